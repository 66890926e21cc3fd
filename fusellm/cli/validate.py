"""`fusellm validate CONFIG`: every problem of a fusion config at once, before anything runs.

Besides the config itself (types, ranges, relations between fields, `--set` overrides) it looks
at the inputs it can see without side effects: local model folders (config.json, safetensors
weights, a tokenizer), a local corpus (`fusellm.io.corpus.check_corpus`: file types, the text
field), the evaluation data folder (each suite's files), the work folder. Nothing is created,
downloaded or written; Hub and S3 inputs are resolved by `fusellm plan` and fetched by
`fusellm run`. A local path that does not exist yet is a warning, not an error: a config is
often written before its data is in place (`fusellm init` writes one with placeholders).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fusellm.cli.plan import Sets

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class Findings:
    """Errors and warnings, each naming the file and the field."""

    def __init__(self, source: str):
        self.source = source
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def error(self, where: str, message: str) -> None:
        self.errors.append(f"{self.source}: {where}: {message}")

    def warn(self, where: str, message: str) -> None:
        self.warnings.append(f"{self.source}: {where}: {message}")


def check_model_folder(path: Path, where: str, found: Findings) -> None:
    """What `fusellm.io.sources.load_model` / `load_tokenizer` will need, checked now."""
    if not path.exists():
        found.warn(where, f"{path} does not exist yet: fill it before `fusellm run`")
        return
    if not path.is_dir():
        found.error(where, f"{path} is not a folder (a model is a folder with config.json)")
        return
    if not (path / "config.json").is_file():
        found.error(where, f"{path} has no config.json")
    if not any(path.glob("*.safetensors")):
        found.error(
            where,
            f"{path} has no *.safetensors weights (pickled checkpoints are refused: loading "
            "them can run arbitrary code)",
        )
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        found.error(where, f"{path} has no tokenizer ({', '.join(TOKENIZER_FILES)})")


def check_inputs(data: dict, found: Findings) -> None:
    """Inputs of every model and corpus entry that parses, whether or not the rest does."""
    from pydantic import ValidationError

    from fusellm.io.corpus import CorpusError, CorpusRef, check_corpus
    from fusellm.io.sources import ModelRef
    from fusellm.io.uris import LocalURI, SourceError, parse_uri

    refs = [("target", data.get("target"))]
    if isinstance(data.get("sources"), list):
        refs += [(f"sources[{i}].uri", s) for i, s in enumerate(data["sources"])]
    seen = set()
    for where, raw in refs:
        try:
            ref = ModelRef.model_validate(raw)
        except (ValidationError, SourceError, TypeError):
            continue  # reported by the config's own validation
        where = where if where.endswith(".uri") else f"{where}.uri"
        uri = ref.parsed
        if isinstance(uri, LocalURI) and uri.path not in seen:
            seen.add(uri.path)
            check_model_folder(uri.path, where, found)
    try:
        corpus = CorpusRef.model_validate(data.get("corpus"))
        uri = parse_uri(corpus.uri)
    except (ValidationError, SourceError, TypeError):
        return
    if isinstance(uri, LocalURI):
        if not uri.path.exists():
            found.warn("corpus.uri", f"{uri.path} does not exist yet: fill it before `fusellm run`")
        else:
            try:
                check_corpus(corpus)
            except CorpusError as err:
                found.error("corpus.uri", str(err))


def check_evaluation_data(config, found: Findings) -> None:
    """Each suite finds its files in evaluation.data_dir (read, never written)."""
    data_dir = config.evaluation.data_dir
    if data_dir is None:
        return
    if not data_dir.exists():
        found.warn(
            "evaluation.data_dir", f"{data_dir} does not exist yet: fill it before `fusellm run`"
        )
        return
    from fusellm.evaluate.data import EvalDataSource
    from fusellm.evaluate.suites import resolve
    from fusellm.stages.evaluation import custom_tasks

    for suite in config.evaluation.suites:
        custom = custom_tasks(config) if suite == "custom" else None
        try:
            resolve(suite, EvalDataSource(data_dir=data_dir), custom=custom)
        except (ValueError, KeyError, OSError) as err:
            found.error(f"evaluation.suites: {suite}", str(err))


def validate(path: Path, sets: list[str] | None = None) -> tuple[object | None, Findings]:
    """The config (None if invalid) and every problem found, without side effects."""
    from fusellm.cli.overrides import apply_overrides
    from fusellm.config import FusionConfigError, parse_fusion_config, rebase_paths
    from fusellm.io.yaml_config import read_yaml

    found = Findings(str(path))
    try:
        data = read_yaml(path, FusionConfigError, "fusion config")
    except FusionConfigError as err:
        found.errors.append(str(err))
        return None, found
    data, problems = apply_overrides(data, sets or (), str(path))
    found.errors += problems
    if not isinstance(data, dict):
        found.errors.append(f"{path}: expected a mapping with target, sources and corpus")
        return None, found
    base = Path(path).resolve().parent
    config = None
    try:
        config = parse_fusion_config(data, source=str(path), base=base)
    except FusionConfigError as err:
        found.errors += err.problems
    check_inputs(rebase_paths(data, base), found)
    if config is not None:
        check_evaluation_data(config, found)
        if config.workdir.exists() and not config.workdir.is_dir():
            found.error("workdir", f"{config.workdir} exists and is not a folder")
    return config, found


def validate_command(
    config: Annotated[Path, typer.Argument(help="YAML fusion config (fields of FusionConfig)")],
    sets: Sets = None,
    strict: Annotated[
        bool, typer.Option(help="count warnings (inputs not there yet) as errors")
    ] = False,
) -> None:
    """Check CONFIG and the inputs it names, reporting every problem at once; writes nothing."""
    fusion, found = validate(config, sets)
    for line in found.errors:
        typer.echo(f"error: {line}", err=True)
    for line in found.warnings:
        typer.echo(f"warning: {line}", err=True)
    failed = bool(found.errors) or (strict and bool(found.warnings))
    counts = f"{len(found.errors)} error(s), {len(found.warnings)} warning(s)"
    if failed:
        typer.echo(f"{config}: invalid: {counts}", err=True)
        raise typer.Exit(1)
    typer.echo(
        f"{config}: valid ({counts}): fusion {fusion.name!r}, target {fusion.target.display_name},"
        f" {len(fusion.sources)} source(s), suites {', '.join(fusion.evaluation.suites)}"
    )
    remote = remote_inputs(fusion)
    if remote:
        typer.echo(
            f"not checked here: {', '.join(remote)} (`fusellm plan` resolves them, "
            "`fusellm run` fetches them)"
        )


def remote_inputs(fusion) -> list[str]:
    """Hub and S3 inputs, each once: validate cannot look at them without the network."""
    from fusellm.io.uris import LocalURI, parse_uri

    uris = [fusion.target.uri, *(s.uri for s in fusion.sources), fusion.corpus.uri]
    return list(dict.fromkeys(u for u in uris if not isinstance(parse_uri(u), LocalURI)))
