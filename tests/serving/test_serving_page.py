"""The built-in page at GET /, served by a real uvicorn process (the tiny model, an API key
configured), first as plain HTTP (files, headers, nothing else reachable), then in headless
Chromium over the DevTools protocol (tests/serving/browser.py): the page loads without a
script error or a Content-Security-Policy violation, notices that the server needs a key,
takes one typed into it, streams a reply in several pieces that is exactly what the API
answers for the same request, and draws the acceptance chart from the numbers the server
reports.

The browser test skips where Debian's `chromium` is not installed (`apt-get install -y
chromium`; .ci/run installs it). Set ASCEND_DSPARK_UPDATE_SCREENSHOT=1 to copy the
screenshot it takes over serving/static/screenshot.png (the committed one was taken with
the default model, `python -m tests.serving.browser`).
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from tests.serving.browser import Browser, ask, chromium_path
from tests.serving.server_process import (
    API_KEY,
    MAX_MODEL_LEN,
    REPO,
    running_server,
    server_env,
)

PROMPT = "hi"                 # the tiny random draft gets a few tokens of its reply accepted
MAX_TOKENS = 32
K = 7


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    # K drafts every step: the page's request and the API's repeat of it must speculate alike
    # (under the confidence policy the second one's depths depend on what the first taught it).
    env = server_env(tiny_model_dir, max_model_len=MAX_MODEL_LEN, max_num_seqs=4, api_key=API_KEY,
                     served_model_name="tiny", num_speculative_tokens=K, speculation="fixed")
    with running_server(env, tmp_path_factory.mktemp("log") / "server.log") as srv:
        yield srv
    assert "Traceback" not in srv.log(), srv.log()[-4000:]


def test_page_and_its_files_are_served_without_a_key(server):
    status, headers, body = server.request("GET", "/", auth=False)
    assert status == 200 and headers["content-type"].startswith("text/html")
    html = body.decode()
    assert '<script src="/static/app.js"' in html and 'href="/static/style.css"' in html
    assert "http://" not in html and "https://" not in html          # nothing from elsewhere
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        status, headers, body = server.request("GET", f"/static/{name}", auth=False)
        assert status == 200 and headers["content-type"].startswith(kind) and body
    for path in ("/static/index.html", "/static/screenshot.png", "/static/..%2Fpage.py", "/static/../page.py",
                 "/static/%2e%2e/config.py", "/static/"):
        status, _, body = server.request("GET", path, auth=False)
        assert status == 404, (path, status)
        assert json.loads(body)["error"]["type"] == "not_found_error"
    # the page is not part of the API's schema
    status, schema = server.json("GET", "/openapi.json", auth=False)
    assert "/" not in schema["paths"] and not any(p.startswith("/static") for p in schema["paths"])
    assert "/speculation" in schema["paths"]


def test_speculation_endpoint_sums_what_responses_report(server):
    status, before = server.json("GET", "/speculation", auth=False)       # open, like /metrics
    assert status == 200 and before["num_speculative_tokens"] == K and len(before["acceptance_per_position"]) == K
    client = server.client()
    got = [client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}], max_tokens=20,
                                          temperature=0, n=2).speculation
           for p in ("one", "two two")]
    server.wait_idle()
    status, after = server.json("GET", "/speculation", auth=False)
    for key in ("num_verify_steps", "num_drafts", "num_draft_tokens", "num_accepted_tokens"):
        assert after[key] - before[key] == sum(s[key] for s in got), key
    reached = [a - b for a, b in zip(after["position_reached"], before["position_reached"])]
    accepted = [a - b for a, b in zip(after["position_accepted"], before["position_accepted"])]
    assert reached[0] == after["num_drafts"] - before["num_drafts"]     # position 1 is reached by every draft
    assert all(0 <= a <= r for a, r in zip(accepted, reached))
    assert sum(accepted) == after["num_accepted_tokens"] - before["num_accepted_tokens"]
    assert after["generation_tokens"] - before["generation_tokens"] >= 4 and after["tokens_per_second"] > 0
    assert after["running"] == 0 and after["waiting"] == 0


@pytest.mark.skipif(chromium_path() is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_page_streams_a_reply_and_draws_the_chart_in_headless_chromium(server, tmp_path):
    t0 = time.monotonic()
    with Browser() as browser:
        browser.navigate(server.url + "/")
        browser.wait_for("document.body && document.body.dataset.state === 'idle'", timeout=30)
        info = browser.evaluate("document.getElementById('server-info').textContent")
        assert "tiny" in info and f"K = {K}" in info
        # /v1/models answered 401: the page asks for the key
        browser.wait_for("document.getElementById('key-label').classList.contains('needed')", timeout=10)
        page = ask(browser, PROMPT, api_key=API_KEY, max_tokens=MAX_TOKENS)
        time.sleep(1.2)                          # one more poll draws the tokens/s line
        shot = browser.screenshot(tmp_path / "page.png")
        tps_drawn = browser.evaluate("""(() => { const c = document.getElementById('tps-chart');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
            for (let i = 0; i < d.length; i += 4) if (d[i] === 232 && d[i + 1] === 113 && d[i + 2] === 60) n++;
            return n; })()""")
        problems = list(browser.problems)
    elapsed = time.monotonic() - t0

    assert page["state"] == "done" and page["error"] is None, page
    # no script error, no CSP violation, no 404; the one 401 is the page's probe for a key
    assert [p for p in problems if not ("401" in p and p.endswith("/v1/models"))] == [], problems
    assert len(problems) == 1, problems
    assert page["storage"] == 0                            # the key stays in memory
    # the reply streamed in pieces, and it is what the API answers for the same request
    want = server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                                   max_tokens=MAX_TOKENS, temperature=0)
    assert page["reply"] == want.choices[0].message.content and page["reply"]
    assert page["updates"] >= 2, page
    assert f"{want.usage.completion_tokens} tokens" in page["meta"]
    assert page["stats"]["stat-tau"] == f"{want.speculation['mean_accepted_length']:.2f}"
    # the chart: K positions, one bar per non-zero rate, of both series, as the server reports them
    values = page["values"]
    assert page["positions"] == K and page["axis_pixels"] > 0
    assert values["reply"] == pytest.approx(want.speculation["acceptance_per_position"])
    nonzero = {s: sum(1 for v in values[s] if v > 0) for s in ("server", "reply")}
    assert page["bars"] == nonzero["server"] + nonzero["reply"]
    assert (page["server_color_pixels"] > 0) == (nonzero["server"] > 0)
    assert (page["reply_color_pixels"] > 0) == (nonzero["reply"] > 0)
    assert nonzero["reply"] > 0, "PROMPT was chosen so that the tiny random draft gets some tokens accepted"
    assert tps_drawn > 0
    assert shot.stat().st_size > 10_000
    if os.environ.get("ASCEND_DSPARK_UPDATE_SCREENSHOT") == "1":
        shutil.copy(shot, REPO / "serving" / "static" / "screenshot.png")
    assert elapsed < 60
