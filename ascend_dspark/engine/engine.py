"""The serving engine: requests join and leave between steps; each step drafts, verifies and
commits for every decoding request, and prefills prompt chunks for new ones.

    add_request(id, prompt_ids, params)   queue a request (refused at once if it can never fit)
    step() -> [RequestDelta]              one scheduler plan, run by the model runner:
        prefill   prompt chunks of admitted requests (one padded forward); a request's last
                  chunk samples its first token (the first anchor), and the drafter observes
                  every chunk's target features.
        draft     the drafter proposes up to K tokens after each decoding request's anchor
                  (the batch's largest per-request cap).
        verify    the target runs [anchor, d1..dK] in one forward; the verifier accepts a
                  prefix per request plus one target token (lossless).
        commit    KV lengths roll back past the rejected tail (a length, not a copy), the
                  drafter observes what was accepted, new tokens stream out.
    abort(id)                             free the request's slot and KV blocks at once
    generate(prompts, params)             offline: add everything, step until done

The engine keeps the requests, the scheduler (scheduler.py: slots, blocks, admission,
preemption), the overlap of host and device work, and the host bookkeeping of each step;
the model runner (runner.py) owns everything on the device, and the output processor
(output_processor.py) turns committed tokens into stops, text and deltas.

Requests accept different numbers of tokens per step and leave as they finish, and the
scheduler admits waiting ones whenever a slot and KV blocks are free, so continuous
batching is invisible in the output: counter-based sampling noise keys on (seed, position),
never on the batch. Plain decoding is the same loop with no drafter (K = 0). One
device -> host copy per step carries every token the step produced.
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

from ascend_dspark.platform import Platform, current_platform
from ascend_dspark.spec.acceptance import AcceptanceEstimator
from ascend_dspark.spec.prefix_scheduler import best_depth
from ascend_dspark.spec.sampling import SamplingParams

from .output_processor import OutputProcessor, logprob_rows
from .outputs import RequestOutput
from .request import Request, RequestDelta, Status
from .runner import HostCopy, ModelRunner
from .scheduler import Scheduler, StepPlan
from .step_costs import StepCosts, measured_step_costs

logger = logging.getLogger(__name__)

DEFAULT_PREFILL_TOKENS = 2048
DEFAULT_KV_FRACTION = 0.9      # of the device's memory, for weights + KV + graphs together
SPECULATION_POLICIES = ("fixed", "confidence")
SLEEP_AFTER = 16               # consecutive steps planned at depth 0 before the drafter sleeps


def depth_menu(num_speculative_tokens: int) -> list[int]:
    """The draft depths the confidence policy chooses from: every depth up to 3, then 5 and K
    (each depth is a step graph per batch bucket; deep drafts rarely survive past 3 anyway)."""
    return sorted({d for d in (0, 1, 2, 3, 5) if d < num_speculative_tokens} | {num_speculative_tokens})


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
    batch's next step before reading the last one's results (see `step`).

    `speculation` (with a drafter): "confidence" (the default) chooses every step's draft
    depth, 0 (plain decoding) to `num_speculative_tokens`, for the most expected tokens per
    second: predicted acceptance (spec/acceptance.py, the confidence head's where the draft
    has one) against the measured cost of a step at this batch size and depth (`step_costs`,
    default: profiled at start-up, step_costs.py); "fixed" always drafts and verifies
    `num_speculative_tokens`. Either way a request's `num_speculative_tokens` caps its own."""

    def __init__(self, target, drafter=None, tokenizer=None, num_speculative_tokens: int = 7,
                 max_model_len: int = 2048, max_batch_size: int = 8, platform: Platform | None = None,
                 num_kv_blocks: int | None = None, kv_block_size: int | None = None,
                 kv_cache_fraction: float = DEFAULT_KV_FRACTION,
                 max_prefill_tokens: int = DEFAULT_PREFILL_TOKENS, graphs: bool | None = None,
                 graph_buckets: list[int] | None = None, overlap: bool | None = None, progress: bool = False,
                 speculation: str | None = None, step_costs: StepCosts | None = None) -> None:
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
        speculation = speculation or ("confidence" if drafter is not None else "fixed")
        if speculation not in SPECULATION_POLICIES:
            raise ValueError(f"unknown speculation policy {speculation!r}: expected one of {', '.join(SPECULATION_POLICIES)}")
        self.speculation = speculation if drafter is not None else "fixed"
        self.max_model_len = max_model_len
        self.max_batch_size = max_batch_size
        self.runner = ModelRunner(target, drafter, self.platform, self.num_speculative_tokens, max_model_len,
                                  max_batch_size, num_kv_blocks, kv_block_size, kv_cache_fraction,
                                  max_prefill_tokens, graphs, graph_buckets,
                                  profile_rows=self.speculation == "confidence" and step_costs is None)
        self.scheduler = Scheduler(self.runner.tables, max_model_len, self.runner.reserve, max_prefill_tokens,
                                   max_batch_size, self.runner.num_kv_blocks)
        eos = tokenizer.eos_token_ids if tokenizer is not None else target.config.eos_token_ids
        self.outputs = OutputProcessor(tokenizer, eos, max_model_len)
        self.depths = depth_menu(self.num_speculative_tokens) if self.speculation == "confidence" else []
        self.runner.capture_graphs(progress, self.depths)
        self.costs: StepCosts | None = None
        self.acceptance: AcceptanceEstimator | None = None
        self.depth_counts = [0] * (self.num_speculative_tokens + 1)     # steps run at each draft depth
        if self.speculation == "confidence":
            self.costs = step_costs or measured_step_costs(self.runner, self.runner.profile_batch_sizes, self.depths,
                                                           progress)
            self.acceptance = AcceptanceEstimator(self.num_speculative_tokens,
                                                  temperatures=getattr(drafter, "confidence_temperatures", None))
        # The drafter sleeps (see `_plan_sleep`): requests admitted meanwhile never draft.
        self.drafter_asleep = False
        self._plain_streak = 0
        # Overlap pays where the device runs ahead of the host (graphs, asynchronous streams).
        self.overlap = self.platform.overlap_steps if overlap is None else overlap
        self._pending: _Launched | None = None
        self._ran_prefill = False          # whether the last step() launched a prefill chunk (timings)
        self.requests: dict[str, Request] = {}
        self._arrivals = itertools.count()
        self.timings = GenerateTimings()

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
        # A seeded sampled request keeps its full depth under the confidence policy: its tokens
        # then depend on its seed alone, never on the load (see `_verify_lens`).
        pinned = params.seed is not None and params.temperature > 0
        if params.seed is None:        # fixed once, so a preempted request recomputes the same tokens
            params = dataclasses.replace(params, seed=random.getrandbits(63))
        request = Request(request_id, list(prompt_ids), params, self.outputs.stop_ids(params), next(self._arrivals),
                          detokenize=detokenize and self.tokenizer is not None, pinned_depth=pinned,
                          drafter_asleep=self.drafter_asleep and not pinned)
        self.scheduler.add(request)
        self.requests[request_id] = request

    def abort(self, request_id: str) -> RequestDelta | None:
        """Stop a request now and free its slot and blocks; None if it is unknown or done."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        self.scheduler.finish(request)
        request.finish_reason = "abort"
        return self.outputs.delta(request)

    @property
    def failure(self) -> str | None:
        """Why the engine can no longer run steps although nothing has been asked of it yet
        (a tensor-parallel rank died: engine/runner.py); None while it can."""
        return self.runner.failure

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
        """KV blocks requests can use (the graph runner's padding rows own blocks of their own)."""
        return self.runner.num_kv_blocks

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
        self._ran_prefill = False
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
        self._ran_prefill = self._ran_prefill or bool(plan.prefill)
        if plan.prefill:
            parts.update(self.runner.prefill(plan.prefill, [self._may_draft(c.request) for c in plan.prefill]))
        verify_lens = self._verify_lens(plan.decode) if plan.decode else []
        if plan.decode:
            self.depth_counts[max(verify_lens)] += 1
            # No row that could ever draft: a plain step, the drafter not even observing.
            observe = any(self._may_draft(r) for r in plan.decode)
            parts.update(self.runner.verify(plan.decode, verify_lens, ahead, observe))
        return _Launched(plan, verify_lens, HostCopy(parts, self.platform))

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
            logprobs = logprob_rows(host, "", plan.decode)
            requests = [plan.decode[i] for i in live]
            verified = [launched.verify_lens[i] for i in live]
            self.outputs.commit(requests, token_lists, counts, verified, confidence,
                         [logprobs[i] for i in live] if logprobs is not None else None)
            if self.acceptance is not None:
                for j, r in enumerate(requests):
                    self.acceptance.observe(r.acceptance, counts[j], verified[j],
                                            confidence[j][:verified[j]] if confidence is not None else None)
            touched += requests
        first_logprobs = logprob_rows(host, "first_", [c.request for c in plan.prefill]) if plan.prefill else None
        for b, chunk in enumerate(plan.prefill):
            r = chunk.request
            r.num_cached = chunk.end
            if chunk.is_last:
                self.scheduler.prefill_done(r)
                if not r.output:
                    logprobs = [first_logprobs[b]] if first_logprobs is not None else None
                    self.outputs.commit([r], [[host["first"][b]]], None, None, None, logprobs)
                    touched.append(r)
        deltas = []
        for r in touched:
            if r.finish_reason is not None and not r.finished:
                self.scheduler.finish(r)
                self.requests.pop(r.request_id, None)
            deltas.append(self.outputs.delta(r))
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
            deltas = self.step()
            elapsed = time.perf_counter() - t0            # step() ends with its host copy: synchronised
            if self._ran_prefill:
                self.timings.prefill_s += elapsed
            else:
                self.timings.decode_s += elapsed
            bar.update(sum(d.finished for d in deltas))
        bar.close()
        self.timings.generated_tokens = sum(len(r.output) for r in requests)
        return [RequestOutput(r.prompt_ids, r.output, r.finish_reason or "length", r.stats,
                              r.text if r.params.stop else None) for r in requests]

    # -- host bookkeeping ----------------------------------------------------------------------
    def _verify_lens(self, requests: list[Request]) -> list[int]:
        """The drafts each row proposes and verifies this step: its cap (the request's
        `num_speculative_tokens`, at most the engine's K), and under the confidence policy at
        most the step's depth. The depth is planned from results already read (never from
        this step's drafts), so it cannot bias what the step accepts."""
        caps = [0 if r.drafter_asleep else self._cap(r) for r in requests]
        if self.acceptance is None:
            return caps
        if self.drafter_asleep:
            self._maybe_wake(len(requests))
        if not any(caps):
            return caps
        # Seeded sampled requests verify their whole cap: which tokens a seed gives depends on
        # the depth (a draft accepted at position p vs a target sample there, both exact in
        # law), so a depth planned from the batch would make a seed's output depend on the load.
        floor = max((c for c, r in zip(caps, requests) if r.pinned_depth), default=0)
        depths = sorted({d for d in self.depths if d >= floor} | {floor})
        predicted = [self.acceptance.predict(r.acceptance) for r in requests]
        depth = best_depth(predicted, caps, depths, self.costs.steps_per_second)
        self._plan_sleep(depth)
        return [min(c, depth) for c in caps]

    def _plan_sleep(self, depth: int) -> None:
        """A depth-0 step still runs the drafter: it reads every committed token, so that it
        could draft at the next step. When the plan has been depth 0 for SLEEP_AFTER steps in
        a row, the drafter sleeps: every request then in the engine (bar seeded sampled ones,
        which keep their depth) and every one admitted while it sleeps never drafts, and
        steps with only such rows are plain decode steps at plain decoding's cost (prefill
        chunks of such requests skip the drafter too). Decided, like the depth, from results
        already read."""
        self._plain_streak = self._plain_streak + 1 if depth == 0 else 0
        if self._plain_streak >= SLEEP_AFTER and not self.drafter_asleep:
            self.drafter_asleep = True
            for r in self.requests.values():
                r.drafter_asleep = r.drafter_asleep or not r.pinned_depth
            logger.info("speculation: %d steps in a row planned without drafts: the drafter sleeps "
                        "(requests admitted from now on decode plainly until drafting could pay)", SLEEP_AFTER)

    def _maybe_wake(self, rows: int) -> None:
        """The drafter wakes (requests admitted from then on draft again) once the acceptance
        measured across requests so far would make drafting pay at this batch size: while it
        sleeps that estimate stands still, so this follows the load."""
        estimate = self.acceptance.engine
        k = self.num_speculative_tokens
        if best_depth([estimate] * rows, [k] * rows, self.depths, self.costs.steps_per_second) > 0:
            self.drafter_asleep = False
            self._plain_streak = 0
            logger.info("speculation: drafting could pay at batch %d again: the drafter wakes", rows)

    def _may_draft(self, request: Request) -> bool:
        """Whether the request can ever draft (so the drafter must keep reading its tokens)."""
        return not request.drafter_asleep and self._cap(request) > 0

    def _cap(self, request: Request) -> int:
        cap = request.params.num_speculative_tokens
        return self.num_speculative_tokens if cap is None else min(cap, self.num_speculative_tokens)

    def _check_prompt(self, ids: list[int]) -> None:
        vocab = self.target.config.vocab_size
        if not ids:
            raise ValueError("empty prompt: at least one token is needed")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}")
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")


@dataclass
class _Launched:
    """A step whose device work is queued: its plan, and its results on the way to the host."""

    plan: StepPlan
    verify_lens: list[int]
    copy: HostCopy
