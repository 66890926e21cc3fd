"""The repository's shape: what the package installs, what imports what, what is read where.

These keep the architecture from drifting: the library (`fusellm/`) never imports Prefect or
the flows; flows and tasks are installed under names of their own; nothing reads outside the
repository; each stage's recorded code version is current.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "fusellm"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _python_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", _python_files(PACKAGE), ids=lambda p: str(p.relative_to(REPO)))
def test_the_library_never_imports_orchestration(path):
    bad = {
        name
        for name in _imports(path)
        if name.split(".")[0] in {"prefect", "flows", "tasks", "fusellm_flows", "fusellm_tasks"}
    }
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_installed_packages_are_the_package_folders():
    """pyproject lists packages by hand (flows/ and tasks/ are mapped to names of their own):
    every folder with an __init__.py must be listed, and nothing else."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(project["packages"])
    found = {
        ".".join(p.parent.relative_to(REPO).parts) for p in PACKAGE.rglob("__init__.py")
    } | {"fusellm_flows", "fusellm_tasks"}
    assert listed == found
    assert project["package-dir"] == {"fusellm_flows": "flows", "fusellm_tasks": "tasks"}
    assert "flows" not in listed and "tasks" not in listed


def test_flows_and_tasks_import_by_their_installed_names():
    for path in _python_files(REPO / "flows") + _python_files(REPO / "tasks"):
        roots = {name.split(".")[0] for name in _imports(path)}
        assert not roots & {"flows", "tasks"}, path


def _tracked_text_files() -> list[Path]:
    import subprocess

    out = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    skip = ("tests/data/",)
    return [
        REPO / f
        for f in out
        if not f.startswith(skip) and Path(f).suffix in {".py", ".md", ".yaml", ".toml", ".sh", ""}
        and (REPO / f).is_file()
    ]


def test_nothing_reads_or_cites_outside_the_repository():
    pattern = re.compile(r"\.\./shared|/work/|DESIGN\.md|FACTS\.md|parents\[2\]")
    hits = []
    for path in _tracked_text_files():
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()):
            if pattern.search(line) and path.name != "test_layout.py":
                hits.append(f"{path.relative_to(REPO)}:{n + 1}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_stage_code_versions_are_current():
    """Changing a stage's code without a version bump would reuse outputs the new code would
    not make. Fix: `python -m fusellm.stages.versions --update` (bumps what changed)."""
    from fusellm.stages import versions

    assert versions.stale() == []
    assert set(versions.recorded()) == set(versions.STAGE_CODE)


def test_a_docstring_edit_is_not_a_code_change(tmp_path, monkeypatch):
    from fusellm.stages import versions

    source = PACKAGE / "method" / "loss.py"
    copy = tmp_path / "method" / "loss.py"
    copy.parent.mkdir()
    text = source.read_text()
    copy.write_text(text)
    monkeypatch.setattr(versions, "PACKAGE", tmp_path)
    monkeypatch.setitem(versions.STAGE_CODE, "train", ("method/loss.py",))
    before = versions.code_digest("train")
    module_doc = ast.get_docstring(ast.parse(text))
    copy.write_text(text.replace(module_doc, module_doc + " More words.") + "\n# a comment\n")
    assert versions.code_digest("train") == before
    copy.write_text(text + "\nTHRESHOLD = 1\n")
    assert versions.code_digest("train") != before
    copy.write_text(text + '\nX = dict(default=1, description="what x is")\n')
    described = versions.code_digest("train")
    copy.write_text(text + '\nX = dict(default=1, description="what x is, better said")\n')
    assert versions.code_digest("train") == described  # documentation, not behaviour
    copy.write_text(text + '\nX = dict(default=2, description="what x is")\n')
    assert versions.code_digest("train") != described
