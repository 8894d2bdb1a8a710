"""Guided decoding: a per-sequence token mask from a grammar, applied before sampling.

A request may carry a `GuidedSpec` (a JSON schema, any JSON object, a regex, a list of choices, an
EBNF grammar, or tool calls). `GrammarCache.compile` turns it into a `CompiledGuide` once per
distinct spec (a bounded LRU keyed by a hash of the spec; compiling takes milliseconds to seconds,
so the door compiles, off the engine thread, and refuses a spec that is too large or too slow);
each sequence then gets its own `Guide`, a matcher over the tokens it has produced. The engine asks
the guides of a step's guided rows for one bitmask (`StepMasks`, computed on a helper thread
while the step's forward runs: the masks depend only on tokens already accepted), samples under
it, and feeds each sampled token back. Rows without a guide are never touched, and a step with no
guided row builds nothing.

The backend is xgrammar (docs/structured-output.md has the measurements against llguidance). It
sees the vocabulary as raw bytes (`token_bytes`): sentencepiece's "▁" is a space, byte pieces are
their byte, control pieces (<unk>, <s>, </s>) are empty (never produced by the grammar; EOS is
allowed exactly where the grammar may end), and ids past the tokenizer (a padded embedding table)
are never allowed. No Ray or gRPC here.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import threading
import time
from typing import Any, Callable

import torch

from .errors import InvalidRequest
from .tokenizer import Tokenizer

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar", "tool_calls")


@dataclasses.dataclass(frozen=True)
class GuidedSpec:
    """What the output must match. `text` is the spec as the user gave it (choice: a JSON list of
    strings; tool_calls: see `tool_call_grammar`); `field` is the request field to name on errors."""

    kind: str
    text: str = ""
    field: str = "guided_decoding"

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.kind}\0{self.text}".encode()).hexdigest()


def token_bytes(tok: Tokenizer, special: Callable[[str], bytes] = lambda _piece: b"") -> list[bytes]:
    """Each token id's bytes as it stands in the output (control pieces: `special(piece)`)."""
    sp, out = tok.sp, []
    for i in range(tok.vocab_size):
        piece = sp.IdToPiece(i)
        if sp.IsControl(i) or sp.IsUnknown(i):
            out.append(special(piece))
        elif sp.IsByte(i):
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            out.append(piece.replace("\u2581", " ").encode())
    return out


class CompiledGuide:
    """A compiled grammar, shared by every sequence that asks for the same spec."""

    def __init__(self, spec: GuidedSpec, compiled: Any, vocab_size: int) -> None:
        self.spec, self.compiled, self.vocab_size = spec, compiled, vocab_size

    def guide(self) -> "Guide":
        return Guide(self)


class Guide:
    """One sequence's place in its grammar."""

    def __init__(self, compiled: CompiledGuide) -> None:
        import xgrammar as xgr

        self.compiled = compiled
        self.matcher = xgr.GrammarMatcher(compiled.compiled)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        return bool(self.matcher.accept_token(int(token)))

    def replay(self, tokens: list[int]) -> None:
        """Tokens produced before (a resumed stream): raises InvalidRequest if they leave the grammar."""
        for i, t in enumerate(tokens):
            if self.matcher.is_terminated() or not self.accept(t):
                raise InvalidRequest(f"resume_token_ids[{i}] ({t}) does not follow the requested "
                                     f"{self.compiled.spec.kind}", "resume_token_ids")


class StepMasks:
    """The next-token masks of a step's guided rows, computed on a helper thread (xgrammar releases
    the GIL) so that they are ready when the logits are: `allowed()` waits for them."""

    _pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="raymoe-guided")

    @classmethod
    def start(cls, seqs: list, vocab_size: int) -> "StepMasks | None":
        """Masks for the sequences (anything with a `guide`) that have one; None when none has."""
        guides = [s.guide for s in seqs]
        return cls(guides, vocab_size) if any(g is not None for g in guides) else None

    def __init__(self, guides: list["Guide | None"], vocab_size: int) -> None:
        self.rows = [i for i, g in enumerate(guides) if g is not None]
        self.vocab_size = vocab_size
        self.seconds = 0.0  # time the masks took to compute
        self.waited = 0.0  # time allowed() waited for them (not hidden behind the forward)
        self.bitmask = torch.full((len(self.rows), (vocab_size + 31) // 32), -1, dtype=torch.int32)  # xgrammar's layout
        self._future = self._pool.submit(self._fill, [(guides[i], k) for k, i in enumerate(self.rows)])

    def _fill(self, work: list[tuple["Guide", int]]) -> None:
        t0 = time.perf_counter()
        for guide, k in work:
            guide.fill(self.bitmask, k)
        self.seconds = time.perf_counter() - t0

    def allowed(self, batch: int) -> torch.Tensor:
        """[batch, V] bool: True where a token may be sampled (every token on unguided rows)."""
        t0 = time.perf_counter()
        self._future.result()
        self.waited = time.perf_counter() - t0
        bits = (self.bitmask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1  # [R, V/32, 32]
        allowed = torch.ones(batch, self.vocab_size, dtype=torch.bool)
        allowed[self.rows] = bits.flatten(1)[:, :self.vocab_size].bool()
        return allowed


def start_guide(params: Any, output_ids: list[int] | tuple[int, ...] = ()) -> "Guide | None":
    """A new sequence's guide (None without guided decoding), with the tokens it already has replayed."""
    if getattr(params, "guided", None) is None:
        return None
    guide = params.guided.guide()
    guide.replay(list(output_ids))
    return guide


# --- compiling ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GuidedLimits:
    max_spec_bytes: int = 64 << 10  # a schema, regex, grammar or choice list larger than this is refused
    compile_timeout_s: float = 10.0  # a spec that takes longer to compile is refused
    cache_size: int = 256  # compiled grammars kept (least recently used dropped)


class GrammarCache:
    """Compiles specs for one vocabulary; compiled grammars are kept by the spec's hash (bounded).
    Thread-safe: the doors compile from worker threads."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: tuple[int, ...],
                 limits: GuidedLimits = GuidedLimits()) -> None:
        self.tokenizer, self.eos_ids, self.limits, self.vocab_size = tokenizer, eos_ids, limits, vocab_size
        self._cache: collections.OrderedDict[str, CompiledGuide] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        self.xgr = None  # xgrammar (its import takes seconds: it loads transformers) on the first compile

    def _load(self) -> None:
        with self._lock:
            if self.xgr is None:
                self._load_compilers()

    def _load_compilers(self) -> None:
        import xgrammar as xgr

        vocab, vocab_size, eos_ids = token_bytes(self.tokenizer), self.vocab_size, self.eos_ids
        # JSON never needs a control character (whitespace between tokens is fixed, and inside strings
        # they must be escaped), but xgrammar's string rules admit raw ones: JSON grammars get a
        # vocabulary without the tokens that hold them.
        no_controls = [b"" if any(c < 0x20 for c in piece) else piece for piece in vocab]
        self.compiler, self.json_compiler = (
            xgr.GrammarCompiler(xgr.TokenizerInfo(v, xgr.VocabType.RAW, vocab_size=vocab_size,
                                                  stop_token_ids=list(eos_ids)),
                                max_threads=1, cache_enabled=False)  # our cache is bounded
            for v in (vocab, no_controls))
        self.xgr = xgr

    def compile(self, spec: GuidedSpec) -> CompiledGuide:
        """The compiled grammar, from the cache or compiled now; InvalidRequest naming spec.field for a
        spec that is malformed, too large or too slow to compile."""
        if spec.kind not in KINDS:
            raise InvalidRequest(f"unknown guided decoding kind {spec.kind!r} (one of {', '.join(KINDS)})", spec.field)
        if len(spec.text.encode()) > self.limits.max_spec_bytes:
            raise InvalidRequest(f"{spec.field} is {len(spec.text.encode())} bytes; the limit is "
                                 f"{self.limits.max_spec_bytes}", spec.field)
        with self._lock:
            hit = self._cache.get(spec.key)
            if hit is not None:
                self._cache.move_to_end(spec.key)
                self.hits += 1
                return hit
            self.misses += 1
        self._load()
        grammar = self._grammar(spec)  # parsing is quick; the compile below is what can take long
        compiler = self.compiler if _free_text(spec) else self.json_compiler
        future = _COMPILE_POOL.submit(compiler.compile_grammar, grammar)
        try:
            compiled = future.result(timeout=self.limits.compile_timeout_s)
        except concurrent.futures.TimeoutError:
            raise InvalidRequest(f"{spec.field} takes longer than {self.limits.compile_timeout_s:g} s to compile; "
                                 f"simplify it", spec.field) from None
        except RuntimeError as e:
            raise InvalidRequest(f"{spec.field} cannot be compiled: {_short(e)}", spec.field) from None
        guide = CompiledGuide(spec, compiled, self.vocab_size)
        with self._lock:
            self._cache[spec.key] = guide
            while len(self._cache) > self.limits.cache_size:
                self._cache.popitem(last=False)
        return guide

    def _grammar(self, spec: GuidedSpec):
        """The spec as an xgrammar Grammar; InvalidRequest naming the field when it is malformed."""
        G = self.xgr.Grammar
        try:
            if spec.kind == "json_schema":
                return G.from_json_schema(_json_text(spec), any_whitespace=False, strict_mode=True)
            if spec.kind == "json_object":
                return G.from_json_schema('{"type": "object"}', any_whitespace=False)
            if spec.kind == "regex":
                return G.from_regex(spec.text)
            if spec.kind == "choice":
                return G.from_ebnf("root ::= " + " | ".join(_ebnf_literal(c) for c in _choices(spec)))
            if spec.kind == "grammar":
                return G.from_ebnf(spec.text)
            return tool_call_grammar(G, json.loads(spec.text))
        except RuntimeError as e:  # xgrammar's parse errors
            raise InvalidRequest(f"{spec.field} is not valid: {_short(e)}", spec.field) from None


_COMPILE_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="raymoe-compile")


def _free_text(spec: GuidedSpec) -> bool:
    """Whether the output may be other than JSON (and so hold control characters such as newlines)."""
    return spec.kind in ("regex", "choice", "grammar") or spec.kind == "tool_calls" and json.loads(spec.text).get(
        "optional", False)


def _short(e: BaseException) -> str:
    """xgrammar's message without its C++ source location prefix."""
    text = str(e).strip()
    return text.split(": ", 1)[1] if text.startswith("[") and ": " in text else text


def _json_text(spec: GuidedSpec) -> str:
    try:
        schema = json.loads(spec.text)
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"{spec.field} is not JSON ({e})", spec.field) from None
    if not isinstance(schema, (dict, bool)):
        raise InvalidRequest(f"{spec.field} must be a JSON object (a JSON schema)", spec.field)
    _check_schema(schema, spec.field)
    return json.dumps(bound_integers(schema))


INT64 = (-(2**63), 2**63 - 1)
_VALUES = {"enum", "const", "default", "examples"}  # keys whose values are data, not schemas


def bound_integers(schema: Any) -> Any:
    """The schema with every integer lacking a bound given int64's: an unbounded integer lets a
    model write digits until max_tokens cuts the answer (invalid JSON); a 64-bit one ends within
    20 characters. (int64 is what most JSON consumers can hold anyway.)"""
    if isinstance(schema, list):
        return [bound_integers(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in _VALUES else bound_integers(v) for k, v in schema.items()}
    types = out.get("type")
    if types == "integer" or isinstance(types, list) and "integer" in types:
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = INT64[0]
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = INT64[1]
    return out


def _check_schema(schema: Any, field: str) -> None:
    """The schema is a valid JSON schema (draft 2020-12 meta-schema), when jsonschema is installed."""
    try:
        import jsonschema
    except ImportError:
        return
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise InvalidRequest(f"{field} is not a valid JSON schema: {e.message}", field) from None


def _choices(spec: GuidedSpec) -> list[str]:
    try:
        choices = json.loads(spec.text)
    except json.JSONDecodeError:
        choices = None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise InvalidRequest(f"{spec.field} must be a non-empty list of non-empty strings", spec.field)
    return choices


def _ebnf_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # EBNF string literals take JSON's escapes


def tool_call_grammar(G, spec: dict):
    """Tool calls: `prefix` then a JSON array of {"name", "arguments"} objects, one per call (at most
    one when not `parallel`), each call's arguments following its function's parameters. With
    `optional` (tool_choice auto) the answer may instead be text that does not start with the
    prefix's first character."""
    calls = [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f.get("parameters") or
                                              {"type": "object"}}, "required": ["name", "arguments"]}
             for f in spec["functions"]]
    array: dict[str, Any] = {"type": "array", "items": {"anyOf": calls} if len(calls) > 1 else calls[0],
                             "minItems": 1}
    if not spec.get("parallel", True):
        array["maxItems"] = 1
    call = G.from_json_schema(json.dumps(array), any_whitespace=False, strict_mode=True)
    prefix = spec.get("prefix") or ""
    if prefix:
        call = G.concat(G.from_ebnf(f"root ::= {_ebnf_literal(prefix)}"), call)
    if not spec.get("optional"):
        return call
    first = (prefix or "[")[0]
    text = G.from_regex(f"([^{_regex_class_escape(first)}][\\s\\S]*)?")
    return G.union(call, text)


def _regex_class_escape(ch: str) -> str:
    return "\\" + ch if ch in "\\]^-[" else ch
