"""`fusion.mode: pairwise` (FuseChat): one fused store and one training per source, with the
pivot (the target) as the other candidate, then the pairwise models merged onto the pivot.
Keys are per pair, so adding a source computes only its own pair (and the merge)."""

from __future__ import annotations

import shutil

import pytest
from fusion_fixtures import fusion_dict, reseed_model, tiny_inputs

from fusellm.config import parse_fusion_config
from fusellm.stages import pipeline
from fusellm.stages.pipeline import Executor


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairwise")
    models, corpus = tiny_inputs(root)
    for name, seed in (("llama-b", 11), ("llama-c", 12)):  # retrained twins of the target
        shutil.copytree(models["llama"], root / name)
        reseed_model(root / name, seed)
        models[name] = str(root / name)
    return root, models, corpus


def _config(root, models, corpus, sources, mode="pairwise"):
    data = fusion_dict(models, str(corpus), root / "work", f"sqlite:///{root / 'ml.db'}")
    data["sources"] = [{"uri": models[n], "name": n} for n in sources]
    data["fusion"]["mode"] = mode
    data["training"].update(max_steps=2, checkpoint_every=2)
    data["tracking"]["register_model"] = False
    return parse_fusion_config(data)


def _labels(plan) -> list[str]:
    return [u.label for u in plan.pending()]


def test_pairwise_trains_a_model_per_pair_and_merges_them_onto_the_pivot(inputs):
    root, models, corpus = inputs
    config = _config(root, models, corpus, ["llama", "neox", "llama-b"])
    planned = _labels(pipeline.plan(config, until="train"))
    # the target's own pair is no pair; the K = 2 trainings and the merge are planned
    assert [x for x in planned if x.startswith("train")] == [
        "train-pair-neox", "train-pair-llama-b", "train-baseline"
    ]  # fmt: skip
    assert planned[-1] == "merge"

    done = pipeline.walk(config, Executor(), until="train")
    assert set(done.pairs) == {"neox", "llama-b"}
    for name, data in done.pairs.items():
        assert list(data.info["sources_stats"]) == [name]  # the pivot and that source only
    assert set(done.trained) == {"pair-neox", "pair-llama-b", "baseline", "fused"}
    fused = done.trained["fused"]
    assert fused.stage == "merge" and (fused.path / "model" / "config.json").is_file()
    assert fused.info["models"] == [done.trained[f"pair-{n}"].key for n in ("neox", "llama-b")]
    assert fused.info["method"] == config.merge.method == "sce"
    keys = {label: a.key for label, a in done.trained.items()}
    assert len(set(keys.values())) == 4

    # A new source: its own extraction, map, fused store, training; then a new merge.
    grown = _config(root, models, corpus, ["llama", "neox", "llama-b", "llama-c"])
    todo = _labels(pipeline.plan(grown, until="train"))
    assert "train-pair-llama-c" in todo and "merge" in todo
    assert not {"train-pair-neox", "train-pair-llama-b", "train-baseline"} & set(todo)
    assert not [x for x in todo if x.startswith("extract-") and "llama-c" not in x]


def test_joint_and_pairwise_share_everything_before_the_fusion(inputs):
    root, models, corpus = inputs
    sources = ["llama", "neox", "llama-b"]
    plans = {
        m: pipeline.plan(_config(root, models, corpus, sources, mode=m))
        for m in ("joint", "pairwise")
    }
    units = {m: {(u.stage, u.key) for u, _ in p.units} for m, p in plans.items()}
    for stage in ("pieces", "extract", "store", "vocab"):
        assert {k for s, k in units["joint"] if s == stage} == {
            k for s, k in units["pairwise"] if s == stage
        }, stage
    trains = {
        m: sorted(u.label for u, _ in p.units if u.stage == "train") for m, p in plans.items()
    }
    assert trains["joint"] == ["train-baseline", "train-fused"]
    assert trains["pairwise"] == ["train-baseline", "train-pair-llama-b", "train-pair-neox"]


def test_pairwise_needs_a_source_besides_the_pivot(inputs):
    root, models, corpus = inputs
    alone = _config(root, models, corpus, ["llama"])
    with pytest.raises(ValueError, match="pairwise needs a source other than the target"):
        pipeline.walk(alone, Executor(), until="align_fuse")


def test_pairwise_across_nodes_is_refused_naming_both_fields(inputs):
    root, models, corpus = inputs
    data = fusion_dict(models, str(corpus), root / "work", "sqlite:///x.db")
    data["fusion"]["mode"] = "pairwise"
    data["training"].update(nodes=2, rendezvous="gpu-0:29400")
    with pytest.raises(
        ValueError, match="pairwise trains each pair on one machine.*training.nodes"
    ):
        parse_fusion_config(data)


def test_a_pivot_mergekit_cannot_merge_stops_before_any_training(inputs):
    """A GPT-NeoX pivot (mergekit's list names attention buffers today's checkpoints lack):
    the fusion stops at the trainings, before the first, naming the way out."""
    from fusellm.stages.base import StageError

    root, models, corpus = inputs
    data = _config(root, models, corpus, ["neox", "llama", "llama-b"]).model_dump(mode="json")
    data["target"] = {"uri": models["neox"]}
    data["workdir"] = str(root / "neox-pivot")
    config = parse_fusion_config(data)
    with pytest.raises(StageError, match=r"merge: mergekit cannot merge GPTNeoXForCausalLM") as err:
        pipeline.walk(config, Executor(), until="train")
    assert "fusion.mode: joint" in str(err.value)
    assert not (root / "neox-pivot" / "train").exists()
    with pytest.raises(StageError, match="GPTNeoXForCausalLM"):  # a part on a GPU worker too
        pipeline.train_part(config, Executor(), "pair-llama")
