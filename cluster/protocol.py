"""Proto ↔ domain: requests become (prompt ids, SamplingParams, stop strings); chunks become responses.

Every field is checked by cluster/requests.py (shared with the HTTP door) or Engine.check, which
raise InvalidRequest naming the field; the ingress turns that into INVALID_ARGUMENT.
"""

from __future__ import annotations

import json

from raymoe.protos import generator_pb2 as pb
from raymoe.model.config import ModelConfig
from raymoe.model.errors import InvalidRequest
from raymoe.model.guided import GrammarCache, GuidedSpec
from raymoe.model.tokenizer import Tokenizer

from .engine_loop import Chunk
from .requests import Request, RequestLimits, build_request, check_counts
from .tools import parse_tools


def guided_spec(req: pb.GenerateRequest) -> GuidedSpec | None:
    """GenerateRequest.guided_decoding as a spec (None when unset); InvalidRequest names the field."""
    if not req.HasField("guided_decoding"):
        return None
    g = req.guided_decoding
    kind = g.WhichOneof("kind")
    field = f"guided_decoding.{kind}"
    if kind is None:
        raise InvalidRequest("guided_decoding is set but empty: set one of json_schema, json_object, regex, "
                             "choice, grammar", "guided_decoding")
    if kind == "json_object":
        return GuidedSpec("json_object", "", field) if g.json_object else None
    if kind == "choice":
        return GuidedSpec("choice", json.dumps(list(g.choice.choice)), field)
    text = getattr(g, kind)
    if not text:
        raise InvalidRequest(f"{field} is empty", field)
    return GuidedSpec(kind, text, field)


def _tools(req: pb.GenerateRequest):
    tools = []
    for i, t in enumerate(req.tools):
        try:
            params = json.loads(t.parameters) if t.parameters else None
        except json.JSONDecodeError as e:
            raise InvalidRequest(f"tools[{i}].parameters is not JSON ({e})", "tools") from None
        tools.append({"type": "function", "function": {"name": t.name, "description": t.description,
                                                       "parameters": params}})
    names = {t.name for t in req.tools}
    choice = req.tool_choice or None
    if choice not in (None, "none", "auto", "required"):
        choice = {"type": "function", "function": {"name": choice}} if choice in names else choice
    return parse_tools(tools, choice, req.parallel_tool_calls if req.HasField("parallel_tool_calls") else None)


def parse_request(req: pb.GenerateRequest, cfg: ModelConfig, limits: RequestLimits,
                  tokenizer: Tokenizer | None, grammars: GrammarCache | None = None) -> Request:
    """A GenerateRequest as the engine's request; InvalidRequest names the field at fault."""
    check_counts(cfg, limits, prompt_ids=len(req.prompt_token_ids), stop=len(req.stop),
                 stop_token_ids=len(req.stop_token_ids), resume_ids=len(req.resume_token_ids))
    return build_request(
        cfg, limits, tokenizer, prompt=req.prompt or None, prompt_ids=list(req.prompt_token_ids),
        max_tokens=req.max_tokens or None, temperature=req.temperature if req.HasField("temperature") else None,
        top_p=req.top_p if req.HasField("top_p") else None, top_k=req.top_k,
        seed=req.seed if req.HasField("seed") else None, logprobs=req.logprobs, stop=list(req.stop),
        stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, resume_ids=req.resume_token_ids,
        resume_text_bytes=req.resume_text_bytes, guided=guided_spec(req), grammars=grammars, tools=_tools(req),
        cache_salt=req.cache_salt)


def _top(rows: list[list[tuple[int, float]]]) -> list[pb.TopLogprobs]:
    return [pb.TopLogprobs(alternatives=[pb.TokenLogprob(token_id=t, logprob=lp) for t, lp in row]) for row in rows]


def chunk_response(chunk: Chunk, prompt_ids: list[int] | None, with_top: bool,
                   seed: int | None = None, tool_calls: list[dict] | None = None) -> pb.GenerateResponse:
    """prompt_ids and seed go on the first chunk of a stream (and on a unary response); tool_calls
    (read_calls of the whole text) on the last, whose finish_reason becomes "tool_calls"."""
    finish = "tool_calls" if tool_calls and chunk.finish_reason == "stop" else chunk.finish_reason or ""
    calls = [pb.ToolCall(id=c["id"], type=c["type"], name=c["function"]["name"],
                         arguments=c["function"]["arguments"]) for c in tool_calls or ()]
    return pb.GenerateResponse(
        text=chunk.text, token_ids=chunk.token_ids, logprobs=chunk.logprobs,
        top_logprobs=_top(chunk.top) if with_top else [], finish_reason=finish,
        usage=pb.Usage(prompt_tokens=len(prompt_ids or ()), completion_tokens=chunk.completion_tokens,
                       cached_prompt_tokens=chunk.cached_tokens),
        prompt_token_ids=prompt_ids or [], seed=seed, tool_calls=calls,
    )


def merge_chunks(chunks: list[Chunk]) -> Chunk:
    """A stream's chunks as one (linear in the number of tokens)."""
    if not chunks:
        return Chunk("", [], [], [], None, 0)
    return Chunk("".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids],
                 [lp for c in chunks for lp in c.logprobs], [row for c in chunks for row in c.top],
                 chunks[-1].finish_reason, chunks[-1].completion_tokens, chunks[-1].cached_tokens)


def config_message(cfg: ModelConfig, dtype: str) -> pb.ModelConfig:
    return pb.ModelConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        num_local_experts=cfg.num_local_experts, num_experts_per_tok=cfg.num_experts_per_tok,
        max_position_embeddings=cfg.max_position_embeddings, sliding_window=cfg.sliding_window or 0,
        rope_theta=cfg.rope_theta, dtype=dtype,
    )
