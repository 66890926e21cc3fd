"""The comparison table and chart for a hand-made result set."""

from __future__ import annotations

import matplotlib.image
import pytest
from matplotlib.container import BarContainer

from fusellm.evaluate.report import bar_chart, build_tables, compare
from fusellm.evaluate.results import SuiteResult, parse_lm_eval

TASKS = ["arc_easy", "boolq"]


def _result(model, suite, metric, values, higher=True, skipped=None):
    return SuiteResult(
        suite=suite,
        model=model,
        primary_metric=metric,
        higher_is_better=higher,
        metrics={t: {metric: v, "other": 0.5} for t, v in values.items()},
        stderr={t: {metric: 0.01} for t in values},
        skipped=skipped or {},
    )


@pytest.fixture
def results():
    accs = {
        "src-a": [0.60, 0.70],
        "src-b": [0.62, 0.66],
        "clm": [0.63, 0.70],
        "fused": [0.65, 0.72],
    }
    bpbs = {"src-a": [1.8, 2.5], "src-b": [1.9, 1.9], "clm": [1.7, 2.2], "fused": [1.6, 2.1]}
    out = {}
    for model, acc in accs.items():
        out[model] = {
            "commonsense": _result(model, "commonsense", "acc", dict(zip(TASKS, acc))),
            "local": _result(
                model,
                "local",
                "bits_per_byte",
                {"prose": bpbs[model][0], "code": bpbs[model][1]},
                higher=False,
            ).to_dict(),  # a serialized result works too
            "multipl-e": _result(
                model,
                "multipl-e",
                "pass@1",
                {"multiple_py": 0.25},
                skipped={"multiple_go": "toolchain for go not installed"},
            ),
        }
    return out


def test_markdown_table(results, tmp_path):
    comp = compare(results, "fused", "clm", ["src-a", "src-b"], tmp_path)
    text = (tmp_path / "comparison.md").read_text()
    assert text == comp.markdown
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| Task"))
    assert header == "| Task | src-a | src-b | clm | fused | fused − CLM | fused − best source |"
    assert (
        "| arc_easy | 60.00 ± 1.00 | 62.00 ± 1.00 | 63.00 ± 1.00 | **65.00 ± 1.00** | +2.00 | +3.00 |"
        in lines
    )
    assert (
        "| boolq | 70.00 ± 1.00 | 66.00 ± 1.00 | 70.00 ± 1.00 | **72.00 ± 1.00** | +2.00 | +2.00 |"
        in lines
    )
    # suite average = mean of the primary metric over tasks
    assert "| **Average** | 65.00 | 64.00 | 66.50 | **68.50** | +2.00 | +3.50 |" in lines
    # lower is better: the fused model's 1.6 beats the baseline's 1.7 by +0.1
    assert (
        "| prose | 1.8000 ± 0.0100 | 1.9000 ± 0.0100 | 1.7000 ± 0.0100 | **1.6000 ± 0.0100** | +0.1000 | +0.2000 |"
        in lines
    )
    assert (
        "| code | 2.5000 ± 0.0100 | **1.9000 ± 0.0100** | 2.2000 ± 0.0100 | 2.1000 ± 0.0100 | +0.1000 | -0.2000 |"
        in lines
    )
    assert "### local: bits_per_byte (lower is better)" in lines
    assert "_multiple_go skipped: toolchain for go not installed_" in text


def test_chart_bars_match_values(results, tmp_path):
    comp = compare(results, "fused", "clm", ["src-a", "src-b"], tmp_path)
    image = matplotlib.image.imread(comp.chart_path)
    assert image.shape[0] > 300 and image.shape[1] > 300
    assert not list(tmp_path.glob(".comparison*"))  # no temporary file left

    fig = bar_chart(comp.tables, "fused", "clm")
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["commonsense", "local", "multipl-e"]
    ax = axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["arc_easy", "boolq", "Average"]
    containers = [c for c in ax.containers if isinstance(c, BarContainer)]
    bars = {c.get_label(): [p.get_height() for p in c.patches] for c in containers}
    assert bars["fused"] == pytest.approx([65.0, 72.0, 68.5])
    assert bars["src-b"] == pytest.approx([62.0, 66.0, 64.0])
    assert list(bars) == ["src-a", "src-b", "clm", "fused"]
    fused_colour = containers[3].patches[0].get_facecolor()
    assert all(c.patches[0].get_facecolor() != fused_colour for c in containers[:3])
    local = {
        c.get_label(): [p.get_height() for p in c.patches]
        for c in axes[1].containers
        if isinstance(c, BarContainer)
    }
    assert local["clm"] == pytest.approx([1.7, 2.2, 1.95])
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_tables_structure(results):
    tables = build_tables(results, ["src-a", "src-b", "clm", "fused"])
    assert tables["commonsense"].values["Average"]["clm"] == pytest.approx(0.665)
    assert tables["multipl-e"].skipped == {"multiple_go": "toolchain for go not installed"}


def test_missing_model_is_named(results, tmp_path):
    with pytest.raises(KeyError, match="no results for src-c"):
        compare(results, "fused", "clm", ["src-a", "src-c"], tmp_path)
    assert not (tmp_path / "comparison.md").exists()


def test_parse_lm_eval_keys():
    raw = {
        "bbh_x": {
            "alias": "x",
            "exact_match,get-answer": 0.5,
            "exact_match_stderr,get-answer": 0.1,
        },
        "boolq": {"acc,none": 1.0, "acc_stderr,none": "N/A"},
    }
    metrics, stderr = parse_lm_eval(raw, ["bbh_x", "boolq"])
    assert metrics == {"bbh_x": {"exact_match": 0.5}, "boolq": {"acc": 1.0}}
    assert stderr == {"bbh_x": {"exact_match": 0.1}, "boolq": {}}


def test_suite_result_round_trip(tmp_path):
    result = _result("m", "commonsense", "acc", {"arc_easy": 0.5, "boolq": 1.0})
    path = result.save(tmp_path / "r.json")
    loaded = SuiteResult.load(path)
    assert loaded == result
    assert loaded.average == pytest.approx(0.75)


def _pairwise_results():
    """A pairwise fusion's results: sources, the CLM baseline, the pairwise models, their merge
    (fused) and a jointly fused model, on `local` and on `custom` with two named tasks."""
    bpb = {"src-a": 2.0, "src-b": 1.9, "baseline": 1.8, "joint": 1.7}
    bpb |= {"pair-src-a": 1.65, "pair-src-b": 1.75, "fused": 1.6}
    acc = {"src-a": 0.50, "src-b": 0.55, "baseline": 0.52, "joint": 0.58}
    acc |= {"pair-src-a": 0.60, "pair-src-b": 0.57, "fused": 0.62}
    entries = {
        "my_qa": {"tasks": ["my_qa"], "metric": "acc", "higher_is_better": True},
        "my_text": {
            "tasks": ["my_text_a", "my_text_b"],
            "metric": "bits_per_byte",
            "higher_is_better": False,
        },
    }
    out = {}
    for model in bpb:
        custom = SuiteResult(
            suite="custom",
            model=model,
            primary_metric="acc",
            higher_is_better=True,
            metrics={
                "my_qa": {"acc": acc[model], "acc_norm": 0.1},
                "my_text_a": {"bits_per_byte": bpb[model] + 0.1},
                "my_text_b": {"bits_per_byte": bpb[model] - 0.1},
            },
            extra={"entries": entries},
        )
        local = _result(model, "local", "bits_per_byte", {"prose": bpb[model]}, higher=False)
        out[model] = {"local": local, "custom": custom}
    return out


def test_pairwise_and_joint_beside_the_fused_model(tmp_path):
    results = _pairwise_results()
    pairs = ["pair-src-a", "pair-src-b"]
    comp = compare(
        results, "fused", "baseline", ["src-a", "src-b"], tmp_path, pairs=pairs, joint="joint"
    )
    lines = comp.markdown.splitlines()
    assert "merge of the pairwise models pair-src-a, pair-src-b" in comp.markdown
    assert "jointly fused: **joint**" in comp.markdown
    header = next(line for line in lines if line.startswith("| Task"))
    assert header == (
        "| Task | src-a | src-b | baseline | joint | pair-src-a | pair-src-b | fused "
        "| fused − CLM | fused − best source | fused − best pair | fused − joint |"
    )
    # local, lower is better: 1.6 vs CLM 1.8, best source 1.9, best pair 1.65, joint 1.7
    prose = next(line for line in lines if line.startswith("| prose"))
    assert prose.endswith("| **1.6000 ± 0.0100** | +0.2000 | +0.3000 | +0.0500 | +0.1000 |")
    assert list(comp.tables["local"].models) == [
        "src-a", "src-b", "baseline", "joint", "pair-src-a", "pair-src-b", "fused"
    ]  # fmt: skip


def test_custom_suite_is_a_table_per_named_task(tmp_path):
    results = _pairwise_results()
    comp = compare(results, "fused", "baseline", ["src-a", "src-b"], tmp_path)
    assert list(comp.tables) == ["local", "custom/my_qa", "custom/my_text"]
    qa, text = comp.tables["custom/my_qa"], comp.tables["custom/my_text"]
    assert (qa.metric, qa.higher_is_better, list(qa.values)) == ("acc", True, ["my_qa", "Average"])
    assert (text.metric, text.higher_is_better) == ("bits_per_byte", False)
    assert list(text.values) == ["my_text_a", "my_text_b", "Average"]
    assert text.values["Average"]["fused"] == pytest.approx(1.6)  # mean over the entry's tasks
    assert "### custom/my_qa: acc ×100 (higher is better)" in comp.markdown
    assert "### custom/my_text: bits_per_byte (lower is better)" in comp.markdown
    # without pairs or joint the table keeps its columns
    header = next(line for line in comp.markdown.splitlines() if line.startswith("| Task"))
    assert header.endswith("| fused | fused − CLM | fused − best source |")
    import matplotlib.pyplot as plt

    fig = bar_chart(comp.tables, "fused", "baseline")
    assert [ax.get_title() for ax in fig.axes] == ["local", "custom/my_qa", "custom/my_text"]
    plt.close(fig)


def test_compare_unit_finds_pairs_and_joint(tmp_path):
    """The stage puts the pairwise models and a joint one beside the fused model when the
    results hold them, and keys the comparison on those roles."""
    from fusellm.stages.base import Artifact
    from fusellm.stages.evaluation import compare_key, compare_unit, comparison_roles

    artifacts = {}
    for label, suites in _pairwise_results().items():
        for suite, result in suites.items():
            folder = tmp_path / "evaluate" / f"{label}-{suite}"
            result.save(folder / "result" / "results.json")
            artifacts.setdefault(label, {})[suite] = Artifact("evaluate", f"k-{label}", folder)
    sources = ["src-a", "src-b"]
    assert comparison_roles(artifacts, sources) == (["pair-src-a", "pair-src-b"], "joint")
    unit = compare_unit(artifacts, "fused", "baseline", sources, tmp_path)
    done = unit.run()
    assert done.info["pairs"] == ["pair-src-a", "pair-src-b"] and done.info["joint"] == "joint"
    text = (done.path / "comparison.md").read_text()
    assert "| fused − best pair | fused − joint |" in text
    plain = {k: v for k, v in artifacts.items() if not k.startswith("pair-") and k != "joint"}
    assert comparison_roles(plain, sources) == ([], None)
    assert compare_key(plain, "fused", "baseline", sources) != unit.key
