"""The demo's runs as a person sees them: the Prefect UI and the MLflow UI in headless Chromium.

A tiny demo (the real `fusellm demo` path: sources, corpus, the `fuse` flow on Prefect's local
ephemeral API, MLflow on SQLite, all under one project data folder) runs in a subprocess; then
`prefect server start` and `mlflow ui` serve that folder on 127.0.0.1 and the browser finds the
demo's flow run Completed and the fusion run with the fused model's metrics and the chart.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

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

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
DEMO = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    from test_demo_run import _tiny_recipe, _tiny_sources
    from fusellm.demo.run import run_demo
    from fusellm_flows.fuse import fuse
    run_demo(fuse, sys.argv[2], recipe=_tiny_recipe(), sources_recipe=_tiny_sources(),
             cache_dir=sys.argv[3], home=sys.argv[4], progress=False)
    """
)


def _run_tiny_demo(root: Path) -> Path:
    """Run the demo into `root/demo` with its own data folder `root/home`; return that folder."""
    home = root / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env.update(FUSELLM_HOME=str(home), PYTHONPATH=str(REPO))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    done = subprocess.run(
        [sys.executable, "-c", DEMO, str(TESTS), str(root / "demo"), str(root / "cache"), str(home)],
        env=env, cwd=root, capture_output=True, text=True, timeout=800, check=False,
    )
    assert done.returncode == 0, f"demo failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert (root / "demo" / "report.json").is_file()
    return home


def test_demo_runs_show_in_the_prefect_and_mlflow_uis(tmp_path, page):
    home = _run_tiny_demo(tmp_path)
    shots = Path(os.environ.get("FUSELLM_UI_SCREENSHOTS", tmp_path / "shots"))
    logs = tmp_path / "logs"
    logs.mkdir()
    with running(start_prefect_ui(home, logs)) as prefect:
        assert_prefect_flow_run_completed(page, prefect.url, "fuse", screenshots=shots)
    with running(start_mlflow_ui(home, logs)) as mlflow_ui:
        values, (width, height) = assert_mlflow_run_has_metrics_and_chart(
            page,
            mlflow_ui.url,
            "fusellm-demo",
            "fusellm-demo",
            ["local/fused/bits_per_byte", "local/baseline/bits_per_byte"],
            "comparison/comparison.png",
            screenshots=shots,
        )
    assert float(values["local/fused/bits_per_byte"]) > 0
    assert width > 100 and height > 100
