"""The merge stage: mergekit's merges of pairwise fused models onto the pivot (docs/merging.md).

The pivot is a tiny Llama; the "pairwise" models are the pivot with its weights perturbed by
fixed seeds, at scales that differ by model and by tensor. The SCE check recomputes select /
calculate / erase in float64 numpy from the definition (as mergekit 0.1.5's `sce.py` spells
it) and compares every tensor of our merge with it; variants of the definition that each
leave one rule out must not match, so the check would see such a difference.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fusellm.config import FusionConfigError, parse_fusion_config
from fusellm.method.merge import MergeError, merge_models
from fusellm.stages.base import Artifact, ModelFiles
from fusellm.stages.merging import merge_key, merge_unit
from fusellm.testing.tiny import save_tiny, tiny_model, train_tokenizer

pytestmark = pytest.mark.timeout(300)

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "knowledge fusion of large language models",
    "a pivot model and its pairwise fused models",
] * 8
SIZES = {"hidden": 16, "layers": 2, "heads": 2}
SCALES = (0.01, 0.02, 0.04)  # each pairwise model's perturbation, times a factor per tensor
FROZEN_ROWS = 40  # embedding rows no model changes: their variance across the models is 0
ONE_MODEL_ROWS = slice(40, 60)  # rows model 0 leaves alone: its task vector is exactly 0 there
SMALL = 1e-4  # the norms: task vectors so small that SCE's weights fall back to 1/K


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _perturbed(pivot: Path, out: Path, index: int) -> Path:
    """The pivot with every tensor moved by seeded noise: a stand-in for a pairwise model."""
    generator = torch.Generator().manual_seed(1000 + index)
    tensors = {}
    for t, (name, value) in enumerate(sorted(_weights(pivot).items())):
        factor = 0.5 + 1.5 * ((t * 7 + index * 3) % 5) / 4  # 0.5 .. 2, differs by tensor
        scale = SMALL if name.endswith("norm.weight") else SCALES[index] * factor
        noise = torch.randn(value.shape, generator=generator) * scale
        if name == "model.embed_tokens.weight":
            noise[:FROZEN_ROWS] = 0
            if index == 0:
                noise[ONE_MODEL_ROWS] = 0
        tensors[name] = (value + noise).contiguous()
    shutil.copytree(pivot, out, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The pivot, three pairwise models, and models that must not merge onto the pivot."""
    root = tmp_path_factory.mktemp("merge")
    tokenizer = train_tokenizer(TEXTS, "spm", 300)
    pivot = save_tiny(tiny_model("llama", tokenizer, seed=0, **SIZES), tokenizer, root / "pivot")
    models = [_perturbed(pivot, root / f"pairwise-{i}", i) for i in range(3)]
    wider = {**SIZES, "hidden": 32}
    odd = {
        "wider": save_tiny(tiny_model("llama", tokenizer, **wider), tokenizer, root / "wider"),
        "shallower": save_tiny(
            tiny_model("llama", tokenizer, **{**SIZES, "layers": 1}), tokenizer, root / "shallow"
        ),
        "neox": save_tiny(tiny_model("gpt_neox", tokenizer, **SIZES), tokenizer, root / "neox"),
    }
    return {"root": root, "pivot": pivot, "models": models, "odd": odd}


# ---------------------------------------------------------------------------------------------
# (a) SCE against float64


def sce_reference(
    base: np.ndarray,
    tuned: list[np.ndarray],
    select_topk: float,
    *,
    erase: bool = True,
    calculate: bool = True,
    select_among_all: bool = False,
    weighted_sign: bool = False,
) -> tuple[np.ndarray, dict]:
    """SCE on one tensor, in float64, from its definition (mergekit's `sce_merge`).

    Task vectors tau_i = M_i - base (K of them).
    Select: with select_topk < 1, keep the k elements of largest variance across the K
      (population variance), k = int(select_topk * the number of elements whose variance is
      not 0); the others are 0 in every task vector. With select_topk = 1 all are kept.
    Erase: an element of tau_i survives when its sign equals the sign of the sum of the K
      selected task vectors at that element (unweighted; a sum of 0 counts as +). An element
      that is 0 never survives.
    Calculate: model i's weight is the mean of its selected tau_i squared, divided by the sum
      of the K such means; when that sum is below 1e-6 every weight is 1/K.
    Merge: base + sum_i w_i keep_i tau_i / max(sum_i w_i keep_i, 1e-6), per element.

    The keyword flags turn one rule off or change it, for the check that those variants differ.
    """
    tvs = np.stack([t.astype(np.float64) - base.astype(np.float64) for t in tuned])
    count = tvs.shape[0]
    info = {"k": None, "uniform": False, "erased": 0}
    if select_topk < 1:
        var = tvs.var(axis=0).ravel()
        population = var.size if select_among_all else int(np.count_nonzero(var))
        k = int(population * select_topk)
        order = np.argsort(-var, kind="stable")
        if 0 < k < var.size:  # an unambiguous selection: no tie at the boundary, even in float32
            assert var[order[k - 1]] > var[order[k]] * (1 + 1e-4), "a tie at the top-k boundary"
        mask = np.zeros(var.size)
        mask[order[:k]] = 1
        tvs = tvs * mask.reshape(base.shape)
        info["k"] = k
    mean_squares = (tvs**2).reshape(count, -1).mean(axis=1)
    total = mean_squares.sum()
    assert not 1e-7 < total < 1e-5, "too near the 1e-6 threshold for float32 to agree"
    if total < 1e-6 or not calculate:
        weights = np.full(count, 1.0 / count)
        info["uniform"] = True
    else:
        weights = mean_squares / total
    weights = weights.reshape((count,) + (1,) * base.ndim)
    if erase:
        summed = (weights * tvs).sum(axis=0) if weighted_sign else tvs.sum(axis=0)
        majority = np.where(summed >= 0, 1.0, -1.0)
        keep = (np.sign(tvs) == majority).astype(np.float64)
        info["erased"] = int(((tvs != 0) & (keep == 0)).sum())
    else:
        keep = (tvs != 0).astype(np.float64)
    kept = weights * keep
    merged = (tvs * kept).sum(axis=0) / np.maximum(kept.sum(axis=0), 1e-6)
    return base.astype(np.float64) + merged, info


def _reference_model(tiny, select_topk: float, **variant) -> tuple[dict, dict]:
    base = {n: t.numpy() for n, t in _weights(tiny["pivot"]).items()}
    tuned = [{n: t.numpy() for n, t in _weights(m).items()} for m in tiny["models"]]
    out, infos = {}, {}
    for name, value in base.items():
        out[name], infos[name] = sce_reference(
            value, [t[name] for t in tuned], select_topk, **variant
        )
    return out, infos


@pytest.mark.parametrize("select_topk", [0.1, 0.5, 1.0])
def test_sce_equals_its_definition_in_float64(tiny, tmp_path, select_topk):
    out = tmp_path / "sce"
    record = merge_models(
        tiny["pivot"], tiny["models"], out, method="sce", parameters={"select_topk": select_topk}
    )
    assert record["parameters"] == {"select_topk": select_topk}
    merged = _weights(out)
    reference, infos = _reference_model(tiny, select_topk)
    assert set(merged) == set(reference)
    for name, expected in reference.items():
        assert merged[name].dtype == torch.float32, name
        np.testing.assert_allclose(merged[name].numpy(), expected, rtol=0, atol=1e-6, err_msg=name)
    # the fixture exercises every rule: erased elements, both weight regimes, and a selection
    # that counts only the elements whose variance is not 0
    assert sum(i["erased"] for i in infos.values()) > 0
    assert any(i["uniform"] for i in infos.values())
    assert not all(i["uniform"] for i in infos.values())
    if select_topk < 1:
        embed = merged["model.embed_tokens.weight"]
        assert infos["model.embed_tokens.weight"]["k"] < int(embed.numel() * select_topk)


@pytest.mark.parametrize(
    "variant",
    [
        {"erase": False},
        {"calculate": False},
        {"select_among_all": True},
        {"weighted_sign": True},
    ],
    ids=lambda v: next(iter(v)),
)
def test_the_sce_check_sees_a_rule_left_out(tiny, tmp_path, variant):
    out = tmp_path / "sce"
    merge_models(tiny["pivot"], tiny["models"], out, method="sce", parameters={})
    merged = _weights(out)
    other, _ = _reference_model(tiny, 0.1, **variant)
    worst = max(np.abs(merged[n].numpy() - other[n]).max() for n in other)
    assert worst > 1e-4, (variant, worst)


# ---------------------------------------------------------------------------------------------
# (b) the other methods


def _mean(tiny) -> dict[str, np.ndarray]:
    tuned = [_weights(m) for m in tiny["models"]]
    return {n: np.mean([t[n].double().numpy() for t in tuned], axis=0) for n in tuned[0]}


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic", "linear"])
def test_each_method_gives_a_model_that_loads_and_moved(tiny, tmp_path, method):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / method
    merge_models(tiny["pivot"], tiny["models"], out, method=method, parameters={})
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(TEXTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    assert (out / "tokenizer.json").read_bytes() == (tiny["pivot"] / "tokenizer.json").read_bytes()
    pivot, merged = _weights(tiny["pivot"]), _weights(out)
    assert max((merged[n] - pivot[n]).abs().max().item() for n in pivot) > 1e-3
    record = json.loads((out / "merge.json").read_text())
    assert record["method"] == method and record["models"] == [str(m) for m in tiny["models"]]
    assert (out / "mergekit_config.yml").is_file()


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_equal_weights_give_the_mean_of_the_models(tiny, tmp_path, method):
    """linear averages the models; task arithmetic with weights 1/K adds the mean task vector."""
    out = tmp_path / method
    merge_models(tiny["pivot"], tiny["models"], out, method=method)
    merged = _weights(out)
    for name, mean in _mean(tiny).items():
        np.testing.assert_allclose(merged[name].numpy(), mean, rtol=0, atol=1e-6, err_msg=name)


def test_a_stale_mergekit_list_is_named_before_the_merge(tiny, tmp_path):
    """mergekit's GPT-NeoX list names attention buffers that today's checkpoints do not hold:
    the error names the architecture, a tensor and the folder, and nothing is written."""
    pivot = tiny["odd"]["neox"]
    assert not any(n.endswith("attention.bias") for n in _weights(pivot))
    models = [_perturbed(pivot, tmp_path / f"neox-{i}", i) for i in range(2)]
    out = tmp_path / "merged"
    with pytest.raises(MergeError, match=r"cannot merge GPTNeoXForCausalLM checkpoints") as err:
        merge_models(pivot, models, out, method="task_arithmetic")
    assert "gpt_neox.layers.0.attention.bias" in str(err.value) and str(pivot) in str(err.value)
    assert "fusion.mode: joint" in str(err.value)
    assert not out.exists() and list(tmp_path.glob(".merged.merging-*")) == []


def test_linear_weights_are_per_model(tiny, tmp_path):
    out = tmp_path / "linear"
    merge_models(
        tiny["pivot"], tiny["models"], out, method="linear", parameters={"weight": [1, 0, 3]}
    )
    merged, tuned = _weights(out), [_weights(m) for m in tiny["models"]]
    for name in merged:
        expected = (tuned[0][name].double() + 3 * tuned[2][name].double()) / 4
        np.testing.assert_allclose(merged[name].numpy(), expected.numpy(), rtol=0, atol=1e-6)


def test_dare_ties_is_reproducible_by_its_seed_and_leaves_the_caller_random_state(tiny, tmp_path):
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    numpy_state = np.random.get_state()[1].copy()
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        merge_models(
            tiny["pivot"], tiny["models"], tmp_path / name, method="dare_ties",
            parameters={"seed": seed},
        )  # fmt: skip
        runs[name] = _weights(tmp_path / name)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert (np.random.get_state()[1] == numpy_state).all()
    assert all(torch.equal(runs["a"][n], runs["b"][n]) for n in runs["a"])
    assert any(not torch.equal(runs["a"][n], runs["c"][n]) for n in runs["a"])


def test_a_merge_replaces_its_output_folder_whole(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from before")
    merge_models(tiny["pivot"], tiny["models"][:2], out, method="linear")
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


# ---------------------------------------------------------------------------------------------
# (c) the stage


def _fusion(tiny, workdir: Path, **merge) -> object:
    return parse_fusion_config(
        {
            "target": {"uri": str(tiny["pivot"])},
            "sources": [{"uri": str(tiny["pivot"]), "name": "pivot"}],
            "corpus": {"uri": str(tiny["root"] / "corpus.txt")},
            "merge": merge,
            "workdir": str(workdir),
        }
    )


def _stage_inputs(tiny, workdir: Path):
    from fusellm.io.sources import ModelRef

    pivot = ModelFiles("pivot", ModelRef(uri=str(tiny["pivot"])), tiny["pivot"], "pivot-id", "tok")
    models = []
    for i, folder in enumerate(tiny["models"]):
        path = workdir / "train" / f"key-{i}"
        shutil.copytree(folder, path / "model")
        models.append(Artifact("train", f"key-{i}", path))
    return pivot, models


def test_the_stage_builds_once_and_reuses_its_folder(tiny, tmp_path):
    config = _fusion(tiny, tmp_path / "work")
    pivot, models = _stage_inputs(tiny, tmp_path / "work")
    unit = merge_unit(pivot, models, config)
    assert (unit.stage, unit.label, unit.inputs) == ("merge", "merge", ("key-0", "key-1", "key-2"))
    assert not unit.peek().done
    first = unit.run()
    assert not first.reused and first.path == tmp_path / "work" / "merge" / unit.key
    assert first.info["method"] == "sce" and first.info["parameters"] == {"select_topk": 0.1}
    assert first.info["models"] == ["key-0", "key-1", "key-2"]
    built = (first.path / "model" / "model.safetensors").stat().st_mtime_ns
    second = merge_unit(pivot, models, config).run()
    assert second.reused and second.path == first.path
    assert (second.path / "model" / "model.safetensors").stat().st_mtime_ns == built


def test_the_key_follows_the_merge_and_nothing_else(tiny, tmp_path):
    pivot, models = _stage_inputs(tiny, tmp_path / "work")
    merge = _fusion(tiny, tmp_path).merge
    key = merge_key(pivot, models, merge)

    def with_(**changes):
        return merge_key(pivot, models, merge.model_copy(update=changes))

    changed = {
        "method": with_(method="ties"),
        "select_topk": with_(select_topk=0.2),
        "dtype": with_(dtype="bfloat16"),
        "models": merge_key(pivot, models[:2], merge),
        "order": merge_key(pivot, models[::-1], merge),
        "pivot": merge_key(dataclasses.replace(pivot, identity="other"), models, merge),
    }
    for what, other in changed.items():
        assert other != key, what
    assert len({key, *changed.values()}) == len(changed) + 1
    ties = _fusion(tiny, tmp_path, method="ties").merge
    # the same merge: defaults spelled out, and everything else of the config
    assert with_(select_topk=0.1) == key
    spelled = _fusion(tiny, tmp_path, method="ties", weight=1 / 3, density=0.5, normalize=True)
    assert merge_key(pivot, models, spelled.merge) == merge_key(pivot, models, ties)
    other = parse_fusion_config(
        {
            **_fusion(tiny, tmp_path / "elsewhere").model_dump(mode="json"),
            "name": "renamed",
            "training": {"learning_rate": 0.5},
            "evaluation": {"suites": ["local", "bbh"]},
        }
    )
    assert merge_key(pivot, models, other.merge) == key
    moved = [Artifact(m.stage, m.key, tmp_path / "moved" / m.key) for m in models]
    assert merge_key(pivot, moved, merge) == key  # folders by key, not by path


# ---------------------------------------------------------------------------------------------
# (d) errors


@pytest.mark.parametrize(
    ("method", "parameters", "message"),
    [
        ("slerp", {}, "merge.method: 'slerp' is not one of sce, ties"),
        ("sce", {"density": 0.5}, "merge.density: method sce does not take density"),
        ("linear", {"select_topk": 0.1}, "merge.select_topk: method linear does not take"),
        ("sce", {"select_topk": 1.5}, "merge.select_topk: 1.5 is not in (0, 1]"),
        ("ties", {"density": 0}, "merge.density: 0.0 is not in (0, 1]"),
        ("ties", {"weight": [1, 2]}, "merge.weight: 2 weights for 3 models"),
        ("linear", {"weight": [1, -1, 0]}, "merge.weight: the weights sum to 0"),
    ],
)
def test_a_bad_method_or_parameter_names_the_field(tiny, tmp_path, method, parameters, message):
    with pytest.raises(MergeError) as err:
        merge_models(tiny["pivot"], tiny["models"], tmp_path / "out", method=method,
                     parameters=parameters)  # fmt: skip
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()


def test_the_config_refuses_a_field_the_method_does_not_take(tiny, tmp_path):
    with pytest.raises(FusionConfigError, match="merge: density: method sce does not take it"):
        _fusion(tiny, tmp_path, density=0.5)
    with pytest.raises(FusionConfigError, match="merge.method"):
        _fusion(tiny, tmp_path, method="slerp")
    with pytest.raises(MergeError, match="merge.weight: 2 weights for 3 models"):
        pivot, models = _stage_inputs(tiny, tmp_path / "work")
        merge_key(pivot, models, _fusion(tiny, tmp_path, method="linear", weight=[1, 2]).merge)


@pytest.mark.parametrize(
    ("odd", "message"),
    [
        ("wider", r"tensor '[\w.]+' has shape \[\d+, 32\], the pivot's is \[\d+, 16\]"),
        ("shallower", r"has no tensor 'model\.layers\.1\.[\w.]+', which the pivot has"),
        ("neox", "architecture GPTNeoXForCausalLM, the pivot"),
    ],
)
def test_a_model_unlike_the_pivot_is_named_with_its_tensor(tiny, tmp_path, odd, message):
    folder = tiny["odd"][odd]
    with pytest.raises(MergeError) as err:
        merge_models(tiny["pivot"], [tiny["models"][0], folder], tmp_path / "out", method="sce")
    assert f"models[1] ({folder}): " in str(err.value)
    assert re.search(message, str(err.value)), str(err.value)
    assert not (tmp_path / "out").exists()


def test_without_mergekit_the_error_says_what_to_install(tiny, tmp_path, monkeypatch):
    from fusellm.extras import extra_for

    monkeypatch.setitem(sys.modules, "mergekit.merge", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'fusellm\[merge\]'") as err:
        merge_models(tiny["pivot"], tiny["models"], tmp_path / "out", method="sce")
    assert err.value.name == "mergekit"
    assert extra_for("mergekit") == "merge"
