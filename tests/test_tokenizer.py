"""Tokenizer, streaming detokenization and stop strings.

Reference for streaming: `tokenizer.decode` of prompt + output, minus the decoded prompt; the
concatenated deltas of `IncrementalDecoder` / `TextStream` must equal it for every split point.
"""

from __future__ import annotations

import pytest

from raymoe.model.completion import complete
from raymoe.model.engine import Engine
from raymoe.model.sampling import SamplingParams
from raymoe.model.synthetic import corpus
from raymoe.model.tokenizer import IncrementalDecoder, TextStream, Tokenizer, TokenizerError, train_tokenizer

MULTI = "naïve café 東京 Zürich 🙂"
# 語 and 🚀 are absent from the training text: they are spelled with byte-fallback pieces.
TEXTS = ["hello world", "The small cat reads the map at 3:45 pm.", f"{MULTI} and more",
         "語🚀 ok, 東京語 again 🚀🚀", "two  spaces\nand a newline  ", " leading space"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    lines = corpus(5, 300) + [f"{MULTI} hello world"] * 20
    return train_tokenizer(lines, tmp_path_factory.mktemp("tok") / "tokenizer.model", 400)


def test_special_ids_and_bos(tok):
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 400)
    ids = tok.encode("hello world")
    assert ids[0] == tok.bos_id and tok.encode("hello world", bos=False) == ids[1:]
    assert tok.bos_id not in ids[1:]
    assert tok.decode([tok.bos_id, tok.eos_id]) == ""


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_unseen_characters_use_byte_fallback(tok):
    ids = tok.encode("語", bos=False)
    assert [tok.piece(i) for i in ids[-3:]] == ["<0xE8>", "<0xAA>", "<0x9E>"]
    assert "東京" in [tok.piece(i).lstrip("▁") for i in tok.encode(MULTI)]  # a seen word is one piece


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_spell_the_text(tok, text):
    """Each token's bytes (a byte-fallback piece: its one byte; ▁: a space) joined are the text's UTF-8,
    with the leading space sentencepiece adds."""
    ids = tok.encode(text, bos=False)
    assert b"".join(tok.token_bytes(i) for i in ids) == (" " + text).encode()
    assert [tok.token_bytes(i) for i in tok.encode("語", bos=False)[-3:]] == [b"\xe8", b"\xaa", b"\x9e"]


def test_padded_ids_decode_to_nothing(tok):
    assert tok.decode([*tok.encode("hi", bos=False), 450, 511]) == "hi"  # ids past the tokenizer
    # a model whose embedding table is padded past the tokenizer may sample such an id: streamed,
    # it is no text (it used to raise IndexError in sentencepiece and fail the sequence)
    past = tok.vocab_size + 3
    stream = TextStream(tok, tok.encode("a"))
    text = "".join(stream.push(i) for i in [*tok.encode("hi", bos=False)[:1], past, *tok.encode("hi", bos=False)[1:]])
    assert text + stream.finish() == " hi"  # after the prompt "a": a new word
    assert tok.token_bytes(past) == b"" and tok.piece(past) == "" and not tok.has_text(past)


def splits(tok, text):
    """Every (prompt, output) split of encode(text) where the prompt ends on a character boundary."""
    ids = tok.encode(text)
    for k in range(1, len(ids)):
        head = tok.decode(ids[:k])
        if "\ufffd" not in head:
            yield ids[:k], ids[k:], tok.decode(ids)[len(head):]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_deltas_equal_decode_in_context(tok, text):
    checked = 0
    for prompt, out, expected in splits(tok, text):
        dec = IncrementalDecoder(tok, prompt)
        deltas = [dec.push(t) for t in out]
        deltas.append(dec.flush())
        assert "".join(deltas) == expected, (prompt, out)
        assert not any("\ufffd" in d for d in deltas)  # valid text: never a broken character
        checked += 1
    assert checked >= 3


def test_multibyte_character_emitted_once_complete(tok):
    prompt = tok.encode("ok")
    out = tok.encode("語", bos=False)
    assert tok.piece(out[0]) == "▁"  # then three byte pieces
    dec = IncrementalDecoder(tok, prompt)
    assert [dec.push(t) for t in out] + [dec.flush()] == [" ", "", "", "語", ""]


def test_leading_space_preserved(tok):
    prompt = tok.encode("hello")
    world = tok.encode("world", bos=False)  # "▁w..." pieces: a word that starts with a space
    assert tok.decode(prompt + world) == "hello world"
    dec = IncrementalDecoder(tok, prompt)
    first = dec.push(world[0])
    assert first.startswith(" ")
    assert first + "".join(dec.push(t) for t in world[1:]) + dec.flush() == " world"
    # After a bare BOS there is no text to separate from: no leading space, as decode() gives.
    bare = IncrementalDecoder(tok, [tok.bos_id])
    assert "".join(bare.push(t) for t in world) + bare.flush() == "world" == tok.decode(world)


def test_long_prompt_context_window(tok):
    prompt = tok.encode("The small cat reads the map at 3:45 pm. The river keeps")
    out = tok.encode("the green door 語", bos=False)
    dec = IncrementalDecoder(tok, prompt)
    text = "".join(dec.push(t) for t in out) + dec.flush()
    assert text == " the green door 語"


def stream(tok, prompt, out, stops):
    ts = TextStream(tok, prompt, stops)
    deltas = [ts.push(t) for t in out]
    deltas.append(ts.finish())
    return ts, deltas


@pytest.mark.parametrize("stop", ["END", "t on t", "語", "🚀 ok"])
def test_stop_string_cuts_text(tok, stop):
    text = "The cat sat on the mat. 語🚀 ok END of story"
    prompt, out = [tok.bos_id], tok.encode(text, bos=False)
    ts, deltas = stream(tok, prompt, out, [stop, "never appears"])
    expected = text[:text.index(stop)]
    assert "".join(deltas) == expected and ts.stopped
    assert stop not in "".join(deltas)
    emitted = ""
    for d in deltas:  # text shown so far is always a prefix of the final text
        emitted += d
        assert expected.startswith(emitted)


def test_stop_string_split_across_tokens(tok):
    text = "The cat sat on the mat."
    out = tok.encode(text, bos=False)
    stop = "t on t"
    assert not any(stop.strip() in tok.piece(i) for i in out)  # no single piece holds it
    ts, deltas = stream(tok, [tok.bos_id], out, [stop])
    assert "".join(deltas) == "The cat sa" and ts.stopped
    assert ts.push(out[0]) == "" and ts.finish() == ""  # nothing after a stop


def test_earliest_stop_wins_and_no_stop_passes_all(tok):
    text = "one two three four"
    out = tok.encode(text, bos=False)
    ts, deltas = stream(tok, [tok.bos_id], out, ["four", "two"])
    assert "".join(deltas) == "one " and ts.stopped
    ts, deltas = stream(tok, [tok.bos_id], out, ["fourteen", "thr33"])
    assert "".join(deltas) == text and not ts.stopped


def test_complete_applies_stop_strings(tiny_model, tokenizer):
    prompt = tokenizer.encode("The cluster sends")
    engine = Engine(tiny_model, kv_cache_tokens=256)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    [full] = complete(engine, tokenizer, [prompt], [params])
    expected = tokenizer.decode(prompt + full.token_ids)[len(tokenizer.decode(prompt)):]
    assert full.text == expected and full.finish_reason == "length"
    stop = expected.strip()[3:6]
    assert stop and stop in expected
    [cut] = complete(engine, tokenizer, [prompt], [params], [[stop]])
    assert cut.text == expected[:expected.index(stop)] and cut.finish_reason == "stop"
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)] and len(cut.token_ids) < 24
    assert engine.cache.used_blocks == 0 and not engine.has_work()


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.model"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        Tokenizer(tmp_path)


def test_tokens_that_decode_to_nothing_cost_linear_work(tok):
    """A resumed request replays its tokens through the decoder: runs of control tokens and of
    byte pieces that never complete a character must each cost a bounded window, and the text
    must still equal decoding the whole (the byte pieces as U+FFFD, as decode gives them)."""
    cont = tok.sp.PieceToId("<0x80>")  # a UTF-8 continuation byte: never completes a character
    out = tok.encode("hi", bos=False) + [tok.bos_id] * 3000 + [cont] * 3000 + tok.encode(" there", bos=False)
    decoded = []
    original = tok.decode

    def counting(ids):
        ids = list(ids)
        decoded.append(len(ids))
        return original(ids)

    tok.decode = counting
    try:
        dec = IncrementalDecoder(tok, [tok.bos_id])
        text = "".join(dec.push(t) for t in out) + dec.flush()
    finally:
        del tok.decode
    assert text == tok.decode(out)
    assert max(decoded) <= 2 * 4 + 2 and sum(decoded) < 20 * len(out)
