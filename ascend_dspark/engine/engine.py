"""The serving engine: requests join and leave between steps; each step drafts, verifies and
commits for every decoding request, and prefills prompt chunks for new ones.

    add_request(id, prompt_ids, params)   queue a request (refused at once if it can never fit)
    step() -> [RequestDelta]              one scheduler plan, run on the device:
        prefill   prompt chunks of admitted requests (one padded forward); a request's last
                  chunk samples its first token (the first anchor), and the drafter observes
                  every chunk's target features.
        draft     the drafter proposes K tokens after each decoding request's anchor.
        verify    the target runs [anchor, d1..dK] in one forward; the verifier accepts a
                  prefix per request plus one target token (lossless).
        commit    KV lengths roll back past the rejected tail (a length, not a copy), the
                  drafter observes what was accepted, new tokens stream out.
    abort(id)                             free the request's slot and KV blocks at once
    generate(prompts, params)             offline: add everything, step until done

Requests accept different numbers of tokens per step and leave as they finish, and the
scheduler (scheduler.py) admits waiting ones whenever a slot and KV blocks are free, so
continuous batching is invisible in the output: counter-based sampling noise keys on
(seed, position), never on the batch. Plain decoding is the same loop with no drafter
(K = 0). One device -> host copy per step carries every token the step produced.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ascend_dspark.models.kv_cache import BlockTables, PagedKVCache
from ascend_dspark.platform import Platform, current_platform
from ascend_dspark.platform.interface import AttentionHints, attention_hints
from ascend_dspark.spec.sampling import SamplingBatch, SamplingParams, Stream
from ascend_dspark.spec.verify import verify

from .graph_runner import StepGraphRunner, default_buckets
from .outputs import RequestOutput
from .request import Request, RequestDelta, Status
from .scheduler import PrefillChunk, Scheduler, StepPlan

logger = logging.getLogger(__name__)

DEFAULT_PREFILL_TOKENS = 2048
DEFAULT_KV_FRACTION = 0.9      # of the device's memory, for weights + KV + graphs together


@dataclass
class GenerateTimings:
    """Wall-clock split of the last generate() call: steps that ran a prefill chunk count as
    prefill, steps that only decoded as decode."""

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
    """Generation over a target model and an optional drafter, both already on the device.

    `max_batch_size`: sequences held at once (slots). `num_kv_blocks`: blocks of
    `kv_block_size` positions (default: the platform's) shared by all requests. By default
    there are enough for every slot to reach `max_model_len`, or, on a device that reports
    its memory, as many as fit in `kv_cache_fraction` of it next to what is already
    allocated, if that is fewer. `max_prefill_tokens`: the per-step budget of (padded)
    prompt tokens. `overlap` (default: the platform's `overlap_steps`): launch a decode
    batch's next step before reading the last one's results (see `step`)."""

    def __init__(self, target, drafter=None, tokenizer=None, num_speculative_tokens: int = 7,
                 max_model_len: int = 2048, max_batch_size: int = 8, platform: Platform | None = None,
                 num_kv_blocks: int | None = None, kv_block_size: int | None = None,
                 kv_cache_fraction: float = DEFAULT_KV_FRACTION,
                 max_prefill_tokens: int = DEFAULT_PREFILL_TOKENS, graphs: bool | None = None,
                 graph_buckets: list[int] | None = None, overlap: bool | None = None, progress: bool = False) -> None:
        self.platform = platform or current_platform()
        self.target = target
        self.drafter = drafter
        self.tokenizer = tokenizer
        self.num_speculative_tokens = num_speculative_tokens if drafter is not None else 0
        if drafter is not None and not 1 <= num_speculative_tokens <= drafter.max_draft_tokens:
            raise ValueError(f"num_speculative_tokens={num_speculative_tokens} must be in "
                             f"1..{drafter.max_draft_tokens} for this drafter")
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
        self.max_model_len = max_model_len
        self.max_batch_size = max_batch_size
        self.capture_layers = tuple(drafter.target_layer_ids) if drafter is not None else ()
        cfg = target.config
        self._sliding = any(cfg.window(i) is not None for i in range(cfg.num_layers))
        param = next(target.parameters())
        self.dtype, self.device = param.dtype, param.device
        # From an anchor, verification writes K + 1 target positions (the drafter observes the
        # same ones) and a proposal writes `lookahead` scratch positions into the drafter's
        # cache: every request's blocks cover the larger past its anchor. The highest anchor
        # sits at max_model_len - 2 (a request whose next token would reach max_model_len has
        # finished).
        self.reserve = max(self.num_speculative_tokens + 1, drafter.lookahead if drafter is not None else 0)
        kv_block_size = kv_block_size or self.platform.kv_block_size
        per_seq = -(-(max_model_len - 2 + self.reserve) // kv_block_size)
        if num_kv_blocks is None:
            num_kv_blocks = self._fitting_blocks(per_seq * max_batch_size, kv_block_size, kv_cache_fraction)
        scratch = max(max_prefill_tokens, max_batch_size * self.reserve)
        graphs = self._use_graphs(graphs)
        # With graphs, the padding rows of a bucket take padding slots: one per row of the
        # largest bucket, each with blocks for one step's reach (their length is reset to 0
        # every step), so no two rows of a step ever write the same cache row.
        buckets = sorted(graph_buckets or default_buckets(max_batch_size)) if graphs else []
        pad_blocks = -(-self.reserve // kv_block_size)
        self.pad_slots = list(range(max_batch_size, max_batch_size + (buckets[-1] if graphs else 0)))
        num_seqs = max_batch_size + len(self.pad_slots)
        self.tables = BlockTables(num_seqs, per_seq, num_kv_blocks + len(self.pad_slots) * pad_blocks,
                                  kv_block_size, self.device, scratch)
        self.cache = PagedKVCache(cfg.num_layers, self.tables, cfg.num_kv_heads, cfg.head_dim, self.dtype)
        if drafter is not None:
            drafter.attach(self.tables, self.dtype)
        self.scheduler = Scheduler(self.tables, max_model_len, self.reserve, max_prefill_tokens, max_batch_size)
        self.anchors = torch.zeros(num_seqs, dtype=torch.long, device=self.device)
        self.graph_runner = None
        if graphs:
            for slot in self.pad_slots:
                self.tables.extend(slot, self.scheduler.allocator.allocate(pad_blocks))
            self.tables.flush()
            self.graph_runner = StepGraphRunner(self, buckets, self.pad_slots)
            with torch.inference_mode():
                self.graph_runner.capture_startup(progress)
        # Overlap pays where the device runs ahead of the host (graphs, asynchronous streams).
        self.overlap = self.platform.overlap_steps if overlap is None else overlap
        self._pending: _Launched | None = None
        self.launched_steps = self.chained_steps = 0
        self.requests: dict[str, Request] = {}
        self._arrivals = itertools.count()
        self._sampling_key: tuple | None = None
        self._sampling: SamplingBatch | None = None
        self.timings = GenerateTimings()

    def _fitting_blocks(self, wanted: int, block_size: int, fraction: float) -> int:
        """`wanted` blocks, or as many as fit in `fraction` of the device's memory."""
        if not self.platform.kv_cache_from_memory:
            return wanted
        stats = self.platform.memory_stats()
        cfg = self.target.config
        per_block = PagedKVCache.bytes_per_block(cfg.num_layers, block_size, cfg.num_kv_heads, cfg.head_dim, self.dtype)
        if self.drafter is not None:
            per_block += self.drafter.kv_bytes_per_block(block_size, self.dtype)
        room = int(fraction * stats["total_bytes"]) - stats["reserved_bytes"]
        fits = max(room // per_block, 0)
        if fits < wanted:
            logger.info("KV cache: %d blocks of %d positions fit in %.0f%% of %s memory (%d would let every slot "
                        "reach max_model_len): requests wait for blocks when they run out",
                        fits, block_size, 100 * fraction, self.platform.name, wanted)
        if fits < 1:
            raise MemoryError(f"no room for a KV cache in {fraction:.0%} of the device's memory "
                              f"({stats['reserved_bytes'] / 2**30:.1f} GiB already reserved)")
        return min(wanted, fits)

    def _use_graphs(self, wanted: bool | None) -> bool:
        """Graphs where the platform has them (default); asking for them elsewhere warns once.
        A model on another device than the platform's (a CPU model on a GPU machine) runs eagerly."""
        if self.device.type != self.platform.device.type:
            if wanted:
                logger.warning("graph replay needs the model on %s, it is on %s: steps run eagerly",
                               self.platform.device, self.device)
            return False
        if wanted is None:
            if self.platform.supports_graphs and not self.platform.graph_steps:
                logger.info("%s: whole-step graph replay is not enabled on this platform yet; steps run eagerly",
                            self.platform.name)
            return self.platform.graph_steps
        if wanted and not self.platform.supports_graphs:
            logger.warning("graph replay is not available on %s: steps run eagerly", self.platform.name)
            return False
        return wanted

    # -- public: the serving API ------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    detokenize: bool = True) -> None:
        """Queue a request. Raises ValueError (and queues nothing) for a bad prompt, stop
        strings without a tokenizer, or a request that could never fit in the KV cache.
        `detokenize=False` skips the per-step text deltas (offline generation decodes once)."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        self._check_prompt(prompt_ids)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: this engine has none (use stop_token_ids)")
        if params.seed is None:        # fixed once, so a preempted request recomputes the same tokens
            params = dataclasses.replace(params, seed=random.getrandbits(63))
        request = Request(request_id, list(prompt_ids), params, self._stop_ids(params), next(self._arrivals),
                          detokenize=detokenize and self.tokenizer is not None)
        self.scheduler.add(request)
        self.requests[request_id] = request

    def abort(self, request_id: str) -> RequestDelta | None:
        """Stop a request now and free its slot and blocks; None if it is unknown or done."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        self.scheduler.finish(request)
        request.finish_reason = "abort"
        return self._delta(request)

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0 or self._pending is not None

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running) + len(self.scheduler.prefilling)

    @property
    def num_free_slots(self) -> int:
        return len(self.scheduler.free_slots)

    @property
    def num_used_kv_blocks(self) -> int:
        """KV blocks held by requests."""
        return self.scheduler.num_used_blocks

    @property
    def num_kv_blocks(self) -> int:
        """KV blocks requests can use (the graph runner's padding rows hold the rest)."""
        return self.scheduler.allocator.num_blocks - sum(len(self.tables.owned[s]) for s in self.pad_slots)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @torch.inference_mode()
    def step(self) -> list[RequestDelta]:
        """Run one scheduler plan; returns a delta for every request that produced tokens or finished.

        With `overlap`, a decode step's results are read one call later: while the host
        commits step n (stop checks, detokenizing, streaming), the device already runs step
        n + 1 of the same batch, which needs nothing from the host (anchors and cache lengths
        live on the device). A batch is chained only while it stays the same: a request that
        might leave (length), a waiting request that could be admitted, or an abort ends the
        chain, and the in-flight step is read first. A step that ran for a request that
        stopped in the step before it is discarded, so the tokens are the same as without
        overlap."""
        pending, self._pending = self._pending, None
        if pending is not None and self._chain(pending):
            self._pending = self._launch(StepPlan(decode=pending.plan.decode), ahead=self.num_speculative_tokens + 1)
        deltas = self._finish(pending) if pending is not None else []
        if self._pending is None:
            plan = self.scheduler.schedule()
            if not plan.empty:
                launched = self._launch(plan)
                if self.overlap and not plan.prefill:
                    self._pending = launched
                else:
                    deltas += self._finish(launched)
        return deltas

    def _launch(self, plan: StepPlan, ahead: int = 0) -> _Launched:
        """Queue the plan's device work and its one device -> host copy. `ahead`: positions the
        rows may have committed beyond what the host knows (a chained step)."""
        parts: dict[str, torch.Tensor] = {}
        if plan.prefill:
            parts.update(self._prefill(plan.prefill))
        verify_lens = [self._verify_len(r) for r in plan.decode]
        if plan.decode:
            parts.update(self._verify(plan.decode, verify_lens, ahead))
        self.launched_steps += 1
        self.chained_steps += bool(ahead)
        return _Launched(plan, verify_lens, _HostCopy(parts, self.platform))

    def _finish(self, launched: _Launched) -> list[RequestDelta]:
        """Read a launched step's results and commit them (rows of requests that left since
        the launch are dropped)."""
        plan, host = launched.plan, launched.copy.receive()
        touched: list[Request] = []
        if plan.decode:
            live = [i for i, r in enumerate(plan.decode)
                    if r.status is Status.RUNNING and self.requests.get(r.request_id) is r]
            counts = [host["num_accepted"][i] for i in live]
            token_lists = [host["tokens"][i][: n + 1] for i, n in zip(live, counts)]
            confidence = [host["confidence"][i] for i in live] if "confidence" in host else None
            logprobs = _logprob_rows(host, "", plan.decode)
            requests = [plan.decode[i] for i in live]
            self._commit(requests, token_lists, counts, [launched.verify_lens[i] for i in live], confidence,
                         [logprobs[i] for i in live] if logprobs is not None else None)
            touched += requests
        first_logprobs = _logprob_rows(host, "first_", [c.request for c in plan.prefill]) if plan.prefill else None
        for b, chunk in enumerate(plan.prefill):
            r = chunk.request
            r.num_cached = chunk.end
            if chunk.is_last:
                self.scheduler.prefill_done(r)
                if not r.output:
                    logprobs = [first_logprobs[b]] if first_logprobs is not None else None
                    self._commit([r], [[host["first"][b]]], None, None, None, logprobs)
                    touched.append(r)
        deltas = []
        for r in touched:
            if r.finish_reason is not None and not r.finished:
                self.scheduler.finish(r)
                self.requests.pop(r.request_id, None)
            deltas.append(self._delta(r))
        return deltas

    def _chain(self, pending: _Launched) -> bool:
        """Whether the next step of the pending decode batch can be launched before its
        results are read: the batch stays as it is, and blocks for one more step are free."""
        if not self.overlap or pending.plan.prefill:
            return False
        if self.scheduler.prefilling or (self.scheduler.waiting and self.scheduler.free_slots):
            return False                            # someone should join: read, then schedule
        ahead = self.num_speculative_tokens + 1
        for r in pending.plan.decode:
            if r.status is not Status.RUNNING or self.requests.get(r.request_id) is not r:
                return False                        # aborted since the launch
            if (len(r.output) + ahead >= r.params.max_tokens
                    or len(r.prompt_ids) + len(r.output) + ahead >= self.max_model_len):
                return False                        # the pending step may finish it by length
        return self.scheduler.grow_ahead(pending.plan.decode, ahead)

    def stream(self) -> Iterator[list[RequestDelta]]:
        """Step until nothing is left, yielding each step's deltas."""
        while self.has_unfinished():
            yield self.step()

    # -- public: offline ----------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 progress: bool = False) -> list[RequestOutput]:
        """Generate for token-id prompts: all are queued at once and run under continuous batching."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        requests = []
        try:
            for prompt, p in zip(prompts, params):
                rid = f"generate-{next(self._arrivals)}"
                self.add_request(rid, prompt, p, detokenize=bool(p.stop))
                requests.append(self.requests[rid])
        except ValueError:
            for r in requests:                      # all or nothing
                self.abort(r.request_id)
            raise
        self.timings = GenerateTimings()
        bar = tqdm(total=len(prompts), desc="generate", disable=not progress, unit="req")
        self.platform.synchronize()
        while self.has_unfinished():
            t0 = time.perf_counter()
            prefilling = bool(self.scheduler.waiting or self.scheduler.prefilling)
            deltas = self.step()
            elapsed = time.perf_counter() - t0            # step() ends with its host copy: synchronised
            if prefilling:
                self.timings.prefill_s += elapsed
            else:
                self.timings.decode_s += elapsed
            bar.update(sum(d.finished for d in deltas))
        bar.close()
        self.timings.generated_tokens = sum(len(r.output) for r in requests)
        return [RequestOutput(r.prompt_ids, r.output, r.finish_reason or "length", r.stats,
                              r.text if r.params.stop else None) for r in requests]

    # -- device work ----------------------------------------------------------------------------
    def _prefill(self, chunks: list[PrefillChunk]) -> dict[str, torch.Tensor]:
        """One padded forward over the chunks; returns each row's sampled next token (used
        for rows that finish a fresh prompt) and, if asked for, its logprobs."""
        dev = self.device
        reqs = [c.request for c in chunks]
        width = max(c.end - c.start for c in chunks)
        ids, nxt = [], []
        for c in chunks:
            tokens = c.request.tokens
            chunk = tokens[c.start:c.end]
            follow = tokens[c.start + 1:c.end + 1]                 # the token after each position, where known
            ids.append(chunk + [0] * (width - len(chunk)))
            nxt.append(follow + [0] * (width - len(follow)))
        host = torch.tensor([[c.start, c.end - c.start, c.request.slot,
                              c.is_last and not c.request.output, c.is_last,
                              c.request.output[-1] if c.request.output else 0] for c in chunks])
        ids, nxt, host = torch.tensor(ids).to(dev), torch.tensor(nxt).to(dev), host.to(dev)
        starts, lens, slots = host[:, 0], host[:, 1], host[:, 2]
        samples_first, is_last, resumed_anchor = host[:, 3].bool(), host[:, 4].bool(), host[:, 5]
        fresh = [c.request.slot for c in chunks if c.start == 0]
        if fresh:
            fresh = torch.tensor(fresh).to(dev)
            self.cache.reset(fresh)
            if self.drafter is not None:
                self.drafter.reset(fresh)
        positions = starts.unsqueeze(1) + torch.arange(width, device=dev)
        valid = torch.arange(width, device=dev).unsqueeze(0) < lens.unsqueeze(1)
        self.tables.set_view(max(c.end for c in chunks))
        # Every attention of a prefill (the target's, Eagle3's observe) is causal over the
        # chunk: kernels that take host lengths (Ascend's) may skip the mask.
        hints = AttentionHints([c.end for c in chunks], [c.end - c.start for c in chunks],
                               "explicit" if self._sliding else "causal")
        with attention_hints(hints):
            out = self.target(ids, positions, self.cache, slots, valid, self.capture_layers)
        hidden = out.hidden.gather(1, (lens - 1).view(-1, 1, 1).expand(-1, 1, out.hidden.shape[-1]))
        last = self.target.logits(hidden)                                       # [B, 1, V]
        sampling = SamplingBatch([r.params for r in reqs], dev)
        first = sampling.sample(sampling.probs(last), (starts + lens).view(-1, 1), Stream.TARGET)[:, 0]
        self.cache.set_lengths(slots, starts + lens)
        # A fresh prompt's last position is followed by the token just sampled.
        last_col = (lens - 1).unsqueeze(1)
        nxt.scatter_(1, last_col, torch.where(samples_first.unsqueeze(1), first.unsqueeze(1), nxt.gather(1, last_col)))
        if self.drafter is not None:
            with attention_hints(hints):
                self.drafter.observe(slots, out.features, positions, nxt, lens)
        # The anchor of a request that finished its prefill: the sampled token, or (after a
        # preemption) its last committed token, which the prefill did not put in the cache.
        anchor = torch.where(samples_first, first, resumed_anchor)
        self.anchors[slots] = torch.where(is_last, anchor, self.anchors[slots])
        out = {"first": first}
        want_logprobs = max((r.params.logprobs for r in reqs if r.params.logprobs is not None), default=None)
        if want_logprobs is not None:
            out.update(self._logprobs(want_logprobs, last[:, 0], first, "first_"))
        return out

    def _verify(self, requests: list[Request], verify_lens: list[int], ahead: int = 0) -> dict[str, torch.Tensor]:
        """One draft + verify + rollback step for the decoding requests: replayed from a
        captured graph where one fits, else run eagerly over the columns the rows reach."""
        slots = [r.slot for r in requests]
        reach = [r.num_cached + ahead + self.reserve for r in requests]
        want_logprobs = max((r.params.logprobs for r in requests if r.params.logprobs is not None), default=None)
        if self.graph_runner is not None and want_logprobs is None:
            out = self.graph_runner.run(slots, verify_lens, [r.params for r in requests],
                                        tuple(r.arrival for r in requests), reach)
            if out is not None:
                return out
        self.tables.set_view(max(reach))
        dev = self.device
        # The step mixes causal (target, Eagle3) and block-bidirectional (DFlash/DSpark) masks:
        # explicit masks, with each row's reach as its key-length bound.
        with attention_hints(AttentionHints(reach, kind="explicit")):
            return self._verify_core(torch.tensor(slots).to(dev), torch.tensor(verify_lens).to(dev),
                                     self._sampling_for(requests), want_logprobs)

    def _verify_core(self, slots: torch.Tensor, verify_lens: torch.Tensor, sampling: SamplingBatch,
                     want_logprobs: int | None) -> dict[str, torch.Tensor]:
        """The device work of a verify step, graph-capturable (no host reads, fixed shapes).

        The anchor (the last committed token, not yet in the cache) sits at the slot's cache
        length: the length is where this step's writes start, and the causal masks built from
        these positions let every query see exactly the committed prefix plus this step's
        tokens. Rolling back the rejected tail is therefore only lowering the length."""
        dev = self.device
        k = self.num_speculative_tokens
        anchors = self.anchors[slots]
        anchor_pos = self.cache.lengths[slots]
        batch = slots.shape[0]
        if self.drafter is not None:
            proposal = self.drafter.propose(slots, anchors, anchor_pos, k, sampling)
            draft_tokens, draft_probs, confidence = proposal.tokens, proposal.probs, proposal.confidence
        else:
            confidence = None
            draft_tokens = anchors.new_zeros(batch, 0)
            draft_probs = torch.empty(batch, 0, self.target.config.vocab_size, device=dev)
        inputs = torch.cat([anchors.unsqueeze(1), draft_tokens], dim=1)
        positions = anchor_pos.unsqueeze(1) + torch.arange(k + 1, device=dev)
        valid = torch.ones_like(inputs, dtype=torch.bool)
        out = self.target(inputs, positions, self.cache, slots, valid, self.capture_layers)
        logits = self.target.logits(out.hidden)
        result = verify(logits, draft_tokens, draft_probs, verify_lens, sampling, anchor_pos + 1)
        num_accepted = result.num_accepted
        self.cache.set_lengths(slots, anchor_pos + num_accepted + 1)
        if self.drafter is not None:
            self.drafter.observe(slots, out.features, positions, result.tokens.clamp(min=0), num_accepted + 1)
        self.anchors[slots] = result.tokens.gather(1, num_accepted.unsqueeze(1)).squeeze(1)
        if self.pad_slots:
            self.cache.lengths[self.pad_slots[0]:].zero_()       # padding rows always verify at 0..K
        out = {"num_accepted": num_accepted, "tokens": result.tokens}
        if confidence is not None:
            out["confidence"] = confidence
        if want_logprobs is not None:
            out.update(self._logprobs(want_logprobs, logits, result.tokens.clamp(min=0), ""))
        return out

    def _logprobs(self, n: int, logits: torch.Tensor, tokens: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
        """The target's log-probabilities (before temperature and filters, as OpenAI reports
        them) of `tokens`, and the top-n alternatives."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        out = {prefix + "logprob": logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)}
        if n:
            top = logp.topk(n, dim=-1)
            out[prefix + "top_ids"], out[prefix + "top_logprobs"] = top.indices, top.values
        return out

    def _verify_len(self, request: Request) -> int:
        cap = request.params.num_speculative_tokens
        return self.num_speculative_tokens if cap is None else min(cap, self.num_speculative_tokens)

    def _sampling_for(self, requests: list[Request]) -> SamplingBatch:
        """The decoding batch's sampling tensors, rebuilt only when its membership changes."""
        key = tuple(r.request_id for r in requests)
        if key != self._sampling_key:
            self._sampling_key, self._sampling = key, SamplingBatch([r.params for r in requests], self.device)
        return self._sampling

    # -- bookkeeping on the host --------------------------------------------------------------
    def _commit(self, requests: list[Request], token_lists: list[list[int]], accepted: list[int] | None,
                verify_lens: list[int] | None, confidences: list[list[float]] | None,
                logprobs: list | None = None) -> None:
        """Append committed tokens; stop at EOS / stop token, max_tokens, stop string, length.

        `accepted` is None for the prefill's first token (not a verify step); `logprobs[i][j]`
        is (logprob, [(id, logprob), ...]) of row i's token j, or None where not asked."""
        for i, (r, tokens) in enumerate(zip(requests, token_lists)):
            if accepted is not None:
                stop = next((j for j, tok in enumerate(tokens) if tok in r.stop_ids), None)
                verified = verify_lens[i]
                conf = confidences[i][:verified] if confidences is not None else None
                r.stats.record(accepted[i], verified, conf, stop)
                r.num_cached += len(tokens)
            for j, tok in enumerate(tokens):
                r.output.append(tok)
                if r.params.logprobs is not None:
                    r.logprobs.append(logprobs[i][j])
                if tok in r.stop_ids:
                    r.finish_reason = "stop"
                    break
                # Token by token: an accepted block may run past either limit.
                if len(r.output) >= r.params.max_tokens or len(r.prompt_ids) + len(r.output) >= self.max_model_len:
                    r.finish_reason = "length"
                    break
            if r.detokenize:
                self._update_text(r)

    def _update_text(self, r: Request) -> None:
        """Extend the text by this step's tokens; cut it at the first stop string (which
        finishes the request). Only the new text (plus a stop string's length of overlap) is
        searched."""
        grown = r.detokenizer.update(self.tokenizer, r.output, final=r.finish_reason is not None)
        if not grown:
            return
        start = max(len(r.text) - max((len(s) for s in r.params.stop), default=0), 0)
        r.text += grown
        hits = [i for i in (r.text.find(s, start) for s in r.params.stop) if i >= 0]
        if hits:
            r.text = r.text[: min(hits)]
            r.finish_reason = "stop"

    def _delta(self, r: Request) -> RequestDelta:
        new_tokens = r.output[r.emitted_tokens:]
        new_logprobs = r.logprobs[r.emitted_tokens:] if r.params.logprobs is not None else None
        r.emitted_tokens = len(r.output)
        text_delta = None
        if r.detokenize:
            end = len(r.text)
            if r.finish_reason is None and r.params.stop:
                # Hold back a tail that could be the start of a stop string.
                end = min(end, len(r.text) - max(len(s) for s in r.params.stop) + 1)
            end = max(end, r.emitted_text)
            text_delta, r.emitted_text = r.text[r.emitted_text:end], end
        return RequestDelta(r.request_id, new_tokens, text_delta, r.finish_reason, r.stats,
                            len(r.prompt_ids), len(r.output), new_logprobs)

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


class _HostCopy:
    """The one device -> host copy per step: every tensor the step produced, in one int64
    tensor, copied without waiting (into pinned memory on an accelerator), with an event to
    wait for. float32 tensors travel bit-cast to int32 (exact, no float64, which NPUs lack);
    the host casts the bits back."""

    def __init__(self, parts: dict[str, torch.Tensor], platform: Platform) -> None:
        self.layout = [(name, t.shape, t.is_floating_point()) for name, t in parts.items()]
        flat = [(t.float().contiguous().view(torch.int32) if t.is_floating_point() else t).long().reshape(-1)
                for t in parts.values()]
        self.host = torch.cat(flat).to("cpu", non_blocking=True) if flat else None
        self.event = platform.event()
        self.event.record()

    def receive(self) -> dict[str, list]:
        """Wait for the copy; each tensor as nested lists."""
        self.event.synchronize()
        flat = self.host.tolist() if self.host is not None else []
        out, i = {}, 0
        for name, shape, is_float in self.layout:
            n = shape.numel()
            values = torch.tensor(flat[i: i + n], dtype=torch.long).view(shape)
            i += n
            out[name] = (values.to(torch.int32).view(torch.float32) if is_float else values).tolist()
        return out


@dataclass
class _Launched:
    """A step whose device work is queued: its plan, and its results on the way to the host."""

    plan: StepPlan
    verify_lens: list[int]
    copy: _HostCopy


def _logprob_rows(host: dict[str, list], prefix: str, requests: list[Request]) -> list | None:
    """Per request row, per token position: (logprob, [(id, logprob) x its top-n]) or None."""
    if prefix + "logprob" not in host:
        return None
    chosen = host[prefix + "logprob"]
    ids, vals = host.get(prefix + "top_ids"), host.get(prefix + "top_logprobs")
    rows = []
    for b, r in enumerate(requests):
        n = r.params.logprobs
        if n is None:
            rows.append(None)
            continue
        row = chosen[b] if isinstance(chosen[b], list) else [chosen[b]]
        tops = (ids[b], vals[b]) if n else None
        if tops is not None and not isinstance(tops[0][0], list):      # prefill: one position
            tops = ([tops[0]], [tops[1]])
        rows.append([(lp, list(zip(tops[0][j][:n], tops[1][j][:n])) if n else []) for j, lp in enumerate(row)])
    return rows
