"""The demo's report: the paper's table in miniature, every model by every metric.

`report.json` is the machine-readable record (what tests and the browser check read)::

    {"fused": name, "baseline": name, "sources": [names], "primary_metric": "bits_per_byte",
     "metrics": {model name: {metric: value}},
     "baseline_margin": {bits-per-byte metric: baseline - fused (positive: fused is better)},
     "protocol": {what the quality protocol measured for the demo's default recipe}}

A gain of a few thousandths of a bit per byte means nothing without its seed-to-seed spread,
and one run cannot measure its own spread. So the report states this run's margin over the CLM
baseline and, beside it, the spread the quality protocol recorded for the default recipe
(`fusellm.demo.recipe.DEFAULT_RECIPE_PROTOCOL`: several seeds, test texts, the paired
difference fused - baseline) with the command that reproduces it; it says whether this run's
margin exceeds twice that paired standard deviation, and whether the run used that recipe
(unknown when the caller does not pass it).

Metric names: ``bits_per_byte`` is the mean over the held-out domains (the primary metric,
lower is better), ``bits_per_byte/<domain>`` each domain, ``acc/<task>`` and ``acc_norm/<task>``
each multiple-choice task. `report.md` is the same table for people and `report.png` a grouped
bar chart of it. Values are rounded to 6 decimals so that the same run always writes the same
bytes, and every file is written beside its final name and renamed into place.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from fusellm.io.files import write_bytes_atomic, write_text_atomic

PRIMARY = "bits_per_byte"
DIGITS = 6
_PREFIX = "fusellm_local_"


def _short(task: str) -> str:
    return task.removeprefix(_PREFIX)


def model_metrics(task_metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """One model's flat metrics from a suite's per-task metrics (lm-eval task -> metric -> value).

    Bits-per-byte tasks give ``bits_per_byte/<domain>`` and their mean ``bits_per_byte``;
    other tasks give ``acc/<task>`` and ``acc_norm/<task>``.
    """
    out: dict[str, float] = {}
    bpb = {}
    for task, metrics in sorted(task_metrics.items()):
        if PRIMARY in metrics:
            bpb[_short(task)] = metrics[PRIMARY]
        for name in ("acc", "acc_norm"):
            if name in metrics:
                out[f"{name}/{_short(task)}"] = round(float(metrics[name]), DIGITS)
    if not bpb:
        raise ValueError(f"no task reports {PRIMARY}: tasks {sorted(task_metrics)}")
    out[PRIMARY] = round(sum(bpb.values()) / len(bpb), DIGITS)
    for domain, value in bpb.items():
        out[f"{PRIMARY}/{domain}"] = round(float(value), DIGITS)
    return out


def build_report(
    fused: str,
    baseline: str,
    sources: list[str],
    metrics: dict[str, dict[str, float]],
    *,
    recipe=None,
) -> dict:
    """The report.json mapping; fails naming any model whose metrics are missing.

    `recipe` (a `DemoRecipe`, optional) is the recipe the run used: the report then says
    whether the protocol's recorded spread belongs to it.
    """
    missing = [m for m in [*sources, baseline, fused] if m not in metrics]
    if missing:
        raise ValueError(f"no metrics for {missing}; have {sorted(metrics)}")
    order = [*sources, baseline, fused]
    margin = {
        k: round(metrics[baseline][k] - v, DIGITS)
        for k, v in sorted(metrics[fused].items())
        if _lower_is_better(k) and k in metrics[baseline]
    }
    return {
        "fused": fused,
        "baseline": baseline,
        "sources": list(sources),
        "primary_metric": PRIMARY,
        "metrics": {name: dict(sorted(metrics[name].items())) for name in order},
        "baseline_margin": margin,
        "protocol": protocol_record(margin.get(PRIMARY), recipe),
    }


def protocol_record(margin: float | None, recipe=None) -> dict:
    """The spread the quality protocol recorded for the default recipe, and this run against it.

    ``margin_exceeds_two_sd``: this run's mean margin over the baseline is above twice the
    recorded paired standard deviation. ``applies``: the run used the recorded recipe (None:
    not known). The recorded mean and sd are over seeds of the library walk scored with
    `fusellm.demo.heldout` (the EOS charged); the demo scores with lm-eval (no EOS), whose
    differences between two models agree to about 1e-3 bits per byte.
    """
    from fusellm.demo.recipe import DEFAULT_RECIPE_PROTOCOL as recorded

    two_sd = 2 * recorded["difference"]["sd"]
    applies = None if recipe is None else recipe.model_dump() == recorded["recipe"]
    return {
        "recipe": recorded["recipe"],
        "applies": applies,
        "seeds": recorded["seeds"],
        "part": recorded["part"],
        "command": recorded["command"],
        "paired_difference": recorded["difference"],
        "margin_exceeds_two_sd": None if margin is None else bool(margin > two_sd),
    }


def verdict(report: dict) -> dict:
    """Whether the fused model beats each source and the baseline on the primary metric."""
    fused = report["metrics"][report["fused"]][PRIMARY]
    others = [*report["sources"], report["baseline"]]
    margins = {name: report["metrics"][name][PRIMARY] - fused for name in others}
    return {"fused_wins": all(m > 0 for m in margins.values()), "margins": margins}


def _columns(report: dict) -> list[str]:
    names = {k for row in report["metrics"].values() for k in row}
    domains = sorted(k for k in names if k.startswith(PRIMARY + "/"))
    rest = sorted(k for k in names if not k.startswith(PRIMARY))
    return [PRIMARY, *domains, *rest]


def _lower_is_better(metric: str) -> bool:
    return metric.startswith(PRIMARY)


def markdown(report: dict) -> str:
    """Models as rows (sources, baseline, fused), metrics as columns, the best value in bold."""
    columns = _columns(report)
    roles = {n: "source" for n in report["sources"]}
    roles |= {report["baseline"]: "CLM baseline (λ = 1)", report["fused"]: "fused"}
    best = {}
    for c in columns:
        values = [r[c] for r in report["metrics"].values() if c in r]
        best[c] = (min if _lower_is_better(c) else max)(values) if values else None
    header = "| model | role | " + " | ".join(_heading(c) for c in columns) + " |"
    lines = [header, "|" + " --- |" * (len(columns) + 2)]
    for name, row in report["metrics"].items():
        cells = []
        for c in columns:
            value = row.get(c)
            text = "–" if value is None else f"{value:.4f}"
            cells.append(f"**{text}**" if value is not None and value == best[c] else text)
        lines.append(f"| {name} | {roles[name]} | " + " | ".join(cells) + " |")
    win = verdict(report)
    summary = "beats" if win["fused_wins"] else "does NOT beat"
    margins = ", ".join(f"{n} {m:+.4f}" for n, m in win["margins"].items())
    return (
        "# FuseLLM demo: held-out results\n\n"
        f"Primary metric: mean held-out **{PRIMARY}** over the domains (lower is better). "
        "`bits_per_byte/<domain>`: each domain's held-out test text; `acc`: multiple choice "
        "(which line follows), higher is better.\n\n"
        + "\n".join(lines)
        + f"\n\nThe fused model {summary} every source and the CLM baseline on mean bits per "
        f"byte (margin of each over the fused model: {margins}).\n" + _protocol_markdown(report)
    )


def _protocol_markdown(report: dict) -> str:
    """This run's margin over the baseline, against the spread the protocol recorded."""
    margin = report.get("baseline_margin", {}).get(PRIMARY)
    record = report.get("protocol")
    if margin is None or record is None:
        return ""
    diff = record["paired_difference"]
    seeds = ", ".join(str(s) for s in record["seeds"])
    applies = {
        True: "This run used that recipe.",
        False: "This run used another recipe: the recorded spread is not its own; run the "
        "command with this recipe to measure it.",
        None: "Whether this run used that recipe is not recorded.",
    }[record["applies"]]
    exceeds = "exceeds" if record["margin_exceeds_two_sd"] else "does NOT exceed"
    return (
        "\n## Fused vs the CLM baseline, and the noise\n\n"
        f"This run: the fused model is {margin:+.4f} bits/byte better than the baseline on the "
        "mean (positive = better). One run cannot measure its own spread. The quality protocol "
        f"recorded for the default recipe, over seeds {seeds} on the {record['part']} texts, a "
        f"paired difference fused - baseline of {diff['mean']:+.4f} ± {diff['sd']:.4f} (mean ± "
        f"sd); this run's margin {exceeds} twice that sd ({2 * diff['sd']:.4f}). {applies}\n\n"
        f"Reproduce the spread: `{record['command']}`\n"
    )


def _heading(metric: str) -> str:
    arrow = "↓" if _lower_is_better(metric) else "↑"
    return f"{metric} {arrow}"


def chart(report: dict):
    """Grouped bars: one group per metric, one bar per model; bits/byte and accuracy apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = _columns(report)
    panels = [
        [c for c in columns if _lower_is_better(c)],
        [c for c in columns if not _lower_is_better(c)],
    ]
    panels = [p for p in panels if p]
    models = list(report["metrics"])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels) + 2, 4.2), squeeze=False)
    width = 0.8 / len(models)
    for ax, metrics in zip(axes[0], panels):
        for i, name in enumerate(models):
            values = [report["metrics"][name].get(m, math.nan) for m in metrics]
            xs = [x + (i - (len(models) - 1) / 2) * width for x in range(len(metrics))]
            ax.bar(
                xs,
                values,
                width,
                label=name,
                color=_color(name, report, i),
                edgecolor="black" if name == report["fused"] else None,
            )
        if _lower_is_better(metrics[0]):  # zoom in: the differences are a few percent
            values = [r.get(m) for r in report["metrics"].values() for m in metrics]
            values = [v for v in values if v is not None and math.isfinite(v)]
            if values:
                ax.set_ylim(0.9 * min(values), 1.02 * max(values))
        ax.set_xticks(range(len(metrics)))
        ax.set_xticklabels([m.replace(PRIMARY, "bpb") for m in metrics], rotation=20)
        ax.set_title(
            "bits per byte (lower is better)"
            if _lower_is_better(metrics[0])
            else "multiple choice (higher is better)"
        )
        ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.suptitle("FuseLLM demo: sources vs CLM baseline vs fused")
    fig.tight_layout()
    return fig


def _color(name: str, report: dict, index: int) -> str:
    if name == report["fused"]:
        return "#d62728"
    if name == report["baseline"]:
        return "#7f7f7f"
    return ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#17becf"][index % 5]


def write_report(report: dict, folder: str | Path) -> dict[str, Path]:
    """Write report.json, report.md and report.png into `folder`; returns their paths."""
    import io

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": write_text_atomic(folder / "report.json", json.dumps(report, indent=2) + "\n"),
        "md": write_text_atomic(folder / "report.md", markdown(report)),
    }
    fig = chart(report)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    paths["png"] = write_bytes_atomic(folder / "report.png", buffer.getvalue())
    return paths
