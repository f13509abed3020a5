// The built-in page of ascend-dspark's server: a chat that streams from /v1/chat/completions
// (server-sent events, parsed here) and the live speculation picture from /speculation.
// Plain browser JavaScript, no libraries. The API key, when the server needs one, lives in
// `state.apiKey` only: never in storage, cookies or the URL. Model text is only ever set
// with textContent.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const POLL_MS = 1000;
  const POLL_STREAMING_MS = 400;
  const TPS_HISTORY_S = 60;
  const COLORS = { server: "#8aa4c8", reply: "#e8713c", grid: "#e3e6eb", axis: "#5b6270", text: "#2b303a" };

  const state = {
    apiKey: "",
    model: null,
    k: 0,
    messages: [],            // the conversation sent with every request
    conversation: 0,         // bumped by "New chat": a reply to an older one is not kept
    controller: null,        // AbortController of the reply streaming now
    reply: null,             // speculation of the last finished reply
    server: null,            // last /speculation answer
    tps: [],                 // [seconds since page load, server tokens/s]
    polling: false,
    t0: performance.now(),
  };

  function setState(s) { document.body.dataset.state = s; }

  function authHeaders() {
    const h = { "Content-Type": "application/json" };
    if (state.apiKey) h.Authorization = "Bearer " + state.apiKey;
    return h;
  }

  function showError(message) {
    const el = $("error");
    el.textContent = message;
    el.hidden = !message;
  }

  function needKey(message) {
    $("key-label").classList.add("needed");
    $("api-key").focus();
    showError(message || "This server needs an API key: paste it at the top right.");
  }

  async function errorMessage(resp) {
    try {
      const body = await resp.json();
      if (body && body.error && body.error.message) return `${resp.status}: ${body.error.message}`;
    } catch (e) { /* not JSON */ }
    return `${resp.status} ${resp.statusText}`;
  }

  // -- server info ------------------------------------------------------------------------
  async function loadInfo() {
    try {
      const resp = await fetch("/version");
      const v = await resp.json();
      state.model = v.model;
      state.k = v.num_speculative_tokens;
      $("server-info").textContent =
        `${v.model} \u00b7 drafter ${v.drafter} (K = ${v.num_speculative_tokens}) \u00b7 ${v.device} \u00b7 v${v.version}`;
      if (!state.k) $("speculate").disabled = true;      // no drafter: nothing to switch
    } catch (e) {
      showError("Cannot reach the server: " + e.message);
      setState("error");
      return;
    }
    try {
      const resp = await fetch("/v1/models", { headers: authHeaders() });
      if (resp.status === 401) needKey();
    } catch (e) { /* the chat will say */ }
    setState("idle");
  }

  // -- server-sent events -----------------------------------------------------------------
  // Yields the data of each event ("data:" lines joined by newlines) as it arrives.
  async function* sseEvents(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, end);
        buf = buf.slice(end + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(l.startsWith("data: ") ? 6 : 5)).join("\n");
        if (data) yield data;
      }
    }
  }

  // -- chat -----------------------------------------------------------------------------
  function addMessage(role, text) {
    const hint = document.querySelector("#messages .hint");
    if (hint) hint.remove();
    const el = document.createElement("div");
    el.className = "message " + role;
    const who = document.createElement("span");
    who.className = "role";
    who.textContent = role === "user" ? "you" : "assistant";
    const body = document.createElement("div");
    body.className = "content";
    body.textContent = text;
    el.append(who, body);
    $("messages").append(el);
    el.scrollIntoView({ block: "end" });
    return body;
  }

  function fmt(x, digits) { return Number.isFinite(x) ? x.toFixed(digits) : "\u2013"; }

  async function send(text) {
    showError("");
    const conversation = state.conversation;
    state.messages.push({ role: "user", content: text });
    addMessage("user", text);
    const out = addMessage("assistant", "");
    out.parentElement.classList.add("streaming");
    const body = {
      model: state.model || "default",
      messages: state.messages,
      stream: true,
      stream_options: { include_usage: true },
      temperature: Number($("temperature").value),
    };
    const maxTokens = parseInt($("max-tokens").value, 10);
    if (maxTokens > 0) body.max_tokens = maxTokens;
    if (!$("speculate").checked) body.num_speculative_tokens = 0;

    const controller = new AbortController();
    state.controller = controller;
    $("send").disabled = true;
    $("stop").disabled = false;
    setState("streaming");
    schedulePoll(POLL_STREAMING_MS);

    const start = performance.now();
    let first = null, reply = "", usage = null, spec = null, failed = null;
    try {
      const resp = await fetch("/v1/chat/completions", {
        method: "POST", headers: authHeaders(), body: JSON.stringify(body), signal: controller.signal,
      });
      if (resp.status === 401) throw Object.assign(new Error(await errorMessage(resp)), { auth: true });
      if (!resp.ok) throw new Error(await errorMessage(resp));
      for await (const data of sseEvents(resp.body)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices || []) {
          const piece = choice.delta && choice.delta.content;
          if (piece) {
            if (first === null) {
              first = performance.now();
              $("stat-ttft").textContent = fmt((first - start) / 1000, 2) + " s";
            }
            reply += piece;
            out.textContent = reply;
          }
        }
        if (chunk.usage) usage = chunk.usage;
        if (chunk.speculation) spec = chunk.speculation;
      }
    } catch (e) {
      failed = e.name === "AbortError" ? "stopped" : e;
    }
    const end = performance.now();
    out.parentElement.classList.remove("streaming");
    state.controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;

    if (conversation === state.conversation) {
      if (reply) state.messages.push({ role: "assistant", content: reply });
      else state.messages.pop();        // nothing came back: do not send a dangling turn next time
    }
    if (failed && failed !== "stopped") {
      out.parentElement.classList.add("failed");
      if (failed.auth) needKey(failed.message); else showError(failed.message);
      setState("error");
    } else {
      if (failed === "stopped") out.parentElement.classList.add("stopped");
      setState("done");
    }
    if (usage && spec) {
      const n = usage.completion_tokens;
      const decodeS = first !== null ? (end - first) / 1000 : 0;
      const tps = n > 1 && decodeS > 0 ? (n - 1) / decodeS : n / ((end - start) / 1000);
      state.reply = spec;
      $("stat-tau").textContent = fmt(spec.mean_accepted_length, 2);
      $("stat-tps").textContent = fmt(tps, 1);
      const meta = document.createElement("div");
      meta.className = "meta";
      meta.textContent = `${n} tokens \u00b7 ${fmt(tps, 1)} tok/s \u00b7 ` +
        `${fmt(spec.mean_accepted_length, 2)} tokens per verify step \u00b7 ` +
        `${spec.num_accepted_tokens}/${spec.num_draft_tokens} drafts accepted`;
      out.parentElement.append(meta);
      drawAcceptance();
    }
    schedulePoll(POLL_MS);
    poll();
  }

  // -- live picture -----------------------------------------------------------------------
  let pollTimer = null;
  function schedulePoll(ms) {
    if (pollTimer) clearInterval(pollTimer);
    pollTimer = setInterval(poll, ms);
  }

  async function poll() {
    if (state.polling || document.hidden) return;
    state.polling = true;
    try {
      const resp = await fetch("/speculation");
      if (resp.ok) {
        const s = await resp.json();
        state.server = s;
        $("stat-server-tau").textContent = s.num_verify_steps ? fmt(s.mean_accepted_length, 2) : "\u2013";
        $("stat-server-tps").textContent = fmt(s.tokens_per_second, 1);
        $("stat-server-tps-label").textContent = `tokens/s, server, last ${s.window_s} s`;
        $("stat-server-load").textContent = `${s.running} / ${s.waiting}`;
        state.tps.push([(performance.now() - state.t0) / 1000, s.tokens_per_second]);
        const cutoff = state.tps[state.tps.length - 1][0] - TPS_HISTORY_S;
        while (state.tps.length && state.tps[0][0] < cutoff) state.tps.shift();
        drawAcceptance();
        drawTps();
      }
    } catch (e) { /* the server may be restarting; try again next tick */ }
    state.polling = false;
  }

  // A canvas sized to its CSS box at the screen's pixel density; returns its 2D context
  // and the size to draw in (CSS pixels).
  function prepare(canvas) {
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || canvas.width, h = canvas.clientHeight || canvas.height;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    ctx.font = "12px system-ui, sans-serif";
    return { ctx, w, h };
  }

  function drawAcceptance() {
    const canvas = $("acceptance-chart");
    const { ctx, w, h } = prepare(canvas);
    const server = state.server ? state.server.acceptance_per_position : [];
    const reply = state.reply ? state.reply.acceptance_per_position : [];
    const k = Math.max(state.k, server.length, reply.length);
    const left = 36, right = 8, top = 10, bottom = 26;
    const pw = w - left - right, ph = h - top - bottom;
    ctx.fillStyle = COLORS.axis;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const y = top + ph - (ph * i) / 4;
      ctx.strokeStyle = COLORS.grid;
      ctx.beginPath(); ctx.moveTo(left, y + 0.5); ctx.lineTo(w - right, y + 0.5); ctx.stroke();
      ctx.fillText((i / 4).toFixed(2), left - 6, y);
    }
    let bars = 0;
    if (k === 0) {
      ctx.textAlign = "center";
      ctx.fillText("no drafter: every step decodes one token", left + pw / 2, top + ph / 2);
    }
    const slot = k ? pw / k : 0, bw = slot * 0.36;
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (let i = 0; i < k; i++) {
      const x = left + slot * i + slot / 2;
      const series = [[server[i], COLORS.server, x - bw], [reply[i], COLORS.reply, x]];
      for (const [v, color, bx] of series) {
        if (v === undefined) continue;
        const bh = Math.max(0, Math.min(1, v)) * ph;
        ctx.fillStyle = color;
        ctx.fillRect(bx, top + ph - bh, bw, bh);
        if (bh > 0) {
          bars++;
          ctx.fillStyle = COLORS.text;
          ctx.font = "10px system-ui, sans-serif";
          ctx.textBaseline = "bottom";
          ctx.fillText(v.toFixed(2), bx + bw / 2, top + ph - bh - 2);
          ctx.font = "12px system-ui, sans-serif";
          ctx.textBaseline = "top";
        }
      }
      ctx.fillStyle = COLORS.axis;
      ctx.fillText(String(i + 1), x, top + ph + 6);
    }
    ctx.strokeStyle = COLORS.axis;
    ctx.beginPath(); ctx.moveTo(left + 0.5, top); ctx.lineTo(left + 0.5, top + ph + 0.5); ctx.lineTo(w - right, top + ph + 0.5); ctx.stroke();
    canvas.dataset.bars = String(bars);        // what was drawn, for tests and curious readers
    canvas.dataset.positions = String(k);
    canvas.dataset.values = JSON.stringify({ server, reply });
  }

  function drawTps() {
    const canvas = $("tps-chart");
    const { ctx, w, h } = prepare(canvas);
    const pts = state.tps;
    const left = 36, right = 8, top = 8, bottom = 8;
    const pw = w - left - right, ph = h - top - bottom;
    const ymax = Math.max(1, ...pts.map((p) => p[1])) * 1.15;
    const tEnd = pts.length ? pts[pts.length - 1][0] : 0;
    ctx.strokeStyle = COLORS.grid;
    ctx.fillStyle = COLORS.axis;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (const f of [0, 0.5, 1]) {
      const y = top + ph - ph * f;
      ctx.beginPath(); ctx.moveTo(left, y + 0.5); ctx.lineTo(w - right, y + 0.5); ctx.stroke();
      ctx.fillText((ymax * f).toFixed(0), left - 6, y);
    }
    if (pts.length < 2) return;
    ctx.strokeStyle = COLORS.reply;
    ctx.lineWidth = 2;
    ctx.beginPath();
    pts.forEach(([t, v], i) => {
      const x = left + pw - ((tEnd - t) / TPS_HISTORY_S) * pw;
      const y = top + ph - (v / ymax) * ph;
      if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
    });
    ctx.stroke();
    ctx.lineWidth = 1;
  }

  // -- wiring -----------------------------------------------------------------------------
  function submit(ev) {
    if (ev) ev.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || state.controller) return;
    $("prompt").value = "";
    send(text);
  }

  $("chat-form").addEventListener("submit", submit);
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) submit(ev);
  });
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("new-chat").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.messages = [];
    state.conversation += 1;
    $("messages").replaceChildren();
    showError("");
  });
  $("api-key").addEventListener("input", (ev) => {
    state.apiKey = ev.target.value.trim();
    $("key-label").classList.remove("needed");
  });
  window.addEventListener("resize", () => { drawAcceptance(); drawTps(); });
  document.addEventListener("visibilitychange", () => { if (!document.hidden) poll(); });

  drawAcceptance();
  drawTps();
  loadInfo().then(poll);
  schedulePoll(POLL_MS);
})();
