"""The demo's three text domains, read from files that ship with CPython itself.

Nothing is downloaded: every Python installation carries enough real text to train and evaluate
tiny language models on three genuinely different kinds of writing.

- ``docs``: the language reference as plain text (``pydoc_data.topics``, what ``help("if")``
  prints): long-form English prose with grammar productions and short examples.
- ``code``: the standard library's Python source with its docstrings removed: identifiers,
  indentation, operators and ``#`` comments.
- ``docstrings``: the docstrings removed from that same source: terse API prose written in the
  imperative ("Return the ..."), parameter lists and ``>>>`` doctests.

Code and docstrings are cut apart so that neither domain contains the other's text.

Every domain is cut into documents of at most ``chunk_chars`` characters at blank lines, exact
duplicates are dropped, and each document goes to the ``train``, ``fusion`` or ``heldout`` split
by a hash of its *content*. Hashing content (not positions, not a random state) makes the split
independent of file order, Python's hash seed and library versions, and puts identical text
that occurs twice (in two domains, say) into the same split, so held-out text is never trained
on. Within a split, documents are ordered by the same hash, so a size cap takes an even sample
of the whole library rather than its alphabetically first modules.

The held-out split is itself cut in two by the same hash: ``validation`` (its first half) is for
choosing a recipe, ``test`` (the second half) for reporting one. A number measured on the texts
a recipe was chosen on flatters it; `load_split(domain, "heldout")` is still both halves.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import re
import sysconfig
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Split = Literal["train", "fusion", "heldout"]
HeldoutPart = Literal["validation", "test"]
DOMAINS: tuple[str, ...] = ("docs", "code", "docstrings")


def check_domains(mix: dict[str, float]) -> None:
    """A mix names only known domains (recipes of the sources and of the fusion use it)."""
    unknown = sorted(set(mix) - set(DOMAINS))
    if unknown:
        raise ValueError(f"unknown domains {unknown}; expected some of {list(DOMAINS)}")
SPLITS: tuple[str, ...] = ("train", "fusion", "heldout")
HELDOUT_PARTS: tuple[str, ...] = ("validation", "test")  # halves of "heldout", by content hash
VALIDATION_SHARE = 0.5  # of the held-out documents; a constant, not a DemoSplits field, so the
# sources' cache keys (which hold DemoSplits) did not change when the held-out split was cut

# Folders that are tests, or that Linux distributions package separately from the standard
# library (Debian: idle, python3-tk, python3-lib2to3, python3-distutils), so that the corpus is
# the same on every installation of a given Python version.
_SKIPPED_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "__pycache__",
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "tkinter",
        "turtledemo",
        "lib2to3",
        "distutils",
        "ensurepip",
    }
)
_SPLIT_SALT = b"fusellm-demo-split-v1\0"


class DemoSplits(BaseModel):
    """How the domains are cut into documents and split (part of every cache key)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    chunk_chars: int = Field(2000, ge=100, description="longest document, in characters")
    min_chars: int = Field(64, ge=1, description="shorter documents are dropped as noise")
    heldout: float = Field(0.1, gt=0, lt=1, description="share of documents held out")
    fusion: float = Field(0.2, ge=0, lt=1, description="share kept for the fusion corpus")

    @model_validator(mode="after")
    def _shares_leave_training_data(self) -> DemoSplits:
        if self.heldout + self.fusion >= 1:
            raise ValueError(
                f"heldout ({self.heldout}) + fusion ({self.fusion}) must be below 1 "
                "so that some documents are left for training"
            )
        if self.min_chars > self.chunk_chars:
            raise ValueError(
                f"min_chars ({self.min_chars}) must not exceed chunk_chars ({self.chunk_chars})"
            )
        return self


DEFAULT_SPLITS = DemoSplits()


def split_position(text: str) -> float:
    """A number in [0, 1) fixed by the text alone: where the document falls among the splits."""
    digest = hashlib.sha256(_SPLIT_SALT + text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(text: str, config: DemoSplits = DEFAULT_SPLITS) -> Split:
    """The split a document belongs to: held-out first, then fusion, the rest is training."""
    u = split_position(text)
    return next(s for s in SPLITS if _bounds(s, config)[0] <= u < _bounds(s, config)[1])


def heldout_part_of(text: str, config: DemoSplits = DEFAULT_SPLITS) -> HeldoutPart | None:
    """``validation`` or ``test`` for a held-out document, None for any other."""
    u = split_position(text)
    inside = [p for p in HELDOUT_PARTS if _bounds(p, config)[0] <= u < _bounds(p, config)[1]]
    return inside[0] if inside else None


def _bounds(split: str, config: DemoSplits) -> tuple[float, float]:
    """The interval of split positions that belongs to `split` (or to a half of "heldout")."""
    cut = config.heldout * VALIDATION_SHARE
    edges = {
        "heldout": (0.0, config.heldout),
        "validation": (0.0, cut),
        "test": (cut, config.heldout),
        "fusion": (config.heldout, config.heldout + config.fusion),
        "train": (config.heldout + config.fusion, 1.0),
    }
    return edges[split]


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Cut text into pieces of at most `max_chars`, at blank lines where possible.

    Paragraphs are packed greedily; a paragraph longer than `max_chars` is packed line by line,
    and a line longer than that is cut. Pieces keep their inner text exactly and lose only the
    blank lines around them.
    """
    pieces: list[str] = []
    current = ""
    for unit in _units(text, max_chars):
        if current and len(current) + len(unit) > max_chars:
            pieces.append(current)
            current = ""
        current += unit
    pieces.append(current)
    return [p.strip("\n") for p in pieces if p.strip()]


def _units(text: str, max_chars: int):
    for paragraph in re.split(r"(?<=\n\n)", text):
        if len(paragraph) <= max_chars:
            yield paragraph
            continue
        for line in re.split(r"(?<=\n)", paragraph):
            for start in range(0, len(line), max_chars):
                yield line[start : start + max_chars]


def stdlib_dir() -> Path:
    """Where this interpreter's standard library lives."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_modules(root: Path | None = None) -> list[Path]:
    """The standard library's own .py files (no tests, no third-party packages), sorted."""
    root = Path(root) if root is not None else stdlib_dir()
    if not root.is_dir():
        raise FileNotFoundError(f"standard library folder {root} does not exist")
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIPPED_DIRS and not d.startswith("config-")]
        for name in files:
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                found.append(Path(folder, name))  # _sysconfigdata: generated per machine
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def split_docstrings(source: str) -> tuple[str, list[str]]:
    """Separate a module's source into (code without docstrings, its docstrings).

    Docstrings are those of the module, its classes and functions (what `ast.get_docstring`
    finds), cleaned of indentation, in source order. A docstring alone on its lines takes those
    lines with it; one sharing a line with code (``def f(): "doc"``) leaves the code.
    """
    tree = ast.parse(source)
    data = source.encode("utf-8")  # ast columns count UTF-8 bytes
    line_starts = [0] + [m.end() for m in re.finditer(b"\n", data)]
    cuts, docstrings = [], []
    for node in _documentable(tree):
        doc = ast.get_docstring(node, clean=True)
        if doc is None:
            continue
        expr = node.body[0]
        start = line_starts[expr.lineno - 1] + expr.col_offset
        end = line_starts[expr.end_lineno - 1] + expr.end_col_offset
        cuts.append(_whole_lines_if_alone(data, start, end))
        if doc.strip():
            docstrings.append((start, doc.strip()))
    code, last = bytearray(), 0
    for start, end in sorted(cuts):
        code += data[last:start]
        last = end
    code += data[last:]
    return code.decode("utf-8"), [doc for _, doc in sorted(docstrings)]


def _documentable(node):
    """The module, classes and functions under `node`, walking statements only.

    (`ast.walk` would visit every expression node too, several times slower on the library.)
    """
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        yield node
    for field in ("body", "orelse", "finalbody", "handlers", "cases"):
        for child in getattr(node, field, None) or ():
            if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
                yield from _documentable(child)


def _whole_lines_if_alone(data: bytes, start: int, end: int) -> tuple[int, int]:
    line_start = data.rfind(b"\n", 0, start) + 1
    line_end = data.find(b"\n", end)
    line_end = len(data) if line_end < 0 else line_end + 1
    if data[line_start:start].strip() or data[end:line_end].strip():
        return start, end
    return line_start, line_end


@functools.lru_cache(maxsize=4)
def _stdlib_texts(root: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(code of each module, docstrings of each module joined by blank lines): parsed once."""
    codes, docs = [], []
    for path in stdlib_modules(root):
        try:
            source = path.read_text(encoding="utf-8")
            code, docstrings = split_docstrings(source)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue  # a module of another Python version or encoding: not worth failing for
        codes.append(code)
        docs.append("\n\n".join(docstrings))
    if not codes:
        raise FileNotFoundError(f"no readable .py modules under the standard library folder {root}")
    return tuple(codes), tuple(docs)


def _docs_texts() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def raw_texts(domain: str, root: Path | None = None) -> list[str]:
    """The domain's source texts (one per topic or module), in a fixed order."""
    _check_domain(domain)
    if domain == "docs":
        return _docs_texts()
    codes, docs = _stdlib_texts(Path(root) if root is not None else stdlib_dir())
    return list(codes if domain == "code" else docs)


def documents(
    domain: str, config: DemoSplits = DEFAULT_SPLITS, root: Path | None = None
) -> list[str]:
    """All documents of a domain: chunks of its texts, deduplicated, in corpus order."""
    _check_domain(domain)
    return [doc for doc, _ in _positioned(domain, config, Path(root) if root else None)]


@functools.lru_cache(maxsize=16)
def _positioned(
    domain: str, config: DemoSplits, root: Path | None
) -> tuple[tuple[str, float], ...]:
    seen: set[str] = set()
    out = []
    for text in raw_texts(domain, root):
        for piece in chunk_text(text, config.chunk_chars):
            if len(piece) >= config.min_chars and piece not in seen:
                seen.add(piece)
                out.append((piece, split_position(piece)))
    return tuple(out)


def load_split(
    domain: str,
    split: str,
    *,
    max_bytes: int | None = None,
    config: DemoSplits = DEFAULT_SPLITS,
    root: Path | None = None,
) -> list[str]:
    """The documents of one domain in one split, in hash order, up to `max_bytes` of UTF-8.

    `split` is one of `SPLITS`, or ``validation`` / ``test``: the two halves of ``heldout``.
    """
    if split not in SPLITS + HELDOUT_PARTS:
        raise ValueError(
            f"unknown split {split!r}; expected one of {', '.join(SPLITS + HELDOUT_PARTS)}"
        )
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    _check_domain(domain)
    low, high = _bounds(split, config)
    positioned = _positioned(domain, config, Path(root) if root else None)
    chosen = [doc for doc, u in sorted(positioned, key=lambda item: item[1]) if low <= u < high]
    return chosen if max_bytes is None else leading_within(chosen, max_bytes)


def leading_within(docs: list[str], max_bytes: int) -> list[str]:
    """The leading documents whose UTF-8 text fits in `max_bytes` together."""
    out, total = [], 0
    for doc in docs:
        size = len(doc.encode("utf-8"))
        if total + size > max_bytes:
            break
        out.append(doc)
        total += size
    return out


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {', '.join(DOMAINS)}")
