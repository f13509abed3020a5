"""The speculative step loop: prefill, then draft -> verify -> commit until every request stops.

    prefill   target runs the prompts, samples the first token (the first anchor), and
              the drafter observes the prompt's target features.
    draft     the drafter proposes K tokens after each request's anchor.
    verify    the target runs [anchor, d1..dK] in one forward; the verifier accepts a
              prefix per request plus one target token (lossless).
    commit    KV lengths roll back past the rejected tail (a length, not a copy), the
              drafter observes the features of what was accepted, new tokens stream out.

Requests in one batch accept different numbers of tokens per step; finished requests
leave the batch. Plain decoding is the same loop with no drafter (K = 0).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ascend_dspark.platform import Platform, current_platform
from ascend_dspark.spec.sampling import SamplingBatch, SamplingParams, Stream
from ascend_dspark.spec.verify import verify

from .kv_cache import KVCache
from .outputs import RequestOutput, RequestStats


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    slot: int
    stop_ids: frozenset[int]
    output: list[int] = field(default_factory=list)
    stats: RequestStats = field(default_factory=RequestStats)
    finish_reason: str | None = None
    text: str | None = None


@dataclass
class GenerateTimings:
    """Wall-clock split of the last generate() call (device synchronised at the ends)."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    generated_tokens: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def tokens_per_s(self) -> float:
        total = self.prefill_s + self.decode_s
        return self.generated_tokens / total if total else 0.0


class Engine:
    """Generation over a target model and an optional drafter, both already on the device."""

    def __init__(self, target, drafter=None, tokenizer=None, num_speculative_tokens: int = 7,
                 max_model_len: int = 2048, max_batch_size: int = 8, platform: Platform | None = None) -> None:
        self.platform = platform or current_platform()
        self.target = target
        self.drafter = drafter
        self.tokenizer = tokenizer
        self.num_speculative_tokens = num_speculative_tokens if drafter is not None else 0
        if drafter is not None and not 1 <= num_speculative_tokens <= drafter.max_draft_tokens:
            raise ValueError(f"num_speculative_tokens={num_speculative_tokens} must be in "
                             f"1..{drafter.max_draft_tokens} for this drafter")
        self.max_model_len = max_model_len
        self.max_batch_size = max_batch_size
        self.capture_layers = tuple(drafter.target_layer_ids) if drafter is not None else ()
        cfg = target.config
        param = next(target.parameters())
        self.dtype, self.device = param.dtype, param.device
        # The highest anchor sits at max_model_len - 2 (a request whose next token would reach
        # max_model_len has finished). From it verification writes K + 1 target positions (the
        # drafter observes the same ones) and a proposal writes `lookahead` scratch positions
        # into the drafter's cache: both caches get room for the larger, and no more, so a
        # write past the end fails loudly instead of landing in the scratch row. Duck-typed
        # drafters without a cache (test doubles) may leave `lookahead` out.
        lookahead = getattr(drafter, "lookahead", 0) if drafter is not None else 0
        capacity = max_model_len - 2 + max(self.num_speculative_tokens + 1, lookahead)
        self.cache = KVCache(cfg.num_layers, max_batch_size, capacity, cfg.num_kv_heads, cfg.head_dim,
                             self.dtype, self.device)
        if drafter is not None:
            drafter.allocate(max_batch_size, capacity, self.dtype, self.device)
        self.timings = GenerateTimings()

    # -- public -------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 progress: bool = False) -> list[RequestOutput]:
        """Generate for token-id prompts; batches of at most `max_batch_size` run together."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        for ids in prompts:
            self._check_prompt(ids)
        self.timings = GenerateTimings()
        outputs: list[RequestOutput] = []
        bar = tqdm(total=len(prompts), desc="generate", disable=not progress, unit="req")
        for start in range(0, len(prompts), self.max_batch_size):
            chunk = range(start, min(start + self.max_batch_size, len(prompts)))
            requests = [_Request(list(prompts[i]), params[i], slot, self._stop_ids(params[i]))
                        for slot, i in enumerate(chunk)]
            self._run(requests)
            outputs += [RequestOutput(r.prompt_ids, r.output, r.finish_reason or "length", r.stats, r.text)
                        for r in requests]
            bar.update(len(requests))
        bar.close()
        return outputs

    # -- the loop -----------------------------------------------------------------------
    def _run(self, requests: list[_Request]) -> None:
        dev = self.device
        slots = torch.tensor([r.slot for r in requests], device=dev)
        sampling = SamplingBatch([r.params for r in requests], dev)
        self.platform.synchronize()
        t0 = time.perf_counter()
        anchors = self._prefill(requests, slots, sampling)
        self._commit(requests, [[t] for t in anchors.tolist()], None, verified=0)
        self.platform.synchronize()
        t1 = time.perf_counter()
        active = [i for i, r in enumerate(requests) if r.finish_reason is None]
        while active:
            rows = torch.tensor(active, device=dev)
            reqs = [requests[i] for i in active]
            sub = sampling.select(rows, [r.params for r in reqs]) if len(active) < len(requests) else sampling
            new_tokens, num_accepted, next_anchor, confidence = self._step(slots[rows], anchors[rows], sub)
            anchors[rows] = next_anchor
            counts, token_lists, confidences = _to_host(num_accepted, new_tokens, confidence)
            self._commit(reqs, token_lists, counts, verified=self.num_speculative_tokens, confidences=confidences)
            active = [i for i, r in zip(active, reqs) if r.finish_reason is None]
        self.platform.synchronize()
        t2 = time.perf_counter()
        self.timings.prefill_s += t1 - t0
        self.timings.decode_s += t2 - t1
        self.timings.generated_tokens += sum(len(r.output) for r in requests)

    def _prefill(self, requests: list[_Request], slots: torch.Tensor, sampling: SamplingBatch):
        dev = self.device
        lens = torch.tensor([len(r.prompt_ids) for r in requests], device=dev)
        width = int(max(len(r.prompt_ids) for r in requests))
        ids = torch.zeros(len(requests), width, dtype=torch.long, device=dev)
        for b, r in enumerate(requests):
            ids[b, : len(r.prompt_ids)] = torch.tensor(r.prompt_ids, device=dev)
        positions = torch.arange(width, device=dev).expand(len(requests), width)
        valid = positions < lens.unsqueeze(1)
        self.cache.reset(slots)
        out = self.target(ids, positions, self.cache, slots, valid, self.capture_layers)
        last = out.hidden.gather(1, (lens - 1).view(-1, 1, 1).expand(-1, 1, out.hidden.shape[-1]))
        probs = sampling.probs(self.target.logits(last))                      # [B, 1, V]
        first = sampling.sample(probs, lens.view(-1, 1), Stream.TARGET)[:, 0]
        self.cache.set_lengths(slots, lens)
        if self.drafter is not None:
            next_tokens = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)
            next_tokens.scatter_(1, (lens - 1).view(-1, 1), first.view(-1, 1))
            self.drafter.reset(slots)
            self.drafter.observe(slots, out.features, positions, next_tokens, lens)
        return first

    def _step(self, slots, anchors, sampling: SamplingBatch):
        """One draft + verify + rollback step for the active rows.

        The anchor (the last committed token, not yet in the cache) sits at the slot's cache
        length: the length is where this step's writes start, and the causal masks built from
        these positions let every query see exactly the committed prefix plus this step's
        tokens. Rolling back the rejected tail is therefore only lowering the length."""
        k = self.num_speculative_tokens
        anchor_pos = self.cache.lengths[slots]
        batch = anchors.shape[0]
        if self.drafter is not None:
            proposal = self.drafter.propose(slots, anchors, anchor_pos, k, sampling)
            draft_tokens, draft_probs, confidence = proposal.tokens, proposal.probs, proposal.confidence
        else:
            confidence = None
            draft_tokens = anchors.new_zeros(batch, 0)
            draft_probs = torch.empty(batch, 0, self.target.config.vocab_size, device=anchors.device)
        inputs = torch.cat([anchors.unsqueeze(1), draft_tokens], dim=1)
        positions = anchor_pos.unsqueeze(1) + torch.arange(k + 1, device=anchors.device)
        valid = torch.ones_like(inputs, dtype=torch.bool)
        out = self.target(inputs, positions, self.cache, slots, valid, self.capture_layers)
        logits = self.target.logits(out.hidden)
        verify_lens = torch.full((batch,), k, dtype=torch.long, device=anchors.device)
        result = verify(logits, draft_tokens, draft_probs, verify_lens, sampling, anchor_pos + 1)
        num_accepted = result.num_accepted
        self.cache.set_lengths(slots, anchor_pos + num_accepted + 1)
        if self.drafter is not None:
            self.drafter.observe(slots, out.features, positions, result.tokens.clamp(min=0), num_accepted + 1)
        next_anchor = result.tokens.gather(1, num_accepted.unsqueeze(1)).squeeze(1)
        return result.tokens, num_accepted, next_anchor, confidence

    # -- bookkeeping on the host --------------------------------------------------------
    def _commit(self, requests: list[_Request], token_lists: list[list[int]], accepted: list[int] | None,
                verified: int, confidences: list[list[float]] | None = None) -> None:
        """Append committed tokens; stop at EOS / stop token, max_tokens, stop string, length.

        `accepted` is None for the prefill's first token (not a verify step)."""
        for i, (r, tokens) in enumerate(zip(requests, token_lists)):
            if accepted is not None:
                stop = next((j for j, tok in enumerate(tokens) if tok in r.stop_ids), None)
                r.stats.record(accepted[i], verified, confidences[i] if confidences is not None else None, stop)
            for tok in tokens:
                r.output.append(tok)
                if tok in r.stop_ids:
                    r.finish_reason = "stop"
                    break
                # Token by token: an accepted block may run past either limit.
                if len(r.output) >= r.params.max_tokens or len(r.prompt_ids) + len(r.output) >= self.max_model_len:
                    r.finish_reason = "length"
                    break
            if r.params.stop and self.tokenizer is not None:
                self._check_stop_strings(r)

    def _check_stop_strings(self, r: _Request) -> None:
        text = self.tokenizer.decode(r.output)
        hits = [i for i in (text.find(s) for s in r.params.stop) if i >= 0]
        if hits:
            r.text = text[: min(hits)]
            r.finish_reason = "stop"

    def _stop_ids(self, params: SamplingParams) -> frozenset[int]:
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            ids |= set(self.tokenizer.eos_token_ids if self.tokenizer is not None else self.target.config.eos_token_ids)
        return frozenset(ids)

    def _check_prompt(self, ids: list[int]) -> None:
        vocab = self.target.config.vocab_size
        if not ids:
            raise ValueError("empty prompt: at least one token is needed")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}")
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")


def _to_host(num_accepted: torch.Tensor, tokens: torch.Tensor, confidence: torch.Tensor | None):
    """The one device -> host copy per step: accepted counts, tokens and confidences together.

    The float32 confidences travel bit-cast to int32 inside the same int64 tensor as the
    tokens (exact, no float64, which NPUs lack); the host casts the bits back. Returns
    (counts, each row's n + 1 committed tokens, each row's confidences or None)."""
    parts = [num_accepted.unsqueeze(1), tokens]
    if confidence is not None:
        parts.append(confidence.float().contiguous().view(torch.int32).long())
    rows = torch.cat(parts, dim=1).tolist()
    width = tokens.shape[1]
    counts = [row[0] for row in rows]
    token_lists = [row[1: n + 2] for row, n in zip(rows, counts)]
    if confidence is None:
        return counts, token_lists, None
    bits = torch.tensor([row[1 + width:] for row in rows], dtype=torch.int32)
    return counts, token_lists, bits.view(torch.float32).tolist()
