"""Extraction and evaluation cut into parts (flows/dispatch.py), without servers: which parts
are left to do, a part builds exactly the folders of its units, and parts together build what
one in-process walk builds, byte for byte. The parts as flow runs on several Prefect workers,
one of them killed: tests/test_integration_servers.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from fusion_fixtures import fusion_dict, tiny_inputs
from support import folder_bytes

from fusellm.config import parse_fusion_config
from fusellm.stages import pipeline
from fusellm.stages.pipeline import Executor, UnknownPart
from fusellm_flows import dispatch


def _config(root, models, corpus, workdir, **update):
    data = fusion_dict(models, str(corpus), root / workdir, f"sqlite:///{root / 'ml.db'}")
    data["extraction"].update(shard_size=2, shards_per_part=2)  # 8 texts: several shards
    data["training"].update(max_steps=2, checkpoint_every=2)
    data["evaluation"].update(limit=1)
    data["tracking"]["register_model"] = False
    for section, values in update.items():
        data[section].update(values)
    return parse_fusion_config(data)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fanout")
    models, corpus = tiny_inputs(root)
    return root, models, corpus


def test_parts_cover_every_shard_once_and_build_what_one_walk_builds(inputs):
    root, models, corpus = inputs
    parted = _config(root, models, corpus, "parted")
    pipeline.walk(parted, Executor(), until="prepare")
    parts = dispatch.extraction_parts(parted)
    shards = pipeline.shard_count(pipeline.plan(parted, until="prepare").units[0][1])
    assert shards and shards >= 3
    names = sorted({p["model"] for p in parts})
    assert names == ["llama", "neox"]  # the target is the llama source: extracted once
    for name in names:
        covered = [s for p in parts if p["model"] == name for s in p["shards"]]
        assert sorted(covered) == list(range(shards))  # every shard once
    assert all(1 <= len(p["shards"]) <= 2 for p in parts)

    first = parts[0]
    own, before = Executor(), Executor()
    built = pipeline.extract_part(parted, own, first["model"], first["shards"], before=before)
    assert [a.info["shard"] for a in built] == first["shards"]
    assert all(not a.reused for a in built)
    assert set(own.tally.states) == {"extract"}  # the part's own units, as tasks in a flow
    assert before.tally.states["pieces"] == ["Cached"]  # the stages before walked aside
    assert dispatch.extraction_parts(parted) == parts[1:]  # done parts are not started again
    for part in parts[1:]:
        pipeline.extract_part(parted, Executor(), part["model"], part["shards"])
    assert dispatch.extraction_parts(parted) == []

    ex = Executor()
    done = pipeline.walk(parted, ex, until="extract")
    assert set(ex.tally.states["extract"]) == {"Cached"}  # the parts built every unit

    whole = _config(root, models, corpus, "whole")
    reference = pipeline.walk(whole, Executor(), until="extract")
    assert reference.stores.keys() == done.stores.keys()
    for identity, store in done.stores.items():
        assert store.key == reference.stores[identity].key
        assert folder_bytes(store.path / "store") == folder_bytes(
            reference.stores[identity].path / "store"
        )


def test_trainings_and_evaluations_are_parts_built_as_in_process(inputs):
    root, models, corpus = inputs
    config = _config(root, models, corpus, "evaluated")
    pipeline.walk(config, Executor(), until="align_fuse")
    assert dispatch.training_parts(config) == [{"model": "fused"}, {"model": "baseline"}]
    own, before = Executor(), Executor()
    trained = pipeline.train_part(config, own, "baseline", before=before)
    assert trained.info["lam"] == 1.0 and not trained.reused
    assert own.tally.as_dict() == {"train": ["Completed"]}
    assert set(before.tally.states["fused"]) == {"Cached"}
    assert dispatch.training_parts(config) == [{"model": "fused"}]
    with pytest.raises(UnknownPart, match="no training 'pair-neox' here"):
        pipeline.train_part(config, Executor(), "pair-neox")
    pipeline.train_part(config, Executor(), "fused")
    ex = Executor()
    pipeline.walk(config, ex, until="train")
    assert set(ex.tally.states["train"]) == {"Cached"}

    parts = dispatch.evaluation_parts(config)
    assert sorted((p["model"], p["suite"]) for p in parts) == [
        ("baseline", "local"),
        ("fused", "local"),
        ("llama", "local"),
        ("neox", "local"),
    ]
    own, before = Executor(), Executor()
    scores = {
        p["model"]: pipeline.evaluate_part(config, own, **p, before=before).info for p in parts
    }
    assert own.tally.as_dict() == {"evaluate": ["Completed"] * 4}
    assert set(before.tally.states["train"]) == {"Cached"}
    assert dispatch.evaluation_parts(config) == []
    ex = Executor()
    done = pipeline.walk(config, ex, until="evaluate")
    assert set(ex.tally.states["evaluate"]) == {"Cached"}
    assert {label: s["local"].info for label, s in done.results.items()} == scores


def test_a_part_naming_what_the_fusion_lacks_is_refused(inputs):
    root, models, corpus = inputs
    config = _config(root, models, corpus, "parted")
    with pytest.raises(UnknownPart, match="no model 'gpt2'.*llama, neox"):
        pipeline.extract_part(config, Executor(), "gpt2", [0])
    with pytest.raises(UnknownPart, match=r"shards \[99\] out of range"):
        pipeline.extract_part(config, Executor(), "neox", [0, 99])


# ---------------------------------------------------------------------------------------------
# Waiting for parts: a crashed run starts again, a failed one fails the stage


class _State(SimpleNamespace):
    def is_final(self):
        return self.name != "Running"

    def is_crashed(self):
        return self.name == "Crashed"

    def is_completed(self):
        return self.name == "Completed"


class _Server:
    """Flow runs of one deployment whose ends are scripted per part: each run of a part ends
    with the next state of its script."""

    def __init__(self, script: dict[str, list[str]]):
        self.script = {k: list(v) for k, v in script.items()}
        self.runs: dict[int, SimpleNamespace] = {}
        self.started: list[tuple[str, str]] = []

    def run_deployment(self, name, parameters, timeout):
        assert timeout == 0  # started, not waited for
        model = parameters["model"]
        run = SimpleNamespace(
            id=len(self.runs), name=f"{model}-{len(self.runs)}", state=_State(name="Running")
        )
        self.runs[run.id] = SimpleNamespace(
            id=run.id, name=run.name, state=_State(name=self.script[model].pop(0), message="m")
        )
        self.started.append((name, model))
        return run

    def read_flow_run(self, run_id):
        return self.runs[run_id]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def server(monkeypatch):
    def make(script):
        fake = _Server(script)
        monkeypatch.setattr(dispatch, "run_deployment", fake.run_deployment)
        monkeypatch.setattr("prefect.client.orchestration.get_client", lambda **kw: fake)
        monkeypatch.setattr(dispatch, "get_run_logger", lambda: SimpleNamespace(
            info=lambda *a: None, warning=lambda *a: None
        ))  # fmt: skip
        monkeypatch.setattr(dispatch, "POLL_S", 0.0)
        return fake

    return make


def _tiny_config(tmp_path, attempts=3):
    return SimpleNamespace(
        part_attempts=attempts, model_dump=lambda mode: {"name": "x"}, workdir=tmp_path
    )


def test_a_crashed_part_starts_again_until_it_completes(server, tmp_path):
    fake = server({"a": ["Crashed", "Crashed", "Completed"], "b": ["Completed"]})
    parts = dispatch.run_parts("extract-part/extract-part", _tiny_config(tmp_path), [
        {"model": "a", "shards": [0]}, {"model": "b", "shards": [1]}
    ])  # fmt: skip
    assert [len(p.runs) for p in parts] == [3, 1]
    assert [r.state.name for r in parts[0].runs] == ["Crashed", "Crashed", "Completed"]
    assert sorted(fake.started) == [("extract-part/extract-part", m) for m in "aaab"]


def test_a_part_that_fails_or_keeps_crashing_fails_the_stage_naming_it(server, tmp_path):
    server({"a": ["Crashed", "Crashed"], "b": ["Failed"], "c": ["Completed"]})
    with pytest.raises(dispatch.StageRunFailed) as failed:
        dispatch.run_parts("evaluate-part/evaluate-part", _tiny_config(tmp_path, attempts=2), [
            {"model": "a", "suite": "bbh"}, {"model": "b", "suite": "bbh"},
            {"model": "c", "suite": "bbh"},
        ])  # fmt: skip
    message = str(failed.value)
    assert "2 of 3 parts did not complete" in message
    assert "model a, suite bbh: run a-3 ended Crashed" in message  # its second run, 2 of 2
    assert "model b, suite bbh: run b-1 ended Failed" in message  # not started again


def test_training_across_nodes_starts_every_node_of_one_training_together(inputs):
    root, models, corpus = inputs
    nodes = {"nodes": 3, "rendezvous": "gpu-0.example:29400"}
    config = _config(root, models, corpus, "nodes", training=nodes)
    assert dispatch.training_nodes(config) == [
        [{"label": "fused", "node_rank": r} for r in range(3)],
        [{"label": "baseline", "node_rank": r} for r in range(3)],
    ]
    alone = _config(root, models, corpus, "nodes", training=nodes, evaluation={"baseline": False})
    assert dispatch.training_nodes(alone) == [
        [{"label": "fused", "node_rank": r} for r in range(3)]
    ]
