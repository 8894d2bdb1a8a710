"""Sentencepiece tokenizer (Mixtral's `tokenizer.model` format) and streaming detokenization.

`IncrementalDecoder` turns a growing list of token ids into text deltas without ever emitting a
broken multi-byte character (byte-fallback pieces are held until they complete) and with the
right leading spaces (each delta is decoded in the context of the tokens before it).
`TextStream` adds stop strings on top: text that could still become a stop string is held back.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

CONTEXT_TOKENS = 6  # prompt tokens decoded before the first output token, for its leading space
# A UTF-8 character has at most 4 bytes: more pending byte pieces than this that still end in an
# incomplete character can never complete it (their text is emitted, with U+FFFD as decode gives).
MAX_HELD_TOKENS = 4


class TokenizerError(ValueError):
    pass


class Tokenizer:
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.exists():
            raise TokenizerError(f"{path.parent}: no tokenizer.model (a sentencepiece model is needed for text)")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except Exception as e:  # sentencepiece raises OSError/RuntimeError on a corrupt file
            raise TokenizerError(f"{path}: not a sentencepiece model ({e})") from None
        self.path = path
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.vocab_size = self.sp.GetPieceSize()

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        return [self.bos_id, *ids] if bos and self.bos_id >= 0 else ids

    def decode(self, ids: Iterable[int]) -> str:
        # A model's embedding table may be padded past the tokenizer; such ids have no text.
        return self.sp.DecodeIds([int(i) for i in ids if self.in_vocab(int(i))])

    def in_vocab(self, token_id: int) -> bool:
        """Whether the tokenizer has a piece for this id (an embedding table may be padded past it)."""
        return 0 <= token_id < self.vocab_size

    def has_text(self, token_id: int) -> bool:
        """False for ids past the tokenizer (a padded embedding table) and control tokens (<s>, </s>)."""
        return self.in_vocab(token_id) and not self.sp.IsControl(token_id)

    def piece(self, token_id: int) -> str:
        token_id = int(token_id)
        return self.sp.IdToPiece(token_id) if self.in_vocab(token_id) else ""

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for in the text: a byte-fallback piece (<0xE8>) is that one byte
        (a character it starts is only complete with the next pieces), any other piece its UTF-8 with
        the word-boundary mark ▁ as a space."""
        token_id = int(token_id)
        if not self.in_vocab(token_id):
            return b""
        if self.sp.IsByte(token_id):
            return bytes([int(self.sp.IdToPiece(token_id)[3:5], 16)])
        return self.sp.IdToPiece(token_id).replace("\u2581", " ").encode()


class IncrementalDecoder:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
        self.tok = tokenizer
        self.ids = [i for i in prompt_ids[-CONTEXT_TOKENS:] if i != tokenizer.bos_id]
        self.prefix = 0  # ids[prefix:read] is the context already turned into text
        self.read = len(self.ids)

    def push(self, token_id: int) -> str:
        # Control tokens (<s>, </s>) and ids past the tokenizer decode to nothing in any context:
        # kept, each would widen the window decoded per token, making a run of them quadratic (a
        # resumed request replays them).
        if not self.tok.has_text(int(token_id)):
            return ""
        self.ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        # Held tokens are bounded (MAX_HELD_TOKENS), so each push decodes a window of bounded size.
        holding = len(self.ids) - self.read < MAX_HELD_TOKENS
        if len(after) <= len(before) and not final and holding:
            return ""
        if after.endswith("\ufffd") and not final and holding:  # an incomplete UTF-8 sequence: wait for its bytes
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]


class TextStream:
    """Detokenize one sequence's output, cutting it at the first stop string (which is not shown)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: Iterable[str] = ()) -> None:
        self.decoder = IncrementalDecoder(tokenizer, prompt_ids)
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # all text decoded so far (before stop-string truncation)
        self.sent = 0  # characters of self.text already returned
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Text newly safe to show; sets `stopped` once a stop string appears."""
        if self.stopped:
            return ""
        self.text += self.decoder.push(token_id)
        return self._emit(final=False)

    def finish(self) -> str:
        """The rest of the text, at the end of the sequence."""
        if self.stopped:
            return ""
        self.text += self.decoder.flush()
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        start = max(0, self.sent - self.hold)
        cut = min((p for p in (self.text.find(s, start) for s in self.stop) if p >= 0), default=-1)
        if cut >= 0:
            self.stopped, self.text = True, self.text[:cut]
            end = cut
        else:
            end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        delta, self.sent = self.text[self.sent:end], max(self.sent, end)
        return delta


def train_tokenizer(lines: Iterable[str], out_path: str | Path, vocab_size: int) -> Tokenizer:
    """Train a Mixtral-style sentencepiece model (BPE, byte fallback, <unk>=0 <s>=1 </s>=2)."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, hard_vocab_limit=False, num_threads=2, minloglevel=2,
        add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        max_sentence_length=16384,
    )
    Path(out_path).write_bytes(buf.getvalue())
    return Tokenizer(out_path)
