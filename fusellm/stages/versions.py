"""What a stage's content key says about the code that made it.

A stage output is reused only if the code that computed it would compute it again. Hashing the
whole package for that (as a first version did) re-ran extraction, GPU-days at the paper's
scale, whenever a typo in the demo report was fixed. So each stage names the modules it runs
(`STAGE_CODE`) and carries an explicit version number in ``versions.json``; the key holds the
version, never the code itself. ``versions.json`` also records a digest of each stage's code
(its syntax tree without docstrings and `description=`/`title=`/`help=` arguments, so
comments and documentation never count); a test fails when the
code of a stage changes while its digest is stale, and

    python -m fusellm.stages.versions --update

bumps the version of every stage whose code changed and records the new digests. Reviewers
see the bump in the diff. The major.minor versions of the libraries that decide a stage's
numbers (torch, transformers, tokenizers, lm-eval, deepspeed) are in the key too: a patch
release keeps outputs, a minor release recomputes them.
"""

from __future__ import annotations

import argparse
import ast
import functools
import hashlib
import json
from importlib import metadata
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
VERSIONS_FILE = Path(__file__).with_name("versions.json")

# Stage -> the package files (or folders) whose code decides its output, relative to fusellm/.
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "pieces": ("data/pieces.py", "data/chat.py", "io/corpus.py", "stages/prepare.py"),
    "extract": (
        "data/extract.py",
        "data/chat.py",
        "data/store.py",
        "io/sources.py",
        "stages/extraction.py",
    ),
    "store": ("data/store.py", "stages/extraction.py"),
    "vocab": ("method/vocab.py", "method/tokens.py", "stages/fusion.py"),
    "fuse": (
        "method/align.py",
        "method/align_dtw.py",
        "data/chat.py",
        "method/fuse.py",
        "method/vocab.py",
        "data/fused_data.py",
        "data/store.py",
        "stages/fusion.py",
    ),
    "fused": ("data/store.py", "data/fused_data.py", "stages/fusion.py"),
    "train": ("train", "method/loss.py", "data/store.py", "stages/training.py"),
    "evaluate": ("evaluate", "stages/evaluation.py"),
    "compare": ("evaluate/report.py", "evaluate/results.py", "stages/evaluation.py"),
    "register": ("tracking", "stages/registry.py"),
    "merge": ("method/merge.py", "stages/merging.py"),
}

# Stage -> distributions whose major.minor version is part of its key.
STAGE_LIBRARIES: dict[str, tuple[str, ...]] = {
    "pieces": ("tokenizers", "transformers"),
    "extract": ("torch", "transformers", "tokenizers"),
    "vocab": ("tokenizers", "transformers", "rapidfuzz"),
    "fuse": ("tokenizers", "transformers"),
    "train": ("torch", "transformers", "deepspeed"),
    "evaluate": ("torch", "transformers", "lm-eval"),
    "merge": ("torch", "mergekit"),
}


DOC_KEYWORDS = {"title", "description", "help"}  # a field's documentation, not its behaviour


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    """Docstrings and documentation keywords (`Field(description=...)`) do not count as code."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            node.keywords = [k for k in node.keywords if k.arg not in DOC_KEYWORDS]
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return tree


def _file_digest(path: Path) -> str:
    """Python by its syntax tree without docstrings; data files (task YAML, JSONL) by bytes."""
    data = path.read_bytes()
    if path.suffix == ".py":
        data = ast.dump(_strip_docstrings(ast.parse(data, filename=str(path)))).encode()
    return hashlib.sha256(data).hexdigest()


def _files(entry: str) -> list[Path]:
    path = PACKAGE / entry
    if not path.exists() and (PACKAGE / f"{entry}.py").is_file():  # a module or its package
        path = PACKAGE / f"{entry}.py"
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"STAGE_CODE names {entry}, which is not in the package")
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and (p.suffix in (".py", ".yaml", ".jsonl") or p.name.endswith("_yaml"))
    )


def code_digest(stage: str) -> str:
    """Digest of the code a stage runs (what `versions.json` must have recorded)."""
    h = hashlib.sha256()
    for entry in STAGE_CODE[stage]:
        for f in _files(entry):
            h.update(f"{f.relative_to(PACKAGE).as_posix()}\0{_file_digest(f)}\n".encode())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def recorded() -> dict[str, dict]:
    """stage -> {"version": int, "code": digest} as committed."""
    return json.loads(VERSIONS_FILE.read_text())


def version(stage: str) -> int:
    try:
        return int(recorded()[stage]["version"])
    except KeyError:
        raise KeyError(f"stage {stage!r} has no version in {VERSIONS_FILE}") from None


def _major_minor(dist: str) -> str:
    try:
        return ".".join(metadata.version(dist).split(".")[:2])
    except metadata.PackageNotFoundError:
        return "absent"


def libraries(stage: str) -> dict[str, str]:
    return {d: _major_minor(d) for d in STAGE_LIBRARIES.get(stage, ())}


def stale() -> list[str]:
    """Stages whose code changed since their digest was recorded."""
    rec = recorded()
    return [s for s in STAGE_CODE if rec.get(s, {}).get("code") != code_digest(s)]


def update() -> dict[str, dict]:
    """Bump the version of every stage whose code changed; write `versions.json`."""
    from fusellm.io.files import write_text_atomic

    rec = {s: dict(v) for s, v in recorded().items() if s in STAGE_CODE}
    for stage in STAGE_CODE:
        digest = code_digest(stage)
        entry = rec.setdefault(stage, {"version": 0, "code": ""})
        if entry["code"] != digest:
            entry["version"] += 1
            entry["code"] = digest
    write_text_atomic(VERSIONS_FILE, json.dumps(rec, indent=2) + "\n")
    recorded.cache_clear()
    return rec


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Stage code versions: check or bump.")
    parser.add_argument("--update", action="store_true", help="bump changed stages, record them")
    args = parser.parse_args(argv)
    if args.update:
        before = {s: v["version"] for s, v in recorded().items()}
        for stage, entry in update().items():
            mark = "bumped" if before.get(stage) != entry["version"] else "unchanged"
            print(f"{stage:10s} v{entry['version']:<3d} {mark}")
        return
    changed = stale()
    print("stale: " + ", ".join(changed) if changed else "all stage versions are current")
    raise SystemExit(1 if changed else 0)


if __name__ == "__main__":
    main()
