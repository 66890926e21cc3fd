"""Browser checks of the Prefect and MLflow UIs: real servers on 127.0.0.1, Debian's Chromium.

Import what a test needs (``from browser import browser, page, start_prefect_ui, running``;
importing the `browser` and `page` fixtures into a test module makes them available there). The
servers are the ones `fusellm ui` starts (`fusellm.settings.ui_servers`), over a project data
folder: the demo's (`.fusellm/`, `$FUSELLM_HOME`) or one a test fills. Each runs in its own
process group, is waited for until it answers, and is stopped with its whole group at the end.

The browser is `/usr/bin/chromium` from Debian's `chromium` package, driven by Playwright in
headless mode; Playwright's own browser download (`playwright install`) is never used, and host
resolution is limited to 127.0.0.1 so that no page can reach the internet (the Prefect UI
otherwise contacts an analytics host).

The `assert_*` functions move through the UIs as a person would: open the start page, follow
the navigation to the list of runs, open the run, and wait for the text that shows the result.
They never wait for "network idle": the MLflow UI polls its server forever. Each step leaves a
screenshot in the caller's folder, so a failure can be looked at.

Pointed at the demo's data folder (flows run there on Prefect's local ephemeral API write to
the same database that `prefect server start` then serves)::

    home = fusellm.settings.data_dir()
    with running(start_prefect_ui(home, logs)) as prefect, \\
            running(start_mlflow_ui(home, logs)) as mlflow_ui:
        assert_prefect_flow_run_completed(page, prefect.url, "fuse", screenshots=shots)
        assert_mlflow_run_has_metrics_and_chart(
            page, mlflow_ui.url, "fusellm", "evaluate", ["bits_per_byte/fused"],
            "comparison/comparison.png", parent_run_name=config.name, screenshots=shots)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import support
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import expect, sync_playwright

from fusellm.settings import MLFLOW_DB, ServerCommand, data_dir, ui_servers

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # tests run as root in containers
    "--disable-gpu",
    "--disable-dev-shm-usage",  # containers give /dev/shm 64 MB; Chromium crashes on big pages
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]
VIEWPORT = {"width": 1440, "height": 900}
STEP_TIMEOUT_MS = 30_000  # one UI step on a busy 2-core machine
SERVER_START_S = 120.0  # Prefect's first start builds its database and copies the UI build
MISSING_WAIT_MS = 10_000  # how long a table filtered to one metric may take to show it

# Playwright's assertions wait 5 s by default, short for a busy CI machine.
expect.set_options(timeout=STEP_TIMEOUT_MS)


# --- servers ----------------------------------------------------------------------------------


@dataclass
class RunningServer:
    """A UI server started in its own process group, with its output in `log`."""

    name: str
    url: str
    health_urls: tuple[str, ...]
    proc: subprocess.Popen
    log: Path

    def log_tail(self) -> str:
        return support.log_tail(self.log)

    def wait_healthy(self, timeout_s: float = SERVER_START_S) -> None:
        """Block until every health URL answers 200; fail with the server's log otherwise."""
        support.wait_http(
            self.health_urls, self.proc, timeout_s, self.log, name=f"{self.name} server"
        )

    def stop(self) -> None:
        """SIGTERM to the server's process group, then SIGKILL to what is left of it."""
        support.stop_server(self.proc)


def start_server(
    name: str, command: ServerCommand, health_paths: Sequence[str], log_dir: Path
) -> RunningServer:
    """Start `command` in a new process group, telemetry off, output to `log_dir/<name>.log`.

    Returns at once; call `wait_healthy` before use (starting two servers and then waiting lets
    them start side by side).
    """
    log = log_dir / f"{name}.log"
    proc = support.start_server(command.argv, log, command.env)
    return RunningServer(name, command.url, tuple(command.url + p for p in health_paths), proc, log)


def start_prefect_ui(
    data: str | os.PathLike, log_dir: Path, port: int | None = None
) -> RunningServer:
    """`prefect server start` over the Prefect home of project data folder `data`."""
    command = ui_servers(data, prefect_port=port or support.free_port())["prefect"]
    # The API answers before the UI build is in place on a first start: wait for both.
    return start_server("prefect", command, ("/api/health", "/"), log_dir)


def start_mlflow_ui(
    data: str | os.PathLike, log_dir: Path, port: int | None = None
) -> RunningServer:
    """`mlflow ui` over the SQLite store of project data folder `data`, which must exist: a
    server started on a missing file would create an empty store and show nothing."""
    db = data_dir(data) / MLFLOW_DB
    if not db.is_file():
        raise FileNotFoundError(
            f"no MLflow store at {db}: run the demo (`fusellm demo`) or a fusion with this data "
            "folder first, or point FUSELLM_HOME at the folder that holds mlflow.db"
        )
    command = ui_servers(data, mlflow_port=port or support.free_port())["mlflow"]
    return start_server("mlflow", command, ("/health", "/"), log_dir)


@contextmanager
def running(server: RunningServer, timeout_s: float = SERVER_START_S) -> Iterator[RunningServer]:
    """Wait until `server` is healthy, yield it, stop it (and its group) however the block ends."""
    try:
        server.wait_healthy(timeout_s)
        yield server
    finally:
        server.stop()


# --- browser ----------------------------------------------------------------------------------


def require_chromium() -> Path:
    """Debian's Chromium, or a failure that says how to install it (CI installs it: a missing
    browser is a broken machine, not a reason to skip)."""
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        found = shutil.which("chromium")
        hint = f" (a `chromium` at {found} is not the one these tests use)" if found else ""
        pytest.fail(
            f"{CHROMIUM} is missing{hint}: install Debian's chromium package as root "
            "(`apt-get update && apt-get install -y chromium`); the browser tests need it",
            pytrace=False,
        )
    return CHROMIUM


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium under Playwright, on loopback only, closed after the module.

    Not session-wide: while Playwright's sync API is open it holds an asyncio loop in the main
    thread, and every later test that runs asyncio there (Prefect's flows do) would fail.
    """
    executable = require_chromium()
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(executable), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser):
    """A fresh page (own cookies and storage) with a desktop-sized window."""
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(STEP_TIMEOUT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


def _shot(page, folder: Path | None, name: str) -> None:
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


@contextmanager
def _step(page, folder: Path | None, name: str) -> Iterator[None]:
    """Screenshot after a step, and also when it fails (named `<name>-failed`)."""
    try:
        yield
    except Exception:
        _shot(page, folder, f"{name}-failed")
        raise
    _shot(page, folder, name)


# --- what the UIs must show -------------------------------------------------------------------


# Prefect's state names, as its UI writes them in state badges.
PREFECT_STATES = (
    "Scheduled",
    "Late",
    "AwaitingRetry",
    "AwaitingConcurrencySlot",
    "Pending",
    "Paused",
    "Suspended",
    "Running",
    "Retrying",
    "Completed",
    "Cached",
    "RolledBack",
    "Cancelling",
    "Cancelled",
    "Crashed",
    "Failed",
    "TimedOut",
)
FINAL_FAILURES = ("Failed", "Crashed", "Cancelled", "TimedOut", "RolledBack")
_STATE_TEXT = " or ".join(f"normalize-space(text())='{s}'" for s in PREFECT_STATES)


def assert_prefect_flow_run_completed(
    page, ui_url: str, flow_name: str, *, screenshots: Path | None = None
) -> str:
    """The newest run of flow `flow_name` is Completed, in the list of runs and on its own page.

    Opens the UI's start page, follows "Runs" in the navigation, takes the first (newest) run
    whose flow is `flow_name`, checks its state badge there, opens it and checks the run page:
    its name, its flow, and the state badge. Returns the flow run's name.
    """
    with _step(page, screenshots, "prefect-1-start"):
        page.goto(ui_url)
        runs_nav = page.get_by_role("link", name="Runs", exact=True).first
        runs_nav.wait_for()
    with _step(page, screenshots, "prefect-2-runs"):
        runs_nav.click()
        flow_link = page.get_by_role("link", name=flow_name, exact=True).first
        _expect_visible(
            flow_link, f"no run of flow {flow_name!r} in the Prefect UI's run list at {ui_url}"
        )
        # The run's own link follows its flow's link (breadcrumb "flow / run"); its card holds
        # the state badge.
        run_link = flow_link.locator("xpath=following::a[contains(@href, '/runs/flow-run/')][1]")
        run_name = run_link.inner_text().strip()
        card = run_link.locator(f"xpath=ancestor::*[.//*[{_STATE_TEXT}]][1]")
        badge = card.locator(f"xpath=.//*[{_STATE_TEXT}]").first
        state = badge.inner_text().strip()
        if state in FINAL_FAILURES:
            raise AssertionError(
                f"the newest run of flow {flow_name!r} ({run_name!r}) is {state}, not Completed, "
                f"in the Prefect UI at {ui_url}"
            )
        expect(badge).to_have_text("Completed")  # a run still going gets the step's time
    with _step(page, screenshots, "prefect-3-flow-run"):
        run_link.click()
        page.wait_for_url(re.compile(r".*/runs/flow-run/[0-9a-f-]+"))
        main = page.get_by_role("main")
        # The list stays on screen for a moment after the URL changes: wait for the run page's
        # own tabs before reading anything.
        expect(main.get_by_role("tab", name="Logs")).to_be_visible()
        expect(main.get_by_text(run_name, exact=True).first).to_be_visible()
        expect(main.get_by_role("link", name=flow_name, exact=True).first).to_be_visible()
        # The first state badge on the page is the run's own (task runs and logs come later).
        expect(main.locator(f"xpath=.//*[{_STATE_TEXT}]").first).to_have_text("Completed")
        # Prefect's own last log line of the run agrees with the badge.
        expect(main.get_by_text("Finished in state Completed").first).to_be_visible()
    return run_name


def _expect_visible(locator, problem: str) -> None:
    """Wait for `locator`, failing with `problem` rather than a selector dump."""
    try:
        locator.wait_for(state="visible")
    except PlaywrightTimeout:
        raise AssertionError(problem) from None


def assert_mlflow_run_has_metrics_and_chart(
    page,
    ui_url: str,
    experiment: str,
    run_name: str,
    metric_names: Sequence[str],
    artifact_name: str,
    *,
    parent_run_name: str | None = None,
    screenshots: Path | None = None,
) -> tuple[dict[str, str], tuple[int, int]]:
    """The newest run `run_name` of `experiment` lists every metric and shows `artifact_name`.

    Opens the UI's start page, switches to the "Model training" view (MLflow 3 opens on its
    GenAI view), follows "Experiments", opens `experiment`, opens the run from the runs list
    (a nested stage run is found by expanding `parent_run_name`'s row first), finds each metric
    in the run's metrics table with the table's own search box, then opens the artifact
    (`comparison/comparison.png`: folder by folder) in the Artifacts tab and waits until the
    browser has decoded the image. Returns the metric values as displayed and the image's
    size in pixels, for the caller to compare with what was logged.
    """
    with _step(page, screenshots, "mlflow-1-start"):
        page.goto(ui_url)
        page.get_by_role("button", name="Model training", exact=True).click()
        _close_assistant(page)
    with _step(page, screenshots, "mlflow-2-experiments"):
        page.get_by_role("link", name="Experiments", exact=True).first.click()
        _expect_visible(
            page.get_by_role("link", name=experiment, exact=True).first,
            f"no experiment {experiment!r} in the MLflow UI at {ui_url}",
        )
    with _step(page, screenshots, "mlflow-3-runs"):
        page.get_by_role("link", name=experiment, exact=True).first.click()
        page.wait_for_url(re.compile(r".*#/experiments/\d+"))
        grid = page.get_by_role("grid")
        if parent_run_name is not None:
            parent = page.get_by_role("link", name=parent_run_name, exact=True)
            _expect_visible(
                grid.locator(parent).first,
                f"no run {parent_run_name!r} in experiment {experiment!r} of the "
                f"MLflow UI at {ui_url}",
            )
            # The button before the run's name shows its nested (stage) runs.
            cell = grid.get_by_role("gridcell").filter(has=parent).first
            cell.get_by_role("button").first.click()
        run_link = grid.get_by_role("link", name=run_name, exact=True).first
        where = f" under {parent_run_name!r}" if parent_run_name else ""
        _expect_visible(
            run_link,
            f"no run {run_name!r}{where} in experiment {experiment!r} of the MLflow UI at {ui_url}",
        )
    with _step(page, screenshots, "mlflow-4-run-metrics"):
        run_link.click()
        main = page.get_by_role("main")
        expect(main.get_by_role("heading", name=run_name, exact=True)).to_be_visible()
        expect(main.get_by_role("heading", name=re.compile(r"^Metrics \(\d+\)$"))).to_be_visible()
        values = {name: _metric_value(main, name) for name in metric_names}
        main.get_by_role("textbox", name="Search metrics").fill("")  # the whole table again
    with _step(page, screenshots, "mlflow-5-chart"):
        main.get_by_role("tab", name="Artifacts").click()
        *folders, file_name = artifact_name.split("/")
        tree = main.get_by_role("list").first
        for name in [*folders, file_name]:
            entry = tree.get_by_text(name, exact=True).first
            _expect_visible(
                entry,
                f"run {run_name!r} has no artifact {artifact_name!r} in the "
                f"MLflow UI at {ui_url} (no {name!r} in its artifact tree)",
            )
            entry.click()
        image = main.get_by_role("img", name=artifact_name, exact=True)
        expect(image).to_be_visible()
        size = image.evaluate(
            """img => new Promise(done => {
                   const ready = () => done([img.naturalWidth, img.naturalHeight]);
                   img.complete ? ready() : img.addEventListener("load", ready, {once: true});
               })"""
        )
        assert size[0] > 0 and size[1] > 0, (
            f"the MLflow UI could not show {artifact_name!r} of run {run_name!r} as an image"
        )
    return values, (int(size[0]), int(size[1]))


def _close_assistant(page) -> None:
    """Close MLflow's chat side panel when it is open: it takes a third of the window."""
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count() and close.first.is_visible():
        close.first.click()


def _metric_value(main, name: str) -> str:
    """The value the run's metrics table shows for `name`, found via the table's search box
    (a long table scrolls; a person searches)."""
    main.get_by_role("textbox", name="Search metrics").fill(name)
    cell = main.page.get_by_role("cell", name=name, exact=True)  # `has=` is relative to the row
    row = main.get_by_role("row").filter(has=cell)
    try:
        expect(row).to_have_count(1, timeout=MISSING_WAIT_MS)
    except AssertionError:
        raise AssertionError(f"metric {name!r} is not in the run's metrics table") from None
    return row.get_by_role("cell").nth(1).inner_text().strip()
