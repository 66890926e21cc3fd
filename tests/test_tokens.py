from fusellm.method.tokens import canonical_vocabulary, decoder_spec


def canon(tokenizer, token):
    vocab = canonical_vocabulary(tokenizer)
    return vocab.canonical[tokenizer.convert_tokens_to_ids(token)]


def test_sentencepiece_marker_and_byte_fallback(real_tokenizers):
    tok = real_tokenizers["llama-spm"]
    spec = decoder_spec(tok)
    assert spec.byte_fallback and not spec.byte_level
    vocab = canonical_vocabulary(tok)
    assert canon(tok, "▁the") == " the"
    assert canon(tok, "<0x0A>") == "\n"
    assert vocab.byte_fallback[tok.convert_tokens_to_ids("<0x0A>")]
    assert not vocab.byte_fallback[tok.convert_tokens_to_ids("▁the")]
    # a lone UTF-8 continuation byte stays distinct from every real character
    assert canon(tok, "<0xA9>") == b"\xa9".decode("utf-8", "surrogateescape")
    assert vocab.canonical[tok.bos_token_id] is None and vocab.canonical[tok.eos_token_id] is None
    assert vocab.roles["eos"] == tok.eos_token_id


def test_byte_level_alphabet(real_tokenizers):
    for name in ("mpt", "gpt-2"):
        tok = real_tokenizers[name]
        assert decoder_spec(tok).byte_level
        assert canon(tok, "Ġthe") == " the"
        assert canon(tok, "Ċ") == "\n"
        assert canon(tok, "Ã©") == "é"
        assert canonical_vocabulary(tok).canonical[tok.eos_token_id] is None


def test_same_text_same_canonical_string_across_families(real_tokenizers):
    llama, mpt = real_tokenizers["llama-spm"], real_tokenizers["mpt"]
    assert canon(llama, "▁world") == canon(mpt, "Ġworld") == " world"


def test_canonical_tokens_rebuild_the_text(real_tokenizers, tiny_tokenizers):
    text = "Hello  world!\n\tdef f(x):\n    return x  # café 😀 你好"
    for tok in [*real_tokenizers.values(), tiny_tokenizers["spm"], tiny_tokenizers["bytelevel"]]:
        vocab = canonical_vocabulary(tok)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        rebuilt = "".join(vocab.canonical[i] for i in ids).encode("utf-8", "surrogateescape").decode()
        assert rebuilt.lstrip(" ") == text


def test_wordpiece_continuations(tiny_tokenizers):
    tok = tiny_tokenizers["wordpiece"]
    vocab = canonical_vocabulary(tok)
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    cont = next(i for i, p in enumerate(pieces) if p.startswith("##") and len(p) > 2)
    word = next(i for i, p in enumerate(pieces) if p.isalpha() and len(p) > 2)
    assert vocab.canonical[cont] == pieces[cont][2:]
    assert vocab.canonical[word] == " " + pieces[word]
    assert vocab.canonical[tok.pad_token_id] is None
