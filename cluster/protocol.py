"""Proto ↔ domain: requests become (prompt ids, SamplingParams, stop strings); chunks become responses.

Everything a client can get wrong is checked here or in Engine.check and raised as ValueError
with a message the client can act on; the ingress turns that into INVALID_ARGUMENT.
"""

from __future__ import annotations

import functools

from protos import generator_pb2 as pb
from model.config import ModelConfig
from model.sampling import SamplingParams
from model.tokenizer import Tokenizer

from .engine_loop import Chunk, merge

DEFAULT_MAX_TOKENS = 16
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 128


def parse_request(req: pb.GenerateRequest, tokenizer: Tokenizer | None) -> tuple[list[int], SamplingParams, list[str]]:
    has_text, has_ids = bool(req.prompt), len(req.prompt_token_ids) > 0
    if has_text == has_ids:
        raise ValueError("give exactly one of prompt and prompt_token_ids" if has_text
                         else "the prompt is empty: set prompt or prompt_token_ids")
    if has_text:
        if tokenizer is None:
            raise ValueError("this model has no tokenizer; send prompt_token_ids instead of prompt")
        prompt_ids = tokenizer.encode(req.prompt)
    else:
        prompt_ids = list(req.prompt_token_ids)
    stop = list(req.stop)
    if len(stop) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed (got {len(stop)})")
    for s in stop:
        if not s or len(s) > MAX_STOP_CHARS:
            raise ValueError(f"each stop string must have 1 to {MAX_STOP_CHARS} characters (got {len(s)})")
    params = SamplingParams(
        max_tokens=req.max_tokens or DEFAULT_MAX_TOKENS,
        temperature=req.temperature if req.HasField("temperature") else 0.0,
        top_p=req.top_p if req.HasField("top_p") else 1.0,
        top_k=req.top_k,
        seed=req.seed if req.HasField("seed") else None,
        logprobs=req.logprobs,
        stop_token_ids=tuple(req.stop_token_ids),
        ignore_eos=req.ignore_eos,
    )
    return prompt_ids, params, stop


def _top(rows: list[list[tuple[int, float]]]) -> list[pb.TopLogprobs]:
    return [pb.TopLogprobs(alternatives=[pb.TokenLogprob(token_id=t, logprob=lp) for t, lp in row]) for row in rows]


def chunk_response(chunk: Chunk, prompt_ids: list[int] | None, with_top: bool) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        text=chunk.text, token_ids=chunk.token_ids, logprobs=chunk.logprobs,
        top_logprobs=_top(chunk.top) if with_top else [], finish_reason=chunk.finish_reason or "",
        usage=pb.Usage(prompt_tokens=len(prompt_ids or ()), completion_tokens=chunk.completion_tokens),
        prompt_token_ids=prompt_ids or [],
    )


def merge_chunks(chunks: list[Chunk]) -> Chunk:
    return functools.reduce(merge, chunks) if chunks else Chunk("", [], [], [], None, 0)


def config_message(cfg: ModelConfig, dtype: str) -> pb.ModelConfig:
    return pb.ModelConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        num_local_experts=cfg.num_local_experts, num_experts_per_tok=cfg.num_experts_per_tok,
        max_position_embeddings=cfg.max_position_embeddings, sliding_window=cfg.sliding_window or 0,
        rope_theta=cfg.rope_theta, dtype=dtype,
    )
