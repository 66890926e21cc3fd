"""Stage functions and content keys, without Prefect: folders appear once, complete, and only
when an input's content or a parameter that matters changes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fusellm import pipeline
from fusellm.config import parse_fusion_config
from fusellm.data.store import open_topk
from fusion_fixtures import build_models, corpus_texts, fusion_dict, write_corpus


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    texts = corpus_texts(8)
    models = {k: str(v) for k, v in build_models(root / "models", texts).items()}
    corpus = write_corpus(root / "corpus", texts)
    data = fusion_dict(models, str(corpus), root / "work", "sqlite:///unused.db")
    data["extraction"]["shard_size"] = 8
    config = parse_fusion_config(data)
    ids = pipeline.resolve_identities(config)
    target = pipeline.fetch_model("target", config.target, ids["target"], config.workdir)
    sources = [
        pipeline.fetch_model(n, r, ids[f"source:{n}"], config.workdir)
        for n, r in zip(config.source_names, config.sources)
    ]
    pieces = pipeline.make_pieces(
        config, [target, *sources], ids["corpus"], config.workdir, progress=False
    )
    return config, ids, target, sources, pieces


def test_build_stage_is_atomic_and_runs_once(tmp_path):
    calls = []

    def fails(folder: Path) -> dict:
        (folder / "half.txt").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        pipeline.build_stage(tmp_path, "s", "k1", fails)
    assert not pipeline.is_done(tmp_path, "s", "k1")
    assert not (tmp_path / "s" / "k1").exists()

    def works(folder: Path) -> dict:
        calls.append(sorted(p.name for p in folder.iterdir()))  # resumes in the same partial
        (folder / "out.txt").write_text("ok")
        return {"n": 1}

    first = pipeline.build_stage(tmp_path, "s", "k1", works)
    again = pipeline.build_stage(tmp_path, "s", "k1", works)
    assert calls == [["half.txt"]]
    assert first.path == again.path == tmp_path / "s" / "k1"
    assert again.info == {"n": 1} and (again.path / "out.txt").read_text() == "ok"
    assert not list((tmp_path / "s").glob(".*partial"))


def test_keys_follow_content_and_relevant_parameters(setup):
    config, ids, target, sources, pieces = setup
    base = pipeline.extract_key(target, pieces, 0, config)
    assert base == pipeline.extract_key(target, pieces, 0, config)
    assert base != pipeline.extract_key(target, pieces, 1, config)
    assert base != pipeline.extract_key(sources[1], pieces, 0, config)
    more_k = config.model_copy(
        update={"extraction": config.extraction.model_copy(update={"top_k": 5})}
    )
    assert base != pipeline.extract_key(target, pieces, 0, more_k)
    bigger_batch = config.model_copy(
        update={"extraction": config.extraction.model_copy(update={"batch_size": 16})}
    )
    assert base == pipeline.extract_key(target, pieces, 0, bigger_batch)  # same numbers out
    # Pieces depend on the tokenizers, not on weights: a retrained source keeps them.
    retrained = pipeline.ModelFiles(
        "neox", sources[1].ref, sources[1].path, "local:other", sources[1].tokenizer
    )
    assert pipeline.pieces_key(config, [target, sources[0], retrained], ids["corpus"]) == pieces.key
    assert pipeline.pieces_key(config, [target, *sources], "changed-corpus") != pieces.key
    fused_train = pipeline.train_key(target, pieces, config)
    assert fused_train != pipeline.train_key(target, pieces, config, baseline=True)
    assert pipeline.training_config(config, baseline=True).lam == 1.0


def test_pieces_fit_every_tokenizer(setup):
    config, _, target, sources, pieces = setup
    texts = pipeline.read_pieces(pieces)
    assert len(texts) == pieces.info["pieces"] > 8  # the documents had to be cut
    limit = config.pieces.block_size - config.pieces.margin
    for model in [target, *sources]:
        tok = pipeline.tokenizer_of(model)
        assert max(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts) <= limit


def test_sharded_extraction_merges_into_one_store_and_fuses(setup):
    config, _, target, sources, pieces = setup
    n = pipeline.shard_count(pieces, config.extraction)
    assert n >= 2
    shards = [
        pipeline.extract_shard(target, pieces, i, config, config.workdir, progress=False)
        for i in range(n)
    ]
    merged = pipeline.merge_stores(shards, pieces, config.workdir)
    store = open_topk(merged.path / "store")  # checksums verified on read
    texts = pipeline.read_pieces(pieces)
    assert len(store) == len(texts) and len(store.manifest["shards"]) == n
    tok = pipeline.tokenizer_of(target)
    for i in (0, len(texts) - 1):
        expected = tok(texts[i], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert store[i].input_ids.tolist() == expected
        assert np.isfinite(store[i].ce)
    # Shard files are shared with the per-shard stores, not copied.
    first = merged.path / "store" / "shard-00000.safetensors"
    assert (
        first.stat().st_ino == (shards[0].path / "store" / "shard-00000.safetensors").stat().st_ino
    )

    neox = sources[1]
    neox_store = pipeline.merge_stores(
        [
            pipeline.extract_shard(neox, pieces, i, config, config.workdir, progress=False)
            for i in range(n)
        ],
        pieces,
        config.workdir,
    )
    vmap = pipeline.vocab_map(neox, target, config.workdir, progress=False)
    assert 0 < vmap.info["exact_rate"] <= 1
    assert json.loads((vmap.path / "stats.json").read_text())["source_vocab"] > 0
    fused = pipeline.fuse_data(
        pieces,
        target,
        merged,
        [(neox, neox_store, vmap)],
        config.fusion,
        config.workdir,
        progress=False,
    )
    stats = fused.info["sources_stats"]["neox"]
    assert 0 < stats["aligned_coverage"] <= 1 and 0 <= stats["min_ce_win_rate"] <= 1
    assert len(open_topk(fused.path / "store")) == len(texts)


def test_merge_refuses_stores_of_different_models(setup):
    config, _, target, sources, pieces = setup
    a = pipeline.extract_shard(target, pieces, 0, config, config.workdir, progress=False)
    b = pipeline.extract_shard(sources[1], pieces, 1, config, config.workdir, progress=False)
    with pytest.raises(pipeline.StageError, match="differs"):
        pipeline.merge_stores([a, b], pieces, config.workdir)
    key = pipeline.stage_key("store", shards=[a.key, b.key], pieces=pieces.key)
    assert not pipeline.is_done(config.workdir, "store", key)


def test_run_record_tells_what_changed(setup):
    config, ids, *_ = setup
    assert pipeline.changed_inputs(config, ids) is None  # never fused
    pipeline.write_record(config, ids, {"scores": {}})
    assert pipeline.changed_inputs(config, ids) == []
    moved = {**ids, "source:neox": "local:new"}
    assert pipeline.changed_inputs(config, moved) == ["source:neox"]
    other = config.model_copy(update={"name": "another"})
    assert pipeline.changed_inputs(other, ids) is None  # another config has its own record


def test_missing_pieces_file_is_named(tmp_path):
    broken = pipeline.Artifact("pieces", "k", tmp_path, {"pieces": 3})
    with pytest.raises(pipeline.StageError, match="pieces.jsonl"):
        pipeline.read_pieces(broken)
