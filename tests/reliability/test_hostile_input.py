"""Hostile input: fuzzed fusion configs and corpus files fail with an error that names the file
(and line or field), never with a traceback from inside a library, and leave nothing behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusellm.config import FusionConfigError, load_fusion_config
from fusellm.io.corpus import CorpusError, CorpusRef, check_corpus, iter_documents

FIELDS = [
    "target",
    "sources",
    "corpus",
    "uri",
    "name",
    "pieces",
    "block_size",
    "margin",
    "extraction",
    "top_k",
    "shard_size",
    "training",
    "lam",
    "fusion",
    "method",
    "workdir",
    "evaluation",
    "suites",
    "tracking",
    "planning",
    "text_field",
    "limit",
    "dtype",
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True),
    st.text(max_size=30),
    st.sampled_from(["hf://org/m", "s3://b/k", "./m", "", "~", "\x00"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=8)), inner, max_size=5),
    ),
    max_leaves=25,
)
FUZZ = settings(  # benchmarks/fault_injection.py --fuzz N runs N examples of each
    max_examples=int(os.environ.get("FUSELLM_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@FUZZ
@given(data=st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=8))
def test_fuzzed_configs_fail_naming_the_file(tmp_path, data):
    path = tmp_path / "fusion.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    try:
        load_fusion_config(path)
    except FusionConfigError as err:
        assert str(path) in str(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fusion.yaml"]


@FUZZ
@given(raw=st.binary(max_size=300))
def test_config_bytes_fail_naming_the_file(tmp_path, raw):
    path = tmp_path / "fusion.yaml"
    path.write_bytes(raw)
    with pytest.raises(FusionConfigError) as err:
        load_fusion_config(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "text",
    [
        "a: 2020-13-45\n",
        "name: !!python/object:os.system x\n",
        "?\n",
        "1: x\n",
        "target: {? : 1}\n",
    ],
)
def test_yaml_values_it_cannot_read_name_the_file(tmp_path, text):
    path = tmp_path / "fusion.yaml"
    path.write_text(text)
    with pytest.raises(FusionConfigError, match="fusion.yaml"):
        load_fusion_config(path)


def _read(path: Path) -> list[str]:
    ref = CorpusRef(uri=str(path))
    check_corpus(ref)
    return list(iter_documents(ref))


@FUZZ
@given(
    lines=st.lists(
        st.one_of(
            VALUES.map(lambda v: json.dumps(v)),
            st.builds(lambda t: json.dumps({"text": t}), st.text(max_size=40)),
            st.text(max_size=40),
            st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
        ),
        max_size=6,
    )
)
def test_fuzzed_jsonl_lines_fail_naming_file_and_line(tmp_path, lines):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    try:
        texts = _read(path)
    except CorpusError as err:
        assert str(path) in str(err)
        assert " line " in str(err) or "corpus" in str(err).lower()
    else:
        assert all(isinstance(t, str) for t in texts)


HOSTILE = {
    "empty.jsonl": b"",
    "binary.jsonl": bytes(range(256)) * 4,
    "latin1.txt": "caf\xe9 cr\xe8me".encode("latin-1"),
    "bad-utf8.jsonl": b'{"text": "ok"}\n{"text": "\xff\xfe broken"}\n',
    "nul.jsonl": b'{"text": "a\x00b"}\n\x00\x00\n',
    "nested.jsonl": b"[" * 100_000 + b"]" * 100_000 + b"\n",
    "deep-object.jsonl": b'{"text": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_000 + b"}\n",
    "wrong-type.jsonl": b'{"text": 42}\n',
    "not-object.jsonl": b'"just a string"\n',
    "missing-field.jsonl": b'{"body": "x"}\n',
    "parquet.parquet": b"PAR1 not really parquet",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_corpus_files_fail_naming_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(HOSTILE[name])
    try:
        texts = _read(path)
    except CorpusError as err:
        assert str(path) in str(err), err
    else:  # only an empty file, or NULs inside a JSON string, are valid text
        assert name in {"empty.jsonl", "nul.jsonl"} and all(isinstance(t, str) for t in texts)


def test_a_50_mb_single_line_is_read(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"text": "word " * 10_000_000}) + "\n")
    (text,) = _read(path)
    assert len(text) == 50_000_000
