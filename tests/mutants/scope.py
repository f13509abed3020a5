"""pytest plugin for `make mutants` (loaded with `-p tests.mutants.scope` in the staged copy).

Which tests a mutant runs, and in what order (mutmut runs them with `-x`: the first
failure kills the mutant, and a survivor runs them all, so the selection of a module is
what each of its survivors costs):
- verification and sampling (`ascend_dspark.spec.*`, `ops.*`): the unit tests of
  verification and sampling only (tests/spec, tests/ops): those must pin the rules on
  their own, and the engine tests reach them seven calls deep.
- the engine: ENGINE_TESTS, in the order of their kills per second (GRAPH_TESTS, the
  graph padding rows through the NPU double, added for the step graphs capture);
- the scheduler: its host-level plan tests, then a few engine runs that preempt and abort;
- the drafters: their unit tests (tests/drafters), then ENGINE_TESTS.
mutmut passes the tests that ran the mutated function; this plugin keeps those of the
mutant's scope, in the scope's order (a file's tests stay together, so its module
fixtures are built once). MUTANT_UNDER_TEST names the mutant in the worker that tests it
("stats", "fail" or "" in mutmut's other runs, which run the union of the scopes;
MUTANTS_NO_SCOPE, set when run_mutants re-checks a claimed kill, runs the tests as named).

Also, in a mutant's run only: a test that runs past TEST_LIMIT_S (plus a multiple of its
clean duration) fails: a mutant that hangs the engine (no progress, an endless step loop)
is caught by the test it hangs, as the real suite would catch it, without waiting for
mutmut's own timeout. And where MUTANTS_SCOPE_LOG names a file, each mutant's run appends
one line to it (mutant, exit status, seconds, tests run, the test that failed first):
what tunes the selections below.

At configure time the plugin builds a tiny transformers model of each architecture once
per process (the global RNG state is kept): the lazy imports behind it take seconds, and
mutmut forks every mutant's run from a process that has configured this plugin, so they
are paid once, not per mutant.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

SEP = "\u01c1"                        # mutmut's class separator in mangled names: xǁClassǁmethod
UNIT_TESTS = ["tests/spec/", "tests/ops/"]
E = "tests/engine/"
FEED = E + "test_engine_drafter_feed.py::test_engine_feeds_the_drafter_the_committed_sequence["
BATCHING = E + "test_continuous_batching.py::"
# The engine's selection (node id prefixes), in the order of the kills per second seen in
# earlier runs (tests/mutants/run_mutants.py logs each mutant's first failing test): a
# killed engine mutant mostly stops in the first second, a surviving one runs all of it.
ENGINE_TESTS = [
    E + "test_scheduler.py",                 # host-level plans: for the scheduler's mutants
    E + "test_engine_kv_rollback.py::test_next_write_starts_at_the_length_and_nothing_past_it_is_seen[dspark-7]",
    E + "test_engine_kv_rollback.py",
    E + "test_engine_overlap.py",
    E + "test_draft_caps.py",
    E + "test_engine_ops_registry.py",
    E + "test_engine_logprobs.py::test_logprobs_of_token_zero_are_its_own",
    E + "test_engine_logprobs.py",
    E + "test_engine_devices.py::test_generate_computes_with_no_tensor_made_without_a_device[None]",
    E + "test_engine_devices.py",
    E + "test_engine_attention_hints.py",
    E + "test_calibration_stats.py",
    E + "test_stops_and_stats.py",
    E + "test_engine_stop_strings.py",
    *(BATCHING + t for t in ("test_a_small_cache_makes_requests_wait_or_recompute_not_fail[None-greedy-",
                             "test_abort_frees", "test_a_request_that_can_never_fit",
                             "test_preempted_requests_recompute_the_same_sampled_tokens",
                             "test_randomised_stress_keeps_the_accounting_exact[None-overlap]",
                             "test_overlap_stops_where_the_synchronous_engine_stops[dspark]",
                             "test_joining_mid_flight_gives_the_tokens_it_gives_alone[dspark-seeded-",
                             "test_randomised_stress_keeps_the_accounting_exact[None-",
                             "test_a_small_cache_makes_requests_wait_or_recompute_not_fail[dspark-seeded-",
                             "test_joining_mid_flight_gives_the_tokens_it_gives_alone[None-greedy-",
                             "test_overlap_stops_where_the_synchronous_engine_stops[")),
    E + "test_engine_seeds.py::test_engine_matches_the_reference_loop_while_the_batch_shrinks[3]",
    E + "test_engine_seeds.py::test_neighbours_finishing_early_keep_their_own_seeds",
    *(FEED + p for p in ("eagle3-3-", "dflash-3-", "dspark-3-", "dspark-1-")),
    *(E + "test_engine_acceptance.py::test_reference_drafter_accepts_every_draft[" + p
      for p in ("eagle3-7-19", "dflash-3-19", "dspark-1-64")),
    *(E + "test_engine_max_model_len.py::test_generation_runs_into_max_model_len[" + p
      for p in ("dspark-1]", "dspark-2]", "eagle3-6]", "dflash-7]")),
    *(E + "test_lossless.py::" + t for t in ("test_stops_on_eos_inside_an_accepted_block[llama",
                                            "test_max_tokens_truncates_an_accepted_block[llama",
                                            "test_long_accepted_prefixes_stay_identical[llama")),
]
# Graph padding rows exist only with whole-step graphs, on the CPU through the NPU double
# (seconds of set-up): for the mutants of the step that graphs capture.
GRAPH_TESTS = [E + "test_npu_graph_padding.py"]
# The scheduler's: its host-level plan tests (which kill every scheduler mutant the engine
# tests kill), then the engine runs that preempt and abort, end to end.
SCHEDULER_TESTS = [ENGINE_TESTS[0]] + [BATCHING + t for t in (
    "test_a_small_cache_makes_requests_wait_or_recompute_not_fail[None-greedy-", "test_abort_frees",
    "test_preempted_requests_recompute_the_same_sampled_tokens",
    "test_randomised_stress_keeps_the_accounting_exact[None-overlap]")]
# mutant module prefix -> test node id prefixes, in running order
SCOPES: list[tuple[tuple[str, ...], list[str]]] = [
    (("ops.", "ascend_dspark.spec."), UNIT_TESTS),
    (("ascend_dspark.engine.scheduler.",), SCHEDULER_TESTS),
    ((f"ascend_dspark.engine.runner.x{SEP}ModelRunner{SEP}verify_core",), ENGINE_TESTS + GRAPH_TESTS),
    (("ascend_dspark.engine.",), ENGINE_TESTS),
    (("ascend_dspark.drafters.",), ["tests/drafters/", *ENGINE_TESTS]),
]

TEST_LIMIT_S = 10.0              # per test, on top of TEST_LIMIT_FACTOR x its clean duration
TEST_LIMIT_FACTOR = 10.0


def scope_of(mutant: str) -> list[str] | None:
    for prefixes, tests in SCOPES:
        if mutant.startswith(prefixes):
            return tests
    return None


def under_test() -> str:
    """The mutant this worker tests, or "" in mutmut's stats / clean / forced-fail runs."""
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    return mutant if mutant not in ("", "stats", "fail", "list_all_tests") else ""


_warm = False


def pytest_configure(config):
    global _warm
    if _warm:
        return
    _warm = True
    import torch

    from tests.helpers import ARCHS, tiny_hf_model

    rng = torch.random.get_rng_state()
    for arch in ARCHS:
        tiny_hf_model(arch)
    torch.random.set_rng_state(rng)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("MUTANTS_NO_SCOPE"):
        return                                   # run_mutants re-checking a claimed kill: as named
    mutant = under_test()
    tests = scope_of(mutant) if mutant else [t for _, scope in SCOPES for t in scope]
    if tests is None:
        return
    rank = {}
    for item in items:
        rank[item] = next((i for i, prefix in enumerate(tests) if item.nodeid.startswith(prefix)), None)
    kept = sorted((item for item in items if rank[item] is not None), key=lambda item: rank[item])
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if rank[item] is None])
    items[:] = kept


# ---------------------------------------------------------------- per-test limit, log

_durations: dict[str, float] | None = None
_run = {"start": 0.0, "ran": 0, "first_failure": ""}


class MutantHangs(Exception):
    pass


def _clean_duration(nodeid: str) -> float:
    global _durations
    if _durations is None:
        try:
            _durations = json.loads(Path("mutmut-stats.json").read_text())["duration_by_test"]
        except (OSError, ValueError, KeyError):
            _durations = {}
    return _durations.get(nodeid, 0.0)


def pytest_sessionstart(session):
    _run.update(start=time.monotonic(), ran=0, first_failure="")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if not under_test():
        yield
        return
    limit = TEST_LIMIT_S + TEST_LIMIT_FACTOR * _clean_duration(item.nodeid)

    def hang(signum, frame):
        raise MutantHangs(f"{item.nodeid} ran past {limit:.0f} s under {under_test()}")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    _run["ran"] += 1


def pytest_runtest_logreport(report):
    if report.failed and not _run["first_failure"]:
        _run["first_failure"] = report.nodeid


def pytest_sessionfinish(session, exitstatus):
    log = os.environ.get("MUTANTS_SCOPE_LOG")
    mutant = under_test()
    if not log or not mutant:
        return
    line = "\t".join([mutant, str(int(exitstatus)), f"{time.monotonic() - _run['start']:.1f}",
                      str(_run["ran"]), _run["first_failure"]])
    with open(log, "a") as f:
        f.write(line + "\n")
