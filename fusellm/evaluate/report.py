"""Side-by-side comparison of the fused model, every source and the CLM baseline.

FuseLLM's claim is relative: the fused target should beat each source and, above all, the same
continual training without fusion (CLM baseline, lambda = 1). So the report always shows all of
them per task and on the suite average, with the fused model's gain over the baseline and over
the best source, as a markdown table and a grouped bar chart like the paper's figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from fusellm.evaluate.results import SuiteResult
from fusellm.io.files import write_bytes_atomic, write_text_atomic

PERCENT_METRICS = {"acc", "acc_norm", "exact_match", "pass@1"}
AVERAGE = "Average"


@dataclass
class SuiteTable:
    """One suite's numbers: rows (tasks, then Average) x models, with stderr where known."""

    suite: str
    metric: str
    higher_is_better: bool
    models: list[str]
    values: dict[str, dict[str, float | None]]  # row -> model -> value
    stderr: dict[str, dict[str, float | None]]
    skipped: dict[str, str] = field(default_factory=dict)  # task -> reason


@dataclass
class Comparison:
    """The comparison written by `compare`: structured tables plus the files made from them."""

    fused: str
    baseline: str
    sources: list[str]
    tables: dict[str, SuiteTable]
    markdown: str
    table_path: Path
    chart_path: Path


def _as_result(value) -> SuiteResult:
    return value if isinstance(value, SuiteResult) else SuiteResult.from_dict(dict(value))


def _by_suite(value) -> dict[str, SuiteResult]:
    """A model's results as suite -> SuiteResult (one result, or a mapping of several)."""
    if isinstance(value, SuiteResult) or (isinstance(value, dict) and "metrics" in value):
        result = _as_result(value)
        return {result.suite: result}
    return {suite: _as_result(v) for suite, v in dict(value).items()}


def build_tables(results: dict, order: list[str]) -> dict[str, SuiteTable]:
    """Gather each suite's primary metric for the models in `order`."""
    per_model = {model: _by_suite(results[model]) for model in order}
    suites: list[str] = []
    for model in order:
        suites += [s for s in per_model[model] if s not in suites]
    tables = {}
    for suite in suites:
        present = [per_model[m][suite] for m in order if suite in per_model[m]]
        metric, higher = present[0].primary_metric, present[0].higher_is_better
        tasks: list[str] = []
        skipped: dict[str, str] = {}
        for result in present:
            tasks += [t for t in result.metrics if t not in tasks]
            skipped.update(result.skipped)
        values: dict[str, dict[str, float | None]] = {}
        errors: dict[str, dict[str, float | None]] = {}
        for task in tasks:
            values[task], errors[task] = {}, {}
            for model in order:
                result = per_model[model].get(suite)
                values[task][model] = result.metrics.get(task, {}).get(metric) if result else None
                errors[task][model] = result.stderr.get(task, {}).get(metric) if result else None
        values[AVERAGE] = {
            m: per_model[m][suite].average if suite in per_model[m] else None for m in order
        }
        errors[AVERAGE] = {m: None for m in order}
        tables[suite] = SuiteTable(suite, metric, higher, list(order), values, errors, skipped)
    return tables


def _fmt(value: float | None, metric: str, err: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    scale, digits = (100.0, 2) if metric in PERCENT_METRICS else (1.0, 4)
    text = f"{value * scale:.{digits}f}"
    if err is not None and not math.isnan(err):
        text += f" ± {err * scale:.{digits}f}"
    return text


def _gain(fused: float | None, other: float | None, higher: bool, metric: str) -> str:
    if fused is None or other is None:
        return "–"
    diff = (fused - other) if higher else (other - fused)
    scale, digits = (100.0, 2) if metric in PERCENT_METRICS else (1.0, 4)
    return f"{diff * scale:+.{digits}f}"


def markdown_table(table: SuiteTable, fused: str, baseline: str, sources: list[str]) -> str:
    """One suite as a markdown table; the best value of each row is bold."""
    direction = "higher is better" if table.higher_is_better else "lower is better"
    unit = " ×100" if table.metric in PERCENT_METRICS else ""
    lines = [
        f"### {table.suite}: {table.metric}{unit} ({direction})",
        "",
        "| Task | " + " | ".join(table.models) + " | fused − CLM | fused − best source |",
        "| --- |" + " ---: |" * (len(table.models) + 2),
    ]
    pick = max if table.higher_is_better else min
    for row, by_model in table.values.items():
        known = [v for v in by_model.values() if v is not None]
        best = pick(known) if known else None
        cells = []
        for model in table.models:
            text = _fmt(by_model[model], table.metric, table.stderr[row][model])
            cells.append(f"**{text}**" if best is not None and by_model[model] == best else text)
        source_values = [by_model[s] for s in sources if by_model.get(s) is not None]
        best_source = pick(source_values) if source_values else None
        name = f"**{row}**" if row == AVERAGE else row
        fused_value = by_model.get(fused)
        vs_baseline = _gain(
            fused_value, by_model.get(baseline), table.higher_is_better, table.metric
        )
        vs_source = _gain(fused_value, best_source, table.higher_is_better, table.metric)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {vs_baseline} | {vs_source} |")
    for task, reason in table.skipped.items():
        lines.append(f"\n_{task} skipped: {reason}_")
    return "\n".join(lines) + "\n"


def _colors(models: list[str], fused: str, baseline: str) -> dict[str, str]:
    source_colors = ["#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#c6dbef"]
    colors, i = {}, 0
    for model in models:
        if model == fused:
            colors[model] = "#d62728"
        elif model == baseline:
            colors[model] = "#ff7f0e"
        else:
            colors[model] = source_colors[i % len(source_colors)]
            i += 1
    return colors


def _short(task: str) -> str:
    return task.replace("bbh_cot_fewshot_", "").replace("fusellm_local_", "")


def _draw_suite(ax, table: SuiteTable, fused: str, baseline: str, horizontal: bool) -> None:
    rows = list(table.values)
    width = 0.8 / len(table.models)
    scale = 100.0 if table.metric in PERCENT_METRICS else 1.0
    colors = _colors(table.models, fused, baseline)
    draw = ax.barh if horizontal else ax.bar
    for k, model in enumerate(table.models):
        positions = [i - 0.4 + width * (k + 0.5) for i in range(len(rows))]
        values = [(table.values[r][model] or 0.0) * scale for r in rows]
        errors = [
            math.nan if table.stderr[r][model] is None else table.stderr[r][model] * scale
            for r in rows
        ]
        draw(
            positions,
            values,
            width,
            **({"xerr": errors} if horizontal else {"yerr": errors}),
            label=model,
            color=colors[model],
            edgecolor="black" if model == fused else "none",
            linewidth=0.8,
            error_kw={"elinewidth": 0.7, "capsize": 2},
        )
    unit = " ×100" if scale != 1.0 else ""
    label = f"{table.metric}{unit} ({'higher' if table.higher_is_better else 'lower'} is better)"
    names = [_short(r) for r in rows]
    if horizontal:
        ax.set_yticks(range(len(rows)), names, fontsize=8)
        ax.invert_yaxis()  # first task on top, Average at the bottom
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    else:
        ax.set_xticks(range(len(rows)), names, fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(table.suite)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def bar_chart(tables: dict[str, SuiteTable], fused: str, baseline: str, crowded: int = 8):
    """Grouped bars per task and the suite average, one colour per model, the fused one in red
    with a black edge; suites with more than `crowded` rows (BBH) get horizontal bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    horizontal = [len(t.values) > crowded for t in tables.values()]
    heights = [
        max(3.0, 0.32 * len(t.values) * len(t.models) / 4) if h else 3.2
        for t, h in zip(tables.values(), horizontal)
    ]
    fig, axes = plt.subplots(
        len(tables),
        1,
        figsize=(9.0, sum(heights) + 0.6 * len(tables)),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for ax, table, flat in zip(axes[:, 0], tables.values(), horizontal):
        _draw_suite(ax, table, fused, baseline, flat)
    fig.tight_layout()
    return fig


def _png(fig) -> bytes:
    """The chart as PNG bytes, so that it is written like every other file."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def compare(
    results: dict,
    fused: str,
    baseline: str,
    sources: list[str],
    output_dir: str | Path,
) -> Comparison:
    """Write comparison.md and comparison.png for the fused model vs sources and baseline.

    results: model label -> SuiteResult (or its dict), or -> {suite: SuiteResult} for several
    suites. Every named model must be present; columns go sources, baseline, fused.
    """
    import matplotlib.pyplot as plt

    order = list(sources) + [baseline, fused]
    missing = [m for m in order if m not in results]
    if missing:
        raise KeyError(
            f"no results for {', '.join(missing)}; results has {', '.join(results) or 'nothing'}"
        )
    if len(set(order)) != len(order):
        raise ValueError(f"fused, baseline and sources must be distinct models, got {order}")
    tables = build_tables(results, order)
    header = (
        f"# FuseLLM comparison\n\nFused: **{fused}**; CLM baseline: **{baseline}**; "
        f"sources: {', '.join(sources)}. Values ± standard error; gains are signed so that "
        "positive means the fused model is better.\n"
    )
    body = "\n".join(markdown_table(t, fused, baseline, sources) for t in tables.values())
    markdown = header + "\n" + body
    output_dir = Path(output_dir)
    table_path = write_text_atomic(output_dir / "comparison.md", markdown)
    fig = bar_chart(tables, fused, baseline)
    try:
        chart_path = write_bytes_atomic(output_dir / "comparison.png", _png(fig))
    finally:
        plt.close(fig)
    return Comparison(fused, baseline, list(sources), tables, markdown, table_path, chart_path)
