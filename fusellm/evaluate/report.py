"""Side-by-side comparison of the fused model, every source and the CLM baseline.

FuseLLM's claim is relative: the fused target should beat each source and, above all, the same
continual training without fusion (CLM baseline, lambda = 1). So the report always shows all of
them per task and on the suite average, with the fused model's gain over the baseline and over
the best source, as a markdown table and a grouped bar chart like the paper's figures.

With pairwise fusion (FuseChat) the fused model is the merge of the pairwise models: they stand
beside it (`pair-<source>`), with the merge's gain over the best of them; a jointly fused model
in the same results (`joint`) stands there too. The `custom` suite holds tasks of different
kinds, so each task or group it names is its own table, in its own metric.
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
    pairs: list[str] = field(default_factory=list)
    joint: str | None = None


def _as_result(value) -> SuiteResult:
    return value if isinstance(value, SuiteResult) else SuiteResult.from_dict(dict(value))


def _by_suite(value) -> dict[str, SuiteResult]:
    """A model's results as suite -> SuiteResult (one result, or a mapping of several)."""
    if isinstance(value, SuiteResult) or (isinstance(value, dict) and "metrics" in value):
        result = _as_result(value)
        return {result.suite: result}
    return {suite: _as_result(v) for suite, v in dict(value).items()}


def _mean(values) -> float | None:
    known = [v for v in values if v is not None and not math.isnan(v)]
    return sum(known) / len(known) if known else None


def _sections(per_model: dict[str, dict[str, SuiteResult]], order: list[str]) -> dict:
    """Table name -> (suite, metric, higher is better, its tasks or None for all the suite's).

    A suite is one table; a suite whose results name entries (`custom`: task or group -> its
    tasks, each read by its own metric) is a table per entry, `<suite>/<entry>`.
    """
    sections: dict[str, tuple[str, str, bool, list[str] | None]] = {}
    for model in order:
        for suite, result in per_model[model].items():
            entries = result.extra.get("entries") if isinstance(result.extra, dict) else None
            if not entries:
                sections.setdefault(
                    suite, (suite, result.primary_metric, result.higher_is_better, None)
                )
                continue
            for name, entry in entries.items():
                metric = entry.get("metric") or result.primary_metric
                higher = entry.get("higher_is_better", result.higher_is_better)
                sections.setdefault(f"{suite}/{name}", (suite, metric, higher, entry["tasks"]))
    return sections


def build_tables(results: dict, order: list[str]) -> dict[str, SuiteTable]:
    """Gather each suite's primary metric (each entry's metric) for the models in `order`."""
    per_model = {model: _by_suite(results[model]) for model in order}
    tables = {}
    for name, (suite, metric, higher, wanted) in _sections(per_model, order).items():
        present = [per_model[m][suite] for m in order if suite in per_model[m]]
        tasks: list[str] = []
        skipped: dict[str, str] = {}
        for result in present:
            tasks += [t for t in result.metrics if t not in tasks]
            skipped.update(result.skipped)
        if wanted is not None:
            tasks = [t for t in wanted if t in tasks]
            skipped = {t: r for t, r in skipped.items() if t in wanted}
        values: dict[str, dict[str, float | None]] = {}
        errors: dict[str, dict[str, float | None]] = {}
        for task in tasks:
            values[task], errors[task] = {}, {}
            for model in order:
                result = per_model[model].get(suite)
                values[task][model] = result.metrics.get(task, {}).get(metric) if result else None
                errors[task][model] = result.stderr.get(task, {}).get(metric) if result else None
        if wanted is None:
            values[AVERAGE] = {
                m: per_model[m][suite].average if suite in per_model[m] else None for m in order
            }
        else:
            values[AVERAGE] = {m: _mean(values[t][m] for t in tasks) for m in order}
        errors[AVERAGE] = {m: None for m in order}
        tables[name] = SuiteTable(name, metric, higher, list(order), values, errors, skipped)
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


def markdown_table(
    table: SuiteTable,
    fused: str,
    baseline: str,
    sources: list[str],
    pairs: list[str] = (),
    joint: str | None = None,
) -> str:
    """One suite as a markdown table; the best value of each row is bold. Gains of the fused
    model over the baseline, the best source and, when present, the best pairwise model and
    the joint one."""
    direction = "higher is better" if table.higher_is_better else "lower is better"
    unit = " ×100" if table.metric in PERCENT_METRICS else ""
    gains = ["fused − CLM", "fused − best source"]
    gains += ["fused − best pair"] if pairs else []
    gains += ["fused − joint"] if joint else []
    lines = [
        f"### {table.suite}: {table.metric}{unit} ({direction})",
        "",
        "| Task | " + " | ".join(table.models + gains) + " |",
        "| --- |" + " ---: |" * (len(table.models) + len(gains)),
    ]
    pick = max if table.higher_is_better else min

    def best_of(by_model: dict, models) -> float | None:
        known = [by_model[m] for m in models if by_model.get(m) is not None]
        return pick(known) if known else None

    for row, by_model in table.values.items():
        best = best_of(by_model, table.models)
        cells = []
        for model in table.models:
            text = _fmt(by_model[model], table.metric, table.stderr[row][model])
            cells.append(f"**{text}**" if best is not None and by_model[model] == best else text)
        others = [by_model.get(baseline), best_of(by_model, sources)]
        others += [best_of(by_model, pairs)] if pairs else []
        others += [by_model.get(joint)] if joint else []
        fused_value = by_model.get(fused)
        cells += [_gain(fused_value, o, table.higher_is_better, table.metric) for o in others]
        name = f"**{row}**" if row == AVERAGE else row
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for task, reason in table.skipped.items():
        lines.append(f"\n_{task} skipped: {reason}_")
    return "\n".join(lines) + "\n"


def _colors(
    models: list[str], fused: str, baseline: str, pairs=(), joint: str | None = None
) -> dict[str, str]:
    """Red the fused model, orange the baseline, purple the joint one, greens the pairwise
    ones, blues the sources."""
    source_colors = ["#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#c6dbef"]
    pair_colors = ["#a1d99b", "#74c476", "#41ab5d", "#238b45", "#006d2c", "#c7e9c0"]
    colors, i, k = {}, 0, 0
    for model in models:
        if model == fused:
            colors[model] = "#d62728"
        elif model == baseline:
            colors[model] = "#ff7f0e"
        elif model == joint:
            colors[model] = "#9467bd"
        elif model in pairs:
            colors[model] = pair_colors[k % len(pair_colors)]
            k += 1
        else:
            colors[model] = source_colors[i % len(source_colors)]
            i += 1
    return colors


def _short(task: str) -> str:
    return task.replace("bbh_cot_fewshot_", "").replace("fusellm_local_", "")


def _draw_suite(ax, table: SuiteTable, colors: dict[str, str], fused: str, horizontal: bool):
    rows = list(table.values)
    width = 0.8 / len(table.models)
    scale = 100.0 if table.metric in PERCENT_METRICS else 1.0
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


def bar_chart(
    tables: dict[str, SuiteTable],
    fused: str,
    baseline: str,
    crowded: int = 8,
    *,
    pairs=(),
    joint: str | None = None,
):
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
        colors = _colors(table.models, fused, baseline, pairs, joint)
        _draw_suite(ax, table, colors, fused, flat)
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
    *,
    pairs: list[str] = (),
    joint: str | None = None,
) -> Comparison:
    """Write comparison.md and comparison.png for the fused model vs sources and baseline.

    results: model label -> SuiteResult (or its dict), or -> {suite: SuiteResult} for several
    suites. Every named model must be present; columns go sources, baseline, the joint model,
    the pairwise ones (`pairs`, whose merge is the fused model), fused.
    """
    import matplotlib.pyplot as plt

    pairs = list(pairs)
    order = list(sources) + [baseline] + ([joint] if joint else []) + pairs + [fused]
    missing = [m for m in order if m not in results]
    if missing:
        raise KeyError(
            f"no results for {', '.join(missing)}; results has {', '.join(results) or 'nothing'}"
        )
    if len(set(order)) != len(order):
        raise ValueError(
            f"fused, baseline, joint, pairs and sources must be distinct models, got {order}"
        )
    tables = build_tables(results, order)
    roles = f"Fused: **{fused}**"
    if pairs:
        roles += f" (the merge of the pairwise models {', '.join(pairs)})"
    roles += f"; CLM baseline: **{baseline}**; "
    if joint:
        roles += f"jointly fused: **{joint}**; "
    header = (
        f"# FuseLLM comparison\n\n{roles}sources: {', '.join(sources)}. Values ± standard "
        "error; gains are signed so that positive means the fused model is better.\n"
    )
    body = "\n".join(
        markdown_table(t, fused, baseline, sources, pairs, joint) for t in tables.values()
    )
    markdown = header + "\n" + body
    output_dir = Path(output_dir)
    table_path = write_text_atomic(output_dir / "comparison.md", markdown)
    fig = bar_chart(tables, fused, baseline, pairs=pairs, joint=joint)
    try:
        chart_path = write_bytes_atomic(output_dir / "comparison.png", _png(fig))
    finally:
        plt.close(fig)
    return Comparison(
        fused, baseline, list(sources), tables, markdown, table_path, chart_path, pairs, joint
    )
