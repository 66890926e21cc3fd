"""Training config and pre-flight checks: bad input fails before training, naming the problem."""

from __future__ import annotations

import time

import pytest
from support import WORDS, tiny_texts
from typer.testing import CliRunner

from fusellm.cli import app
from fusellm.testing.synthetic import synthetic_store
from fusellm.testing.tiny import save_tiny, tiny_model, train_tokenizer
from fusellm.train.config import TrainConfig, TrainConfigError, load_config, parse_config
from fusellm.train.data import open_training_data


def _texts(n: int, seed: int) -> list[str]:
    return tiny_texts(n, seed, lengths=(6, 20), words=WORDS[:16])  # English words only


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A tiny target model folder and a fused store for it; plus a store of another tokenizer."""
    root = tmp_path_factory.mktemp("target")
    tok = train_tokenizer(_texts(40, 0), "spm", vocab_size=320)
    save_tiny(tiny_model("llama", tok, hidden=32, layers=1, heads=2), tok, root / "model")
    synthetic_store(root / "data", tok, _texts(16, 1), sources=["llama", "mpt"])
    other = train_tokenizer(_texts(40, 2), "bytelevel", vocab_size=300)
    synthetic_store(root / "other", other, _texts(16, 3))
    return root, tok


def test_defaults_are_the_papers():
    cfg = TrainConfig()
    assert (cfg.lam, cfg.learning_rate, cfg.warmup_ratio, cfg.zero_stage) == (0.9, 1e-5, 0.008, 2)
    assert (cfg.adam_betas, cfg.weight_decay, cfg.max_grad_norm) == ((0.9, 0.95), 0.1, 1.0)
    assert (cfg.global_batch, cfg.epochs, cfg.lr_scheduler) == (128, 1, "cosine")


def test_yaml_round_trip(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(
        "lam: 1.0\nglobal_batch: 8\nmicro_batch: 4\nzero_stage: 3\nadam_betas: [0.8, 0.9]\n"
    )
    cfg = load_config(path)
    assert (cfg.lam, cfg.global_batch, cfg.micro_batch, cfg.zero_stage) == (1.0, 8, 4, 3)
    assert cfg.adam_betas == (0.8, 0.9)


@pytest.mark.parametrize(
    ("text", "field", "detail"),
    [
        ("zero_stage: 4\n", "zero_stage", "unknown ZeRO stage 4"),
        ("global_batch: 8\nmicro_batch: 3\n", "micro_batch", "does not divide global_batch=8"),
        ("learning_rat: 0.1\n", "learning_rat", "Extra inputs"),
        ("lam: 1.5\n", "lam", "less than or equal to 1"),
        ("adam_betas: [0.9, 1.0]\n", "adam_betas", "[0, 1)"),
    ],
)
def test_bad_yaml_names_file_and_field(tmp_path, text, field, detail):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(TrainConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and f"{field}:" in message and detail in message


def test_missing_or_malformed_config_file(tmp_path):
    with pytest.raises(TrainConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(TrainConfigError, match="expected a mapping"):
        load_config(tmp_path / "list.yaml")


def _check(root, tok, data="data", world_size=1, **fields):
    cfg = parse_config({"global_batch": 4, "micro_batch": 2, **fields})
    return open_training_data(
        root / data, cfg, tok, model_vocab_size=len(tok), world_size=world_size
    )


def test_good_store_passes(target):
    root, tok = target
    assert len(_check(root, tok, sources=["mpt"])) == 16


def test_missing_store_is_named(target):
    root, tok = target
    with pytest.raises(TrainConfigError, match=r"nowhere: training data folder not found"):
        _check(root, tok, data="nowhere")


def test_store_of_another_tokenizer_is_refused(target):
    root, tok = target
    with pytest.raises(TrainConfigError) as err:
        _check(root, tok, data="other")
    assert "other/manifest.json" in str(err.value) and "tokenizer_fingerprint" in str(err.value)


def test_source_without_distributions_is_named(target):
    root, tok = target
    with pytest.raises(
        TrainConfigError, match=r"sources: no fused distributions from source 'gpt2'"
    ):
        _check(root, tok, sources=["llama", "gpt2"])


def test_global_batch_must_split_over_ranks(target):
    root, tok = target
    with pytest.raises(
        TrainConfigError, match=r"global_batch: 4 is not a multiple .* world size \(3\)"
    ):
        _check(root, tok, world_size=3)
    with pytest.raises(TrainConfigError, match=r"global_batch: 32 exceeds the 16 records"):
        _check(root, tok, global_batch=32, micro_batch=2)


def test_cli_fails_fast_before_training(target, tmp_path):
    """The command reports a bad store in seconds and leaves no output behind."""
    root, _ = target
    cfg = tmp_path / "train.yaml"
    cfg.write_text("global_batch: 4\nmicro_batch: 2\n")
    out = tmp_path / "out"
    started = time.perf_counter()
    result = CliRunner().invoke(
        app,
        [
            "train",
            str(cfg),
            "--model",
            str(root / "model"),
            "--data",
            str(root / "other"),
            "--output",
            str(out),
        ],
    )
    assert result.exit_code == 2, result.output
    assert "tokenizer_fingerprint" in result.output
    assert time.perf_counter() - started < 30 and not out.exists()
    cfg.write_text("zero_stage: 7\n")
    result = CliRunner().invoke(
        app,
        [
            "train",
            str(cfg),
            "--model",
            str(root / "model"),
            "--data",
            str(root / "data"),
            "--output",
            str(out),
        ],
    )
    assert result.exit_code == 2 and "zero_stage" in result.output and not out.exists()
