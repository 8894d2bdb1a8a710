"""The generation engine: continuous batching over token ids. It knows nothing of text, protos or Ray.

Sequences are added at any time and join the running batch at the next `step()`. A step packs
one decode token of every running sequence plus prompt chunks of newly admitted ones (up to
`max_batch_tokens`), runs the model once, and samples for every sequence whose pending tokens are
all in the cache.

Memory: a sequence is admitted when the KV cache can hold its prompt and the first token it
samples (not its whole max_tokens) and takes blocks as it grows. When the cache runs out, the running sequence that arrived last is
preempted: its blocks are freed and it goes back to the queue (in its place by arrival) with the
tokens it has, to be recomputed (prompt + output re-prefilled) when memory frees up. Sampling
depends only on (seed, position), so a preempted sequence produces the tokens it would have
(the recomputation is one prefill instead of step-by-step decoding, so float rounding can
differ in the last bits: only a near-tie between two tokens could flip). A waiting request
that fits may start before an earlier one that does not, but each waiting request is passed at
most `max_overtakes` times: after that the queue is strictly first come, first served until it
starts, so a large request is never starved.

Prefix caching (model/prefix_cache.py, on unless prefix_caching=False): a sequence starts from
the longest cached prefix of its tokens under its salt, whether new, resumed or coming back after
preemption, and prefills only the rest; a fully cached one still computes its last token. The
cached keys are the ones a prefill of the same tokens computed, so the output is the same as
without the cache up to float rounding of the different step shapes (as for batch shapes).

Isolation: a row with non-finite logits fails that sequence alone. If the model itself raises,
the step's sequences are retried one at a time and only those that fail again are failed; a
BackendUnavailable error (the experts cannot be reached) fails the step's sequences at once.
"""

from __future__ import annotations

import collections
from typing import Hashable

import torch

from .errors import BackendUnavailable, InvalidRequest
from .fair import FairShare
from .guided import StepMasks, start_guide
from .kv_cache import PagedKVCache
from . import row_stable, shape_buckets
from .prefix_cache import BlockHash, extend_hashes
from .sampling import SamplingParams, sample
from .sequence import Sequence, TokenEvent
from .step import StepLayout, build_layout
from .transformer import Mixtral


class Engine:
    def __init__(self, model: Mixtral, *, kv_cache_tokens: int = 16384, block_size: int = 16,
                 max_batch_tokens: int = 2048, max_running: int = 64, micro_batches: int = 1,
                 max_overtakes: int = 16, prefix_caching: bool = True) -> None:
        """micro_batches > 1 splits each step's batch so that, with remote experts, the attention of
        one part runs while another part's experts compute (see Mixtral.forward_micro)."""
        self.model, self.cfg = model, model.cfg
        self.device = model.embed_tokens.weight.device  # the KV cache and each step's inputs live there
        self._bucketed = shape_buckets.applies(model.embed_tokens.weight)  # attention shapes (model/step.py)
        self.cache = PagedKVCache(self.cfg, kv_cache_tokens, block_size=block_size, dtype=model.dtype,
                                  device=self.device, prefix_caching=prefix_caching)
        self.max_batch_tokens, self.max_running, self.micro_batches = max_batch_tokens, max_running, micro_batches
        self.max_overtakes = max_overtakes
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: dict[Hashable, Sequence] = {}
        self._arrivals = 0
        self.last_batch = (0, 0)  # (sequences, tokens) of the latest step, for metrics
        self.preemptions = 0  # since the engine started
        # Guided decoding, since the engine started: seconds computing masks, and the part of them
        # the steps waited for (the rest overlapped the forward)
        self.mask_seconds = self.mask_wait_seconds = 0.0
        self._eos = frozenset(self.cfg.eos_token_ids)
        self.fair = FairShare()  # admission and preemption order between tenants (one tenant: arrival)

    # --- requests ---------------------------------------------------------------------------

    def check(self, prompt_ids: list[int], params: SamplingParams, output_ids: list[int] = ()) -> None:
        """Raise InvalidRequest (a message for the user) if the request can never run."""
        params.validate()
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty", "prompt")
        vocab = self.cfg.vocab_size
        if params.logprobs > vocab:
            raise InvalidRequest(f"logprobs must be at most the vocabulary size, {vocab} (got {params.logprobs})",
                                 "logprobs")
        bad = next((t for t in (*prompt_ids, *output_ids) if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(f"token id {bad} is outside the vocabulary [0, {vocab})", "prompt_token_ids")
        if len(output_ids) >= params.max_tokens:
            raise InvalidRequest(f"{len(output_ids)} tokens were already generated; max_tokens "
                                 f"({params.max_tokens}) leaves nothing to continue", "max_tokens")
        need, ctx = len(prompt_ids) + params.max_tokens, self.cfg.max_position_embeddings
        if need > ctx:
            raise InvalidRequest(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {need} "
                                 f"exceeds the model's context of {ctx} tokens", "max_tokens")
        if need > self.cache.capacity_tokens:
            raise InvalidRequest(f"prompt + max_tokens = {need} tokens exceeds the KV cache "
                                 f"({self.cache.capacity_tokens} tokens)", "max_tokens")

    def add(self, seq_id: Hashable, prompt_ids: list[int], params: SamplingParams,
            output_ids: list[int] = (), tenant: Hashable = "", weight: float = 1.0, priority: int = 0,
            cache_salt: bytes = b"") -> Sequence:
        """Queue a sequence. `output_ids` continues a generation whose first tokens were already
        produced (elsewhere): they are prefilled with the prompt and count towards max_tokens.
        tenant, weight, priority: its share of the engine beside other tenants (model/fair.py)."""
        self.check(prompt_ids, params, output_ids)
        if seq_id in self.running or any(s.seq_id == seq_id for s in self.waiting):
            raise ValueError(f"sequence id {seq_id!r} is already in use")
        self.fair.arrive(tenant, {s.tenant for s in (*self.waiting, *self.running.values())})
        seq = Sequence(seq_id, list(prompt_ids), params, params.effective_seed(), list(output_ids),
                       arrival=self._arrivals, guide=start_guide(params, output_ids), tenant=tenant, weight=weight,
                       priority=priority, cache_salt=cache_salt)
        self._arrivals += 1
        self.waiting.append(seq)
        return seq

    def abort(self, seq_id: Hashable, reason: str = "cancelled") -> Sequence | None:
        """End a sequence now (client gone, deadline, stop string) and free its memory."""
        seq = self.running.pop(seq_id, None)
        if seq is None:
            seq = next((s for s in self.waiting if s.seq_id == seq_id), None)
            if seq is not None:
                self.waiting.remove(seq)
        if seq is not None:
            seq.finish_reason = seq.finish_reason or reason
            self.cache.release(seq_id, keep_cached=reason != "error")
        return seq

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- scheduling -------------------------------------------------------------------------

    def _preempt(self, seq: Sequence) -> None:
        """Free the sequence's memory; it waits, in its place by arrival, to be recomputed."""
        del self.running[seq.seq_id]
        self.cache.release(seq.seq_id)
        seq.num_cached = 0
        seq.preemptions += 1
        self.preemptions += 1
        at = next((i for i, w in enumerate(self.waiting) if w.arrival > seq.arrival), len(self.waiting))
        self.waiting.insert(at, seq)

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Blocks for `num_tokens` of `seq`, preempting later-admitted sequences if needed.
        False if `seq` itself had to be preempted."""
        while not self.cache.allocate(seq.seq_id, num_tokens):
            victim = self.fair.victim(self.running.values())  # one tenant: the latest to arrive
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _schedule(self) -> list[tuple[Sequence, list[int]]]:
        budget = self.max_batch_tokens
        batch = []
        for seq in sorted(self.running.values(), key=lambda s: s.arrival):  # running first, oldest first
            if seq.seq_id not in self.running:
                continue  # preempted by an older sequence of this loop
            decoding = seq.num_cached == seq.num_tokens - 1
            chunk = seq.pending(1 if decoding else max(budget, 0))  # decoding never waits for budget
            if chunk and self._grow(seq, seq.num_cached + len(chunk)):
                batch.append((seq, chunk))
                budget -= len(chunk)
        batch = [(s, c) for s, c in batch if s.seq_id in self.running]  # a later grow may have preempted it
        if self.waiting and budget > 0:
            admitted = self._admit(budget)  # a better priority class may preempt some of `batch`
            batch = [(s, c) for s, c in batch if s.seq_id in self.running] + admitted
        return batch

    def _admit(self, budget: int) -> list[tuple[Sequence, list[int]]]:
        """Start waiting sequences that fit in the free blocks, in the fair order (model/fair.py:
        priority class, the tenant's virtual counter, arrival; one tenant: oldest first). A sequence
        of a better class that finds no room preempts running ones of worse classes. Fitting counts the
        token its prefill samples (the block the next step writes it into), so a sequence admitted
        into the last free blocks is not preempted at once at the next block boundary. One that
        does not fit may be overtaken by later ones, each waiting sequence at most `max_overtakes`
        times (counted on every sequence passed, so it holds also for one that was preempted and
        waits again)."""
        admitted = []
        bs = self.cache.block_size
        # Blocks the next step will ask for and nobody holds yet: running sequences whose tokens end
        # on a block boundary (their next token opens a block). An admitted one takes its own at once.
        reserved = sum(1 for s in self.running.values() if s.num_cached == s.num_tokens - 1 and s.num_tokens % bs == 0)
        order = self.fair.order(self.waiting)
        i = 0
        while i < len(order) and budget > 0:
            seq = order[i]
            prefix = self._reusable(seq)
            tokens = self._admission_tokens(seq)
            # (a preemption that makes room may release blocks of its cached prefix: asked again after it)
            if not self._make_room(seq, self.cache.admission_blocks(prefix, tokens) + reserved, admitted) or \
                    self.cache.admission_blocks(prefix, tokens) + reserved > self.cache.free_blocks:
                if seq.overtaken >= self.max_overtakes or len(self.running) >= self.max_running:
                    break  # strict order until it starts
                i += 1
                continue
            limit_reached = False
            for passed in order[:i]:  # each stays behind `seq`
                passed.overtaken += 1
                limit_reached |= passed.overtaken >= self.max_overtakes
            del order[i]
            self.waiting.remove(seq)
            # the whole prompt and its first token, from its longest cached prefix
            seq.num_cached = self.cache.allocate_prefix(seq.seq_id, prefix, tokens, seq.num_tokens)
            if seq.cached_prompt_tokens is None:
                seq.cached_prompt_tokens = min(seq.num_cached, len(seq.prompt_ids))
            self.running[seq.seq_id] = seq
            chunk = seq.pending(budget)
            admitted.append((seq, chunk))
            budget -= len(chunk)
            if seq.preemptions == 0:  # its service (VTC): the prompt at admission, each token as it comes
                self.fair.charge(seq, prompt_tokens=len(seq.prompt_ids))
                order[i:] = self.fair.order(order[i:])  # its tenant's counter moved
            if limit_reached:
                break  # strict order until the one passed too often starts
        return admitted

    def _make_room(self, seq: Sequence, blocks: int, admitted: list) -> bool:
        """Whether `seq` can start now: a running slot and `blocks` free blocks, preempting running
        sequences of worse priority classes (never one admitted in this step) if that is needed."""
        fresh = {s.seq_id for s, _ in admitted}
        while len(self.running) >= self.max_running or blocks > self.cache.free_blocks:
            worse = [s for s in self.running.values() if s.priority > seq.priority and s.seq_id not in fresh]
            if not worse:
                return False
            self._preempt(self.fair.victim(worse))
        return True

    @staticmethod
    def _admission_tokens(seq: Sequence) -> int:
        """What a sequence needs to start: its tokens, and one more unless its prefill samples its last."""
        return seq.num_tokens + (1 if seq.params.max_tokens - len(seq.output_ids) > 1 else 0)

    # --- stepping ---------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        batch = self._schedule()
        self.last_batch = (len(batch), sum(len(c) for _, c in batch))
        if not batch:
            return []
        try:
            return self._run(batch)
        except BackendUnavailable as e:  # the experts are gone: every sequence of the step needs them
            return [self._fail(seq, e) for seq, _ in batch]
        except Exception as e:  # noqa: BLE001 — find the sequences that cause it; the others go on
            if len(batch) == 1:
                return [self._fail(batch[0][0], e)]
            events = []
            for i, item in enumerate(batch):
                try:
                    events += self._run([item])
                except BackendUnavailable as e:  # the experts went away meanwhile: the rest need them too
                    return events + [self._fail(seq, e) for seq, _ in batch[i:]]
                except Exception as e:  # noqa: BLE001
                    events.append(self._fail(item[0], e))
            return events

    def _run(self, batch: list[tuple[Sequence, list[int]]]) -> list[TokenEvent]:
        ready = [b for b, (s, c) in enumerate(batch) if s.num_cached + len(c) == s.num_tokens]
        seqs = [batch[b][0] for b in ready]
        masks = StepMasks.start(seqs, self.cfg.vocab_size)  # None without guided rows; else runs beside the forward
        parts = [self._inputs(part) for part in self._split(batch)]
        # Only prompt tokens need row-stable float32 kernels (a cache hit = a miss, model/row_stable.py)
        decode_only = all(len(c) == 1 and s.num_cached >= len(s.prompt_ids) for s, c in batch)
        with row_stable.fast_kernels(decode_only):
            if len(parts) == 1:
                hiddens = [self.model(*parts[0], self.cache)]
            else:  # micro-batches: attention of one overlaps the (remote) experts of another
                hiddens = self.model.forward_micro(parts, self.cache)
            last = torch.cat([h[layout.last_index] for h, (_, layout) in zip(hiddens, parts)])  # [B, D], batch order
            logits = self.model.logits(last[ready]).cpu() if ready else None
        allowed = None if masks is None else masks.allowed(len(seqs))
        out = sample(logits, [s.params for s in seqs], [s.seed for s in seqs],
                     [len(s.output_ids) for s in seqs], allowed=allowed) if ready else None
        if masks is not None:
            self.mask_seconds += masks.seconds
            self.mask_wait_seconds += masks.waited
        bad_rows = {seqs[i].seq_id for i in out.failed} if out is not None else set()
        for seq, chunk in batch:  # nothing changes before here, so a failed step can be retried
            seq.num_cached += len(chunk)
            if seq.seq_id not in bad_rows:  # blocks of computed keys become reusable
                self.cache.commit(seq.seq_id, self._hash(seq, seq.num_cached), seq.num_cached)
        if out is None:
            return []
        failed = set(out.failed)
        events = []
        for i, seq in enumerate(seqs):
            if i in failed:
                events.append(self._fail(seq, FloatingPointError("the model produced non-finite logits")))
                continue
            token = out.token_ids[i]
            if seq.guide is not None and not seq.guide.accept(token):  # a mask bug, never the request's
                events.append(self._fail(seq, RuntimeError(f"token {token} was sampled outside the grammar")))
                continue
            seq.output_ids.append(token)
            self.fair.charge(seq, output_tokens=1)
            seq.logprobs.append(out.logprobs[i])
            seq.top_logprobs.append(out.top[i])
            seq.finish_reason = self._finish_reason(seq, token)
            if seq.finish_reason:
                self.running.pop(seq.seq_id)
                self.cache.release(seq.seq_id)
            events.append(TokenEvent(seq.seq_id, token, out.logprobs[i], out.top[i], seq.finish_reason,
                                     cached_tokens=seq.cached_prompt_tokens or 0))
        return events

    def _hash(self, seq: Sequence, num_tokens: int) -> list[BlockHash]:
        """The sequence's block hashes, extended to its first num_tokens tokens' full blocks."""
        if self.cache.prefix_caching and len(seq.block_hashes) < num_tokens // self.cache.block_size:
            tokens = (seq.prompt_ids + seq.output_ids)[:num_tokens]
            extend_hashes(seq.block_hashes, tokens, self.cache.block_size, seq.cache_salt)
        return seq.block_hashes

    def _reusable(self, seq: Sequence) -> list[BlockHash]:
        """The hashes of the blocks a starting sequence may take from the cache: not the one of its
        last token, which it computes for the logits of its next sample."""
        return self._hash(seq, seq.num_tokens)[:(seq.num_tokens - 1) // self.cache.block_size]

    def _fail(self, seq: Sequence, error: Exception) -> TokenEvent:
        self.abort(seq.seq_id, "error")
        return TokenEvent(seq.seq_id, -1, 0.0, [], "error", error)

    def _split(self, batch: list[tuple[Sequence, list[int]]]) -> list[list[tuple[Sequence, list[int]]]]:
        """Contiguous parts of about equal token counts (one part unless micro-batching applies)."""
        n = min(self.micro_batches, len(batch))
        if n <= 1:
            return [batch]
        total, parts, acc = sum(len(c) for _, c in batch), [[]], 0
        for item in batch:
            if acc >= total * len(parts) / n and len(parts) < n:
                parts.append([])
            parts[-1].append(item)
            acc += len(item[1])
        return parts

    def _inputs(self, part: list[tuple[Sequence, list[int]]]) -> tuple[torch.Tensor, StepLayout]:
        layout = build_layout([len(c) for _, c in part], [s.num_cached for s, _ in part],
                              block_tables=[self.cache.table(s.seq_id) for s, _ in part],
                              block_size=self.cache.block_size, sliding_window=self.cfg.sliding_window,
                              bucketed=self._bucketed)
        tokens = torch.tensor([t for _, c in part for t in c], dtype=torch.long)
        return tokens.to(self.device, non_blocking=True), layout.to(self.device)

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        if token in seq.params.stop_token_ids or (not seq.params.ignore_eos and token in self._eos):
            return "stop"
        if len(seq.output_ids) >= seq.params.max_tokens:
            return "length"
        return None

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Sequence]:
        """Run a batch of prompts to completion (all joining at once, mixed lengths welcome)."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self.add(("generate", i), p, sp) for i, (p, sp) in enumerate(zip(prompts, plist))]
        try:
            while self.has_work():
                for ev in self.step():
                    if ev.error is not None:
                        raise ev.error
        finally:  # an error leaves nothing behind: the engine can be used again
            for seq in seqs:
                self.abort(seq.seq_id, "error")
        return seqs
