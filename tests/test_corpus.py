"""Corpus loading: local formats, saved datasets, S3 over HTTP, Hub offline, fingerprints, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError
from s3server import s3_bucket, s3_endpoint  # noqa: F401  (fixtures)

from fusellm.io.corpus import (
    CorpusError,
    CorpusRef,
    check_corpus,
    corpus_fingerprint,
    iter_documents,
)
from fusellm.io.sources import SourceError, upload_dir


def docs(uri, **kw) -> list[str]:
    return list(iter_documents(CorpusRef(uri=str(uri), **kw)))


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def mixed(tmp_path) -> Path:
    """A folder mixing every local format, nested, plus files that must be ignored."""
    root = tmp_path / "corpus"
    (root / "b_sub").mkdir(parents=True)
    (root / "a.txt").write_text("first document\n\nsecond paragraph of it\n")
    write_jsonl(root / "b_sub" / "x.jsonl", [{"text": "json one", "id": 1}, {"text": "json two"}])
    pq.write_table(pa.table({"text": ["pq one", "pq two"], "n": [1, 2]}), root / "c.parquet")
    (root / ".hidden.txt").write_text("not part of the corpus")
    return root


def test_folder_of_mixed_formats_in_fixed_order(mixed):
    expected = [
        "first document\n\nsecond paragraph of it\n",  # a .txt file is one document
        "json one",
        "json two",
        "pq one",
        "pq two",
    ]
    assert docs(mixed) == expected
    assert docs(f"file://{mixed}") == expected
    assert docs(mixed, limit=3) == expected[:3]


def test_unsupported_file_in_folder_is_named(mixed):
    (mixed / "notes.csv").write_text("a,b\n")
    with pytest.raises(CorpusError, match=r"notes\.csv has an unsupported type '\.csv'"):
        docs(mixed)


def test_jsonl_errors_name_file_line_and_field(tmp_path):
    rows = [{"text": f"doc {i}"} for i in range(16)] + [{"body": "no text here"}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(CorpusError, match=r'c\.jsonl line 17 has no field "text" \(it has: body\)'):
        docs(path)
    assert docs(tmp_path / "c.jsonl", limit=16) == [f"doc {i}" for i in range(16)]

    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n\n{"text": \n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl line 3: invalid JSON"):
        docs(tmp_path / "bad.jsonl")
    write_jsonl(tmp_path / "num.jsonl", [{"text": 5}])
    with pytest.raises(
        CorpusError, match=r'num\.jsonl line 1: field "text" is int, expected a string'
    ):
        docs(tmp_path / "num.jsonl")
    write_jsonl(tmp_path / "list.jsonl", [["text"]])
    with pytest.raises(CorpusError, match=r"list\.jsonl line 1 is a JSON list, expected an object"):
        docs(tmp_path / "list.jsonl")


def test_custom_text_field(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"content": "a"}, {"content": "b"}])
    assert docs(path, text_field="content") == ["a", "b"]


def test_parquet_errors(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(CorpusError, match=r'a\.parquet has no column "text" \(it has: body\)'):
        docs(tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": ["x", None]}), tmp_path / "b.parquet")
    with pytest.raises(CorpusError, match=r'b\.parquet row 1: column "text" is NoneType'):
        docs(tmp_path / "b.parquet")
    (tmp_path / "c.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(CorpusError, match=r"c\.parquet: not a readable Parquet file"):
        docs(tmp_path / "c.parquet")


def test_txt_must_be_utf8(tmp_path):
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin\.txt: not UTF-8 at byte 3"):
        docs(tmp_path / "latin.txt")


def test_saved_datasets(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_dict({"text": ["s1", "s2", "s3"]}).save_to_disk(str(tmp_path / "single"))
    assert docs(tmp_path / "single") == ["s1", "s2", "s3"]
    assert docs(tmp_path / "single", limit=2) == ["s1", "s2"]

    DatasetDict(
        train=Dataset.from_dict({"text": ["t1", "t2"]}),
        validation=Dataset.from_dict({"text": ["v1"]}),
    ).save_to_disk(str(tmp_path / "dict"))
    assert docs(tmp_path / "dict", split="validation") == ["v1"]
    with pytest.raises(CorpusError, match=r"has splits \['train', 'validation'\]: set split"):
        docs(tmp_path / "dict")
    with pytest.raises(CorpusError, match=r"has no split 'test'"):
        docs(tmp_path / "dict", split="test")
    with pytest.raises(CorpusError, match=r'has no column "body"'):
        docs(tmp_path / "dict", split="train", text_field="body")


def test_ref_validation_names_fields():
    with pytest.raises(ValidationError) as err:
        CorpusRef(uri="x", limit=0)
    assert err.value.errors()[0]["loc"] == ("limit",)
    with pytest.raises(ValidationError, match="hf://datasets/org/name"):
        CorpusRef(uri="hf://org/model")
    with pytest.raises(ValidationError) as err:
        CorpusRef(uri="ftp://host/x")
    assert err.value.errors()[0]["loc"] == ("uri",)
    with pytest.raises(CorpusError, match="does not exist"):
        docs("/no/such/corpus")


def test_local_fingerprint_follows_content_and_selection(mixed):
    ref = CorpusRef(uri=str(mixed))
    first = corpus_fingerprint(ref)
    assert first == corpus_fingerprint(ref)
    assert corpus_fingerprint(CorpusRef(uri=str(mixed), limit=2)) != first
    assert corpus_fingerprint(CorpusRef(uri=str(mixed), text_field="n")) != first
    # A same-size edit with the mtime restored still changes it: local corpora are fully hashed.
    path = mixed / "a.txt"
    st = os.stat(path)
    path.write_text(path.read_text().replace("first", "FIRST"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert corpus_fingerprint(ref) != first


def test_s3_corpus_prefix_and_single_key(tmp_path, mixed, s3_bucket, monkeypatch):
    monkeypatch.setenv("FUSELLM_CACHE", str(tmp_path / "cache"))
    upload_dir(mixed, f"s3://{s3_bucket}/corpora/mixed")
    local = docs(mixed)
    assert docs(f"s3://{s3_bucket}/corpora/mixed") == local
    assert docs(f"s3://{s3_bucket}/corpora/mixed/c.parquet") == ["pq one", "pq two"]

    ref = CorpusRef(uri=f"s3://{s3_bucket}/corpora/mixed")
    first = corpus_fingerprint(ref)
    assert first == corpus_fingerprint(ref)
    (mixed / "a.txt").write_text("changed")
    upload_dir(mixed, f"s3://{s3_bucket}/corpora/mixed")
    assert corpus_fingerprint(ref) != first
    assert docs(f"s3://{s3_bucket}/corpora/mixed")[0] == "changed"


def test_hub_dataset_offline_without_cache_is_clear(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Both libraries read the variable at import; set what they already read as well.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(
        CorpusError, match="dataset acme/pile .* not in the Hugging Face datasets cache"
    ):
        docs("hf://datasets/acme/pile")
    with pytest.raises(SourceError, match="dataset acme/pile .* not in the Hugging Face cache"):
        corpus_fingerprint(CorpusRef(uri="hf://datasets/acme/pile"))


def test_check_corpus_before_reading_it(mixed):
    assert check_corpus(CorpusRef(uri=str(mixed))) == 3
    with pytest.raises(CorpusError, match=r'c\.parquet has no column "body"'):
        check_corpus(CorpusRef(uri=str(mixed / "c.parquet"), text_field="body"))
    write_jsonl(mixed / "b_sub" / "y.jsonl", [{"content": "x"}])
    with pytest.raises(CorpusError, match=r'y\.jsonl line 1 has no field "text"'):
        check_corpus(CorpusRef(uri=str(mixed)))
    with pytest.raises(CorpusError, match="does not exist"):
        check_corpus(CorpusRef(uri=str(mixed / "nope")))
