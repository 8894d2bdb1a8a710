"""xgrammar vs llguidance on raymoe's sentencepiece vocabularies: compile ms and mask µs per token.

Two vocabularies: the demo model's (≈300 pieces) and a 32k sentencepiece BPE trained here on the
Python standard library's source (Mixtral's size). For each backend and a few specs (a JSON
schema, any JSON object, a regex) it compiles the spec (cold: a new compiler, no cache) and then
walks a fixed valid answer token by token, computing the next-token mask before each token —
exactly what the engine does per generated token. Prints medians over `--repeats` runs and the
load average. Run: python -m bench.bench_grammar_backends
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

from raymoe.model.default import default_checkpoint
from raymoe.model.guided import token_bytes
from raymoe.model.tokenizer import Tokenizer, train_tokenizer

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 40},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.[a-z]{2,3}$"},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": ["string", "null"]}},
                "required": ["city", "zip"]}},
    "required": ["name", "age", "email", "tags", "address"]}
ANSWER = json.dumps({"name": "Ada Lovelace", "age": 36, "email": "ada@math.uk", "tags": ["red", "blue"],
                     "address": {"city": "London", "zip": None}})
REGEX, REGEX_ANSWER = r"\d{3}-\d{4} [A-Z][a-z]+", "555-1234 Smith"


def byte_ids(tok: Tokenizer, text: str) -> list[int]:
    """Token ids whose bytes are exactly `text` (longest match first): sentencepiece would add its
    dummy-prefix space, which the grammars rightly refuse at the start of an answer."""
    by_bytes = {b: i for i, b in enumerate(token_bytes(tok)) if b}
    raw, ids, at = text.encode(), [], 0
    while at < len(raw):
        n = next(n for n in range(min(32, len(raw) - at), 0, -1) if raw[at:at + n] in by_bytes)
        ids.append(by_bytes[raw[at:at + n]])
        at += n
    return ids


def big_tokenizer(out: Path, vocab: int = 32000) -> Tokenizer:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines = [ln for f in sorted(stdlib.glob("*.py"))[:400] for ln in f.read_text(errors="ignore").splitlines() if ln]
    return train_tokenizer(lines[:400_000], out, vocab)


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tok: Tokenizer) -> None:
        import xgrammar as xgr
        self.xgr, self.vocab = xgr, tok.vocab_size
        self.info = xgr.TokenizerInfo(token_bytes(tok), xgr.VocabType.RAW, vocab_size=tok.vocab_size,
                                      stop_token_ids=[tok.eos_id])

    def compile(self, kind: str, spec: str):
        c = self.xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        return {"json_schema": c.compile_json_schema, "json_object": lambda _: c.compile_builtin_json_grammar(),
                "regex": c.compile_regex}[kind](spec)

    def walk(self, compiled, ids: list[int]) -> list[float]:
        m = self.xgr.GrammarMatcher(compiled)
        mask = self.xgr.allocate_token_bitmask(1, self.vocab)
        times = []
        for t in ids:
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(mask)
            times.append(time.perf_counter() - t0)
            assert m.accept_token(t), t
        return times


class Llguidance:
    name = "llguidance"

    def __init__(self, tok: Tokenizer) -> None:
        import llguidance
        import llguidance.torch  # noqa: F401
        self.llg = llguidance
        pieces = token_bytes(tok, special=lambda p: b"\xff" + p.encode())

        class Wrapped:
            eos_token_id, bos_token_id, tokens = tok.eos_id, tok.bos_id, pieces
            special_token_ids = [i for i, p in enumerate(pieces) if p.startswith(b"\xff")]

            def __call__(self, s):
                return tok.encode(s.decode() if isinstance(s, bytes) else s, bos=False)
        self.tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Wrapped()), n_vocab=tok.vocab_size)

    def compile(self, kind: str, spec: str):
        M = self.llg.LLMatcher
        grammar = {"json_schema": lambda s: M.grammar_from_json_schema(s),
                   "json_object": lambda _: M.grammar_from_json_schema({"type": "object"}),
                   "regex": M.grammar_from_regex}[kind](spec)
        return M(self.tok, grammar)  # llguidance compiles lazily; the matcher is what a request needs

    def walk(self, matcher, ids: list[int]) -> list[float]:
        import llguidance.torch as lt
        mask = lt.allocate_token_bitmask(1, self.tok.vocab_size)
        times = []
        for t in ids:
            t0 = time.perf_counter()
            lt.fill_next_token_bitmask(matcher, mask)
            times.append(time.perf_counter() - t0)
            assert matcher.consume_token(t), (t, matcher.get_error())
        return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"loadavg: {Path('/proc/loadavg').read_text().strip()}")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        vocabs = {"demo": Tokenizer(default_checkpoint()), "32k": big_tokenizer(Path(tmp) / "big.model")}
        print(f"32k tokenizer: {vocabs['32k'].vocab_size} pieces (trained in {time.perf_counter() - t0:.0f} s)")
        specs = [("json_schema", json.dumps(SCHEMA), ANSWER), ("json_object", "", ANSWER),
                 ("regex", REGEX, REGEX_ANSWER)]
        print(f"{'vocab':6} {'backend':11} {'spec':12} {'compile ms':>11} {'mask µs/token':>14} {'(spread)':>16}")
        for vname, tok in vocabs.items():
            for backend in (Xgrammar(tok), Llguidance(tok)):
                for kind, spec, answer in specs:
                    ids = byte_ids(tok, answer) + [tok.eos_id]
                    compile_ms, mask_us = [], []
                    try:
                        for _ in range(args.repeats):
                            t0 = time.perf_counter()
                            compiled = backend.compile(kind, spec)
                            compile_ms.append((time.perf_counter() - t0) * 1e3)
                            mask_us.append(statistics.median(backend.walk(compiled, ids)) * 1e6)
                    except AssertionError as e:  # the backend refused a valid answer (or crashed inside)
                        print(f"{vname:6} {backend.name:11} {kind:12} failed: {str(e).splitlines()[0][:90]}")
                        continue
                    print(f"{vname:6} {backend.name:11} {kind:12} {statistics.median(compile_ms):11.1f} "
                          f"{statistics.median(mask_us):14.1f} {min(mask_us):7.1f}-{max(mask_us):<7.1f}",
                          flush=True)
    print(f"loadavg: {Path('/proc/loadavg').read_text().strip()}")


if __name__ == "__main__":
    sys.exit(main())
