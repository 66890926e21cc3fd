"""The demo's results as a person sees them: the Prefect UI shows the `fuse` flow run completed,
the MLflow UI shows the fused model's run with its metrics and its comparison chart.

The stand-in for the demo is made with the real pieces: a small `@flow` named `fuse` runs
against a real `prefect server start` and tracks to MLflow with `fusellm.tracking` on a SQLite
store, both in a project data folder laid out like the demo's (`fusellm.settings`). The UIs
are then served by the same commands `fusellm ui` runs, and checked in Debian's Chromium.
Screenshots land in `$FUSELLM_UI_SCREENSHOTS` when set (else in the test's temporary folder).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import browser as ui
import pytest
from browser import (  # noqa: F401  (fixtures)
    assert_mlflow_run_has_metrics_and_chart,
    assert_prefect_flow_run_completed,
    browser,
    page,
    running,
    start_mlflow_ui,
    start_prefect_ui,
)

from fusellm.settings import embedded_defaults

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

EXPERIMENT = "fusellm"
RUN_NAME = "fusellm-demo"
# On the fusion run itself (a summary) and on its nested `evaluate` stage run (as the demo does).
RUN_METRICS = {
    "eval/bits_per_byte": 1.94,
    "eval/bits_per_byte_baseline": 1.954,
    "align/coverage": 0.49,
}
STAGE_METRICS = {"bits_per_byte/fused": 1.94, "bits_per_byte/baseline": 1.954}
CHART = "comparison/comparison.png"
CHART_PIXELS = (400, 300)  # figsize (4, 3) at matplotlib's default 100 dpi

# The stand-in flow: named like the demo's and logging like it (a parent fusion run, a nested
# stage run, a matplotlib chart) through fusellm.tracking. Its own process, so that Prefect's
# client reads the server's address from the environment like the demo's would.
FLOW = textwrap.dedent(
    """
    import json, sys

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from prefect import flow

    from fusellm import tracking

    spec = json.loads(sys.argv[1])

    def chart(values):
        fig, ax = plt.subplots(figsize=(4, 3))
        ax.bar(["fused", "baseline"], values)
        ax.set_ylabel("bits per byte")
        return fig

    @flow(name="fuse")
    def fuse() -> str:
        with tracking.fusion_run(spec["run"], experiment=spec["experiment"],
                                 params={"training": {"lam": 0.9}}) as run_id:
            with tracking.stage_run("evaluate"):
                tracking.log_metrics(spec["stage_metrics"])
                tracking.log_figure(chart(list(spec["stage_metrics"].values())), spec["chart"])
            tracking.log_metrics(spec["run_metrics"])
            tracking.log_figure(chart([1.94, 1.954]), spec["chart"])
            return run_id

    @flow(name="fuse-broken")
    def fuse_broken() -> None:
        raise RuntimeError("a stage failed")

    fuse_broken(return_state=True)  # a failed run in the list, for the negative check
    print(fuse())
    """
)


def _run_stand_in_flow(home: Path, api_url: str) -> str:
    """Run the stand-in `fuse` flow against the Prefect server at `api_url`, tracking to the
    MLflow store of data folder `home`; return the MLflow run id it printed."""
    spec = {
        "run": RUN_NAME,
        "experiment": EXPERIMENT,
        "chart": CHART,
        "run_metrics": RUN_METRICS,
        "stage_metrics": STAGE_METRICS,
    }
    env = {**os.environ, **embedded_defaults(home), "PREFECT_API_URL": api_url}
    done = subprocess.run(
        [sys.executable, "-c", FLOW, json.dumps(spec)],
        env=env,
        cwd=home,
        check=False,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, (
        f"stand-in flow failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout.strip().splitlines()[-1]


def _displayed(values: dict[str, float]) -> dict[str, str]:
    """How the MLflow UI writes these logged values."""
    return {name: f"{value:g}" for name, value in values.items()}


def test_prefect_and_mlflow_uis_show_the_fusion(tmp_path, page):
    """Flow run `fuse` is Completed in the Prefect UI (a failed flow's run is reported as
    Failed); the fusion run and its nested `evaluate` stage show their metrics with the logged
    values and the chart in the MLflow UI (a metric never logged is reported missing)."""
    home = tmp_path / "fusellm-home"
    logs = tmp_path / "logs"
    shots = Path(os.environ.get("FUSELLM_UI_SCREENSHOTS") or tmp_path / "screenshots")
    with running(start_prefect_ui(home, logs)) as prefect:
        _run_stand_in_flow(home, f"{prefect.url}/api")
        mlflow_server = start_mlflow_ui(home, logs)  # starts while the browser checks Prefect
        try:
            run_name = assert_prefect_flow_run_completed(
                page, prefect.url, "fuse", screenshots=shots / "prefect"
            )
            with pytest.raises(AssertionError, match=r"'fuse-broken' .* is Failed, not Completed"):
                assert_prefect_flow_run_completed(
                    page, prefect.url, "fuse-broken", screenshots=shots / "prefect-failed"
                )
        except BaseException:
            mlflow_server.stop()
            raise
    assert run_name  # Prefect's generated flow-run name, read from the list

    with running(mlflow_server) as mlflow_ui:
        values, size = assert_mlflow_run_has_metrics_and_chart(
            page,
            mlflow_ui.url,
            EXPERIMENT,
            RUN_NAME,
            list(RUN_METRICS),
            CHART,
            screenshots=shots / "mlflow-run",
        )
        assert values == _displayed(RUN_METRICS)
        assert size == CHART_PIXELS

        values, size = assert_mlflow_run_has_metrics_and_chart(
            page,
            mlflow_ui.url,
            EXPERIMENT,
            "evaluate",
            list(STAGE_METRICS),
            CHART,
            parent_run_name=RUN_NAME,
            screenshots=shots / "mlflow-stage",
        )
        assert values == _displayed(STAGE_METRICS)
        assert size == CHART_PIXELS

        with pytest.raises(AssertionError, match="'eval/never_logged' is not in the run's"):
            assert_mlflow_run_has_metrics_and_chart(
                page,
                mlflow_ui.url,
                EXPERIMENT,
                RUN_NAME,
                ["eval/never_logged"],
                CHART,
                screenshots=shots / "mlflow-missing",
            )


def test_missing_chromium_fails_with_the_install_command(monkeypatch, tmp_path):
    """No browser is a broken machine, not a skipped test: the failure says what to install."""
    monkeypatch.setattr(ui, "CHROMIUM", tmp_path / "no-chromium")
    with pytest.raises(pytest.fail.Exception, match=r"apt-get install -y chromium"):
        ui.require_chromium()


def test_mlflow_ui_refuses_a_data_folder_without_a_store(tmp_path):
    """Pointed at the wrong folder, the MLflow UI would start on a new empty store and every
    check would fail far from the cause: refuse before starting anything."""
    with pytest.raises(FileNotFoundError, match=r"mlflow\.db.*fusellm demo"):
        start_mlflow_ui(tmp_path / "empty", tmp_path / "logs")
