"""The serving engine: requests join and leave between steps; each step drafts, verifies and
commits for every decoding request, and prefills prompt chunks for new ones.

    add_request(id, prompt_ids, params)   queue a request (refused at once if it can never fit)
    step() -> [RequestDelta]              one scheduler plan, run by the model runner:
        prefill   prompt chunks of admitted requests (one padded forward, replayed from a
                  graph where one fits); a request's last chunk samples its first token (the
                  first anchor), and the drafter observes every chunk's target features.
        draft     the drafter proposes up to K tokens after each decoding request's anchor
                  (the batch's largest per-request cap).
        verify    the target runs [anchor, d1..dK] in one forward; the verifier accepts a
                  prefix per request plus one target token (lossless).
        commit    KV lengths roll back past the rejected tail (a length, not a copy), the
                  drafter observes what was accepted, new tokens stream out.
    abort(id)                             free the request's slot and KV blocks at once
    generate(prompts, params)             offline: add everything, step until done

Structured output (a request whose `SamplingParams.grammar` is set) masks its rows with the
grammar; a batch holding one runs eager single steps without overlap (constrained.py).
Plain decode batches that nothing can change for N steps run N steps per launch
(multistep.py, `decode_steps_per_launch`).

The engine keeps the requests, the scheduler (scheduler.py: slots, blocks, admission,
preemption), the overlap of host and device work, and the host bookkeeping of each step;
the model runner (runner.py) owns everything on the device, the speculation policy
(speculation.py) says how many drafts each step verifies, and the output processor
(output_processor.py) turns committed tokens into stops, text and deltas.

Requests accept different numbers of tokens per step and leave as they finish, and the
scheduler admits waiting ones whenever a slot and KV blocks are free, so continuous
batching is invisible in the output: counter-based sampling noise keys on (seed, position),
never on the batch. Plain decoding is the same loop with no drafter (K = 0). One
device -> host copy per launch (one step, or several plain ones) carries every token it produced.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ascend_dspark.platform import Platform, current_platform
from ascend_dspark.spec.acceptance import AcceptanceEstimator
from ascend_dspark.spec.sampling import SamplingParams

from .constrained import follow_grammar, grammar_for
from .host_copy import HostCopy
from .multistep import DEFAULT_STEPS_PER_LAUNCH, MultiStep
from .offline import GenerateTimings, generate
from .output_processor import OutputProcessor, logprob_rows
from .outputs import RequestOutput
from .request import Request, RequestDelta, Status
from .runner import ModelRunner
from .scheduler import Scheduler, StepPlan
from .speculation import SLEEP_AFTER, SPECULATION_POLICIES, SpeculationPolicy, depth_menu
from .step_costs import StepCosts, measured_step_costs

__all__ = ["Engine", "GenerateTimings", "SLEEP_AFTER", "SPECULATION_POLICIES", "depth_menu"]

DEFAULT_PREFILL_TOKENS = 2048
DEFAULT_KV_FRACTION = 0.9      # of the device's memory, for weights + KV + graphs together

class Engine:
    """Generation over a target model and an optional drafter, both already on the device.

    `max_batch_size`: sequences held at once (slots). `num_kv_blocks`: blocks of
    `kv_block_size` positions (default: the platform's) shared by all requests. By default
    there are enough for every slot to reach `max_model_len`, or, on a device that reports
    its memory, as many as fit in `kv_cache_fraction` of it next to what is already
    allocated, if that is fewer. `max_prefill_tokens`: the per-step budget of (padded)
    prompt tokens. `overlap` (default: the platform's `overlap_steps`): launch a decode
    batch's next step before reading the last one's results (see `step`).

    `prefill_graphs` (default on where the step graphs run; False: eager prefills): replay
    prompt chunks from graphs in (rows, width) buckets,
    `prefill_graph_buckets` = (rows buckets, width buckets) (default: engine/prefill_graphs.py,
    which says what they cost).

    `speculation` (with a drafter): "confidence" (the default) chooses every step's draft
    depth, 0 (plain decoding) to `num_speculative_tokens`, for the most expected tokens per
    second: predicted acceptance (spec/acceptance.py, the confidence head's where the draft
    has one) against the cost of a step at this batch size and depth (`step_costs`, default:
    profiled at start-up and corrected by the steps that run, step_costs.py); "fixed" always
    drafts and verifies `num_speculative_tokens`. Either way a request's
    `num_speculative_tokens` caps its own (speculation.py).

    `decode_steps_per_launch` (default DEFAULT_STEPS_PER_LAUNCH, 1: off): plain decode steps
    one launch may carry when nothing can change the batch meanwhile
    (multistep.py); 1 launches every step on its own."""

    def __init__(self, target, drafter=None, tokenizer=None, num_speculative_tokens: int = 7,
                 max_model_len: int = 2048, max_batch_size: int = 8, platform: Platform | None = None,
                 num_kv_blocks: int | None = None, kv_block_size: int | None = None,
                 kv_cache_fraction: float = DEFAULT_KV_FRACTION,
                 max_prefill_tokens: int = DEFAULT_PREFILL_TOKENS, graphs: bool | None = None,
                 graph_buckets: list[int] | None = None, overlap: bool | None = None, progress: bool = False,
                 speculation: str | None = None, step_costs: StepCosts | None = None,
                 prefill_graphs: bool | None = None,
                 prefill_graph_buckets: tuple[list[int], list[int]] | None = None,
                 decode_steps_per_launch: int | None = None) -> None:
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
                                  profile_rows=self.speculation == "confidence" and step_costs is None,
                                  prefill_graphs=prefill_graphs, prefill_graph_buckets=prefill_graph_buckets)
        self.scheduler = Scheduler(self.runner.tables, max_model_len, self.runner.reserve, max_prefill_tokens,
                                   max_batch_size, self.runner.num_kv_blocks, self._prefill_width)
        eos = tokenizer.eos_token_ids if tokenizer is not None else target.config.eos_token_ids
        self.outputs = OutputProcessor(tokenizer, eos, max_model_len)
        self.policy = SpeculationPolicy(self.speculation, self.num_speculative_tokens)
        if decode_steps_per_launch is None:
            decode_steps_per_launch = DEFAULT_STEPS_PER_LAUNCH
        self.multistep = MultiStep(decode_steps_per_launch, self.scheduler, self.policy, self.outputs, max_model_len)
        self.runner.capture_graphs(progress, self.policy.depths, decode_steps_per_launch)
        if self.speculation == "confidence":
            self.policy.costs = step_costs or measured_step_costs(self.runner, self.runner.profile_batch_sizes,
                                                                  self.policy.depths, progress)
            self.policy.learn_costs = step_costs is None
            self.policy.acceptance = AcceptanceEstimator(self.num_speculative_tokens,
                                                         temperatures=getattr(drafter, "confidence_temperatures", None))
        # Overlap pays where the device runs ahead of the host (graphs, asynchronous streams).
        self.overlap = self.platform.overlap_steps if overlap is None else overlap
        self._pending: _Launched | None = None
        self.ran_prefill = False           # whether the last step() launched a prefill chunk (offline.py's timings)
        self.requests: dict[str, Request] = {}
        self.policy.attach(self.requests)
        self._arrivals = itertools.count()
        self.timings = GenerateTimings()

    def _prefill_width(self, rows: int) -> int:
        """The scheduler's packing limit: the widest chunk a step of `rows` prompt chunks may hold
        while the prefill graphs run (read per step, so switching them off restores packing by
        the token budget alone)."""
        graphs = self.runner.prefill_graphs
        if graphs is None or not graphs.shapes:
            return self.scheduler.max_prefill_tokens
        return graphs.widest(rows)

    # The policy's state, where tests and benchmarks look for it.
    @property
    def depth_counts(self) -> list[int]:
        return self.policy.depth_counts

    @property
    def drafter_asleep(self) -> bool:
        return self.policy.drafter_asleep

    @property
    def drafter_sleeps(self) -> int:
        return self.policy.sleeps

    @property
    def costs(self) -> StepCosts | None:
        return self.policy.costs

    @costs.setter
    def costs(self, costs: StepCosts) -> None:
        self.policy.costs = costs

    @property
    def acceptance(self) -> AcceptanceEstimator | None:
        return self.policy.acceptance

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
        # then depend on its seed alone, never on the load (speculation.py).
        pinned = params.seed is not None and params.temperature > 0
        if params.seed is None:        # fixed once, so a preempted request recomputes the same tokens
            params = dataclasses.replace(params, seed=random.getrandbits(63))
        request = Request(request_id, list(prompt_ids), params, self.outputs.stop_ids(params), next(self._arrivals),
                          detokenize=detokenize and self.tokenizer is not None, pinned_depth=pinned,
                          drafter_asleep=self.drafter_asleep and not pinned,
                          grammar=grammar_for(params, self.target.config.vocab_size, self.runner.tp is not None,
                                              self.overlap or self.runner.graph_runner is not None, self.platform.name))
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
        overlap. A launch may carry several plain steps (multistep.py); chained or not, it is
        read as one."""
        self.ran_prefill = False
        pending, self._pending = self._pending, None
        if pending is not None and self._chain(pending):
            self._pending = self._launch(StepPlan(decode=pending.plan.decode), ahead=pending.reach)
        deltas = self._finish(pending) if pending is not None else []
        if self._pending is None:
            plan = self.scheduler.schedule()
            if not plan.empty:
                launched = self._launch(plan)
                if self.overlap and not plan.prefill and not launched.constrained:
                    self._pending = launched
                else:
                    deltas += self._finish(launched)
        return deltas

    def _launch(self, plan: StepPlan, ahead: int = 0) -> _Launched:
        """Queue the plan's device work and its one device -> host copy. `ahead`: positions the
        rows may have committed beyond what the host knows (a chained step)."""
        parts: dict[str, torch.Tensor] = {}
        self.ran_prefill = self.ran_prefill or bool(plan.prefill)
        if plan.prefill:
            parts.update(self.runner.prefill(plan.prefill, [self.policy.may_draft(c.request) for c in plan.prefill],
                                             any(c.request.grammar is not None for c in plan.prefill)))
        verify_lens = self.policy.verify_lens(plan.decode) if plan.decode else []
        constrained = any(r.grammar is not None for r in plan.decode)
        observe, steps = False, 1
        if plan.decode and not plan.prefill:
            steps = self.multistep.steps_for(plan.decode, ahead)
        if steps > 1:
            self.policy.depth_counts[0] += steps - 1              # verify_lens counted the first
            parts.update(self.runner.decode_steps(plan.decode, steps, ahead))
        elif plan.decode:
            # No row that could ever draft: a plain step, the drafter not even observing.
            observe = any(self.policy.may_draft(r) for r in plan.decode)
            parts.update(self.runner.verify(plan.decode, verify_lens, ahead, observe, constrained))
        # Tokens per row the launch may commit: what a launch chained behind it must allow for.
        reach = steps if steps > 1 else self.num_speculative_tokens + 1
        return _Launched(plan, verify_lens, HostCopy(parts, self.platform), observe, constrained, steps, reach)

    def _finish(self, launched: _Launched) -> list[RequestDelta]:
        """Read a launched step's results and commit them (rows of requests that left since
        the launch are dropped)."""
        plan, host = launched.plan, launched.copy.receive()
        self.policy.step_read(len(plan.decode), max(launched.verify_lens, default=0), launched.observe,
                              launched.steps, decode_only=bool(plan.decode) and not plan.prefill)
        touched: list[Request] = []
        live = [i for i, r in enumerate(plan.decode)
                if r.status is Status.RUNNING and self.requests.get(r.request_id) is r]
        if launched.steps > 1:
            requests = [plan.decode[i] for i in live]
            self.multistep.commit(requests, [host["tokens"][i] for i in live], "confidence" in host)
            touched += requests
        elif plan.decode:
            counts = [host["num_accepted"][i] for i in live]
            token_lists = [follow_grammar(plan.decode[i], host["tokens"][i][: n + 1]) for i, n in zip(live, counts)]
            confidence = [host["confidence"][i] for i in live] if "confidence" in host else None
            logprobs = logprob_rows(host, "", plan.decode)
            requests = [plan.decode[i] for i in live]
            verified = [launched.verify_lens[i] for i in live]
            self.outputs.commit(requests, token_lists, counts, verified, confidence,
                         [logprobs[i] for i in live] if logprobs is not None else None)
            self.policy.observe(requests, counts, verified, confidence)
            touched += requests
        first_logprobs = logprob_rows(host, "first_", [c.request for c in plan.prefill]) if plan.prefill else None
        if "prompt_logprob" in host:
            self.outputs.record_prompt_logprobs(plan.prefill, host)
        for b, chunk in enumerate(plan.prefill):
            r = chunk.request
            r.num_cached = chunk.end
            if chunk.is_last:
                self.scheduler.prefill_done(r)
                if not r.output:
                    logprobs = [first_logprobs[b]] if first_logprobs is not None else None
                    self.outputs.commit([r], [follow_grammar(r, [host["first"][b]])], None, None, None, logprobs)
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
        if not self.overlap or pending.plan.prefill or pending.constrained:
            return False
        if self.scheduler.prefilling or (self.scheduler.waiting and self.scheduler.free_slots):
            return False                            # someone should join: read, then schedule
        ahead = pending.reach
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
        """Generate for token-id prompts: all are queued at once and run under continuous
        batching (offline.py); `self.timings` splits the wall time."""
        return generate(self, prompts, params, progress)

    # -- host bookkeeping ----------------------------------------------------------------------
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
    observe: bool = False             # whether the drafter read the decode rows' tokens
    constrained: bool = False         # a row has a grammar: read at once (the next masks need its tokens)
    steps: int = 1                    # plain decode steps the launch carries (multistep.py)
    reach: int = 1                    # tokens per row it may commit (a chained launch's `ahead`)
