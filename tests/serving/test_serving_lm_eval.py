"""lm-eval (lm-evaluation-harness, unchanged) against a live default-model server with its
DSpark draft speculating: `local-completions` (log-likelihood and generate_until) and
`local-chat-completions` (generate_until), on a few documents of the GSM8K test split the
package ships (benchmarks/lm_eval_tasks.py; nothing from a hub). What lm-eval records is
checked against transformers' own forward and greedy decoding of the same weights."""

from __future__ import annotations

import re
import sys

import pytest
import torch

from tests.helpers import hf_greedy
from tests.serving.server_process import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import lm_eval_tasks  # noqa: E402

pytestmark = pytest.mark.slow
DOCS = 2              # log-likelihood documents (two choices each, one token generated per request)
GEN_DOCS = 1          # generate_until documents: each costs a server run and a transformers run (CI time)
GEN_TOKENS = 12


def _draft_tokens(server) -> float:
    _, _, raw = server.request("GET", "/metrics")
    match = re.search(r"^vllm:spec_decode_num_draft_tokens_total\{[^}]*\} (\S+)$", raw.decode(), re.M)
    return float(match.group(1))


def _cut(text: str, until: list[str]) -> str:
    for stop in until:
        text = text.split(stop)[0]
    return text


def _expected_generation(hf_model, tokenizer, ids: list[int]) -> str:
    out = hf_greedy(hf_model, ids, GEN_TOKENS)
    if tokenizer.eos_token_id in out:
        out = out[: out.index(tokenizer.eos_token_id)]
    return _cut(tokenizer.decode(out), lm_eval_tasks.UNTIL)


def test_local_completions_loglikelihood_and_generate_until(default_server, smollm2_hf, hf_tokenizer, tmp_path):
    drafted = _draft_tokens(default_server)
    tasks = [lm_eval_tasks.gsm8k_choice(tmp_path, DOCS), lm_eval_tasks.gsm8k_generate(tmp_path, GEN_DOCS, GEN_TOKENS)]
    out = lm_eval_tasks.run(tasks, "local-completions",
                            {"base_url": default_server.url + "/v1/completions", "model": "smol",
                             "num_concurrent": 1, "max_retries": 1, "max_length": 1024})
    assert out["results"]["gsm8k_shipped_choice"]["acc,none"] in (0.0, 0.5, 1.0)
    assert "exact_match,flexible-extract" in out["results"]["gsm8k_shipped"]
    assert len(out["samples"]["gsm8k_shipped_choice"]) == DOCS
    assert {s["doc_id"] for s in out["samples"]["gsm8k_shipped"]} == set(range(GEN_DOCS))   # once per filter
    for sample in out["samples"]["gsm8k_shipped_choice"]:
        for (context, continuation), ((ll, greedy),) in zip(sample["arguments"], sample["resps"]):
            # lm-eval's own split: the whole text encoded, the context's tokens cut off.
            whole = hf_tokenizer.encode(context + continuation, add_special_tokens=False)
            n_ctx = len(hf_tokenizer.encode(context, add_special_tokens=False))
            with torch.no_grad():
                logp = torch.log_softmax(smollm2_hf(torch.tensor([whole])).logits[0].float(), dim=-1)
            rows = logp[n_ctx - 1: len(whole) - 1]
            cont = torch.tensor(whole[n_ctx:])
            assert ll == pytest.approx(rows.gather(1, cont.unsqueeze(1)).sum().item(), abs=5e-3)
            assert greedy == bool((rows.argmax(-1) == cont).all())
    for sample in out["samples"]["gsm8k_shipped"]:
        context = sample["arguments"][0][0]
        ids = hf_tokenizer.encode(context, add_special_tokens=False)
        assert sample["resps"][0][0] == _expected_generation(smollm2_hf, hf_tokenizer, ids)
    assert _draft_tokens(default_server) > drafted          # the draft speculated under lm-eval
    default_server.wait_idle()


def test_local_chat_completions_generate_until(default_server, smollm2_hf, hf_tokenizer, tmp_path):
    tasks = [lm_eval_tasks.gsm8k_generate(tmp_path, GEN_DOCS, GEN_TOKENS, name="gsm8k_shipped_chat")]
    out = lm_eval_tasks.run(tasks, "local-chat-completions",
                            {"base_url": default_server.url + "/v1/chat/completions", "model": "smollm2-alias",
                             "num_concurrent": 1, "max_retries": 1}, apply_chat_template=True)
    assert "exact_match,strict-match" in out["results"]["gsm8k_shipped_chat"]
    samples = out["samples"]["gsm8k_shipped_chat"]
    assert {s["doc_id"] for s in samples} == set(range(GEN_DOCS))
    for sample in samples:
        question = sample["doc"]["question"]
        messages = [{"role": "user", "content": f"Question: {question}\nAnswer:"}]
        ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = hf_tokenizer.encode(ids, add_special_tokens=False)
        assert sample["resps"][0][0] == _expected_generation(smollm2_hf, hf_tokenizer, ids)
    default_server.wait_idle()
