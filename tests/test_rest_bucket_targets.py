"""What the rest bucket sees in a fused store: 1 - sum of a row, for each fusion method.

The loss's rest bucket (`fusellm.method.loss`, `rest_bucket=True`) reads the stored values as
real probabilities. Extraction stores log-softmax values, so that holds for the target's and the
sources' stores; these tests check what each fusion method hands on.
"""

from __future__ import annotations

import numpy as np

from fusellm.data.store import decode_logprobs, encode_logprobs
from fusellm.method.fuse import avg_ce, avg_ce_unnormalised, min_ce


def candidate(rng, rows, k, vocab, mass):
    """A top-k of real probabilities: each row keeps `mass` of a full distribution."""
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(rows)]).astype(np.int64)
    p = rng.dirichlet(np.ones(k), size=rows) * mass
    order = np.argsort(-p, axis=1)
    return np.take_along_axis(ids, order, 1), np.log(np.take_along_axis(p, order, 1)).astype(
        np.float32
    )


def kept(lps):
    return np.exp(lps.astype(np.float64)).sum(-1)


def test_min_ce_keeps_the_winners_probabilities_unrenormalised():
    rng = np.random.default_rng(0)
    cands = [candidate(rng, 7, 5, 50, m) for m in (0.3, 0.6, 0.45)]
    _, lps, winner = min_ce(cands, np.array([2.0, 1.0, 3.0]))
    assert (winner == 1).all()
    np.testing.assert_allclose(kept(lps), 0.6, rtol=1e-5)  # rest = 0.4: the source's own tail


def test_avg_ce_unnormalised_rest_holds_the_weighted_tails():
    """Mixed as stored: with no truncation (every id fits in k) the rest is exactly the
    weighted sum of the candidates' dropped mass; truncation only adds to it."""
    rng = np.random.default_rng(1)
    a, b = candidate(rng, 6, 3, 40, 0.3), candidate(rng, 6, 3, 40, 0.7)
    ce = np.array([1.0, 1.5])
    _, lps, weights = avg_ce_unnormalised([a, b], ce, k=6)
    expected = 1 - (weights[0] * 0.3 + weights[1] * 0.7)
    np.testing.assert_allclose(1 - kept(lps), expected, rtol=1e-5)
    _, lps3, _ = avg_ce_unnormalised([a, b], ce, k=3)
    assert (1 - kept(lps3) >= expected - 1e-6).all()


def test_avg_ce_renormalises_each_candidate_so_the_rest_is_only_its_own_truncation():
    """As published, every candidate's top-k is renormalised before mixing: the sources'
    tails are gone. A row whose candidates fit in k ids sums to 1 (rest 0); otherwise the rest
    is the mixture's mass beyond its k largest entries, not what the models dropped."""
    rng = np.random.default_rng(2)
    a, b = candidate(rng, 6, 3, 40, 0.3), candidate(rng, 6, 3, 40, 0.7)
    ce = np.array([1.0, 1.5])
    _, lps, _ = avg_ce([a, b], ce, k=6)
    np.testing.assert_allclose(kept(lps), 1.0, rtol=1e-5)
    _, lps3, weights = avg_ce([a, b], ce, k=3)
    rest = 1 - kept(lps3)
    assert (rest > 0).all() and (rest < weights.max(axis=0) + 1e-6).all()


def test_stored_codes_keep_the_rest_within_companding_error():
    rng = np.random.default_rng(3)
    _, lps = candidate(rng, 200, 10, 100, 0.35)
    back = decode_logprobs(encode_logprobs(lps))
    assert np.abs(kept(back) - kept(lps)).max() < 0.01
