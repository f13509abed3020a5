"""Plain-torch reference computations written straight from the spec, on DeepSpec tensor names.

Independent of ascend_dspark.drafters: no slot cache, no ops/, no masks (the sequence is
built explicitly), so agreement checks names, layout, RoPE and visibility together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x, positions, theta):
    """x [T, heads, hd], neox rotate-half layout."""
    hd = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = positions.double().unsqueeze(-1) * inv
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos().unsqueeze(1).to(x.dtype), emb.sin().unsqueeze(1).to(x.dtype)
    half = hd // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def attend(q, k, v, visible):
    """q [Tq, nh, hd], k/v [Tk, nkv, hd], visible [Tq, Tk] bool."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, 1)
    v = v.repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def mlp(sd, p, x):
    return F.linear(F.silu(F.linear(x, sd[p + "mlp.gate_proj.weight"])) * F.linear(x, sd[p + "mlp.up_proj.weight"]),
                    sd[p + "mlp.down_proj.weight"])


def dspark_block_hidden(sd, cfg, embed, ctx_features, anchor, start):
    """DeepSpec §1.9 step 3 for one request: features [start, m*H] of positions 0..start-1."""
    nh, nkv, hd, theta, n = cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"], cfg["theta"], cfg["block_size"]
    c = rms(F.linear(ctx_features, sd["fc.weight"]), sd["hidden_norm.weight"])
    ids = torch.full((n,), cfg["mask_token_id"], dtype=torch.long)
    ids[0] = anchor
    x = embed(ids)
    pos_ctx, pos_blk = torch.arange(start), start + torch.arange(n)
    for i in range(cfg["num_layers"]):
        p = f"layers.{i}."
        xn = rms(x, sd[p + "input_layernorm.weight"])
        q = F.linear(xn, sd[p + "self_attn.q_proj.weight"]).view(n, nh, hd)
        q = rope(rms(q, sd[p + "self_attn.q_norm.weight"]), pos_blk, theta)
        kin = torch.cat([c, xn], 0)
        k = F.linear(kin, sd[p + "self_attn.k_proj.weight"]).view(-1, nkv, hd)
        k = rope(rms(k, sd[p + "self_attn.k_norm.weight"]), torch.cat([pos_ctx, pos_blk]), theta)
        v = F.linear(kin, sd[p + "self_attn.v_proj.weight"]).view(-1, nkv, hd)
        visible = torch.ones(n, start + n, dtype=torch.bool)           # whole context + whole block
        x = x + F.linear(attend(q, k, v, visible).reshape(n, -1), sd[p + "self_attn.o_proj.weight"])
        x = x + mlp(sd, p, rms(x, sd[p + "post_attention_layernorm.weight"]))
    return rms(x, sd["norm.weight"])


def dspark_greedy(sd, cfg, h, anchor, lm_head):
    """Greedy Markov chain + confidence (§1.9 steps 4-5): tokens, logits, confidence."""
    prev, tokens, logits_all, conf = anchor, [], [], []
    for k in range(h.shape[0]):
        logits = F.linear(h[k], lm_head)
        if "markov_head.markov_w1.weight" in sd:
            e = sd["markov_head.markov_w1.weight"][prev]
            logits = logits + F.linear(e, sd["markov_head.markov_w2.weight"])
            feat = torch.cat([h[k], e]) if cfg.get("with_markov", True) else h[k]
        else:
            feat = h[k]
        if "confidence_head.proj.weight" in sd:
            conf.append(torch.sigmoid(F.linear(feat, sd["confidence_head.proj.weight"], sd["confidence_head.proj.bias"])))
        tok = int(logits.argmax())
        tokens.append(tok)
        logits_all.append(logits)
        prev = tok
    return tokens, torch.stack(logits_all), (torch.cat(conf) if conf else None)


class Eagle3Reference:
    """Eagle3 (§1.10) for one request with an explicit K/V list."""

    def __init__(self, sd, cfg, embed, lm_head):
        self.sd, self.cfg, self.embed, self.lm_head = sd, cfg, embed, lm_head
        self.k, self.v = [], []

    def step(self, hidden, tokens, positions):
        """Run the layer on rows (hidden [T,H], token [T]) at positions; causal over everything so far."""
        sd, cfg, p = self.sd, self.cfg, "layers.0."
        nh, nkv, hd, theta = cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"], cfg["theta"]
        t = hidden.shape[0]
        x = torch.cat([rms(self.embed(tokens), sd[p + "input_layernorm.weight"]),
                       rms(hidden, sd[p + "hidden_norm.weight"])], -1)
        q = F.linear(x, sd[p + "self_attn.q_proj.weight"]).view(t, nh, hd)
        k = F.linear(x, sd[p + "self_attn.k_proj.weight"]).view(t, nkv, hd)
        v = F.linear(x, sd[p + "self_attn.v_proj.weight"]).view(t, nkv, hd)
        if cfg.get("qk_norm", True):
            q, k = rms(q, sd[p + "self_attn.q_norm.weight"]), rms(k, sd[p + "self_attn.k_norm.weight"])
        q, k = rope(q, positions, theta), rope(k, positions, theta)
        self.k.append(k)
        self.v.append(v)
        kk, vv = torch.cat(self.k), torch.cat(self.v)
        total = kk.shape[0]
        visible = torch.arange(total).unsqueeze(0) <= (total - t + torch.arange(t)).unsqueeze(1)
        h = hidden + F.linear(attend(q, kk, vv, visible).reshape(t, -1), sd[p + "self_attn.o_proj.weight"])
        return h + mlp(sd, p, rms(h, sd[p + "post_attention_layernorm.weight"]))

    def greedy(self, features, next_tokens, num_tokens):
        n = features.shape[0]
        h = self.step(F.linear(features, self.sd["fc.weight"]), next_tokens, torch.arange(n))[-1:]
        out, logits_all = [], []
        for k in range(num_tokens):
            if k > 0:
                h = self.step(h, torch.tensor([out[-1]]), torch.tensor([n - 1 + k]))
            logits = F.linear(rms(h[0], self.sd["norm.weight"]), self.lm_head)
            out.append(int(logits.argmax()))
            logits_all.append(logits)
        return out, torch.stack(logits_all)
