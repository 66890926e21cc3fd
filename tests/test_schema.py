"""The fusion config explains itself: every field titled and described, in the shipped schema,
in docs/config.md and in the Prefect form; the YAML configs name the schema for editors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fusellm.cli import app
from fusellm.cli.schema import SCHEMA_LINE, fusion_schema, schema_markdown, schema_text
from fusellm.config import FusionConfig

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "configs" / "fusion.schema.json"
REFERENCE = REPO / "docs" / "config.md"
WHERE = (
    "describe it with Field(title=..., description=...) where it is declared, or, for fields of "
    "io/sources.py, io/corpus.py and train/config.py, in fusellm/config.py's tables"
)


def _fields(schema: dict) -> list[tuple[str, dict]]:
    """(path, property) of every field, following $refs into $defs, array items and unions."""
    defs = schema.get("$defs", {})
    out, seen = [], set()

    def refs(node: dict) -> list[str]:
        found = [node["$ref"].rsplit("/", 1)[-1]] if "$ref" in node else []
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                found += refs(node[key])
        for option in node.get("anyOf", []) + node.get("prefixItems", []):
            found += refs(option)
        return found

    def visit(node: dict, path: str) -> None:
        for name, prop in node.get("properties", {}).items():
            out.append((f"{path}{name}", prop))
            for ref in refs(prop):
                if ref not in seen:
                    seen.add(ref)
                    visit(defs[ref], f"{path}{name}.")

    visit(schema, "")
    assert seen == set(defs), f"sections never reached from the root: {set(defs) - seen}"
    return out


def test_every_field_has_a_title_and_a_description():
    fields = _fields(fusion_schema())
    assert len(fields) > 60
    missing = [path for path, prop in fields if not prop.get("description")]
    assert not missing, f"fields without a description: {missing}; {WHERE}"
    untitled = [path for path, prop in fields if not prop.get("title")]
    assert not untitled, untitled
    for name, section in fusion_schema()["$defs"].items():
        assert section.get("description"), f"section {name} has no docstring"


def test_the_shipped_schema_and_reference_are_current():
    assert SHIPPED.read_text(encoding="utf-8") == schema_text(), (
        "configs/fusion.schema.json is out of date: "
        "fusellm schema --output configs/fusion.schema.json"
    )
    assert REFERENCE.read_text(encoding="utf-8") == schema_markdown(), (
        "docs/config.md is out of date: fusellm schema --markdown --output docs/config.md"
    )


def test_the_reference_lists_every_field():
    text = REFERENCE.read_text(encoding="utf-8")
    for path, prop in _fields(fusion_schema()):
        assert f"| `{path.rsplit('.', 1)[-1]}` |" in text, path
        assert prop["description"].replace("|", "\\|") in text, path


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_configs_name_the_schema_and_satisfy_it(config):
    import jsonschema

    text = config.read_text(encoding="utf-8")
    assert text.splitlines()[0] == SCHEMA_LINE
    data = yaml.safe_load(text)
    jsonschema.Draft202012Validator(json.loads(SHIPPED.read_text())).validate(data)


def test_schema_command_prints_and_writes(tmp_path):
    runner = CliRunner()
    printed = runner.invoke(app, ["schema"])
    assert printed.exit_code == 0 and json.loads(printed.output) == fusion_schema()
    out = tmp_path / "reference.md"
    written = runner.invoke(app, ["schema", "--markdown", "--output", str(out)])
    assert written.exit_code == 0 and out.read_text() == schema_markdown()


def _fuse(config: FusionConfig) -> None:
    """Stands for the `fuse` flow (flows/fuse.py), whose one parameter is the config."""


def test_the_prefect_form_carries_the_descriptions():
    """The `fuse` flow's form is generated from its FusionConfig parameter."""
    from prefect.utilities.callables import parameter_schema

    form = parameter_schema(_fuse).model_dump_for_openapi()
    defs = form["definitions"]
    assert defs["ModelRef"]["properties"]["trust_remote_code"]["title"] == "Trust remote code"
    assert "MLflow" in defs["TrackingConfig"]["properties"]["experiment"]["description"]
    assert defs["TrainConfig"]["properties"]["lam"]["description"]
    assert defs["FusionConfig"]["properties"]["planning"]["description"]
