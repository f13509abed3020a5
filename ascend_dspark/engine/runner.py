"""The model runner: everything on the device, nothing about requests' lives.

The engine decides what runs (engine.py, scheduler.py); the runner owns the device state
and runs it:

    block tables, the target's paged KV cache (the drafter's sits on the same tables), each
    slot's anchor (its last committed token, not yet in the cache), the padding slots of
    the graph buckets;
    prefill       prompt chunks in one padded forward, replayed from a captured graph
                  (prefill_graphs.py) where one fits; a request's last chunk samples its
                  first token; the drafter observes every chunk's target features;
    verify        draft + verify + rollback for the decoding rows, replayed from a captured
                  graph (graph_runner.py) where one fits, else eagerly;
    HostCopy      the one device -> host copy per step (host_copy.py).

With tensor parallelism (the target sharded by models/parallel.py) every rank holds a runner;
rank 0's is the driver: the engine calls it as ever, and each call that runs the device
(`capture_graphs`, `time_step`, `prefill`, `verify`) is first sent to the other ranks, which
run the same call on their runner (`tp_calls.follow`) with the same block tables (broadcast with the
call). The ranks' logits are all-gathered whole, and sampling is counter-based (seed,
position), so every rank samples the same tokens and keeps the same anchors, cache lengths
and drafter state without a broadcast of the tokens; only rank 0 copies them to the host.
Everything above the runner (engine, scheduler, server) is unaware of the group.

Every forward gets an explicit `ForwardContext` (ops/context.py): the platform's op registry,
how many key columns attention reads, the rows' attention lengths for kernels that take host integers, and the
graph being captured, if any.
"""

from __future__ import annotations

import functools
import logging
import statistics
import time

import torch

from ascend_dspark.cache import BlockTables, PagedKVCache
from ascend_dspark.platform import Platform
from ascend_dspark.spec.grammar import RequestGrammar, step_bitmask
from ascend_dspark.spec.sampling import SamplingBatch, SamplingParams, Stream
from ascend_dspark.spec.verify import verify
from ops.context import AttentionHints, ForwardContext

from .graph_runner import StepGraphRunner, default_buckets, use_graphs
from .host_copy import HostCopy
from .kv_budget import fitting_kv_blocks, kv_heads_here
from .logprobs import logprobs, prompt_logprobs_of
from .output_processor import prompt_logprob_rows
from .prefill_graphs import PrefillGraphRunner, attention_lengths, prefill_inputs
from .request import Request
from .scheduler import PrefillChunk
from .step_costs import profile_batch_sizes
from .tp_calls import sent_to_followers

logger = logging.getLogger(__name__)
HALF = (torch.bfloat16, torch.float16)


def warn_if_not_exact(platform: Platform, dtype: torch.dtype, device: torch.device) -> None:
    """Greedy speculation equals plain decoding only if a verify forward computes each row
    as a 1-row decode step does. Where this platform's matmul is not batch-invariant
    (`ops/linear.py`), half precision can flip near-ties: say so, once per platform/dtype."""
    linear = platform.ops.resolve("linear", device)
    if dtype in HALF and not getattr(linear, "batch_invariant", False):
        _warn_not_exact(platform.describe(), str(dtype).removeprefix("torch."))


@functools.lru_cache(maxsize=None)
def _warn_not_exact(where: str, dtype: str) -> None:
    logger.warning("speculative decoding on %s in %s: the matmuls are not batch-invariant here, so at "
                   "temperature 0 the output can differ from plain decoding where two tokens nearly tie "
                   "(README, \"Exactness\"); float32 keeps the difference to rounding", where, dtype)


class ModelRunner:
    """The target and drafter on one device, with their caches and captured step graphs.

    `max_batch_size` slots hold requests; with graphs, one padding slot per row of the
    largest bucket follows them, each owning blocks for one step's reach (their lengths are
    reset to 0 every step), so no two rows of a step ever write the same cache row.
    `num_kv_blocks` (the requests' blocks) defaults to enough for every slot to reach
    `max_model_len` or, on a device that reports its memory, as many as fit in
    `kv_cache_fraction` of it next to what is already allocated, if that is fewer."""

    def __init__(self, target, drafter, platform: Platform, num_speculative_tokens: int, max_model_len: int,
                 max_batch_size: int, num_kv_blocks: int | None, kv_block_size: int | None,
                 kv_cache_fraction: float, max_prefill_tokens: int, graphs: bool | None,
                 graph_buckets: list[int] | None, profile_rows: bool = False, prefill_graphs: bool | None = None,
                 prefill_graph_buckets: tuple[list[int], list[int]] | None = None) -> None:
        self.tp = getattr(target, "tp", None)           # set by models/parallel.py shard_target
        self._sending = False
        if self.tp is not None and self.tp.is_driver:
            self.tp.send_command(("__init__", (num_speculative_tokens, max_model_len, max_batch_size, num_kv_blocks,
                                               kv_block_size, kv_cache_fraction, max_prefill_tokens, graphs,
                                               graph_buckets, profile_rows, prefill_graphs, prefill_graph_buckets),
                                   {}))
        self.platform = platform
        self.target = target
        self.drafter = drafter
        self.num_speculative_tokens = num_speculative_tokens
        self.capture_layers = tuple(drafter.target_layer_ids) if drafter is not None else ()
        cfg = target.config
        # Every attention of a prefill (the target's, Eagle3's observe) is causal over the chunk:
        # kernels that take host lengths (Ascend's) may skip the mask, unless a sliding window needs it.
        sliding = any(cfg.window(i) is not None for i in range(cfg.num_layers))
        self.prefill_attention = "explicit" if sliding else "causal"
        param = next(target.parameters())
        self.dtype, self.device = param.dtype, param.device
        if drafter is not None:
            warn_if_not_exact(platform, self.dtype, self.device)
        # From an anchor, verification writes K + 1 target positions (the drafter observes the
        # same ones) and a proposal writes `lookahead` scratch positions into the drafter's
        # cache: every request's blocks cover the larger past its anchor. The highest anchor
        # sits at max_model_len - 2 (a request whose next token would reach max_model_len has
        # finished).
        self.reserve = max(num_speculative_tokens + 1, drafter.lookahead if drafter is not None else 0)
        kv_block_size = kv_block_size or platform.kv_block_size
        per_seq = -(-(max_model_len - 2 + self.reserve) // kv_block_size)
        if num_kv_blocks is None:
            num_kv_blocks = fitting_kv_blocks(self, per_seq * max_batch_size, kv_block_size, kv_cache_fraction)
        self.num_kv_blocks = num_kv_blocks
        graphs = use_graphs(platform, self.device, graphs)
        buckets = sorted(graph_buckets or default_buckets(max_batch_size)) if graphs else []
        self.profile_batch_sizes = profile_batch_sizes(buckets, max_batch_size)
        # Padding slots: a graph bucket's rows past the real batch, and the rows a step-cost
        # profile runs on (`profile_rows`: so profiling never touches a request's slot).
        num_pad = buckets[-1] if graphs else (self.profile_batch_sizes[-1] if profile_rows else 0)
        self.pad_slots = list(range(max_batch_size, max_batch_size + num_pad))
        pad_blocks = -(-self.reserve // kv_block_size)
        num_seqs = max_batch_size + len(self.pad_slots)
        scratch = max(max_prefill_tokens, max_batch_size * self.reserve)
        self.tables = BlockTables(num_seqs, per_seq, num_kv_blocks + len(self.pad_slots) * pad_blocks,
                                  kv_block_size, self.device, scratch)
        # The padding slots own the blocks past the requests' (the scheduler allocates below).
        for i, slot in enumerate(self.pad_slots):
            first = num_kv_blocks + i * pad_blocks
            self.tables.extend(slot, list(range(first, first + pad_blocks)))
        self.tables.flush()
        self.cache = PagedKVCache(cfg.num_layers, self.tables, kv_heads_here(target), cfg.head_dim, self.dtype)
        if drafter is not None:
            drafter.attach(self.tables, self.dtype)
        self.anchors = torch.zeros(num_seqs, dtype=torch.long, device=self.device)
        self.graph_runner = StepGraphRunner(self, buckets) if graphs else None
        self.prefill_graphs = PrefillGraphRunner.build(self, prefill_graphs, max_prefill_tokens, max_model_len,
                                                       prefill_graph_buckets)
        self._sampling_key: tuple | None = None
        self._sampling: SamplingBatch | None = None

    @property
    def failure(self) -> str | None:
        """Why this runner's tensor-parallel group can no longer compute (a rank died); None if it can."""
        return self.tp.failure if self.tp is not None else None

    @sent_to_followers
    def capture_graphs(self, progress: bool, depths: list[int] = (), steps: int = 1) -> None:
        """Capture the start-up step graphs (a no-op without graphs); `depths`: the draft
        depths the engine may choose besides K (greedy graphs for each are captured too);
        `steps` > 1: the plain multi-step graphs of `decode_steps` too."""
        if self.graph_runner is not None:
            with torch.inference_mode():
                self.graph_runner.capture_startup(progress, depths, steps)
                if self.prefill_graphs is not None:
                    self.prefill_graphs.capture_startup(progress)

    @sent_to_followers
    @torch.inference_mode()
    def time_step(self, batch: int, depth: int, repeats: int, observe: bool = True) -> float:
        """Median seconds of a greedy step of `batch` padding rows drafting and verifying
        `depth` tokens each, run as the engine runs it (a graph replay where one fits) with
        its host copy, after one warm-up step. `observe=False`: a plain step, the drafter
        asleep (depth 0 only)."""
        params = SamplingParams(temperature=0.0)
        rows = [Request(f"profile-{i}", [0], params, frozenset(), -1 - i) for i in range(batch)]
        for row, slot in zip(rows, self.pad_slots):
            row.slot = slot
        slots = torch.tensor(self.pad_slots[:batch]).to(self.device)
        self.cache.reset(slots)                 # fresh sequences, as a prefill would start them
        if self.drafter is not None:
            self.drafter.reset(slots)
        times = []
        for _ in range(repeats + 1):
            self.platform.synchronize()
            start = time.perf_counter()
            HostCopy(self.verify(rows, [depth] * batch, observe=observe), self.platform).receive()
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    # -- prefill -----------------------------------------------------------------------------
    @sent_to_followers
    def prefill(self, chunks: list[PrefillChunk], observe: list[bool] | None = None,
                constrained: bool = False) -> dict[str, torch.Tensor]:
        """One padded forward over the chunks, a graph replay where a prefill graph fits
        (prefill_graphs.py), else eager; returns each row's sampled next token (used
        for rows that finish a fresh prompt) and, if asked for, its logprobs. `observe[b]`
        (default: all): whether the drafter reads row b's chunk (not for a request whose
        drafter sleeps, engine.py). `constrained`: some row's request has a grammar; the
        first token of such a row is sampled from the masked logits (spec/grammar.py)."""
        observe = [True] * len(chunks) if observe is None else observe
        watch = self.drafter is not None and any(observe)
        reqs = [c.request for c in chunks]
        dev = self.device
        fresh = [c.request.slot for c in chunks if c.start == 0]
        if fresh:                   # eagerly, before the forward: a replayed graph never resets a sequence
            fresh = torch.tensor(fresh).to(dev)
            self.cache.reset(fresh)
            if self.drafter is not None:
                self.drafter.reset(fresh)
        want_logprobs = max((r.params.logprobs for r in reqs if r.params.logprobs is not None), default=None)
        prompt_rows = prompt_logprob_rows(reqs)
        if self.prefill_graphs is not None:
            out = self.prefill_graphs.run(chunks, observe, watch, want_logprobs is not None or bool(prompt_rows[0]),
                                          constrained)
            if out is not None:
                return out
        ids, following, rows = (t.to(dev) for t in prefill_inputs(chunks, observe, max(c.end - c.start for c in chunks)))
        ctx = ForwardContext(self.platform.ops, num_keys=max(c.end for c in chunks),
                             hints=AttentionHints(*attention_lengths(chunks), self.prefill_attention))
        # only a fresh prompt's first token is used: its grammar state is the initial one
        grammars = [c.request.grammar if c.is_last and not c.request.output else None for c in chunks]
        return self.prefill_core(ids, following, rows, SamplingBatch([r.params for r in reqs], dev, self.platform.ops),
                                 ctx, watch, want_logprobs, grammars if constrained else None,
                                 prompt_rows if prompt_rows[0] else None)

    def prefill_core(self, ids: torch.Tensor, following: torch.Tensor, rows: torch.Tensor, sampling: SamplingBatch,
                     ctx: ForwardContext, watch: bool, want_logprobs: int | None = None,
                     grammars: list[RequestGrammar | None] | None = None,
                     prompt_logprobs: tuple[list[int], int] | None = None) -> dict[str, torch.Tensor]:
        """The device work of a prefill, graph-capturable (no host reads, fixed shapes) without
        the last three arguments (eager only): the target's forward over `ids` [B, W], the first
        token sampled after each row's last position, cache lengths, the drafter's observe
        (`watch`: of any row), anchors. `following` [B, W]: the token after each position (a
        fresh prompt's last: the sampled token, written in here). `rows` [B, 7]: the fields
        prefill_graphs.ROW_FIELDS names; a row of length 0 (padding) writes nothing. `grammars`:
        first tokens from masked logits (spec/grammar.py). `prompt_logprobs`: (rows, top-n)."""
        starts, lens, slots = rows[:, 0], rows[:, 1], rows[:, 2]
        samples_first, is_last, resumed_anchor, observed = rows[:, 3].bool(), rows[:, 4].bool(), rows[:, 5], rows[:, 6]
        width = ids.shape[1]
        positions = starts.unsqueeze(1) + torch.arange(width, device=ids.device)
        valid = torch.arange(width, device=ids.device).unsqueeze(0) < lens.unsqueeze(1)
        out = self.target(ids, positions, self.cache, slots, valid, self.capture_layers if watch else (), ctx)
        last_col = (lens - 1).clamp(min=0).unsqueeze(1)                          # a padding row: column 0
        hidden = out.hidden.gather(1, last_col.unsqueeze(2).expand(-1, 1, out.hidden.shape[-1]))
        last = self.target.logits(hidden, ctx.ops)                                     # [B, 1, V]
        masked = last
        if grammars is not None:
            bitmask = step_bitmask(grammars, [[] for _ in grammars], [0] * len(grammars), 1, last.shape[-1])
            masked = ctx.ops.apply_token_bitmask(last, bitmask.to(ids.device))
        first = sampling.sample(sampling.probs(masked), (starts + lens).view(-1, 1), Stream.TARGET)[:, 0]
        self.cache.set_lengths(slots, starts + lens)
        # A fresh prompt's last position is followed by the token just sampled.
        following.scatter_(1, last_col, torch.where(samples_first.unsqueeze(1), first.unsqueeze(1),
                                                    following.gather(1, last_col)))
        if watch:
            self.drafter.observe(slots, out.features, positions, following, lens * observed, ctx)
        # The anchor of a request that finished its prefill: the sampled token, or (after a
        # preemption) its last committed token, which the prefill did not put in the cache.
        anchor = torch.where(samples_first, first, resumed_anchor)
        self.anchors[slots] = torch.where(is_last, anchor, self.anchors[slots])
        result = {"first": first}
        if want_logprobs is not None:
            result.update(logprobs(want_logprobs, last[:, 0], first, "first_"))
        if prompt_logprobs is not None:
            result.update(prompt_logprobs_of(self.target, out.hidden, following, *prompt_logprobs, ctx.ops))
        return result

    # -- draft + verify ----------------------------------------------------------------------
    @sent_to_followers
    def verify(self, requests: list[Request], verify_lens: list[int], ahead: int = 0,
               observe: bool = True, constrained: bool = False) -> dict[str, torch.Tensor]:
        """One draft + verify + rollback step for the decoding requests: replayed from a
        captured graph where one fits, else run eagerly over the columns the rows reach.
        `verify_lens[b]`: the drafts row b verifies (its request's cap); the drafter proposes
        as many as the largest of them, so a batch capped at 0 proposes nothing. `observe`:
        whether the drafter reads the committed tokens (False, with no drafts: a plain
        decode step, the drafter untouched). `ahead`: positions the rows may have committed
        beyond what the host knows (a step launched before the last one was read).
        `constrained`: some row's request has a grammar: the step runs eagerly, with one host
        read of the drafts to mask the target's rows (spec/grammar.py); `ahead` must be 0."""
        if not observe and max(verify_lens) > 0:
            raise ValueError("a step that drafts must let the drafter observe")
        slots = [r.slot for r in requests]
        num_drafts = max(verify_lens)
        reach = [r.num_cached + ahead + self.reserve for r in requests]
        want_logprobs = max((r.params.logprobs for r in requests if r.params.logprobs is not None), default=None)
        if self.graph_runner is not None and want_logprobs is None and not constrained:
            out = self.graph_runner.run(slots, verify_lens, num_drafts, [r.params for r in requests],
                                        tuple(r.arrival for r in requests), reach, observe)
            if out is not None:
                return out
        # The step mixes causal (target, Eagle3) and block-bidirectional (DFlash/DSpark) masks:
        # explicit masks, with each row's reach as its key-length bound.
        ctx = ForwardContext(self.platform.ops, num_keys=max(reach), hints=AttentionHints(reach, kind="explicit"))
        dev = self.device
        grammars = [r.grammar for r in requests] if constrained else None
        return self.verify_core(torch.tensor(slots).to(dev), torch.tensor(verify_lens).to(dev), num_drafts,
                                self._sampling_for(requests), want_logprobs, ctx, observe,
                                (grammars, verify_lens) if constrained else None)

    def verify_core(self, slots: torch.Tensor, verify_lens: torch.Tensor, num_drafts: int, sampling: SamplingBatch,
                    want_logprobs: int | None, ctx: ForwardContext, observe: bool = True,
                    grammars: tuple[list[RequestGrammar | None], list[int]] | None = None) -> dict[str, torch.Tensor]:
        """The device work of a verify step, graph-capturable (no host reads, fixed shapes):
        `num_drafts` tokens drafted (0: none, a plain decode step), `verify_lens` of them verified.
        `grammars` (eager steps only): each row's grammar (or None) and the verify lengths on
        the host; the target's rows are masked with them before verification (one host read
        of the drafts: the masks depend on them).

        The anchor (the last committed token, not yet in the cache) sits at the slot's cache
        length: the length is where this step's writes start, and the causal masks built from
        these positions let every query see exactly the committed prefix plus this step's
        tokens. Rolling back the rejected tail is therefore only lowering the length."""
        dev = self.device
        k = num_drafts
        anchors = self.anchors[slots]
        anchor_pos = self.cache.lengths[slots]
        batch = slots.shape[0]
        if self.drafter is not None:       # proposing 0 tokens costs nothing (an empty proposal)
            proposal = self.drafter.propose(slots, anchors, anchor_pos, k, sampling, ctx)
            draft_tokens, draft_probs, confidence = proposal.tokens, proposal.probs, proposal.confidence
        else:
            confidence = None
            draft_tokens = anchors.new_zeros(batch, 0)
            draft_probs = torch.empty(batch, 0, self.target.config.vocab_size, device=dev)
        inputs = torch.cat([anchors.unsqueeze(1), draft_tokens], dim=1)
        positions = anchor_pos.unsqueeze(1) + torch.arange(k + 1, device=dev)
        valid = torch.ones_like(inputs, dtype=torch.bool)
        drafter = self.drafter if observe else None        # None: the drafter sleeps this step
        out = self.target(inputs, positions, self.cache, slots, valid, self.capture_layers if drafter else (), ctx)
        logits = self.target.logits(out.hidden, ctx.ops)
        masked = logits
        if grammars is not None:
            rows, host_lens = grammars
            bitmask = step_bitmask(rows, draft_tokens.tolist(), host_lens, k + 1, logits.shape[-1])
            masked = ctx.ops.apply_token_bitmask(logits, bitmask.to(dev))
        result = verify(masked, draft_tokens, draft_probs, verify_lens, sampling, anchor_pos + 1)
        num_accepted = result.num_accepted
        self.cache.set_lengths(slots, anchor_pos + num_accepted + 1)
        if drafter is not None:
            drafter.observe(slots, out.features, positions, result.tokens.clamp(min=0), num_accepted + 1, ctx)
        self.anchors[slots] = result.tokens.gather(1, num_accepted.unsqueeze(1)).squeeze(1)
        if self.pad_slots:
            self.cache.lengths[self.pad_slots[0]:].zero_()       # padding rows always verify at 0..K
        out = {"num_accepted": num_accepted, "tokens": result.tokens}
        if confidence is not None:
            out["confidence"] = confidence
        if want_logprobs is not None:
            out.update(logprobs(want_logprobs, logits, result.tokens.clamp(min=0), ""))
        return out

    @sent_to_followers
    def decode_steps(self, requests: list[Request], steps: int, ahead: int = 0) -> dict[str, torch.Tensor]:
        """`steps` plain decode steps (no drafts, the drafter not observing) for the decoding
        requests in one launch: one graph replay where one fits, else `steps` eager steps
        with no host read between them. Returns "tokens" [B, steps], row b's token of each
        step (and a zero-width "confidence" where a drafter with a confidence head sits
        asleep, as its plain single steps give). Each step reads the anchors and cache
        lengths the one before it left on the device and samples on (seed, position), so the
        tokens are those of `steps` single steps; a row whose request stops (EOS, a stop
        string) mid-launch computes the rest for nothing, and the engine discards them as a
        rejected tail. The caller reserves blocks for `ahead + steps - 1` positions past the
        anchor plus the reserve (Scheduler.grow_ahead), and never asks for more tokens than
        a row may still commit by length. No logprobs, no grammar: those rows run single steps."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        slots = [r.slot for r in requests]
        # The last step's anchor sits up to ahead + steps - 1 past the host's view.
        reach = [r.num_cached + ahead + steps - 1 + self.reserve for r in requests]
        if self.graph_runner is not None:
            out = self.graph_runner.run(slots, [0] * len(slots), 0, [r.params for r in requests],
                                        tuple(r.arrival for r in requests), reach, observe=False, steps=steps)
            if out is not None:
                return out
        ctx = ForwardContext(self.platform.ops, num_keys=max(reach), hints=AttentionHints(reach, kind="explicit"))
        return self.decode_core(torch.tensor(slots).to(self.device), steps, self._sampling_for(requests), ctx)

    def decode_core(self, slots: torch.Tensor, steps: int, sampling: SamplingBatch,
                    ctx: ForwardContext) -> dict[str, torch.Tensor]:
        """The device work of `decode_steps`, graph-capturable: `verify_core` with 0 drafts and
        the drafter asleep, `steps` times over, its per-step outputs stacked along dim 1."""
        verify_lens = torch.zeros_like(slots)
        outs = [self.verify_core(slots, verify_lens, 0, sampling, None, ctx, observe=False) for _ in range(steps)]
        out = {"tokens": torch.cat([o["tokens"] for o in outs], dim=1)}
        if "confidence" in outs[0]:
            out["confidence"] = outs[0]["confidence"]          # [B, 0]: no drafts, no confidences
        return out

    def _sampling_for(self, requests: list[Request]) -> SamplingBatch:
        """The decoding batch's sampling tensors, rebuilt only when its membership changes."""
        key = tuple(r.request_id for r in requests)
        if key != self._sampling_key:
            self._sampling_key = key
            self._sampling = SamplingBatch([r.params for r in requests], self.device, self.platform.ops)
        return self._sampling
