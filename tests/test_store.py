import hashlib
import json

import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from fusellm.data import store as topk_store
from fusellm.data.store import (
    CorruptStoreError,
    StoreError,
    TopkRecord,
    TopkWriter,
    concat_stores,
    decode_logprobs,
    encode_logprobs,
    open_topk,
    write_topk,
)
from fusellm.testing.synthetic import model_shaped_records


def random_records(n, vocab=32000, k=10, length=(20, 60), seed=0, token_ce=True):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        T = int(rng.integers(*length))
        logits = rng.normal(size=(T, 512)) * rng.uniform(0.5, 6)
        ids_full = rng.choice(vocab, size=512, replace=False)
        lp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        order = np.argsort(-lp, axis=-1)[:, :k]
        out.append(
            TopkRecord(
                input_ids=rng.integers(0, vocab, T),
                ids=ids_full[order],
                logprobs=np.take_along_axis(lp, order, -1).astype(np.float32),
                ce=float(rng.uniform(1, 5)),
                token_ce=rng.uniform(0, 8, T).astype(np.float32) if token_ce else None,
            )
        )
    return out


def assert_exact(back, original):
    """Ids, codes and the float16 bits of the per-token CE read back exactly."""
    codes = encode_logprobs(original.logprobs)
    np.testing.assert_array_equal(back.input_ids, original.input_ids)
    np.testing.assert_array_equal(back.ids, np.where(codes == 0, -1, original.ids))
    np.testing.assert_array_equal(encode_logprobs(back.logprobs), codes)
    np.testing.assert_array_equal(back.ce, np.float32(original.ce))  # NaN == NaN here
    if original.token_ce is None:
        assert back.token_ce is None
    else:
        bits = original.token_ce.astype(np.float16).view(np.uint16)
        np.testing.assert_array_equal(back.token_ce.astype(np.float16).view(np.uint16), bits)


def test_round_trip_ids_exact_probabilities_within_001(tmp_path):
    records = random_records(30)
    manifest = write_topk(tmp_path, records, top_k=10, vocab_size=32000, meta={"m": 1}, shard_size=8)
    store = open_topk(tmp_path)
    assert len(store) == 30 == manifest["count"]
    assert len(manifest["shards"]) == 4
    for original, back in zip(records, store):
        np.testing.assert_array_equal(back.input_ids, original.input_ids)
        kept = back.ids >= 0
        np.testing.assert_array_equal(back.ids[kept], original.ids[kept])
        # slots read back as empty only when their probability was negligible
        assert np.all(np.exp(original.logprobs[~kept]) < 1e-8)
        err = np.abs(np.exp(back.logprobs) - np.exp(original.logprobs)).max()
        assert err < 0.01
        assert back.ce == pytest.approx(original.ce, rel=1e-6)
        np.testing.assert_allclose(back.token_ce, original.token_ce, rtol=1e-3)


@pytest.mark.parametrize("vocab", [49_152, 262_144])
def test_at_most_25_bytes_per_token_at_k10_on_realistic_data(tmp_path, vocab):
    records, _ = model_shaped_records(64, vocab, seed=vocab)
    manifest = write_topk(tmp_path, records, top_k=10, vocab_size=vocab, meta={}, shard_size=64)
    assert manifest["bytes_per_token"] <= 25  # with per-token CE; 32-bit ids were ~56
    on_disk = sum(p.stat().st_size for p in tmp_path.glob("shard-*.safetensors"))
    assert on_disk == manifest["bytes"]
    for original, back in zip(records, open_topk(tmp_path)):
        assert_exact(back, original)


def test_codec_error_bound_over_the_whole_range():
    p = np.linspace(1e-6, 1.0, 200001)
    back = np.exp(decode_logprobs(encode_logprobs(np.log(p))))
    assert np.abs(back - p).max() < 0.006
    assert decode_logprobs(encode_logprobs(np.log(np.array([1e-12]))))[0] == -np.inf


def test_empty_slots_round_trip(tmp_path):
    ids = np.array([[5, -1, -1], [7, 8, -1]])
    lp = np.array([[0.0, -np.inf, -np.inf], [-0.1, -2.4, -np.inf]], dtype=np.float32)
    write_topk(tmp_path, [TopkRecord(np.array([1, 2]), ids, lp, 1.0)], top_k=3, vocab_size=10, meta={})
    back = open_topk(tmp_path)[0]
    np.testing.assert_array_equal(back.ids, ids)
    assert back.token_ce is None
    assert np.isneginf(back.logprobs[ids < 0]).all()


def test_ids_beyond_16_bits_and_edge_cases_round_trip_exactly(tmp_path):
    vocab = 262_144
    records = random_records(3, vocab=vocab)
    edge = records[0]
    edge.ids[0] = [vocab - 1, 0, 1, 2, 3, 65_535, 65_536, 1 << 17, vocab - 2, 7]
    edge.ids[1, :3] = edge.input_ids[2]  # the next token, repeated
    edge.input_ids[:3] = [vocab - 1, 0, 65_536]
    edge.ids[2, 5:] = -1  # empty slots
    edge.logprobs[2, 5:] = -np.inf
    edge.token_ce[:4] = [0.0, np.inf, 6.0e4, 1e-7]
    one = TopkRecord(np.array([5]), np.full((1, 10), 4), np.zeros((1, 10), np.float32), 0.5,
                     np.array([np.nan], np.float32))
    empty = TopkRecord(np.zeros(0, np.int64), np.zeros((0, 10), np.int64),
                       np.zeros((0, 10), np.float32), float("nan"), np.zeros(0, np.float32))
    records += [one, empty]
    write_topk(tmp_path, records, top_k=10, vocab_size=vocab, meta={}, shard_size=3)
    for original, back in zip(records, open_topk(tmp_path)):
        assert_exact(back, original)


def test_store_without_token_ce_and_empty_store(tmp_path):
    records, _ = model_shaped_records(5, 151_936, length=(20, 40))
    for r in records:
        r.token_ce = None
    write_topk(tmp_path / "a", records, top_k=10, vocab_size=151_936, meta={})
    for original, back in zip(records, open_topk(tmp_path / "a")):
        assert_exact(back, original)
    manifest = write_topk(tmp_path / "b", [], top_k=10, vocab_size=151_936, meta={})
    assert manifest["count"] == 0 and len(open_topk(tmp_path / "b")) == 0


def test_format_1_stores_are_still_read_and_unknown_versions_refused(tmp_path):
    records = random_records(5)
    write_topk(tmp_path, records, top_k=10, vocab_size=32000, meta={"m": 1}, shard_size=3)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for entry, part in zip(manifest["shards"], (records[:3], records[3:])):  # as version 1 wrote
        data = save_safetensors(topk_store._shard_arrays(part, 10, 32000))
        (tmp_path / entry["file"]).write_bytes(data)
        entry["bytes"] = len(data)
        entry["sha256"] = hashlib.sha256(data).hexdigest()
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "version": 1}))
    for original, back in zip(records, open_topk(tmp_path)):
        assert_exact(back, original)
    with pytest.raises(StoreError, match="version=1"):  # never extended in the new format
        TopkWriter(tmp_path, top_k=10, vocab_size=32000, meta={"m": 1}, shard_size=3)
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(StoreError, match="version 99.*extract it again"):
        open_topk(tmp_path)


def test_corrupted_shard_is_detected_by_checksum(tmp_path):
    write_topk(tmp_path, random_records(10), top_k=10, vocab_size=32000, meta={}, shard_size=5)
    shard = tmp_path / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    store = open_topk(tmp_path)
    store[0]  # the intact shard still reads
    with pytest.raises(StoreError, match="shard-00001.safetensors.*sha256"):
        store[7]


def test_damaged_streams_are_named_even_without_the_checksum(tmp_path):
    write_topk(tmp_path, random_records(4), top_k=10, vocab_size=32000, meta={})
    shard = tmp_path / "shard-00000.safetensors"
    data = shard.read_bytes()
    tensors = load_safetensors(data)
    index = topk_store._header_metadata(data)["streams"].split(",")
    cases = {
        "missing": ",".join(index[:-1] + ["renamed:" + index[-1].split(":")[1]]),
        "add up": ",".join(index[:-1] + [index[-1].split(":")[0] + ":1"]),
    }
    for match, damaged in cases.items():
        shard.write_bytes(save_safetensors(tensors, metadata={"streams": damaged}))
        manifest = json.loads((tmp_path / "manifest.json").read_text())
        manifest["shards"][0]["bytes"] = shard.stat().st_size
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(CorruptStoreError, match=f"shard-00000.safetensors.*{match}"):
            open_topk(tmp_path, verify=False)[0]


def test_truncated_shard_is_named(tmp_path):
    write_topk(tmp_path, random_records(4), top_k=10, vocab_size=32000, meta={})
    shard = tmp_path / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(StoreError, match="shard-00000.safetensors.*truncated"):
        open_topk(tmp_path)[0]


def test_incomplete_or_missing_store(tmp_path):
    with pytest.raises(StoreError, match="manifest.json is missing"):
        open_topk(tmp_path)
    writer = TopkWriter(tmp_path, top_k=10, vocab_size=32000, meta={})
    writer.write_shard(random_records(2))
    with pytest.raises(StoreError, match="incomplete"):
        open_topk(tmp_path)


def test_writer_resumes_after_valid_prefix_and_refuses_other_meta(tmp_path):
    records = random_records(6)
    first = TopkWriter(tmp_path, top_k=10, vocab_size=32000, meta={"model": "a"}, shard_size=2)
    first.write_shard(records[:2])
    first.write_shard(records[2:4])
    # a crash left a stray temporary file and no finish()
    (tmp_path / ".shard-00002.safetensors.tmp-1").write_bytes(b"partial")
    again = TopkWriter(tmp_path, top_k=10, vocab_size=32000, meta={"model": "a"}, shard_size=2)
    assert again.done_shards == 2
    again.write_shard(records[4:])
    again.finish()
    store = open_topk(tmp_path)
    assert len(store) == 6
    np.testing.assert_array_equal(store[5].input_ids, records[5].input_ids)
    with pytest.raises(StoreError, match="meta"):
        TopkWriter(tmp_path, top_k=10, vocab_size=32000, meta={"model": "b"}, shard_size=2)


def test_bad_record_shapes_and_ids(tmp_path):
    rec = random_records(1)[0]
    bad = TopkRecord(rec.input_ids, rec.ids[:, :5], rec.logprobs[:, :5], 1.0)
    with pytest.raises(StoreError, match="shape"):
        write_topk(tmp_path / "a", [bad], top_k=10, vocab_size=32000, meta={})
    with pytest.raises(StoreError, match="outside"):
        write_topk(tmp_path / "b", [rec], top_k=10, vocab_size=100, meta={})
    for folder in ("a", "b"):  # nothing half-written
        assert not (tmp_path / folder / "manifest.json").exists()
        assert not list((tmp_path / folder).glob("*shard*"))


def test_concat_stores_joins_parts_in_order(tmp_path):
    records = random_records(7)
    write_topk(tmp_path / "a", records[:4], top_k=10, vocab_size=32000, meta={"model_fingerprint": "m"}, shard_size=3)
    write_topk(tmp_path / "b", records[4:], top_k=10, vocab_size=32000, meta={"model_fingerprint": "m"})
    manifest = concat_stores([tmp_path / "a", tmp_path / "b"], tmp_path / "all", meta={"texts_sha256": "x"})
    store = open_topk(tmp_path / "all")
    assert len(store) == 7 == manifest["count"] and len(manifest["shards"]) == 3
    assert store.meta == {"model_fingerprint": "m", "texts_sha256": "x"}
    for original, back in zip(records, store):
        np.testing.assert_array_equal(back.input_ids, original.input_ids)
    write_topk(tmp_path / "c", records[:1], top_k=10, vocab_size=32000, meta={"model_fingerprint": "other"})
    with pytest.raises(StoreError, match="another model"):
        concat_stores([tmp_path / "a", tmp_path / "c"], tmp_path / "bad")
