"""FusionConfig: YAML in, every error naming the file and the field, paths relative to the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fusellm.config import FusionConfig, FusionConfigError, load_fusion_config, parse_fusion_config

MINIMAL = {
    "target": {"uri": "models/target"},
    "sources": [{"uri": "models/a", "name": "a"}, {"uri": "hf://org/b@v1"}],
    "corpus": {"uri": "corpus"},
}


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "fusion.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_defaults_are_the_papers_and_paths_follow_the_file(tmp_path):
    config = load_fusion_config(_write(tmp_path, MINIMAL))
    assert config.pieces.block_size == 2048 and config.pieces.margin == 48
    assert config.extraction.top_k == 10
    assert config.training.lam == 0.9
    assert config.fusion.method == "min_ce" and config.fusion.ce_unit == "byte"
    assert config.target.uri == str(tmp_path / "models/target")
    assert config.corpus.uri == str(tmp_path / "corpus")
    assert config.sources[1].uri == "hf://org/b@v1"  # remote URIs are left alone
    assert config.workdir == tmp_path / "fusellm-work"
    assert config.source_names == ["a", "b"]
    assert config.primary_suite == "local" and config.lower_is_better() is True


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"training": {"micro_batch": 3, "global_batch": 8}}, "training.micro_batch", "divide"),
        ({"sources": []}, "sources", "at least 1"),
        ({"sources": [{"uri": "s3://Bad_Bucket/x"}]}, "sources[0].uri", "bucket"),
        (
            {"sources": [{"uri": "a", "name": "x"}, {"uri": "b", "name": "x"}]},
            "sources",
            "distinct",
        ),
        ({"corpus": {"uri": "c", "text_fild": "t"}}, "corpus.text_fild", "Extra inputs"),
        ({"fusion": {"method": "max"}}, "fusion.method", "min_ce"),
        ({"evaluation": {"suites": ["mmlu"]}}, "evaluation.suites", "unknown suite"),
        ({"pieces": {"block_size": 32, "margin": 30}}, "pieces", "at least 8"),
        ({"tracking": {"primary_suite": "bbh"}}, "tracking.primary_suite", "not among"),
        ({"target": {"uri": "hf://datasets/org/x"}}, "target.uri", "dataset"),
        ({"evaluation": {"sources": False}}, "tracking.register_model", "evaluation.sources"),
    ],
)
def test_errors_name_file_and_field(tmp_path, change, field, words):
    path = _write(tmp_path, {**MINIMAL, **change})
    with pytest.raises(FusionConfigError) as info:
        load_fusion_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert f"{field}: " in message and words in message, message


def test_several_errors_reported_together(tmp_path):
    data = {**MINIMAL, "extraction": {"top_k": 0}, "training": {"lam": 2}}
    with pytest.raises(FusionConfigError) as info:
        load_fusion_config(_write(tmp_path, data))
    assert "extraction.top_k" in str(info.value) and "training.lam" in str(info.value)


def test_missing_file_bad_yaml_and_wrong_shape(tmp_path):
    with pytest.raises(FusionConfigError, match="not found"):
        load_fusion_config(tmp_path / "nope.yaml")
    with pytest.raises(FusionConfigError, match="not valid YAML"):
        load_fusion_config(_write(tmp_path, "target: [unclosed"))
    with pytest.raises(FusionConfigError, match="expected a mapping"):
        load_fusion_config(_write(tmp_path, "- just\n- a list\n"))


def test_credentials_never_echoed_in_errors(tmp_path):
    data = {**MINIMAL, "corpus": {"uri": "s3://user:hunter2@bucket/x"}}
    with pytest.raises(FusionConfigError) as info:
        load_fusion_config(_write(tmp_path, data))
    assert "hunter2" not in str(info.value)
    assert "corpus.uri" in str(info.value)


def test_a_tracking_uri_with_a_password_is_refused_without_echoing_it(tmp_path):
    """Configs are logged and shown in the Prefect UI's form: credentials go in the
    environment (MLFLOW_TRACKING_USERNAME / _PASSWORD)."""
    data = {**MINIMAL, "tracking": {"tracking_uri": "https://fusellm:hunter2@mlflow.example"}}
    with pytest.raises(FusionConfigError) as info:
        load_fusion_config(_write(tmp_path, data))
    assert "hunter2" not in str(info.value)
    assert "tracking.tracking_uri" in str(info.value)
    assert "MLFLOW_TRACKING_PASSWORD" in str(info.value)


def test_schema_is_a_form_and_round_trips():
    """The Prefect UI renders the JSON schema; a dumped config loads back to the same value."""
    schema = FusionConfig.model_json_schema()
    assert {"target", "sources", "corpus"} <= set(schema["required"])
    config = parse_fusion_config({**MINIMAL, "workdir": "/w"})
    again = parse_fusion_config(config.model_dump(mode="json"))
    assert again == config


def test_run_command_reports_config_errors_before_starting_anything(tmp_path):
    from typer.testing import CliRunner

    from fusellm_flows.cli import app

    path = _write(tmp_path, {**MINIMAL, "training": {"lam": 1.5}})
    result = CliRunner().invoke(app, ["run", str(path), "--home", str(tmp_path / "home")])
    assert result.exit_code == 2
    assert f"{path}: training.lam" in result.output
    assert not (tmp_path / "home").exists()  # failed before the embedded stores were made
