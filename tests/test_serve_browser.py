"""`fusellm serve` as a person uses it: one command, then everything in the browser.

From a fresh data folder, `fusellm serve --demo-size tiny` builds the demo's models and data
(a few thousand parameters each, seconds), starts the Prefect and MLflow servers on 127.0.0.1
and serves the deployments. In Debian's Chromium: the deployments are listed, `refusion` with
its weekly schedule; `fuse` is run from its Run button with the default form (the demo's
config); its flow run, named after the config, ends Completed; its markdown artifact links to
the MLflow run, whose page shows the comparison table, the registered version and its alias.
Then Ctrl-C (SIGINT to the command's process group, as a terminal sends it) stops everything.

Screenshots are kept in `$FUSELLM_UI_SCREENSHOTS` when set, else in the test's temporary folder;
the path is printed.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
from browser import browser, page  # noqa: F401  (fixtures)
from playwright.sync_api import expect
from support import api_json, free_port, log_tail, start_server, stop_server

from fusellm.settings import LOCALHOST, MLFLOW_DB, sqlite_uri

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
DEPLOYMENTS = {
    "fuse", "refusion", "prepare", "extract", "align-fuse", "train",
    "extract-part", "train-part", "evaluate-part", "train-node",
}  # fmt: skip
SERVE_READY_S = 300  # sources, data, both servers' first start, on a busy 2-core machine
RUN_DONE_MS = 300_000  # the tiny fusion, in a fresh flow-run process
STOP_GRACE_S = 60
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# Variables of this test process that would point the command elsewhere than its data folder.
FOREIGN = (
    "FUSELLM_HOME",
    "MLFLOW_TRACKING_URI",
    "PREFECT_API_URL",
    "PREFECT_HOME",
    "PREFECT_UI_URL",
    "FUSELLM_MLFLOW_UI_URL",
)


def _served(api: str) -> set[str]:
    try:
        return {d["name"] for d in api_json(f"{api}/deployments/filter", {})}
    except OSError:
        return set()


def _wait_served(api: str, proc, log: Path) -> None:
    deadline = time.monotonic() + SERVE_READY_S
    while _served(api) != DEPLOYMENTS:
        if proc.poll() is not None:
            pytest.fail(f"fusellm serve exited with {proc.returncode}:\n{log_tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"no deployments after {SERVE_READY_S} s:\n{log_tail(log)}")
        time.sleep(2)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection((LOCALHOST, port), timeout=1):
            return True
    except OSError:
        return False


def _shot(page, folder: Path, name: str) -> None:
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def test_serve_runs_fuse_from_the_prefect_ui_and_links_to_mlflow(tmp_path, page):
    home = tmp_path / "home"
    shots = Path(os.environ.get("FUSELLM_UI_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {shots}")
    prefect_port, mlflow_port = free_port(), free_port()
    prefect, mlflow_ui = f"http://{LOCALHOST}:{prefect_port}", f"http://{LOCALHOST}:{mlflow_port}"
    log = tmp_path / "serve.log"
    argv = [
        str(Path(sys.executable).parent / "fusellm"),
        "serve",
        "--home",
        str(home),
        "--demo-size",
        "tiny",
        "--prefect-port",
        str(prefect_port),
        "--mlflow-port",
        str(mlflow_port),
    ]
    env = {
        "FUSELLM_CACHE": str(tmp_path / "cache"),  # the demo's sources, built here
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")
        ),
    }
    proc = start_server(argv, log, env, unset=FOREIGN, cwd=tmp_path)
    try:
        _wait_served(f"{prefect}/api", proc, log)

        # The deployments, and refusion's weekly schedule.
        page.goto(f"{prefect}/deployments")
        for name in ("fuse", "refusion"):
            expect(page.get_by_role("link", name=name, exact=True).first).to_be_visible()
        _shot(page, shots, "1-deployments")
        page.get_by_role("link", name="refusion", exact=True).first.click()
        expect(page.get_by_text("At 03:00 AM, only on Monday").first).to_be_visible()
        _shot(page, shots, "2-refusion-schedule")

        # fuse: Run -> Quick run -> the default form (the demo's config) -> Run.
        page.goto(f"{prefect}/deployments")
        page.get_by_role("link", name="fuse", exact=True).first.click()
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Quick run", exact=True).click()
        dialog = page.get_by_role("dialog")
        expect(dialog.get_by_role("textbox").first).to_have_value("fusellm-demo")  # its name
        _shot(page, shots, "3-run-form")
        dialog.get_by_role("button", name="Run", exact=True).click()
        expect(page.get_by_role("button", name="View run").first).to_be_visible()  # a toast
        _shot(page, shots, "4-run-created")
        fuse_runs = {"deployments": {"name": {"any_": ["fuse"]}}}
        runs = api_json(f"{prefect}/api/flow_runs/filter", fuse_runs)
        assert len(runs) == 1, f"one press of Run, one flow run; got {runs}"
        run_id = runs[0]["id"]
        page.goto(f"{prefect}/runs/flow-run/{run_id}")  # where the toast's "View run" leads
        deadline = time.monotonic() + RUN_DONE_MS / 1000
        while (state := api_json(f"{prefect}/api/flow_runs/{run_id}")["state_type"]) not in FINAL:
            assert proc.poll() is None, f"fusellm serve exited:\n{log_tail(log)}"
            assert time.monotonic() < deadline, f"fuse still {state}:\n{log_tail(log)}"
            time.sleep(3)
        assert state == "COMPLETED", f"fuse ended {state}:\n{log_tail(log)}"
        page.reload()
        expect(page.get_by_text("Completed", exact=True).first).to_be_visible()
        name = re.compile(r"^fusellm-demo-[0-9a-f]{8}-\d{8}-\d{6}$")
        expect(page.get_by_text(name).first).to_be_visible()  # the readable run name
        _shot(page, shots, "5-flow-run-completed")

        # Its artifact, and the artifact's link to the MLflow run.
        page.get_by_text("Artifacts", exact=True).first.click()
        page.get_by_role("link", name=re.compile("fusion-fusellm-demo")).first.click()
        link = page.get_by_role("link", name="MLflow run", exact=True)
        expect(link).to_be_visible()
        expect(page.get_by_text("Champion decision").first).to_be_visible()
        _shot(page, shots, "6-artifact")
        assert link.get_attribute("href").startswith(f"{mlflow_ui}/#/experiments/")
        with page.context.expect_page() as opened:
            link.click()
        mlflow_page = opened.value

        # The MLflow run: the comparison table, the registered version and its alias.
        close = mlflow_page.get_by_role("button", name="Close", exact=True)
        expect(mlflow_page.get_by_text("Champion decision").first).to_be_visible()
        if close.count() and close.first.is_visible():  # MLflow's assistant panel
            close.first.click()
        mlflow_page.get_by_text("Show more", exact=True).first.click()  # the whole description
        alias = re.compile(r"Version 1 of fusellm-demo-fused is the (champion|challenger)")
        expect(mlflow_page.get_by_text(alias).first).to_be_visible()
        alias_name = re.compile(r"alias @(champion|challenger)")
        expect(mlflow_page.get_by_text(alias_name).first).to_be_visible()
        expect(mlflow_page.get_by_role("columnheader", name="fused − CLM")).to_be_visible()
        docs = mlflow_page.get_by_role("cell", name="fusellm_local_docs", exact=True)
        expect(docs).to_be_visible()
        _shot(mlflow_page, shots, "7-mlflow-run-description")
        # The run's own "Registered models" entry (the description's link says "Model ...").
        registered = mlflow_page.get_by_role("link", name=re.compile(r"^fusellm-demo-fused"))
        registered.first.scroll_into_view_if_needed()
        expect(registered.first).to_be_visible()
        _shot(mlflow_page, shots, "8-mlflow-run-registered-model")
    finally:
        stop_server(proc, signal.SIGINT, grace_s=STOP_GRACE_S)  # Ctrl-C

    assert proc.returncode == 0, f"fusellm serve did not stop cleanly:\n{log_tail(log)}"
    assert not _listening(prefect_port) and not _listening(mlflow_port)
    from mlflow import MlflowClient

    client = MlflowClient(sqlite_uri(home / MLFLOW_DB))
    model = client.get_registered_model("fusellm-demo-fused")
    assert {int(v) for v in model.aliases.values()} == {1}
    assert set(model.aliases) & {"champion", "challenger"}
