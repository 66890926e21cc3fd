"""Stage units without Prefect: folders appear once, complete, and only when an input's content
or a parameter that matters changes (every field is covered by tests/test_stage_keys.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fusion_fixtures import tiny_fusion_config

from fusellm.data.piece_shards import iter_all_pieces
from fusellm.data.store import open_topk
from fusellm.stages.base import Artifact, ModelFiles, StageError, build_stage, is_done, tokenizer_of
from fusellm.stages.extraction import extract_key, extract_unit, store_key, store_unit
from fusellm.stages.fusion import fuse_unit, fused_unit, vocab_unit
from fusellm.stages.prepare import (
    fetch_model,
    pieces_key,
    pieces_unit,
    read_shard,
    resolve_identities,
    shard_count,
)
from fusellm.stages.registry import changed_inputs, write_record
from fusellm.stages.training import train_key, training_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    config = tiny_fusion_config(root)
    ids = resolve_identities(config)
    target = fetch_model("target", config.target, ids["target"], config.workdir)
    sources = [
        fetch_model(n, r, ids[f"source:{n}"], config.workdir)
        for n, r in zip(config.source_names, config.sources)
    ]
    pieces = pieces_unit(config, [target, *sources], ids["corpus"], progress=False).run()
    return config, ids, target, sources, pieces


def test_build_stage_is_atomic_and_runs_once(tmp_path):
    calls = []

    def fails(folder: Path) -> dict:
        (folder / "half.txt").write_text("half")
        (folder / "sub").mkdir()  # killed half-way through atomic writes: their temporaries
        (folder / ".stage.json.x1y2.tmp").write_text("{")
        (folder / "sub" / ".manifest.json.z3.tmp").write_text("[")
        (folder / "sub" / ".shard-00001.safetensors.tmp-4242").write_bytes(b"half a shard")
        (folder / ".map.npz.tmp-4242.npz").write_bytes(b"half a map")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        build_stage(tmp_path, "s", "k1", fails)
    assert not is_done(tmp_path, "s", "k1")
    assert not (tmp_path / "s" / "k1").exists()

    def works(folder: Path) -> dict:
        calls.append(sorted(p.name for p in folder.iterdir()))  # resumes in the same partial
        (folder / "out.txt").write_text("ok")
        return {"n": 1}

    first = build_stage(tmp_path, "s", "k1", works)
    again = build_stage(tmp_path, "s", "k1", works)
    assert calls == [["half.txt", "sub"]]  # the dead writes are gone, the work is kept
    assert not [p for p in (tmp_path / "s" / "k1").rglob("*") if ".tmp" in p.name]
    assert first.path == again.path == tmp_path / "s" / "k1"
    assert again.info == {"n": 1} and (again.path / "out.txt").read_text() == "ok"
    assert not list((tmp_path / "s").glob(".*partial"))


def test_keys_follow_content_and_relevant_parameters(setup):
    config, ids, target, sources, pieces = setup
    base = extract_key(target, pieces, 0, config)
    assert base == extract_key(target, pieces, 0, config)
    assert base != extract_key(target, pieces, 1, config)
    assert base != extract_key(sources[1], pieces, 0, config)
    more_k = config.model_copy(
        update={"extraction": config.extraction.model_copy(update={"top_k": 5})}
    )
    assert base != extract_key(target, pieces, 0, more_k)
    bigger_batch = config.model_copy(
        update={"extraction": config.extraction.model_copy(update={"batch_size": 16})}
    )
    assert base == extract_key(target, pieces, 0, bigger_batch)  # same numbers out
    # Pieces depend on the tokenizers, not on weights: a retrained source keeps them.
    retrained = ModelFiles(
        "neox", sources[1].ref, sources[1].path, "local:other", sources[1].tokenizer
    )
    assert pieces_key(config, [target, sources[0], retrained], ids["corpus"]) == pieces.key
    assert pieces_key(config, [target, *sources], "changed-corpus") != pieces.key
    fused_train = train_key(target, pieces, pieces, config)
    assert fused_train != train_key(target, pieces, pieces, config, baseline=True)
    assert training_config(config, baseline=True).lam == 1.0


def test_pieces_fit_every_tokenizer(setup):
    config, _, target, sources, pieces = setup
    texts = list(iter_all_pieces(pieces.path))
    assert len(texts) == pieces.info["pieces"] > 8  # the documents had to be cut
    limit = config.pieces.block_size - config.pieces.margin
    for model in [target, *sources]:
        tok = tokenizer_of(model)
        assert max(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts) <= limit


def test_sharded_extraction_merges_into_one_store_and_fuses(setup):
    config, _, target, sources, pieces = setup
    n = shard_count(pieces)
    assert n >= 2
    shards = [extract_unit(target, pieces, i, config, progress=False).run() for i in range(n)]
    merged = store_unit(target, shards, pieces, config.workdir).run()
    store = open_topk(merged.path / "store")  # checksums verified on read
    texts = list(iter_all_pieces(pieces.path))
    assert len(store) == len(texts) and len(store.manifest["shards"]) == n
    tok = tokenizer_of(target)
    for i in (0, len(texts) - 1):
        text_ids = tok(texts[i], add_special_tokens=False)["input_ids"]
        expected = [tok.bos_token_id, *text_ids, tok.eos_token_id]  # framed as a document
        assert store[i].input_ids.tolist() == expected
        assert np.isfinite(store[i].ce)
    # Shard files are shared with the per-shard stores, not copied.
    first = merged.path / "store" / "shard-00000.safetensors"
    assert (
        first.stat().st_ino == (shards[0].path / "store" / "shard-00000.safetensors").stat().st_ino
    )

    neox = sources[1]
    neox_shards = [extract_unit(neox, pieces, i, config, progress=False).run() for i in range(n)]
    neox_store = store_unit(neox, neox_shards, pieces, config.workdir).run()
    assert len(open_topk(neox_store.path / "store")) == len(texts)
    vmap = vocab_unit(neox, target, config, progress=False).run()
    assert 0 < vmap.info["exact_rate"] <= 1
    assert json.loads((vmap.path / "stats.json").read_text())["source_vocab"] > 0
    fused_shards = [
        fuse_unit(pieces, i, target, shards[i], [(neox, neox_shards[i], vmap)], config).run()
        for i in range(n)
    ]
    fused = fused_unit(fused_shards, [vmap], pieces, config).run()
    assert (fused.path / "store" / "shard-00000.safetensors").stat().st_ino == (
        fused_shards[0].path / "store" / "shard-00000.safetensors"
    ).stat().st_ino  # joined without copying
    stats = fused.info["sources_stats"]["neox"]
    assert 0 < stats["aligned_coverage"] <= 1 and 0 <= stats["min_ce_win_rate"] <= 1
    assert len(open_topk(fused.path / "store")) == len(texts)


def test_merge_refuses_stores_of_different_models(setup):
    config, _, target, sources, pieces = setup
    a = extract_unit(target, pieces, 0, config, progress=False).run()
    b = extract_unit(sources[1], pieces, 1, config, progress=False).run()
    with pytest.raises(StageError, match="differs"):
        store_unit(target, [a, b], pieces, config.workdir).run()
    assert not is_done(config.workdir, "store", store_key([a, b], pieces))


def test_run_record_tells_what_changed(setup):
    config, ids, *_ = setup
    assert changed_inputs(config, ids) is None  # never fused
    write_record(config, ids, {"scores": {}})
    assert changed_inputs(config, ids) == []
    moved = {**ids, "source:neox": "local:new"}
    assert changed_inputs(config, moved) == ["source:neox"]
    other = config.model_copy(update={"name": "another"})
    assert changed_inputs(other, ids) is None  # another config has its own record


def test_a_shard_reads_only_its_own_pieces(setup, monkeypatch):
    """Extracting or fusing shard i opens pieces shard i and no other pieces file."""
    import builtins
    import io

    config, _, target, sources, pieces = setup
    n = shard_count(pieces)
    assert n >= 3
    opened: list[str] = []
    real_open = builtins.open

    def spy(file, *args, **kwargs):
        if str(file).startswith(str(pieces.path)):
            opened.append(Path(file).name)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)  # what pathlib's read_text goes through
    shard = n - 2
    ex_config = config.model_copy(
        update={"extraction": config.extraction.model_copy(update={"top_k": 3})}
    )
    target_shard = extract_unit(target, pieces, shard, ex_config, progress=False).run()
    neox_shard = extract_unit(sources[1], pieces, shard, ex_config, progress=False).run()
    assert set(opened) - {"pieces.json"} == {f"pieces-{shard:05d}.jsonl"}
    opened.clear()
    vmap = vocab_unit(sources[1], target, config, progress=False).run()
    fuse_unit(
        pieces, shard, target, target_shard, [(sources[1], neox_shard, vmap)], ex_config
    ).run()
    assert set(opened) - {"pieces.json"} == {f"pieces-{shard:05d}.jsonl"}


def test_a_changed_pieces_shard_is_named(setup, tmp_path):
    import shutil

    _, _, _, _, pieces = setup
    copy = tmp_path / "pieces"
    shutil.copytree(pieces.path, copy)
    victim = copy / "pieces-00001.jsonl"
    victim.write_text(victim.read_text()[:-3])
    broken = Artifact("pieces", pieces.key, copy, pieces.info)
    assert read_shard(broken, 0)  # the others stay readable
    with pytest.raises(StageError, match="pieces-00001.jsonl: checksum mismatch"):
        read_shard(broken, 1)


def test_missing_pieces_file_is_named(tmp_path):
    broken = Artifact("pieces", "k", tmp_path, {"pieces": 3, "shards": 1})
    with pytest.raises(StageError, match="pieces.json"):
        read_shard(broken, 0)


def test_fuse_shards_in_worker_processes_match_in_process(setup):
    """The process pool builds the same bytes as this process does, shard for shard."""
    import hashlib
    import shutil

    from fusellm.stages.pipeline import Executor

    config, _, target, sources, pieces = setup
    neox = sources[1]
    n = shard_count(pieces)
    t_shards = [extract_unit(target, pieces, i, config, progress=False).run() for i in range(n)]
    n_shards = [extract_unit(neox, pieces, i, config, progress=False).run() for i in range(n)]
    vmap = vocab_unit(neox, target, config, progress=False).run()
    units = [
        fuse_unit(pieces, i, target, t_shards[i], [(neox, n_shards[i], vmap)], config)
        for i in range(n)
    ]

    def digests(artifacts):
        return [
            hashlib.sha256((a.path / "store" / "shard-00000.safetensors").read_bytes()).hexdigest()
            for a in artifacts
        ]

    here = digests(Executor().run_all(units))
    for unit in units:
        shutil.rmtree(config.workdir / unit.stage / unit.key)
    pooled = Executor()
    assert digests(pooled.run_all(units, workers=2)) == here
    assert pooled.tally.states["fuse"] == ["Completed"] * n


def test_extraction_loads_each_model_once_for_all_its_shards(setup):
    """Every shard of two models through the walk's executor: one load per model, and the same
    bytes as from a model loaded fresh for the unit."""
    import hashlib
    import shutil

    from fusellm.stages.devices import DEVICES
    from fusellm.stages.pipeline import Executor

    config, _, target, sources, pieces = setup
    n = shard_count(pieces)
    models = [target, sources[1]]
    units = [
        extract_unit(m, pieces, i, config, place=p, progress=False)
        for p, m in enumerate(models)
        for i in range(n)
    ]
    for unit in units:
        shutil.rmtree(config.workdir / unit.stage / unit.key, ignore_errors=True)
    DEVICES.release()
    before = DEVICES.loads.copy()
    done = Executor().run_all(units)
    loads = DEVICES.loads - before
    assert loads == {("cpu", target.identity): 1, ("cpu", sources[1].identity): 1}
    assert {a.info["device"] for a in done} == {"cpu"}

    def digest(artifact):
        return hashlib.sha256((artifact.path / "store" / "shard-00000.safetensors").read_bytes())

    kept = digest(done[n - 1]).hexdigest()  # the last target shard, on a model used n times
    shutil.rmtree(done[n - 1].path)
    DEVICES.release()
    assert digest(units[n - 1].run()).hexdigest() == kept
