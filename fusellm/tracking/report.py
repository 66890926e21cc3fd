"""What a fusion shows where people look: its run's description, links into the MLflow UI.

`fusion_markdown` writes one short page: where the run and the model version are, what the
registry decided (champion or challenger, and why), and the comparison table of fused model,
CLM baseline and sources. The same page is the MLflow run's description (`set_description`,
MLflow's `mlflow.note.content` tag) and, with a link back to the MLflow run, what the
orchestration publishes next to its own run.

Links point at the MLflow UI `fusellm.settings.mlflow_ui_url` names: the tracking server
itself, or the UI `fusellm serve` / `fusellm ui` start over the embedded store.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import quote

from mlflow import MlflowClient

from fusellm.settings import mlflow_ui_url
from fusellm.tracking.current import require_run

NOTE_TAG = "mlflow.note.content"  # what the MLflow UI shows as a run's description
NOTE_LIMIT = 8000  # MLflow's longest tag value
_CUT = "\n\n… (cut here: the whole table is the run's `comparison/comparison.md` artifact)\n"


def run_url(run_id: str, *, ui_url: str | None = None) -> str:
    """The MLflow UI page of a run."""
    experiment = MlflowClient().get_run(run_id).info.experiment_id
    return f"{(ui_url or mlflow_ui_url()).rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"


def model_version_url(name: str, version: int | str, *, ui_url: str | None = None) -> str:
    """The MLflow UI page of a registered model version."""
    base = (ui_url or mlflow_ui_url()).rstrip("/")
    return f"{base}/#/models/{quote(name, safe='')}/versions/{version}"


def _table(comparison_md: str) -> str:
    """The comparison without its own title (the page has one)."""
    lines = comparison_md.strip().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join(lines).strip()


def decision_line(registration: Mapping | None) -> str:
    """One sentence: which version, which alias now points at it, and why."""
    if not registration:
        return "Not registered (`tracking.register_model` is off, or the fusion stopped early)."
    alias = "champion" if registration.get("is_champion") else "challenger"
    return (
        f"Version {registration['version']} of `{registration['name']}` is the "
        f"**{alias}** (alias `@{alias}`): {registration.get('reason', '')}."
    )


def fusion_markdown(
    title: str,
    *,
    comparison_md: str | None,
    registration: Mapping | None,
    links: Mapping[str, str],
) -> str:
    """The fusion's page in markdown: title, decision, links (label -> URL), comparison."""
    parts = [f"# {title}", "", f"**Champion decision.** {decision_line(registration)}", ""]
    parts += [f"- [{label}]({url})" for label, url in links.items() if url]
    parts.append("")
    if comparison_md:
        parts += ["## Comparison", "", _table(comparison_md)]
    else:
        parts.append("No comparison: the baseline or the sources were not evaluated.")
    return "\n".join(parts).rstrip() + "\n"


def set_description(markdown: str, *, run_id: str | None = None) -> None:
    """Make `markdown` the run's description in the MLflow UI (cut to what a tag holds)."""
    if len(markdown) > NOTE_LIMIT:
        markdown = markdown[: NOTE_LIMIT - len(_CUT)] + _CUT
    MlflowClient().set_tag(require_run("set_description", run_id), NOTE_TAG, markdown)
