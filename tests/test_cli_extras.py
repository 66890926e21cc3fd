"""`pip install fusellm` without extras: a command that needs one ends with one line naming the
module and the extra, exit code 1; `fusellm plan` needs none (fusellm.extras).

The `fusellm` command runs in a subprocess in which the optional modules cannot be found, as in
an environment where they were never installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.util import find_spec
from pathlib import Path

import pytest

from fusellm.extras import extra_for, extras_by_module

REPO = Path(__file__).resolve().parents[1]
SEVEN_B = REPO / "configs" / "fusellm-7b.yaml"
# what the extras install beyond the core's own dependencies
OPTIONAL = (
    "deepspeed", "accelerate", "mlflow", "lm_eval", "datasets", "prefect", "psutil", "boto3",
    "pyarrow", "prefect_docker", "psycopg2",
)  # fmt: skip

# Every finder on sys.meta_path answers "not here" for the hidden modules, so `import mlflow`
# fails as it does where mlflow is not installed, and importlib.util.find_spec returns None.
# No command here may start the servers: if one gets that far, it fails instead.
LAUNCHER = textwrap.dedent(
    """
    import os, sys

    HIDDEN = set(os.environ["HIDDEN_MODULES"].split(","))

    class Hide:
        def __init__(self, finder):
            self.finder = finder

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in HIDDEN:
                return None
            find = getattr(self.finder, "find_spec", None)
            return find(name, path, target) if find else None

        def __getattr__(self, name):
            return getattr(self.finder, name)

    sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
    import fusellm.cli.ui

    def no_servers(*args, **kwargs):
        raise AssertionError("servers started")

    fusellm.cli.ui.start_servers = no_servers
    from fusellm_flows.cli import main

    sys.argv = ["fusellm", *sys.argv[1:]]
    main()
    """
)


def _fusellm(
    tmp_path: Path, *args: str, hidden=OPTIONAL, hf_cache: Path | None = None
) -> subprocess.CompletedProcess:
    launcher = tmp_path / "fusellm_without_extras.py"
    launcher.write_text(LAUNCHER)
    env = {
        **os.environ,
        "HIDDEN_MODULES": ",".join(hidden),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(hf_cache or tmp_path / "empty-hf-cache"),
        "NO_COLOR": "1",
    }
    return subprocess.run(
        [sys.executable, str(launcher), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_the_extras_are_read_from_the_package_metadata():
    modules = extras_by_module()
    assert set(OPTIONAL) <= set(modules)
    assert extra_for("mlflow", prefer=("plan", "orchestration")) == "orchestration"
    assert extra_for("mlflow.tracking", prefer=("train", "orchestration")) == "train"
    assert extra_for("lm_eval") == "eval" and extra_for("psycopg2") == "stack"
    assert extra_for("numpy") is None and extra_for("no_such_module") is None
    for module, extras in modules.items():  # the import names are right: all installed here
        if set(extras) - {"dev"}:
            assert find_spec(module) is not None, (module, extras)


def test_plan_needs_no_extra(tmp_path):
    result = _fusellm(tmp_path, "plan", str(SEVEN_B), "--home", str(tmp_path / "home"), "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["stopped"].startswith("identities not resolved")
    assert plan["estimate"]["total"]["gpu_hours"] > 0


@pytest.mark.slow
def test_plan_stops_at_the_stage_whose_key_needs_a_missing_extra(tmp_path):
    """The evaluation key reads lm-eval's task index and the registration key names MLflow's
    registry: without them the plan looks at every stage before, and names the extra."""
    import yaml
    from fusion_fixtures import EVAL_DATA, corpus_texts, tiny_hub_model, write_corpus

    texts = corpus_texts()
    tiny_hub_model(tmp_path / "hf")
    write_corpus(tmp_path / "corpus", texts)
    config = tmp_path / "fusion.yaml"
    data = {
        "target": {"uri": "hf://org/tiny"},
        "sources": [{"uri": "hf://org/tiny", "name": "tiny"}],
        "corpus": {"uri": "corpus"},
        "pieces": {"block_size": 64, "margin": 8},
        "evaluation": {"data_dir": str(EVAL_DATA)},
        "tracking": {"register_model": True},
    }
    config.write_text(yaml.safe_dump(data))

    def plan(hidden, *sets: str) -> dict:
        args = ("plan", str(config), "--json", *sets)
        result = _fusellm(tmp_path, *args, hidden=hidden, hf_cache=tmp_path / "hf")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def stages(plan: dict) -> set[str]:
        return {u["stage"] for u in plan["units"]}

    core = plan(OPTIONAL)
    assert core["stopped"] == "evaluate: lm_eval is not installed: pip install 'fusellm[eval]'"
    assert {"pieces", "extract", "fuse", "train"} <= stages(core)
    assert not stages(core) & {"evaluate", "register"}
    without_mlflow = plan(("mlflow",))
    assert without_mlflow["stopped"] == (
        "register: mlflow is not installed: pip install 'fusellm[orchestration]'"
    )
    assert "evaluate" in stages(without_mlflow) and "register" not in stages(without_mlflow)
    not_registering = plan(("mlflow",), "--set", "tracking.register_model=false")
    assert not_registering["stopped"] is None
    assert not_registering["units"] == without_mlflow["units"]
    assert all(not u["done"] for u in without_mlflow["units"])
    assert not Path(core["workdir"]).exists()  # planned, nothing written


@pytest.mark.parametrize(
    ("args", "hidden", "module"),
    [
        (("run", str(SEVEN_B)), OPTIONAL, "prefect"),
        (("run", str(SEVEN_B)), ("mlflow",), "mlflow"),  # Prefect there, MLflow not
        (("demo", "--out", "demo"), OPTIONAL, "prefect"),
        (("serve",), OPTIONAL, "prefect"),  # started as programs, not imported
        (("serve",), ("mlflow",), "mlflow"),
        (("ui", "--start"), OPTIONAL, "prefect"),
    ],
)
def test_a_command_without_its_extra_says_what_to_install(tmp_path, args, hidden, module):
    result = _fusellm(tmp_path, *args, "--home", str(tmp_path / "home"), hidden=hidden)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.strip() == (
        f"error: fusellm {args[0]} needs {module}, which is not installed: "
        "pip install 'fusellm[orchestration]'"
    )
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "demo").exists()
