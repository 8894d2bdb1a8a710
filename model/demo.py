"""The demo model: a tiny Mixtral trained here on multi-digit addition, so its answers can be checked.

`raymoe train-demo` builds it: a sentencepiece tokenizer trained on the problems' text, then a
Mixtral (8 experts, top-2) trained from scratch with the project's own model code (the cache-free
packed forward of model/transformer.py) on problems "a+b=" answered "<a+b></s>", operands of 1 to 3
digits. `raymoe eval-demo` scores greedy exact-match accuracy on held-out problems.

Held-out problems are excluded from training by construction: a pair (a, b) is held out when a
hash of "a+b" falls in one bucket of HOLDOUT_BUCKETS; training only ever draws the others, and
evaluation draws only held-out pairs (from its own seed). Everything is deterministic from a seed.
Pure PyTorch: nothing here knows about Ray or gRPC; `evaluate` takes any prompt → answer function.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .completion import complete
from .config import ModelConfig
from .default import default_checkpoint
from .engine import Engine
from .export import save_checkpoint
from .moe import MoEBlock
from .presets import random_model
from .sampling import SamplingParams
from .step import build_layout
from .synthetic import addition
from .tokenizer import Tokenizer, train_tokenizer
from .transformer import Mixtral
from .weights import load_model

MAX_DIGITS = 3
HOLDOUT_BUCKETS = 20  # one pair in 20 is held out for evaluation
EVAL_SEED = 1234  # the held-out evaluation stream (training uses its own seed)
TOKENIZER_VOCAB = 300  # asked of sentencepiece; byte fallback alone takes 256 + 3 special pieces
TOKENIZER_LINES = 4000

GenerateFn = Callable[[list[str]], list[str]]  # prompts → answer texts (what follows each prompt)


# --- the task ---------------------------------------------------------------------------------

def is_held_out(a: int, b: int) -> bool:
    """Whether the pair (a, b) belongs to the evaluation split (stable across runs and platforms)."""
    digest = hashlib.blake2b(f"{a}+{b}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % HOLDOUT_BUCKETS == 0


def _pairs(rng: random.Random, held_out: bool) -> Iterator[tuple[int, int]]:
    """Pairs as model/synthetic.addition draws them (each operand 1 to MAX_DIGITS digits), one split only."""
    while True:
        prompt, _ = addition(rng, MAX_DIGITS)
        a, b = (int(x) for x in prompt.rstrip("=").split("+"))
        if is_held_out(a, b) == held_out:
            yield a, b


def prompt_text(a: int, b: int) -> str:
    return f"{a}+{b}="


def train_problems(seed: int) -> Iterator[tuple[int, int]]:
    """The endless training stream: never a held-out pair."""
    return _pairs(random.Random(seed), held_out=False)


def eval_problems(n: int = 500, seed: int = EVAL_SEED) -> list[tuple[int, int]]:
    """n held-out problems (pairs may repeat, as the small ones are few)."""
    it = _pairs(random.Random(seed), held_out=True)
    return [next(it) for _ in range(n)]


def tokenizer_corpus(seed: int, lines: int = TOKENIZER_LINES) -> list[str]:
    """Lines of 1-4 solved training problems, as the tokenizer's training text."""
    rng = random.Random(seed)
    it = train_problems(seed + 1)
    out = []
    for _ in range(lines):
        out.append(" ".join(f"{prompt_text(a, b)}{a + b}" for a, b in (next(it) for _ in range(rng.randint(1, 4)))))
    return out


class Encoder:
    """Problem → token ids: the prompt exactly as a server encodes it (BOS first), then the answer + EOS."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self.digits = {d: tokenizer.sp.PieceToId(d) for d in "0123456789"}
        for a, b in [(123, 456), (7, 8), (999, 1), (0, 0)]:  # the answer continues the prompt's tokens
            full, prompt = tokenizer.encode(prompt_text(a, b) + str(a + b)), tokenizer.encode(prompt_text(a, b))
            if full != prompt + [self.digits[c] for c in str(a + b)]:
                raise RuntimeError("tokenizer does not split answers into single digits after the prompt")

    def encode(self, a: int, b: int) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids ending with EOS)."""
        return self.tok.encode(prompt_text(a, b)), [self.digits[c] for c in str(a + b)] + [self.tok.eos_id]


# --- the model --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int = 128
    intermediate: int = 128
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    experts: int = 8
    top_k: int = 2


DEMO_SHAPE = Shape()


def demo_config(shape: Shape, vocab_size: int, tokenizer: Tokenizer) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, num_local_experts=shape.experts,
                       num_experts_per_tok=shape.top_k, rope_theta=10000.0, max_position_embeddings=512,
                       bos_token_id=tokenizer.bos_id, eos_token_ids=(tokenizer.eos_id,))


class RouterStats:
    """Forward pre-hooks on every MoE block: the Switch-style load-balancing loss of each step's routing.

    Recomputes the router's softmax on the MoE input (the model's own forward is left untouched)."""

    def __init__(self, model: Mixtral) -> None:
        self.losses: list[torch.Tensor] = []
        self.handles = [m.register_forward_pre_hook(self._hook) for m in model.modules() if isinstance(m, MoEBlock)]

    def _hook(self, module: MoEBlock, args: tuple[torch.Tensor, ...]) -> None:
        if not torch.is_grad_enabled():
            return
        probs = torch.softmax(F.linear(args[0], module.gate.weight).float(), dim=-1)  # [T, E]
        e = probs.shape[-1]
        idx = torch.topk(probs, module.top_k, dim=-1).indices
        frac = torch.bincount(idx.reshape(-1), minlength=e).float() / idx.numel()
        self.losses.append(e * (frac * probs.mean(0)).sum())

    def take(self) -> torch.Tensor:
        out = torch.stack(self.losses).mean() if self.losses else torch.zeros(())
        self.losses = []
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# --- training ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Batch:
    tokens: torch.Tensor  # [T] packed sequences
    q_lens: list[int]
    loss_index: torch.Tensor  # [N] packed positions whose next token is an answer token or EOS
    targets: torch.Tensor  # [N]
    seq_of_target: torch.Tensor  # [N] which sequence each target belongs to


def make_batch(encoder: Encoder, pairs: list[tuple[int, int]]) -> Batch:
    tokens, q_lens, loss_index, targets, seq_of = [], [], [], [], []
    for s, (a, b) in enumerate(pairs):
        prompt, answer = encoder.encode(a, b)
        start = len(tokens)
        seq = prompt + answer
        tokens += seq[:-1]  # the final EOS is only ever a target
        q_lens.append(len(seq) - 1)
        for j in range(len(answer)):
            loss_index.append(start + len(prompt) - 1 + j)
            targets.append(answer[j])
            seq_of.append(s)
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return Batch(t(tokens), q_lens, t(loss_index), t(targets), t(seq_of))


def batch_loss(model: Mixtral, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy over answer tokens, per-sequence exact match under teacher forcing [B] bool).

    Teacher-forced exact match equals greedy exact match: greedy decoding reproduces the answer
    exactly when every answer token is the argmax given the correct tokens before it."""
    layout = build_layout(batch.q_lens, [0] * len(batch.q_lens))
    hidden = model(batch.tokens, layout)
    logits = model.logits(hidden[batch.loss_index])
    loss = F.cross_entropy(logits, batch.targets)
    wrong = (logits.argmax(-1) != batch.targets).long()
    per_seq = torch.zeros(len(batch.q_lens), dtype=torch.long).index_add_(0, batch.seq_of_target, wrong)
    return loss, per_seq == 0


@dataclasses.dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 4000
    batch_size: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.01
    aux_coef: float = 0.01  # router load-balancing loss weight (0 disables)
    grad_clip: float = 1.0
    threads: int = 2
    log_every: int = 100
    shape: Shape = DEMO_SHAPE


@dataclasses.dataclass
class TrainResult:
    model: Mixtral
    tokenizer: Tokenizer
    losses: list[float]  # per step
    steps: int
    seconds: float

    @property
    def final_loss(self) -> float:
        """Mean loss over the last 50 steps (or all of them when fewer)."""
        tail = self.losses[-50:]
        return sum(tail) / len(tail)


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio · lr."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    p = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def train(tc: TrainConfig, tokenizer_dir: str | Path, *, log: Callable[[str], None] | None = print) -> TrainResult:
    """Train a tokenizer (written to tokenizer_dir/tokenizer.model) and a Mixtral on the addition task."""
    log = log or (lambda s: None)
    torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    t0 = time.perf_counter()
    Path(tokenizer_dir).mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(tokenizer_corpus(tc.seed), Path(tokenizer_dir) / "tokenizer.model", TOKENIZER_VOCAB)
    encoder = Encoder(tok)
    cfg = demo_config(tc.shape, tok.vocab_size, tok)
    model = random_model(cfg, tc.seed, scale_outputs=True).train().requires_grad_(True)
    log(f"tokenizer: {tok.vocab_size} pieces; model: {cfg.num_parameters() / 1e6:.2f}M parameters "
        f"({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_local_experts} experts × "
        f"intermediate {cfg.intermediate_size}, top-{cfg.num_experts_per_tok}); {tc.steps} steps of "
        f"{tc.batch_size} problems, {tc.threads} threads")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.98))
    router = RouterStats(model) if tc.aux_coef > 0 else None
    data = train_problems(tc.seed)
    losses: list[float] = []
    window = {"loss": 0.0, "aux": 0.0, "exact": 0.0, "n": 0, "tokens": 0, "t": time.perf_counter()}
    try:
        for step in range(tc.steps):
            batch = make_batch(encoder, [next(data) for _ in range(tc.batch_size)])
            for group in opt.param_groups:
                group["lr"] = lr_at(step, tc)
            loss, exact = batch_loss(model, batch)
            aux = router.take() if router else torch.zeros(())
            opt.zero_grad(set_to_none=True)
            (loss + tc.aux_coef * aux).backward()
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            losses.append(loss.detach().item())
            window["loss"] += losses[-1]
            window["aux"] += aux.detach().item()
            window["exact"] += float(exact.float().mean())
            window["n"] += 1
            window["tokens"] += int(batch.tokens.numel())
            if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
                now, n = time.perf_counter(), window["n"]
                rate = n / (now - window["t"])
                elapsed = now - t0
                log(f"step {step + 1:5d}/{tc.steps}  loss {window['loss'] / n:.4f}  "
                    f"exact {window['exact'] / n:6.1%}  aux {window['aux'] / n:.3f}  lr {lr_at(step, tc):.2e}  "
                    f"{rate:.2f} steps/s  {window['tokens'] / (now - window['t']):,.0f} tok/s  "
                    f"elapsed {elapsed:.0f}s  eta {(tc.steps - step - 1) / rate:.0f}s")
                window.update(loss=0.0, aux=0.0, exact=0.0, n=0, tokens=0, t=now)
    finally:
        if router:
            router.remove()
    model.eval().requires_grad_(False)
    return TrainResult(model, tok, losses, tc.steps, time.perf_counter() - t0)


def train_demo(out_dir: str | Path, tc: TrainConfig | None = None, *, dtype: torch.dtype = torch.bfloat16,
               log: Callable[[str], None] | None = print) -> TrainResult:
    """Train and write the checkpoint (config.json, model.safetensors, tokenizer.model) to out_dir.

    Weights are stored in `dtype`: bfloat16 halves the file and scores the same as float32."""
    tc = tc or TrainConfig()
    with tempfile.TemporaryDirectory() as tmp:
        result = train(tc, tmp, log=log)
        save_checkpoint(result.model, out_dir, tokenizer=result.tokenizer.path, dtype=dtype)
    result.tokenizer = Tokenizer(out_dir)
    return result


# --- evaluation -------------------------------------------------------------------------------

@dataclasses.dataclass
class EvalResult:
    correct: int
    n: int
    seconds: float  # spent generating
    errors: list[tuple[str, str, str]]  # (prompt, expected, got), the first few
    answers: list[str]  # every answer text as generated (unstripped), in problem order

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0


def local_generate(checkpoint: str | Path, *, batch_size: int = 64, max_tokens: int = 6,
                   dtype: torch.dtype = torch.float32, experts_factory=None,
                   quantization: str | None = None) -> GenerateFn:
    """Greedy answers from the engine in this process (as `raymoe run`); experts_factory and
    quantization (of local experts) as in load_model."""

    model = load_model(checkpoint, dtype=dtype, experts_factory=experts_factory, quantization=quantization)
    tok = Tokenizer(checkpoint)
    params = SamplingParams(max_tokens=max_tokens)

    def generate(prompts: list[str]) -> list[str]:
        out = []
        for i in range(0, len(prompts), batch_size):
            ids = [tok.encode(p) for p in prompts[i:i + batch_size]]
            engine = Engine(model, kv_cache_tokens=sum(len(p) + max_tokens + 16 for p in ids),
                            max_running=len(ids))
            out += [c.text for c in complete(engine, tok, ids, [params] * len(ids))]
        return out

    return generate


def evaluate(checkpoint: str | Path | None = None, n: int = 500, seed: int = EVAL_SEED, *,
             generate: GenerateFn | None = None, batch_size: int = 64, quantization: str | None = None) -> EvalResult:
    """Exact-match accuracy on n held-out problems: an answer is right when its stripped text is str(a+b).

    `generate` (prompts → answers) replaces the in-process model, e.g. with remote experts or a server."""
    if generate is None:
        if checkpoint is None:
            checkpoint = default_checkpoint()
        generate = local_generate(checkpoint, batch_size=batch_size, quantization=quantization)
    problems = eval_problems(n, seed)
    prompts = [prompt_text(a, b) for a, b in problems]
    t0 = time.perf_counter()
    answers = generate(prompts)
    seconds = time.perf_counter() - t0
    if len(answers) != len(prompts):
        raise RuntimeError(f"generate returned {len(answers)} answers for {len(prompts)} prompts")
    correct, errors = 0, []
    for p, (a, b), got in zip(prompts, problems, answers):
        if got.strip() == str(a + b):
            correct += 1
        elif len(errors) < 10:
            errors.append((p, str(a + b), got))
    return EvalResult(correct, n, seconds, errors, list(answers))
