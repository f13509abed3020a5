"""`make mutants`: mutation testing of the lossless core with mutmut 3 (not part of CI).

What it mutates (TARGETS below): verification and sampling (`ascend_dspark/spec/{verify,
sampling}.py`, `ops/{verify,sampling}.py`, every function), the engine's step (the
engine's launch / finish / chain, the model runner's prefill and verify, the output
processor's commit) and the scheduler's plan (growth, admission, chunking, preemption),
and the drafters' propose / observe. What it runs against them: per mutant, the tests
tests/mutants/scope.py picks for its module, in its order, `-x` (verification and sampling:
their unit tests; the scheduler: its host-level plan tests, then a subset of the engine
tests; the engine: that subset, strongest per second first; the drafters: their unit tests,
then the subset), a test that hangs under a mutant failing after a per-test limit, within
mutmut's per-mutant CPU-time limit. FAST_TESTS (the union) is what mutmut's stats and clean
runs see. Every target: about 2000 mutants, 24 minutes of mutmut on the shared 2-core machine,
then 2-3 minutes of re-checking the claimed kills.

How:
- The files git tracks are copied, as they are in the working tree (so `git add` a new
  test file before the run), into `.mutmut/` (gitignored)
  and mutmut runs there, so its `mutants/` work directory and caches never touch the
  checkout another session may be testing in.
- mutmut 3 skips decorated functions, and every op entry point is `@dispatching(...)`
  and every drafter propose / observe `@torch.no_grad()`. In the copy, those decorator
  lines become comments and the same decorators are applied at the end of the module
  (`f = dispatching("op")(f)`): same behaviour, same line numbers, and mutmut mutates the
  bodies.
- Afterwards every surviving mutant (and every "no tests" / suspicious one) is written to
  `tests/mutants/survivors.md`, one line each: file:line, function, the mutation, and a
  verdict carried over from the previous file (matched on file, function and the changed
  text, not on line numbers): "killed by <test>" (the test added for it, in the selection
  or not, e.g. an NPU-double test; re-checked here by running that test against the
  mutant), "equivalent: <reason>" or "open: <reason>".
  A survivor with no verdict is UNEXPLAINED and the run exits 1.

Usage: `make mutants`, or `.venv/bin/python tests/mutants/run_mutants.py [--files PATH ...]
[--report-only]` (--files: only those source files; the ledger lines of the others stay).
Useful afterwards, inside `.mutmut/`: `../.venv/bin/mutmut show <mutant>`, and
`cd .mutmut/mutants && MUTANT_UNDER_TEST=<mutant> ../../.venv/bin/python -m pytest <test>`
runs one test against one mutant.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scope import ENGINE_TESTS, GRAPH_TESTS  # tests/mutants/scope.py, the pytest plugin

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / ".mutmut"
LEDGER = Path(__file__).with_name("survivors.md")
VENV_BIN = Path(sys.executable).parent
SEP = "\u01c1"                        # mutmut's class separator in mangled names: xǁClassǁmethod

# source file -> mutant-name globs inside that module ("*": every function)
TARGETS: dict[str, list[str]] = {
    "ascend_dspark/spec/verify.py": ["*"],
    "ascend_dspark/spec/sampling.py": ["*"],
    "ops/verify.py": ["*"],
    "ops/sampling.py": ["*"],
    "ascend_dspark/engine/engine.py": [f"x{SEP}Engine{SEP}{name}__mutmut_*" for name in (
        "step", "_launch", "_finish", "_chain")],
    # ModelRunner.verify (graph or eager dispatch) stays out, as Engine._verify did: its graph
    # branch is pinned by the CUDA and NPU-double graph tests, which the engine selection skips.
    "ascend_dspark/engine/runner.py": [f"x{SEP}ModelRunner{SEP}{name}__mutmut_*" for name in (
        "prefill", "verify_core")],
    "ascend_dspark/engine/output_processor.py": [f"x{SEP}OutputProcessor{SEP}commit__mutmut_*"],
    "ascend_dspark/engine/scheduler.py": [f"x{SEP}Scheduler{SEP}{name}__mutmut_*" for name in (
        "_grow_running", "grow_ahead", "_fill_prefill", "_chunk", "_preempt")],
    "ascend_dspark/drafters/dspark.py": [f"x{SEP}DSparkDrafter{SEP}sample_drafts__mutmut_*"],
    "ascend_dspark/drafters/dflash.py": [f"x{SEP}DFlashDrafter{SEP}sample_drafts__mutmut_*"],
    "ascend_dspark/drafters/eagle3.py": [f"x{SEP}Eagle3Drafter{SEP}propose__mutmut_*",
                                         f"x{SEP}Eagle3Drafter{SEP}observe__mutmut_*"],
    "ascend_dspark/drafters/block_backbone.py": [f"x{SEP}BlockDrafter{SEP}{name}__mutmut_*" for name in (
        "observe", "propose")],
}

# The fast selection (pytest arguments): the union of what scope.py lets each mutant run
# (ENGINE_TESTS and GRAPH_TESTS are its lists). New test files that match these globs join it.
FAST_TESTS = ["tests/spec", "tests/ops/test_ops_sampling.py", "tests/ops/test_*_mutants.py",
              "tests/drafters", *dict.fromkeys(t.split("::")[0] for t in ENGINE_TESTS + GRAPH_TESTS)]
# Left out of ENGINE_TESTS: the statistical engine tests (test_distribution,
# test_engine_sampling_power: seconds to minutes each; the spec-level tests check the same
# distributions in seconds) and the NPU-double end-to-end tests. The token-exactness tests
# run on the Llama-style target only (Qwen3 and Gemma3 change the target, not the engine,
# the drafters or the verifier).
SLOW_TESTS = [f"tests/engine/test_lossless.py::{test}[{arch}" for arch in ("qwen3", "gemma3") for test in (
    "test_plain_decoding_matches_transformers", "test_speculative_greedy_is_token_identical",
    "test_long_accepted_prefixes_stay_identical", "test_stops_on_eos_inside_an_accepted_block",
    "test_max_tokens_truncates_an_accepted_block")]
# every pytest run, stats, clean run and per-mutant runs alike
PYTEST_ARGS = ["-p", "no:cacheprovider", "-p", "tests.mutants.scope", "-m", "not slow and not cuda"] + [f"--deselect={t}" for t in SLOW_TESTS]

# Decorators mutmut would skip a function for; moved to the end of the module in the copy.
MOVABLE_DECORATOR = re.compile(r"^(?P<indent>\s*)@(?P<deco>dispatching\([^()]*\)|torch\.no_grad\(\)|"
                               r"torch\.inference_mode\(\))\s*$")


def log(msg: str) -> None:
    print(f"[mutants] {msg}", flush=True)


# ---------------------------------------------------------------- staging

def stage(files: list[str]) -> None:
    """Fresh copy of the working tree in WORK, decorators moved, mutmut's config written."""
    if WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir()
    # What git tracks, as it is in the working tree: untracked files are someone's work in
    # progress (`git add` a new test file to include it).
    listed = subprocess.run(["git", "ls-files", "-z", "--cached"],
                            cwd=REPO, check=True, capture_output=True).stdout.decode().split("\0")
    for rel in listed:
        if not rel or not rel.startswith(("ascend_dspark/", "ops/", "serving/", "tools/", "tests/")) and rel != "pyproject.toml":
            continue
        src = REPO / rel
        if not src.is_file():          # deleted in the working tree
            continue
        dst = WORK / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    for rel in files:
        path = WORK / rel
        path.write_text(move_decorators(path.read_text()))
    write_config(files)


def move_decorators(source: str) -> str:
    """Rewrite `@deco` + `def f` as a comment + `f = deco(f)` after the module (methods:
    `Cls.f = deco(Cls.f)`), keeping every line number."""
    lines = source.split("\n")
    tree = ast.parse(source)
    owners: dict[int, str] = {}              # def line -> qualified name
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            owners[node.lineno] = node.name
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    owners[item.lineno] = f"{node.name}.{item.name}"
    appended = []
    for i, line in enumerate(lines):
        m = MOVABLE_DECORATOR.match(line)
        if not m:
            continue
        j = i + 1
        while j < len(lines) and lines[j].lstrip().startswith("@"):
            j += 1
        name = owners.get(j + 1)
        if name is None:
            raise SystemExit(f"move_decorators: no def after decorator at line {i + 1}: {line!r}")
        lines[i] = f"{m['indent']}# (mutants staging) @{m['deco']} is applied after the module"
        appended.append(f"{name} = {m['deco']}({name})")
    if appended:
        lines += ["", "# (mutants staging) decorators moved out of the way of mutmut"] + appended + [""]
    return "\n".join(lines)


def fast_test_args() -> list[str]:
    out = []
    for pattern in FAST_TESTS:
        matches = sorted(str(p.relative_to(WORK)) for p in WORK.glob(pattern)) if "*" in pattern else [pattern]
        out += [m for m in matches if (WORK / m).exists()]
    return out


def write_config(files: list[str]) -> None:
    def lst(values):
        return "".join(f"\n    {v}" for v in values)

    cfg = ["[mutmut]",
           f"source_paths ={lst(['ascend_dspark', 'ops'])}",
           f"also_copy ={lst(['tools'])}",               # the NPU test double reads the contract tool
           f"only_mutate ={lst(files)}",
           f"pytest_add_cli_args ={lst(PYTEST_ARGS)}",
           f"pytest_add_cli_args_test_selection ={lst(fast_test_args())}",
           # A mutant times out after 5 * (its tests' time + 5 s) wall seconds. The tests'
           # time is measured without fixture setup and on a shared 2-core machine a
           # surviving mutant's run takes up to 4x it: tighter, and equivalent mutants
           # show up as (false) timeouts.
           "timeout_multiplier = 5.0",
           "timeout_constant = 5.0",
           "use_setproctitle = false",
           "use_git_change_detection = false",
           ""]
    (WORK / "setup.cfg").write_text("\n".join(cfg))


# ---------------------------------------------------------------- running

def mutant_globs(files: list[str]) -> list[str]:
    globs = []
    for rel in files:
        module = rel[:-3].replace("/", ".")
        globs += [f"{module}.{g}" for g in TARGETS[rel]]
    return globs


def run_mutmut(files: list[str], max_children: int, time_limit: int) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1",
               ASCEND_DSPARK_DEVICE="cpu", MUTANTS_SCOPE_LOG=str(WORK / "scope_log.tsv"))
    cmd = [str(VENV_BIN / "mutmut"), "run", "--max-children", str(max_children), *mutant_globs(files)]
    log(" ".join(cmd[1:]))
    try:
        return subprocess.run(cmd, cwd=WORK, env=env, timeout=time_limit).returncode
    except subprocess.TimeoutExpired:
        log(f"mutmut did not finish in {time_limit} s; reporting what it has")
        return 124


# ---------------------------------------------------------------- reporting

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped",
          36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", 37: "type check",
          None: "not checked", -11: "segfault", -9: "segfault"}
# Timeouts are listed too: a slow equivalent mutant times out just like a hanging one.
CAUGHT = {"killed"}


def mutant_status(files: list[str]) -> dict[str, tuple[str, str]]:
    """mutant name -> (source path, status) for the mutants named by TARGETS."""
    import fnmatch

    globs = mutant_globs(files)
    out = {}
    for rel in files:
        meta = WORK / "mutants" / (rel + ".meta")
        if not meta.exists():
            continue
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if any(fnmatch.fnmatch(name, g) for g in globs):
                out[name] = (rel, STATUS.get(code, "suspicious"))
    return out


def function_def_lines(path: Path) -> dict[str, int]:
    """mangled function name (x_f, xǁClsǁm) -> line of its `def` in the original source."""
    tree = ast.parse(path.read_text())
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[f"x_{node.name}"] = node.lineno
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    out[f"x{SEP}{node.name}{SEP}{item.name}"] = item.lineno
    return out


def describe(rel: str, name: str, def_lines: dict[str, int], spans: dict) -> dict:
    """file line, function and the changed text of one mutant."""
    mangled = name.rpartition(".")[2].partition("__mutmut_")[0]
    text = (WORK / "mutants" / rel).read_text().split("\n")

    def body(fn):
        start, end = spans[fn]
        return text[start - 1:end]

    plain = mangled.rpartition(SEP)[2] if SEP in mangled else mangled[2:]
    rename = re.compile(re.escape(mangled) + r"__mutmut_\w+")
    orig = [rename.sub(plain, x) for x in body(f"{mangled}__mutmut_orig")]
    mut = [rename.sub(plain, x) for x in body(name.rpartition(".")[2])]
    sm = difflib.SequenceMatcher(a=orig, b=mut, autojunk=False)
    first, old, new = None, [], []
    for tag, a0, a1, b0, b1 in sm.get_opcodes():
        if tag == "equal":
            continue
        first = a0 if first is None else first
        old += [x.strip() for x in orig[a0:a1]]
        new += [x.strip() for x in mut[b0:b1]]
    func = mangled[2:] if mangled.startswith("x_") else mangled[1:].replace(SEP, ".").strip(".")
    def_index = next(i for i, x in enumerate(orig) if x.lstrip().startswith(("def ", "async def ")))
    return dict(path=rel, line=def_lines[mangled] + (first or def_index) - def_index, func=func,
                old=" ".join(old) or "(nothing)", new=" ".join(new) or "(nothing)")


LEDGER_LINE = re.compile(r"^- `(?P<path>[^:`]+):(?P<line>\d+)` `(?P<func>[^`]+)`: ``(?P<old>.*?)`` -> ``(?P<new>.*?)``"
                         r" -- (?:\[(?P<status>[^\]]+)\] )?(?P<verdict>.*)$")


def key(d: dict) -> tuple:
    return d["path"], d["func"], d["old"], d["new"]


def read_ledger() -> list[dict]:
    if not LEDGER.exists():
        return []
    return [m.groupdict() for line in LEDGER.read_text().split("\n") if (m := LEDGER_LINE.match(line))]


def check_kills(claims: list[tuple[str, str]]) -> dict[tuple[str, str], bool]:
    """Run each claimed killing test against its mutant (one process, pytest.main per claim)."""
    if not claims:
        return {}
    script = (
        "import json, os, sys, pytest\n"
        "os.environ['MUTANTS_NO_SCOPE'] = '1'\n"
        "sys.path.insert(0, os.getcwd())\n"
        "out = {}\n"
        "for test, mutant in json.loads(sys.argv[1]):\n"
        "    os.environ['MUTANT_UNDER_TEST'] = mutant\n"
        f"    rc = pytest.main(['-x', '-q', '--no-header', '-p', 'no:randomly', *{PYTEST_ARGS!r}, test])\n"
        "    out[test + ' ' + mutant] = int(rc)\n"
        "print('KILLS ' + json.dumps(out))\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(claims)], cwd=WORK / "mutants", env=env,
                          capture_output=True, text=True)
    line = next((x for x in proc.stdout.split("\n") if x.startswith("KILLS ")), None)
    if line is None:
        log("could not check the claimed kills:\n" + proc.stdout[-3000:] + proc.stderr[-3000:])
        return {c: False for c in claims}
    rcs = json.loads(line[6:])
    return {(t, m): rcs[f"{t} {m}"] == 1 for t, m in claims}


def report(files: list[str], elapsed: float | None) -> int:
    status = mutant_status(files)
    if elapsed is None and (WORK / "run_seconds").exists():
        elapsed = float((WORK / "run_seconds").read_text())
    spans_cache, defs_cache, described = {}, {}, {}
    for name, (rel, st) in status.items():
        if rel not in spans_cache:
            spans_cache[rel] = json.loads((WORK / "mutants" / (rel + ".spans")).read_text())["spans"]
            defs_cache[rel] = function_def_lines(WORK / rel)
        described[name] = describe(rel, name, defs_cache[rel], spans_cache[rel]) | {"status": st, "name": name}

    old = read_ledger()
    verdicts = {key(e): e["verdict"] for e in old}
    by_key = {}
    for d in described.values():
        by_key.setdefault(key(d), []).append(d)

    entries, claims = [], []
    for d in described.values():                         # survivors and the like
        if d["status"] in CAUGHT:
            continue
        verdict = verdicts.get(key(d), "UNEXPLAINED")
        if verdict.startswith("killed by"):
            verdict = f"UNEXPLAINED (listed as {verdict}, but it survives)"
        entries.append(d | {"verdict": verdict})
    claimed = set()
    for e in old:                                        # earlier survivors, killed by a new test
        if not e["verdict"].startswith("killed by"):
            continue
        if e["path"] in files:
            if key(e) in claimed:                        # mutants with the same text: one pass lists them all
                continue
            claimed.add(key(e))
        now = by_key.get(key(e))
        if e["path"] not in files:
            entries.append(e)                            # not run this time: keep as it was
        elif now and all(d["status"] in CAUGHT for d in now):
            test = e["verdict"][len("killed by"):].strip().strip("`").split()[0]
            for d in now:
                claims.append((test, d["name"]))
                entries.append(d | {"verdict": e["verdict"], "claim": (test, d["name"])})
        elif not now:
            log(f"mutant gone (code changed?), dropping: {e['path']} {e['func']}: {e['old']} -> {e['new']}")
    for e in old:                                        # lines of files not run this time
        if e["path"] not in files and not e["verdict"].startswith("killed by"):
            entries.append(e)

    confirmed = check_kills(claims)
    for e in entries:
        if "claim" in e and not confirmed.get(e["claim"], False):
            e["verdict"] = f"UNEXPLAINED (listed as {e['verdict']}, but that test passes against it)"

    write_ledger(entries, status, files, elapsed)
    unexplained = [e for e in entries if e["verdict"].startswith("UNEXPLAINED")]
    counts = {}
    for rel, st in status.values():
        counts.setdefault(rel, {}).setdefault(st, 0)
        counts[rel][st] += 1
    for rel in files:
        log(f"{rel}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.get(rel, {}).items())))
    log(f"{len(entries)} ledger lines, {len(unexplained)} unexplained -> {LEDGER.relative_to(REPO)}")
    return 1 if unexplained else 0


def write_ledger(entries: list[dict], status: dict, files: list[str], elapsed: float | None) -> None:
    order = list(TARGETS)
    entries = sorted(entries, key=lambda e: (order.index(e["path"]) if e["path"] in order else 99, e["path"],
                                             int(e["line"]), e["old"], e["new"]))
    head = [
        "# Surviving mutants of the lossless core",
        "",
        "Written by `make mutants` (tests/mutants/run_mutants.py, mutmut 3). One line per mutant that",
        "the fast test selection did not kill: `file:line` `function`: ``original`` -> ``mutant`` --",
        "verdict. Verdicts are kept by hand and carried over between runs (matched on file, function",
        "and changed text): `killed by <test>` (a survivor of an earlier run, killed by the test added",
        "for it; each run re-checks that the test fails against the mutant), `equivalent: <reason>`",
        "(no test can tell), `open: <reason>`. UNEXPLAINED lines need a test or a verdict.",
        "",
    ]
    totals = {}
    for rel, st in status.values():
        totals[st] = totals.get(st, 0) + 1
    if status:
        head.append("Last run: " + ", ".join(f"{n} {s}" for s, n in sorted(totals.items()))
                    + (f" over {', '.join(files)}" if files != list(TARGETS) else " over every target")
                    + (f", {elapsed / 60:.1f} min." if elapsed else "."))
        head.append("")
    body, current = [], None
    for e in entries:
        if e["path"] != current:
            current = e["path"]
            body += ["", f"## {current}", ""]
        tag = f"[{e['status']}] " if e.get("status") not in (None, "survived", "killed") else ""
        body.append(f"- `{e['path']}:{e['line']}` `{e['func']}`: ``{e['old']}`` -> ``{e['new']}`` -- {tag}{e['verdict']}")
    LEDGER.write_text("\n".join(head + body).rstrip("\n") + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", nargs="*", default=None, help="source files to mutate (default: every target)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the ledger from the last run in .mutmut/")
    ap.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--time-limit", type=int, default=3000, help="seconds for the mutmut run itself")
    args = ap.parse_args()
    files = args.files or list(TARGETS)
    unknown = [f for f in files if f not in TARGETS]
    if unknown:
        raise SystemExit(f"not a target: {unknown}; targets: {list(TARGETS)}")
    elapsed = None
    if not args.report_only:
        t0 = time.monotonic()
        stage(files)
        rc = run_mutmut(files, args.max_children, args.time_limit)
        elapsed = time.monotonic() - t0
        (WORK / "run_seconds").write_text(f"{elapsed:.0f}\n")
        log(f"mutmut exited {rc} after {elapsed / 60:.1f} min")
        if rc not in (0, 124):
            return rc
    return report(files, elapsed)


if __name__ == "__main__":
    sys.exit(main())
