"""Conversations as a corpus (FuseChat): each model reads them in its own chat template, the
loss covers what the assistant says, and positions align on the messages' text."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fusion_fixtures import (
    build_models,
    corpus_texts,
    fusion_dict,
    reseed_model,
    write_chat_corpus,
)

from fusellm.config import parse_fusion_config
from fusellm.data.chat import ChatError, normalise_messages, render
from fusellm.data.store import TopkRecord, open_topk, write_topk
from fusellm.demo.real import GEMMA_CHAT_TEMPLATE, REAL_MODELS
from fusellm.io.corpus import CorpusError, CorpusRef, iter_documents
from fusellm.method.align import pair_ends
from fusellm.method.loss import IGNORE_INDEX
from fusellm.stages import pipeline
from fusellm.stages.base import StageError
from fusellm.stages.pipeline import Executor
from fusellm.train.collator import collate

# Two templates unlike each other: Llama-2-like with BOS and EOS closing the assistant's turn,
# and ChatML-like with text role markers and a default system prompt the messages do not hold.
BRACKETS = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
)
MARKERS = (
    "{% if messages[0]['role'] != 'system' %}<|system|>\nYou help.{{ eos_token }}\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
)


def conversations(n: int = 10) -> list[list[dict]]:
    """Short exchanges made of the tiny corpus's words, some of two turns."""
    texts = corpus_texts(2 * n, seed=3)
    out = []
    for i in range(n):
        question = " ".join(texts[2 * i].split()[:6]) + "?"
        answer = " ".join(texts[2 * i + 1].split()[:12]) + "."
        turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if i % 3 == 0:
            turns += [{"role": "user", "content": "And then?"},
                      {"role": "assistant", "content": " ".join(answer.split()[:4]) + "."}]  # fmt: skip
        out.append(turns)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    texts = corpus_texts(8)
    models = {k: str(v) for k, v in build_models(root / "models", texts).items()}
    shutil.copytree(models["llama"], root / "llama-b")  # a retrained twin of the target
    reseed_model(root / "llama-b", 11)
    models["llama-b"] = str(root / "llama-b")
    return root, models


def tokenizers(models: dict[str, str]):
    from transformers import AutoTokenizer

    llama, neox = (AutoTokenizer.from_pretrained(models[k]) for k in ("llama", "neox"))
    llama.chat_template, neox.chat_template = BRACKETS, MARKERS
    return llama, neox


# ---------------------------------------------------------------------------------------------
# Reading one conversation


def test_each_template_trains_the_assistant_text_and_its_turn_end_only(tiny):
    _, models = tiny
    messages = normalise_messages(conversations()[0], "test")
    assert len(messages) == 4
    for tok in tokenizers(models):
        view = render(messages, tok)
        assert len(view.ids) == len(view.ends) == len(view.trained)
        learnt = tok.decode(view.ids[1:][view.trained[:-1]], skip_special_tokens=False)
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        assert learnt.replace(" ", "") == "".join(r + tok.eos_token for r in replies).replace(
            " ", ""
        )  # what the assistant says, then the token that ends its turn; nothing else
        spoken = tok.decode(view.ids[1:][view.from_sources[:-1]]).replace(" ", "")
        assert spoken == "".join(replies).replace(" ", "")  # sources: the text, not the marker
        assert view.assistant_bytes == sum(len(r.encode()) for r in replies)


def test_positions_pair_on_the_messages_text_across_templates(tiny):
    from fusellm.method.align import align_positions

    _, models = tiny
    llama, neox = tokenizers(models)
    in_chat, alone = [], []
    for conv in conversations():
        messages = normalise_messages(conv, "test")
        t, s = render(messages, llama), render(messages, neox)
        pairs = pair_ends(t.ends, s.ends)
        used = np.flatnonzero(t.from_sources & (pairs >= 0))
        in_chat.append(used.size / t.from_sources.sum())
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        alone.append(np.mean([(align_positions(r, llama, neox) >= 0).mean() for r in replies]))
        # A paired source position has read exactly the target's text: same canonical end.
        assert np.array_equal(t.ends[used], s.ends[pairs[used]])
        # The position before each reply pairs with the source's (context: the question).
        first = [int(np.flatnonzero(t.from_sources)[0])]
        assert pairs[first[0]] >= 0
        assert tuple(np.unique(t.ends[t.ends >= 0], return_counts=True)[1]) == (1,) * len(
            np.unique(t.ends[t.ends >= 0])
        )  # canonical ends never repeat: pair_ends needs them strictly increasing
    # The templates cost the replies no alignment: as many positions pair as when the replies
    # are aligned as plain texts of their own (these tiny tokenizers cut words apart often).
    assert np.mean(in_chat) >= np.mean(alone) - 0.05, (np.mean(in_chat), np.mean(alone))


def test_bad_conversations_are_errors_naming_the_record(tmp_path):
    cases = {
        "no list": ({"messages": "hi"}, "expected a non-empty list of messages"),
        "role": ({"messages": [{"role": "bot", "content": "x"}]}, "message 0 has role 'bot'"),
        "content": ({"messages": [{"role": "user", "content": 3}]}, "content of type int"),
        "no reply": ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
        "field": ({"turns": []}, 'has no field "messages"'),
    }
    for name, (record, message) in cases.items():
        folder = tmp_path / name.replace(" ", "-")
        folder.mkdir()
        (folder / "c.jsonl").write_text(json.dumps(record) + "\n")
        ref = CorpusRef(uri=str(folder), format="chat")
        with pytest.raises(CorpusError, match=message) as err:
            list(iter_documents(ref))
        assert "c.jsonl line 1" in str(err.value)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("plain")
    with pytest.raises(CorpusError, match="a chat corpus is JSONL or Parquet"):
        list(iter_documents(CorpusRef(uri=str(tmp_path / "t"), format="chat")))


def test_jsonl_and_parquet_conversations_read_alike(tmp_path):
    convs = conversations(4)
    jsonl = list(
        iter_documents(CorpusRef(uri=str(write_chat_corpus(tmp_path / "j", convs)), format="chat"))
    )
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"messages": convs}), tmp_path / "p" / "c.parquet")
    parquet = list(iter_documents(CorpusRef(uri=str(tmp_path / "p"), format="chat")))
    assert jsonl == parquet and len(jsonl) == 4
    assert json.loads(jsonl[0])[0] == {"role": "user", "content": convs[0][0]["content"]}


def test_the_trained_positions_survive_the_store_and_mask_the_labels(tmp_path):
    rng = np.random.default_rng(0)
    records = []
    for n in (6, 9):
        trained = np.zeros(n, bool)
        trained[2:4] = True
        lp = np.log(np.full((n, 2), 0.4, np.float32))
        records.append(TopkRecord(rng.integers(0, 30, n), rng.integers(0, 30, (n, 2)), lp, 1.0,
                                  trained=trained))  # fmt: skip
    write_topk(tmp_path / "s", records, top_k=2, vocab_size=30, meta={}, shard_size=1)
    back = [open_topk(tmp_path / "s")[i] for i in range(2)]
    assert all(np.array_equal(b.trained, r.trained) for b, r in zip(back, records))
    batch = collate(back, pad_id=0, max_length=8)
    labels = batch["labels"].numpy()
    # Position t predicts label t + 1: positions 2 and 3 train tokens 3 and 4, nothing else.
    for row, record in enumerate(back):
        kept = np.flatnonzero(labels[row] != IGNORE_INDEX)
        assert kept.tolist() == [3, 4]
        assert labels[row, 3] == record.input_ids[3]


# ---------------------------------------------------------------------------------------------
# A chat fusion, pieces to training


def chat_config(root: Path, models: dict, convs, name: str, **changes):
    data = fusion_dict(models, str(write_chat_corpus(root / f"{name}-corpus", convs)),
                       root / name, "sqlite:///unused.db")  # fmt: skip
    data["corpus"]["format"] = "chat"
    data["target"]["chat_template"] = BRACKETS
    data["sources"][0]["chat_template"] = BRACKETS
    data["sources"][1]["chat_template"] = MARKERS
    data["pieces"]["block_size"] = 192
    data["training"].update(max_steps=3, max_length=192)
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        data[section][key] = value
    return parse_fusion_config(data)


def test_a_chat_fusion_trains_on_what_the_assistant_says(tiny):
    root, models = tiny
    convs = conversations(10)
    long = [{"role": "user", "content": "Why?"},
            {"role": "assistant", "content": "Because."},
            {"role": "user", "content": "Tell me more. " * 20},
            {"role": "assistant", "content": "The answer is long. " * 20}]  # fmt: skip
    too_long = [{"role": "user", "content": "Go on " * 80}, {"role": "assistant", "content": "No."}]
    config = chat_config(root, models, [*convs, long, too_long], "joint")
    f = pipeline.walk(config, Executor(), until="train")

    info = f.pieces.info
    assert (info["texts"], info["pieces"]) == (12, 11)
    assert (info["shortened"], info["dropped_long"]) == (1, 1)  # the long one keeps its 1st turn
    llama, neox = tokenizers(models)
    store = open_topk(f.stores[f.target.identity].path / "store")
    assert store.meta["chat"] is True
    first = store[0]
    learnt = llama.decode(first.input_ids[1:][first.trained[:-1]]).replace(" ", "")
    replies = "".join(m["content"] + "</s>" for m in convs[0] if m["role"] == "assistant")
    assert learnt == replies.replace(" ", "")
    assert np.isfinite(first.ce)  # over the trained positions

    fused = open_topk(f.fused_data.path / "store")
    assert fused.meta["chat"] is True
    assert all(np.array_equal(fused[i].trained, store[i].trained) for i in range(len(fused)))
    # Coverage counts the positions that predict assistant text, paired on canonical offsets.
    from fusellm.data.chat import read_piece
    from fusellm.data.piece_shards import iter_all_pieces

    paired = spoken = 0
    for piece in iter_all_pieces(f.pieces.path):
        t, s = render(read_piece(piece), llama), render(read_piece(piece), neox)
        paired += int((pair_ends(t.ends, s.ends)[t.from_sources] >= 0).sum())
        spoken += int(t.from_sources.sum())
    stats = f.fused_data.info["sources_stats"]["neox"]
    assert stats["aligned_coverage"] == pytest.approx(paired / spoken)
    assert f.trained["fused"].info["steps"] == 3
    assert f.trained["baseline"].info["steps"] == 3


def test_a_chat_fusion_pairwise_then_merged(tiny):
    root, models = tiny
    config = chat_config(root, models, conversations(8), "pairwise",
                         **{"fusion.mode": "pairwise"})  # fmt: skip
    data = config.model_dump(mode="json")
    data["sources"][0] = {"uri": models["llama-b"], "name": "llama-b", "chat_template": BRACKETS}
    config = parse_fusion_config(data)
    planned = [u.label for u in pipeline.plan(config, until="train").pending()]
    assert [x for x in planned if x.startswith("train")] == [
        "train-pair-llama-b", "train-pair-neox", "train-baseline"
    ]  # fmt: skip
    assert planned[-1] == "merge"
    f = pipeline.walk(config, Executor(), until="train")
    assert sorted(f.trained) == ["baseline", "fused", "pair-llama-b", "pair-neox"]
    assert f.trained["fused"].stage == "merge"
    for name, data in f.pairs.items():  # each pair: the pivot and one source, on chat pieces
        assert open_topk(data.path / "store").meta["chat"] is True
        assert list(data.info["sources_stats"]) == [name]


def test_a_model_without_a_chat_template_is_named(tiny):
    root, models = tiny
    config = chat_config(root, models, conversations(4), "untemplated")
    data = config.model_dump(mode="json")
    data["sources"][1].pop("chat_template")
    with pytest.raises((ChatError, StageError), match="model 'neox' has no chat template"):
        pipeline.walk(parse_fusion_config(data), Executor(), until="prepare")


# ---------------------------------------------------------------------------------------------
# The real checkpoints' own templates (SmolLM2 and Qwen: ChatML; Gemma 3 base: none of its own)


@pytest.mark.slow
def test_real_templates_train_the_replies_and_align_on_them():
    from transformers import AutoTokenizer

    from fusellm.io.pretrained import ensure_model

    toks = {}
    for name in REAL_MODELS.values():
        tok = AutoTokenizer.from_pretrained(ensure_model(name))
        if name.startswith("gemma"):
            assert not tok.chat_template  # the base checkpoint: the config must give one
            tok.chat_template = GEMMA_CHAT_TEMPLATE
        toks[name] = tok
    messages = normalise_messages(
        [{"role": "system", "content": "Answer briefly."},
         {"role": "user", "content": "What does `zip` return in Python 3?"},
         {"role": "assistant", "content": "An iterator of tuples — lazily, über-fast. 🙂"},
         {"role": "user", "content": "And len(zip(a, b))?"},
         {"role": "assistant", "content": "A TypeError: zip objects have no len()."}],
        "test",
    )  # fmt: skip
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    views = {}
    for name, tok in toks.items():
        views[name] = view = render(messages, tok)
        spoken = tok.decode(view.ids[1:][view.from_sources[:-1]])
        assert spoken == "".join(replies), name
        turn_end = view.ids[1:][view.trained[:-1] & ~view.from_sources[:-1]]
        assert (
            tok.convert_ids_to_tokens(turn_end.tolist())
            == ["<end_of_turn>" if name.startswith("gemma") else "<|im_end|>"] * 2
        ), name
    target = views["smollm2-135m-instruct"]
    for name in ("qwen2.5-coder-0.5b-instruct", "gemma-3-270m"):
        pairs = pair_ends(target.ends, views[name].ends)
        coverage = (pairs[target.from_sources] >= 0).mean()
        assert coverage > 0.75, (name, coverage)


def test_changing_a_chat_template_recuts_the_conversations(tiny):
    """The templates decide which conversations fit, so they key the pieces (and so all after);
    with a text corpus a template changes nothing."""
    root, models = tiny
    convs = conversations(4)
    config = chat_config(root, models, convs, "keys")
    data = config.model_dump(mode="json")
    data["sources"][1]["chat_template"] = MARKERS.replace("You help.", "You help well.")
    before = pipeline.plan(config, until="prepare").units[0][0].key
    after = pipeline.plan(parse_fusion_config(data), until="prepare").units[0][0].key
    assert before != after
    text = root / "keys-text"
    text.mkdir()
    (text / "docs.jsonl").write_text('{"text": "plain words"}\n')
    keys = []
    for d in (config.model_dump(mode="json"), data):
        d["corpus"] = {"uri": str(text)}
        keys.append(pipeline.plan(parse_fusion_config(d), until="prepare").units[0][0].key)
    assert keys[0] == keys[1]


def test_a_chat_corpus_none_of_whose_conversations_fits_is_an_error(tiny):
    root, models = tiny
    long = [{"role": "user", "content": "Go on " * 80}, {"role": "assistant", "content": "No."}]
    config = chat_config(root, models, [long, long], "too-long")
    with pytest.raises(StageError, match=r"none of its 2 conversations fits in pieces.block_size"):
        pipeline.walk(config, Executor(), until="prepare")


def test_reply_bits_per_byte_scores_the_replies_given_the_conversation(tiny):
    """The chat demo's held-out score: the NLL of the trained positions only, over the bytes
    of the replies; a conversation longer than the model's window is left out and counted."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from fusellm.demo.chat import reply_bits_per_byte

    _, models = tiny
    llama, _ = tokenizers(models)
    model = AutoModelForCausalLM.from_pretrained(models["llama"]).eval()
    convs = [normalise_messages(c, "test") for c in conversations(3)]
    too_long = normalise_messages(
        [{"role": "user", "content": "Go on " * 80}, {"role": "assistant", "content": "No."}], "t"
    )
    got = reply_bits_per_byte(model, llama, [*convs, too_long], batch_size=2)
    assert (got["conversations"], got["skipped"]) == (3, 1)
    nats, size = 0.0, 0
    with torch.no_grad():
        for messages in convs:
            view = render(messages, llama)
            logits = model(torch.tensor([view.ids])).logits[0].double()
            logp = torch.log_softmax(logits[:-1], -1)
            nll = -logp[torch.arange(len(view.ids) - 1), torch.tensor(view.ids[1:])]
            nats += float(nll[torch.tensor(view.trained[:-1])].sum())
            size += view.assistant_bytes
    assert got["bits_per_byte"] == pytest.approx(nats / math.log(2) / size, rel=1e-4)
