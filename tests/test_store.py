import numpy as np
import pytest

from fusellm.data.store import (
    StoreError,
    TopkRecord,
    TopkWriter,
    concat_stores,
    decode_logprobs,
    encode_logprobs,
    open_topk,
    write_topk,
)


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


def test_at_most_35_bytes_per_token_at_k10(tmp_path):
    records = random_records(64, length=(400, 600), token_ce=True)
    manifest = write_topk(tmp_path, records, top_k=10, vocab_size=50432, meta={}, shard_size=32)
    assert manifest["bytes_per_token"] <= 35
    on_disk = sum(p.stat().st_size for p in tmp_path.glob("shard-*.safetensors"))
    assert on_disk == manifest["bytes"]


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


def test_uint32_ids_for_large_vocabularies(tmp_path):
    records = random_records(3, vocab=150_000)
    write_topk(tmp_path, records, top_k=10, vocab_size=150_000, meta={})
    back = open_topk(tmp_path)
    assert back.manifest["id_dtype"] == "uint32"
    np.testing.assert_array_equal(back[2].input_ids, records[2].input_ids)


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
