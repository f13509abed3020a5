"""Serving sweep in the style of `vllm bench serve`: streaming chat requests with real prompts
at several concurrency levels, speculation on and off, against a running server (`--url`)
or one this script starts (`--launch`).

    python benchmarks/serve_bench.py --launch --concurrency 1 4 16 64 --max-tokens 128 \\
        --out benchmarks/results/serving/h200.json -- --device cuda --max-num-seqs 64
    python benchmarks/serve_bench.py --url http://127.0.0.1:8000 --plain-url http://127.0.0.1:8001

Everything after `--` goes to `ascend-dspark serve` (started as `python -m serving.cli serve`
from this checkout, on a free loopback port, with this environment: fastapi and
uvicorn may come from a `pip install --target` directory on PYTHONPATH; the server's log
goes beside --out). `--plot JSON PNG` redraws a plot from a results file, `--combine A.json
B.json --out C.json` joins the results of several runs (e.g. one mode each).

Modes:
  spec    the server's speculation (its drafter; its policy, by default the confidence
          scheduler choosing each step's depth, 0 to K)
  fixed   a second server, the same flags plus `--speculation fixed` (K drafts every step;
          with `--url`, give it as `--fixed-url`)
  plain   plain decoding: a second server, the same flags plus `--drafter none` (`--launch`
          starts it after the first one stops; with `--url`, give it as `--plain-url`)
  nospec  the speculating server with `num_speculative_tokens: 0` on every request: no step
          drafts and the drafter does not run (a request capped at 0 never drafts), so this is
          plain decoding on the speculating server

For each mode and each concurrency C, `--num-prompts` prompts (default max(8, 4 C)) go out with at
most C in flight, each as soon as a slot frees (vLLM's `--max-concurrency` with an infinite
request rate), or, with `--request-rate`, arriving as a Poisson stream of that rate (one rate
for every level, or one per level) and waiting while C are in flight. The prompts are the first user turns of MT-Bench (or ShareGPT, GSM8K, a JSONL
file) through ascend_dspark.training.prompts, the same prefix of one seeded shuffle for
every mode and level. Greedy, `ignore_eos` by default, so every request generates exactly
`--max-tokens` tokens and the modes do the same work.

Per request, measured on this side from the stream: TTFT (send to first content chunk),
TPOT ((latency - TTFT) / (output tokens - 1)), ITL (the gaps between content chunks: with
speculation one chunk carries every token a verify step committed, as in vLLM), end-to-end
latency; output tokens from the final usage chunk. Per level: mean / p50 / p99 of each,
output and total tokens/s, requests/s, and goodput (requests/s meeting every SLO given with
`--slo-ttft-ms`, `--slo-tpot-ms`, `--slo-e2el-ms`). Speculation per level comes from the
server's GET /speculation before and after (mean accepted length, acceptance per position).

The HTTP client is the standard library's asyncio (one connection per request, chunked
transfer decoding, SSE parsing) and the statistics are plain Python, so the client needs
nothing beyond this checkout; only the plot needs matplotlib (without it the JSON is still
written, and `--plot` draws it later anywhere).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform as host
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODES = ("spec", "fixed", "eager_prefill", "plain", "nospec")
# Modes with a server of their own: the launch flags they add to the shared ones.
OWN_SERVER = {"plain": ["--drafter", "none"], "fixed": ["--speculation", "fixed"],
              "eager_prefill": ["--no-prefill-graphs"]}
LABELS = {"spec": "speculation on", "fixed": "speculation, fixed K (--speculation fixed)",
          "eager_prefill": "speculation, eager prefill (--no-prefill-graphs)",
          "plain": "plain decoding (--drafter none)",
          "nospec": "drafts discarded (num_speculative_tokens 0)"}


# -- a small streaming HTTP client ---------------------------------------------------------------
class HTTPError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status


async def _open(url: str):
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    reader, writer = await asyncio.open_connection(parts.hostname, port, ssl=ssl.create_default_context() if tls else None,
                                                   limit=1 << 20)
    return parts, reader, writer


async def post_events(url: str, body: dict, api_key: str | None):
    """POST `body` as JSON and yield (arrival time, event data) for each server-sent event."""
    parts, reader, writer = await _open(url)
    try:
        payload = json.dumps(body).encode()
        head = [f"POST {parts.path or '/'} HTTP/1.1", f"Host: {parts.netloc}", "Content-Type: application/json",
                f"Content-Length: {len(payload)}", "Accept: text/event-stream", "Connection: close"]
        if api_key:
            head.append(f"Authorization: Bearer {api_key}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if status != 200:
            raise HTTPError(status, (await _read_all(reader, headers, chunked)).decode(errors="replace"))
        buf = b""
        async for piece in _body(reader, headers, chunked):
            buf += piece.replace(b"\r\n", b"\n")
            while (end := buf.find(b"\n\n")) >= 0:
                block, buf = buf[:end], buf[end + 2:]
                data = b"\n".join(line[5:].lstrip(b" ") for line in block.split(b"\n") if line.startswith(b"data:"))
                if data:
                    yield time.perf_counter(), data.decode()
    finally:
        writer.close()


async def _body(reader, headers: dict, chunked: bool):
    if chunked:
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                return
            data = await reader.readexactly(size)
            await reader.readexactly(2)
            yield data
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while piece := await reader.read(1 << 16):
            yield piece


async def _read_all(reader, headers, chunked) -> bytes:
    return b"".join([piece async for piece in _body(reader, headers, chunked)])


def get_json(url: str, api_key: str | None = None, timeout: float = 10.0) -> dict:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


# -- one request, one level ----------------------------------------------------------------------
@dataclass
class Record:
    ok: bool = False
    error: str | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    mean_accepted_length: float | None = None
    verify_steps: int = 0

    @property
    def tpot(self) -> float | None:
        return (self.latency - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


async def one_request(url: str, model: str, messages: list[dict], args, speculate: bool) -> Record:
    body = {"model": model, "messages": messages, "max_tokens": args.max_tokens, "temperature": args.temperature,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": args.ignore_eos}
    if not speculate:
        body["num_speculative_tokens"] = 0
    rec = Record()
    start = last = time.perf_counter()
    first = None
    try:
        async for t, data in post_events(url + "/v1/chat/completions", body, args.api_key):
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(chunk["error"].get("message"))
            if any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                if first is None:
                    first = t
                else:
                    rec.itl.append(t - last)
                last = t
            if chunk.get("usage"):
                rec.prompt_tokens = chunk["usage"]["prompt_tokens"]
                rec.output_tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("speculation"):
                rec.mean_accepted_length = chunk["speculation"]["mean_accepted_length"]
                rec.verify_steps = chunk["speculation"]["num_verify_steps"]
        rec.latency = time.perf_counter() - start
        rec.ttft = (first if first is not None else time.perf_counter()) - start
        rec.ok = first is not None and rec.output_tokens > 0
        if not rec.ok:
            rec.error = "no content streamed"
    except Exception as exc:                      # a failed request is counted, not fatal
        rec.error = f"{type(exc).__name__}: {exc}"
    return rec


async def run_level(url: str, model: str, prompts: list[list[dict]], concurrency: int, args,
                    speculate: bool, rate: float = float("inf")) -> tuple[list[Record], float]:
    """Send `prompts` with at most `concurrency` in flight. `rate` (requests/s): arrivals as a
    Poisson stream (exponential gaps from a seeded generator, the same for every mode); a
    request that arrives while `concurrency` are in flight waits for a free one (vLLM's
    `--request-rate` with `--max-concurrency`); infinite: all arrive at once. Latencies count
    from the send, as vLLM's do."""
    gaps = random.Random(args.seed)
    arrivals, at = [], 0.0
    for _ in prompts:
        arrivals.append(at)
        if rate != float("inf"):
            at += gaps.expovariate(rate)
    limit = asyncio.Semaphore(concurrency)
    records: list[Record] = []
    t0 = time.perf_counter()

    async def arrive(messages, when: float):
        await asyncio.sleep(max(0.0, when - (time.perf_counter() - t0)))
        async with limit:
            records.append(await one_request(url, model, messages, args, speculate))

    await asyncio.gather(*(arrive(m, when) for m, when in zip(prompts, arrivals)))
    return records, time.perf_counter() - t0


def percentile(values: list[float], q: float) -> float:
    """numpy.percentile's default (linear interpolation between the closest ranks)."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(records: list[Record], duration: float, args) -> dict:
    ok = [r for r in records if r.ok]

    def stats(values: list[float]) -> dict:
        if not values:
            return {"mean": None, "p50": None, "p99": None}
        ms = [v * 1000.0 for v in values]
        return {"mean": sum(ms) / len(ms), "p50": percentile(ms, 50), "p99": percentile(ms, 99)}

    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    slos = {"ttft": args.slo_ttft_ms, "tpot": args.slo_tpot_ms, "e2el": args.slo_e2el_ms}

    def good(r: Record) -> bool:
        values = {"ttft": r.ttft * 1000, "tpot": (r.tpot or 0.0) * 1000, "e2el": r.latency * 1000}
        return all(limit is None or values[k] <= limit for k, limit in slos.items())

    steps = sum(r.verify_steps for r in ok if r.mean_accepted_length is not None)
    committed = sum(r.mean_accepted_length * r.verify_steps for r in ok if r.mean_accepted_length is not None)
    return {
        "completed": len(ok), "failed": len(records) - len(ok),
        "errors": sorted({r.error for r in records if r.error})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + in_tokens) / duration,
        "total_output_tokens": out_tokens, "total_input_tokens": in_tokens,
        "ttft_ms": stats([r.ttft for r in ok]),
        "tpot_ms": stats([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": stats([x for r in ok for x in r.itl]),
        "e2el_ms": stats([r.latency for r in ok]),
        "goodput": sum(1 for r in ok if good(r)) / duration,
        "mean_accepted_length_requests": committed / steps if steps else None,
    }


def speculation_delta(before: dict | None, after: dict | None) -> dict:
    """What the server's /speculation counters gained over one level."""
    if not before or not after:
        return {}
    d = {k: after[k] - before[k] for k in ("num_verify_steps", "num_drafts", "num_draft_tokens",
                                          "num_accepted_tokens", "generation_tokens")}
    committed = (after["mean_accepted_length"] * after["num_verify_steps"]
                 - before["mean_accepted_length"] * before["num_verify_steps"])
    reached = [a - b for a, b in zip(after["position_reached"], before["position_reached"])]
    accepted = [a - b for a, b in zip(after["position_accepted"], before["position_accepted"])]
    d["mean_accepted_length"] = committed / d["num_verify_steps"] if d["num_verify_steps"] else None
    if after.get("drafter_sleeps") is not None and before.get("drafter_sleeps") is not None:
        d["drafter_sleeps"] = after["drafter_sleeps"] - before["drafter_sleeps"]
    d["acceptance_per_position"] = [a / r if r else 0.0 for a, r in zip(accepted, reached)]
    if "verify_length_counts" in after:
        d["verify_length_counts"] = [a - b for a, b in zip(after["verify_length_counts"],
                                                           before.get("verify_length_counts", []) + [0] * 64)]
    return d


# -- prompts -------------------------------------------------------------------------------------
def load_messages(dataset: str, n: int, seed: int, max_chars: int) -> tuple[list[list[dict]], str]:
    from ascend_dspark.training import prompts as P

    if dataset.endswith(".jsonl"):
        items, used = P.read_prompts(dataset), dataset
    else:
        try:
            items, used = P.load_prompts(dataset), dataset
        except FileNotFoundError as exc:       # the prompt package is not installed here
            print(f"note: {dataset} unavailable ({exc}); using gsm8k-test (ships with the package)", file=sys.stderr)
            items, used = P.load_prompts("gsm8k-test"), "gsm8k-test"
    items = [p for p in items if len(p.text) <= max_chars]
    random.Random(seed).shuffle(items)
    if not items:
        raise SystemExit(f"no prompt of {used} is at most {max_chars} characters long")
    return [list(items[i % len(items)].messages) for i in range(n)], used


# -- launching a server --------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(server_args: list[str], log_path: Path, timeout: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "-m", "serving.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", *server_args]
    print("launching:", " ".join(cmd), f"(log: {log_path})", file=sys.stderr)
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} while starting:\n"
                             f"{log_path.read_text(errors='replace')[-3000:]}")
        try:
            get_json(url + "/health", timeout=2)
            return proc, url
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop(proc)
            raise SystemExit(f"the server did not come up within {timeout} s; see {log_path}")
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the sweep -----------------------------------------------------------------------------------
def machine() -> str:
    cpu = host.processor() or host.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores visible, {host.system()} {host.release()}"


def sweep(args, server_args: list[str], command: str) -> dict:
    groups = []                      # (modes, url, server flags): one server each
    shared = [m for m in args.modes if m not in OWN_SERVER]
    if shared:
        groups.append((shared, args.url, server_args))
    for mode in (m for m in args.modes if m in OWN_SERVER):
        url = {"plain": args.plain_url, "fixed": args.fixed_url}.get(mode)
        groups.append(([mode], url, [*server_args, *OWN_SERVER[mode]]))
    results, servers, meta = [], {}, {}
    for modes, url, flags in groups:
        proc = None
        if args.launch:
            stem = args.out.with_suffix("") if args.out else Path("serve_bench")
            log_path = Path(f"{stem}.{modes[0] if modes[0] in OWN_SERVER else 'spec'}.server.log")
            log_path.parent.mkdir(parents=True, exist_ok=True)
            proc, url = launch(flags, log_path, args.launch_timeout)
        url = url.rstrip("/")
        try:
            version = get_json(url + "/version")
            model = get_json(url + "/v1/models", args.api_key)["data"][0]["id"]
            most = max(_num_prompts(args, c) for c in args.concurrency)
            prompts, dataset = load_messages(args.dataset, most, args.seed, args.max_prompt_chars)
            print(f"server {url}: {model}, drafter {version.get('drafter')} (K={version.get('num_speculative_tokens')}),"
                  f" {version.get('device')}; prompts: {dataset}", file=sys.stderr)
            meta.setdefault("model", model)
            meta.setdefault("dataset", dataset)
            for mode in modes:
                servers[mode] = {**version, "url": None if args.launch else url,
                                 "launched_with": flags if args.launch else None}
                speculate = mode in ("spec", "fixed", "eager_prefill")
                if args.warmup:
                    asyncio.run(run_level(url, model, prompts[:args.warmup], 1, args, speculate))
                for c, rate in zip(args.concurrency, _rates(args)):
                    n = _num_prompts(args, c)
                    before, gc_before = _speculation(url), _gc_pauses(url)
                    records, duration = asyncio.run(run_level(url, model, prompts[:n], c, args, speculate, rate))
                    after = _speculation(url)
                    row = {"mode": mode, "concurrency": c, "request_rate": None if rate == float("inf") else rate,
                           "num_prompts": n, **summarize(records, duration, args),
                           "server_speculation": speculation_delta(before, after),
                           "server_step_costs": (after or {}).get("step_costs"),   # what the policy saw, after it
                           "server_gc": gc_delta(gc_before, _gc_pauses(url))}
                    results.append(row)
                    print(f"{mode:6s} C={c:3d} n={n:4d}: {row['output_throughput']:8.1f} out tok/s, "
                          f"{row['request_throughput']:6.2f} req/s, TTFT p50 {_ms(row['ttft_ms']['p50'])}, "
                          f"TPOT p50 {_ms(row['tpot_ms']['p50'])}, ITL p99 {_ms(row['itl_ms']['p99'])}, "
                          f"goodput {row['goodput']:.2f} req/s, "
                          f"tau {_f(row['server_speculation'].get('mean_accepted_length'))}, failed {row['failed']}"
                          + (f", drafter slept {row['server_speculation']['drafter_sleeps']}x"
                             if row["server_speculation"].get("drafter_sleeps") else "")
                          + "".join(f", gc{g} {d['collections']}x {1e3 * d['seconds']:.0f} ms"
                                    for g, d in sorted(row["server_gc"].items()) if d["collections"]),
                          file=sys.stderr)
        finally:
            if proc is not None:
                stop(proc)
    return {
        "meta": {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
                 "python": sys.version.split()[0], "commands": [command], **meta, "servers": servers,
                 "max_tokens": args.max_tokens, "temperature": args.temperature, "ignore_eos": args.ignore_eos,
                 "slo_ms": {"ttft": args.slo_ttft_ms, "tpot": args.slo_tpot_ms, "e2el": args.slo_e2el_ms}},
        "results": results,
    }


def _rates(args) -> list[float]:
    """One Poisson arrival rate per concurrency level (one given: the same for all)."""
    rates = args.request_rate or [float("inf")]
    if len(rates) == 1:
        rates = rates * len(args.concurrency)
    if len(rates) != len(args.concurrency):
        raise SystemExit(f"--request-rate: give one rate or one per concurrency level ({len(args.concurrency)})")
    return rates


def _num_prompts(args, c: int) -> int:
    return args.num_prompts or max(args.min_prompts, args.prompts_per_concurrency * c)


def combine(paths: list[Path]) -> dict:
    """Several runs' results as one (the first run's settings; every run's command)."""
    runs = [json.loads(p.read_text()) for p in paths]
    meta = dict(runs[0]["meta"])
    meta["commands"] = [c for r in runs for c in r["meta"].get("commands", [])]
    meta["servers"] = {k: v for r in runs for k, v in r["meta"].get("servers", {}).items()}
    meta["dates"] = [r["meta"]["date"] for r in runs]
    return {"meta": meta, "results": [row for r in runs for row in r["results"]]}


def _speculation(url: str) -> dict | None:
    try:
        return get_json(url + "/speculation")
    except (OSError, ValueError):
        return None                                 # another server without it: no server-side numbers


def _gc_pauses(url: str) -> dict[str, list[float]]:
    """The server's cyclic-GC collections so far, {generation: [count, seconds]} (empty for a
    server without ascend_dspark:gc_pause_seconds): each one stalls the engine loop."""
    try:
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
    except (ImportError, OSError, ValueError):
        return {}
    out: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("ascend_dspark:gc_pause_seconds_count", "ascend_dspark:gc_pause_seconds_sum"):
                pair = out.setdefault(sample.labels["generation"], [0.0, 0.0])
                pair[sample.name.endswith("_sum")] = sample.value
    return out


def gc_delta(before: dict, after: dict) -> dict:
    """Collections and their seconds per generation over one level."""
    return {g: {"collections": int(after[g][0] - before.get(g, [0, 0])[0]),
                "seconds": after[g][1] - before.get(g, [0, 0])[1]} for g in after}


def _ms(x) -> str:
    return "-" if x is None else f"{x:7.1f} ms"


def _f(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["results"]
    meta = results["meta"]
    panels = [("output_throughput", None, "output tokens/s"), ("ttft_ms", "p50", "TTFT p50 (ms)"),
              ("tpot_ms", "p50", "TPOT p50 (ms)"), ("itl_ms", "p99", "ITL p99 (ms)"),
              ("request_throughput", None, "requests/s"), ("e2el_ms", "p50", "request latency p50 (ms)"),
              ("e2el_ms", "p99", "request latency p99 (ms)"), ("goodput", None, "goodput (requests/s within SLO)")]
    fig, axes = plt.subplots(2, 4, figsize=(17, 7))
    styles = {"spec": ("#e8713c", "-"), "fixed": ("#c9a227", "-."), "eager_prefill": ("#8e5bb5", ":"),
              "plain": ("#5b7fb5", "-"),
              "nospec": ("#9a9a9a", "--")}
    for ax, (key, sub, label) in zip(axes.flat, panels):
        for mode in MODES:
            pts = [(r["concurrency"], r[key][sub] if sub else r[key]) for r in rows if r["mode"] == mode]
            pts = [(c, v) for c, v in pts if v is not None]
            if pts:
                color, line = styles[mode]
                ax.plot(*zip(*pts), marker="o", color=color, linestyle=line, label=LABELS[mode])
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["concurrency"] for r in rows}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("concurrency")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    axes.flat[0].legend(fontsize=8)
    slo = ", ".join(f"{k}<={v:g} ms" for k, v in meta["slo_ms"].items() if v is not None) or "none"
    servers = meta.get("servers") or {}
    srv = servers.get("spec") or next(iter(servers.values()), {})
    rates = sorted({(r["concurrency"], r.get("request_rate") or float("inf")) for r in rows})
    arrivals = ("Poisson arrivals " + ", ".join(f"{rate:g}/s at C={c}" for c, rate in rates)
                if any(rate != float("inf") for _, rate in rates) else "all requests at once")
    fig.suptitle(f"{meta['model']} + {srv.get('drafter')} (K={srv.get('num_speculative_tokens')}) on "
                 f"{srv.get('device')}: {meta['dataset']}, {meta['max_tokens']} tokens/request, {arrivals}, SLO {slo}\n"
                 f"{meta['machine']}, {meta['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    server_args = []
    if "--" in argv:
        i = argv.index("--")
        argv, server_args = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--launch", action="store_true", help="start `ascend-dspark serve` (flags after --)")
    parser.add_argument("--plain-url", help="with --url: a server of the same model with --drafter none (mode plain)")
    parser.add_argument("--fixed-url", help="with --url: a server of the same model with --speculation fixed (mode fixed)")
    parser.add_argument("--launch-timeout", type=float, default=900.0, help="seconds to wait for /health")
    parser.add_argument("--api-key", default=os.environ.get("ASCEND_DSPARK_SERVE_API_KEY"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--request-rate", type=float, nargs="+", default=None,
                        help="Poisson arrivals, requests/s: one rate, or one per --concurrency level (default: all at once)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["spec", "plain", "nospec"])
    parser.add_argument("--num-prompts", type=int, default=None, help="per level (default: max(MIN, PER * C))")
    parser.add_argument("--min-prompts", type=int, default=8)
    parser.add_argument("--prompts-per-concurrency", type=int, default=4)
    parser.add_argument("--dataset", default="mtbench",
                        help="mtbench | sharegpt | gsm8k-test | humaneval | a JSONL of save_prompts (default mtbench)")
    parser.add_argument("--max-prompt-chars", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                        help="let requests stop at EOS (default: exactly --max-tokens each)")
    parser.add_argument("--warmup", type=int, default=2, help="requests before each mode, not measured")
    parser.add_argument("--slo-ttft-ms", type=float, default=None)
    parser.add_argument("--slo-tpot-ms", type=float, default=None)
    parser.add_argument("--slo-e2el-ms", type=float, default=None)
    parser.add_argument("--out", type=Path, default=None, help="results JSON (the plot goes beside it as .png)")
    parser.add_argument("--plot", type=Path, nargs=2, metavar=("RESULTS_JSON", "PNG"), default=None)
    parser.add_argument("--combine", type=Path, nargs="+", metavar="RESULTS_JSON", default=None,
                        help="join these results files into --out (and its plot)")
    args = parser.parse_args(argv)
    if args.plot:
        plot(json.loads(args.plot[0].read_text()), args.plot[1])
        return 0
    if args.combine:
        if not args.out:
            parser.error("--combine needs --out")
        results = combine(args.combine)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        plot(results, args.out.with_suffix(".png"))
        return 0
    if not args.url and not args.launch:
        parser.error("give --url of a running server or --launch")
    if args.url and "fixed" in args.modes and not args.fixed_url:
        parser.error("mode fixed against --url needs --fixed-url (a server with --speculation fixed)")
    if args.url and "plain" in args.modes and not args.plain_url:
        parser.error("mode plain against --url needs --plain-url (a server with --drafter none), "
                     "or leave it out: --modes spec nospec")
    if args.url and "eager_prefill" in args.modes:
        parser.error("mode eager_prefill starts a server of its own: use --launch")
    if server_args and not args.launch:
        parser.error("server flags after -- need --launch")
    command = " ".join(["python", "benchmarks/serve_bench.py", *sys.argv[1:]])
    results = sweep(args, server_args, command)
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
        try:
            plot(results, args.out.with_suffix(".png"))
            print(f"wrote {args.out.with_suffix('.png')}", file=sys.stderr)
        except ImportError as exc:
            print(f"no plot ({exc}): draw it elsewhere with --plot {args.out} OUT.png", file=sys.stderr)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
