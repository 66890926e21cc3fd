"""A damaged artifact is found, named, and recomputed on the next run (fusellm.stages.base).

Small files (pieces, vocabulary maps, tables, tiny stores) are hashed in each stage record and
checked when a folder is reused; large ones are sized there and verified by their readers, whose
error moves the damaged folder aside so that the next run recomputes it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from fusion_fixtures import tiny_fusion_config

from fusellm.stages import base
from fusellm.stages.pipeline import Executor, walk


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    root = tmp_path_factory.mktemp("corruption")
    config = tiny_fusion_config(root)
    walk(config, Executor(), until="align_fuse")
    return config


def _rerun(config) -> dict[str, list[str]]:
    ex = Executor()
    walk(config, ex, until="align_fuse")
    return ex.tally.as_dict()


def _digest(folder: Path) -> str:
    """The folder's data (records with timings, *.json, left out)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix != ".json")
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


def _one(config, stage: str) -> Path:
    return min((Path(config.workdir) / stage).glob("[!.]*"))


def _largest_data_file(folder: Path) -> Path:
    """The largest of the files `_digest` covers: a shard, a vocabulary map, a pieces file.

    Never a record or a store manifest (*.json): their sizes vary with the digits of their
    timings, so "the largest file" would not always be the same one, and a damaged manifest
    is not shared with the stages downstream as a shard is.
    """
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix != ".json"]
    return max(files, key=lambda p: (p.stat().st_size, p.name))


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("stage", "damage", "rebuilt_stages"),
    [
        ("vocab", "flip", {"vocab"}),
        ("pieces", "truncate", {"pieces"}),
        ("extract", "delete", {"extract"}),  # the merged store keeps its own link to the file
        ("fuse", "flip", {"fuse", "fused"}),  # the fused store is a hard link to the same bytes
    ],
)
def test_a_damaged_folder_is_rebuilt_on_reuse(fused, stage, damage, rebuilt_stages, caplog):
    folder = _one(fused, stage)
    before = _digest(folder)
    victim = _largest_data_file(folder)
    if "fused" in rebuilt_stages:  # the damage must reach the fused store through the link
        assert victim.stat().st_nlink > 1
    if damage == "flip":
        _flip(victim)
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-5])
    else:
        victim.unlink()
    states = _rerun(fused)
    assert str(victim) in caplog.text  # the warning names the file
    assert _digest(folder) == before  # rebuilt, the same bytes
    steps = ("resolve-sources", "fetch-model")  # not stage folders: they run every time
    rebuilt = {s: [x for x in v if x == "Completed"] for s, v in states.items() if s not in steps}
    assert {s for s, v in rebuilt.items() if v} == rebuilt_stages
    assert all(len(v) <= 1 for v in rebuilt.values())  # that folder alone in each stage
    assert not list(folder.parent.glob("*.partial"))


def test_a_damaged_large_file_is_caught_by_its_reader_and_set_aside(fused, monkeypatch):
    """A flipped byte the stage record does not hash: the reader's checksum finds it, the
    folder is moved aside with a note in the error, and the next run recomputes it."""
    import json
    import shutil

    shard = _one(fused, "extract")
    before = _digest(shard)
    victim = next(shard.glob("store/shard-*.safetensors"))
    record = json.loads((shard / "stage.json").read_text())
    del record["files"][str(victim.relative_to(shard))]["sha256"]  # as for a shard over 1 MB
    (shard / "stage.json").write_text(json.dumps(record))
    monkeypatch.setattr(base, "HASHED_UP_TO", -1)
    _flip(victim)
    inode = victim.stat().st_ino
    for stage in ("fuse", "fused", "store"):  # so that the shard is read again
        shutil.rmtree(Path(fused.workdir) / stage)
    with pytest.raises(Exception) as err:
        _rerun(fused)
    text = str(err.value) + " ".join(getattr(err.value, "__notes__", []))
    assert str(victim) in text and "moved aside" in text
    assert not shard.exists() and shard.with_name(f".{shard.name}.corrupt").is_dir()
    linked = [  # the merged store built in that run links the damaged shard: set aside too
        f
        for record in Path(fused.workdir).glob("*/*/stage.json")
        if not record.parent.name.startswith(".")
        for f in record.parent.rglob("*.safetensors")
        if f.stat().st_ino == inode
    ]
    assert linked == [] and "store" in text
    states = _rerun(fused)
    assert _digest(shard) == before
    assert "Completed" in states["extract"]


def test_an_unreadable_stage_record_is_rebuilt(fused):
    folder = _one(fused, "vocab")
    before = _digest(folder)
    record = folder / "stage.json"
    record.write_text(record.read_text()[:-7])
    states = _rerun(fused)
    assert "Completed" in states["vocab"] and _digest(folder) == before
    assert folder.with_name(f".{folder.name}.corrupt").is_dir()
