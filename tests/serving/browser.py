"""Headless Chromium driven over the Chrome DevTools Protocol, standard library only.

Chromium's `--remote-debugging-pipe` speaks CDP over two inherited descriptors (3: commands
in, 4: replies and events out), each message one JSON text ended by a NUL byte, so no
websocket client and no port are needed. `Browser` starts Chromium, opens one page and
offers `call` (a command, waiting for its reply), `evaluate` (JavaScript in the page) and
`wait_for` (poll an expression until it is truthy). Console errors, uncaught exceptions and
log entries (a Content-Security-Policy violation is one) are collected in `problems`.

`chromium_path()` is None where Debian's `chromium` package is not installed; the page test
skips then.

Run as a script it drives a running server's page once and writes a screenshot:

    python -m tests.serving.browser http://127.0.0.1:8000 "Name three primes." out.png [API_KEY]
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

WIDTH, HEIGHT = 1400, 860


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class CDPError(RuntimeError):
    pass


def _high(fd: int) -> int:
    """`fd` moved to a descriptor >= 10 (so the shell's redirections cannot collide with it)."""
    import fcntl

    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class Browser:
    def __init__(self, executable: str | None = None, timeout: float = 30.0) -> None:
        executable = executable or chromium_path()
        if executable is None:
            raise FileNotFoundError("chromium is not installed (apt-get install -y chromium)")
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="cdp-profile-")
        cmd_r, self._cmd_w = os.pipe()          # we write commands, Chromium reads fd 3
        self._out_r, out_w = os.pipe()          # Chromium writes fd 4, we read
        cmd_r, out_w = _high(cmd_r), _high(out_w)   # never 3 or 4 themselves
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--mute-audio",
                "--hide-scrollbars", f"--window-size={WIDTH},{HEIGHT}", f"--user-data-dir={self.profile}",
                "about:blank"]
        # bash moves our two pipe ends onto descriptors 3 and 4, then becomes Chromium.
        script = f'exec "$0" "$@" 3<&{cmd_r} 4>&{out_w} {cmd_r}<&- {out_w}>&-'
        self.proc = subprocess.Popen(["bash", "-c", script, executable, *args], pass_fds=(cmd_r, out_w),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        os.close(cmd_r)
        os.close(out_w)
        self._next_id = 0
        self._replies: dict[int, queue.Queue] = {}
        self._lock = threading.Lock()
        self.events: list[dict] = []
        self.problems: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.session: str | None = None
        try:
            target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
            self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                     session=False)["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                self.call(f"{domain}.enable")
            self.call("Emulation.setDeviceMetricsOverride",
                      {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False})
        except BaseException:
            self.close()
            raise

    # -- protocol ---------------------------------------------------------------------------
    def _read(self) -> None:
        buf = b""
        with os.fdopen(self._out_r, "rb", buffering=0) as f:
            while True:
                chunk = f.read(1 << 16)
                if not chunk:
                    break
                buf += chunk
                while b"\0" in buf:
                    raw, buf = buf.split(b"\0", 1)
                    self._dispatch(json.loads(raw))
        with self._lock:                      # Chromium is gone: wake every waiter
            for q in self._replies.values():
                q.put({"error": {"message": "chromium closed the pipe"}})

    def _dispatch(self, msg: dict) -> None:
        if "id" in msg:
            with self._lock:
                q = self._replies.get(msg["id"])
            if q is not None:
                q.put(msg)
            return
        self.events.append(msg)
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.problems.append("exception: " + str(details.get("exception", {}).get("description")
                                                    or details.get("text")))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.problems.append("console.error: " + " ".join(str(a.get("value", a.get("description", "")))
                                                              for a in params.get("args", [])))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self.problems.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}")

    def call(self, method: str, params: dict | None = None, session: bool = True, timeout: float | None = None) -> dict:
        with self._lock:
            self._next_id += 1
            mid = self._next_id
            q = self._replies[mid] = queue.Queue()
        msg = {"id": mid, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        try:
            reply = q.get(timeout=timeout or self.timeout)
        except queue.Empty:
            raise CDPError(f"no reply to {method} within {timeout or self.timeout} s") from None
        finally:
            with self._lock:
                self._replies.pop(mid, None)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    # -- page helpers -----------------------------------------------------------------------
    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise CDPError(f"{expression!r} raised: {details.get('exception', {}).get('description') or details}")
        return result.get("result", {}).get("value")

    def navigate(self, url: str) -> None:
        result = self.call("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CDPError(f"navigating to {url}: {result['errorText']}")

    def wait_for(self, expression: str, timeout: float = 30.0, interval: float = 0.05):
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression!r} still falsy after {timeout} s")
            time.sleep(interval)

    def screenshot(self, path: str | Path) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        path = Path(path)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("Browser.close", session=False, timeout=5)
            except (CDPError, OSError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            os.close(self._cmd_w)
        except OSError:
            pass
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- the page's own steps, shared by the test and the screenshot script -------------------------
WATCH_REPLY = """(() => {
  window.__updates = 0;
  new MutationObserver((records) => {
    for (const r of records) {
      const msg = r.target.nodeType === 1 ? r.target.closest('.message.assistant') : r.target.parentElement?.closest('.message.assistant');
      if (msg) window.__updates += 1;
    }
  }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
  return true;
})()"""


def type_into(browser: Browser, element_id: str, text: str) -> None:
    """Set an input's value and fire the `input` event, as typing would."""
    browser.evaluate(f"(() => {{ const el = document.getElementById({json.dumps(element_id)}); "
                     f"el.value = {json.dumps(text)}; el.dispatchEvent(new Event('input', {{bubbles: true}})); "
                     f"return true; }})()")


def ask(browser: Browser, prompt: str, api_key: str | None = None, max_tokens: int | None = None,
        timeout: float = 120.0) -> dict:
    """Type `prompt` (and the API key, if given) into the loaded page, send it, wait for the
    reply to finish; returns what the page shows."""
    if api_key:
        type_into(browser, "api-key", api_key)
    if max_tokens:
        type_into(browser, "max-tokens", str(max_tokens))
    browser.evaluate(WATCH_REPLY)
    type_into(browser, "prompt", prompt)
    browser.evaluate("document.getElementById('chat-form').requestSubmit(), true")
    browser.wait_for("document.body.dataset.state === 'done' || document.body.dataset.state === 'error'",
                     timeout=timeout)
    # the poll after the reply refreshes the server-side numbers; wait for it to land
    browser.wait_for("document.getElementById('stat-server-tau').textContent !== '\u2013'", timeout=10)
    return browser.evaluate("""(() => {
      const last = [...document.querySelectorAll('.message.assistant')].pop();
      const chart = document.getElementById('acceptance-chart');
      const ctx = chart.getContext('2d');
      const px = ctx.getImageData(0, 0, chart.width, chart.height).data;
      const colors = {};
      for (let i = 0; i < px.length; i += 4) {
        const key = px[i] + ',' + px[i + 1] + ',' + px[i + 2] + ',' + px[i + 3];
        colors[key] = (colors[key] || 0) + 1;
      }
      return {
        state: document.body.dataset.state,
        error: document.getElementById('error').hidden ? null : document.getElementById('error').textContent,
        reply: last ? last.querySelector('.content').textContent : null,
        meta: last && last.querySelector('.meta') ? last.querySelector('.meta').textContent : null,
        updates: window.__updates,
        stats: Object.fromEntries([...document.querySelectorAll('.stat .value')].map(e => [e.id, e.textContent])),
        bars: Number(chart.dataset.bars), positions: Number(chart.dataset.positions),
        values: JSON.parse(chart.dataset.values || 'null'),
        axis_pixels: colors['91,98,112,255'] || 0,
        reply_color_pixels: colors['232,113,60,255'] || 0, server_color_pixels: colors['138,164,200,255'] || 0,
        storage: localStorage.length + sessionStorage.length + document.cookie.length,
      };
    })()""")


def main(argv: list[str]) -> int:
    url, prompt, out = argv[:3]
    api_key = argv[3] if len(argv) > 3 else None
    with Browser() as browser:
        browser.navigate(url)
        browser.wait_for("document.body && document.body.dataset.state === 'idle'", timeout=30)
        result = ask(browser, prompt, api_key, timeout=300)
        time.sleep(1.5)                       # a few polls for the tokens/s line
        browser.screenshot(out)
        print(json.dumps(result, indent=2))
        if browser.problems:
            print("problems:", *browser.problems, sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
