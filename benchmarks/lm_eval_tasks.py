"""lm-eval tasks over the GSM8K test split that ships in the package
(ascend_dspark/training/data/gsm8k_test.jsonl.gz), so lm-eval runs against the server with no
dataset hub: the documents are written to a local JSON-lines file, and each task is a config
dict (lm-eval's YAML keys) that reads it through `datasets`' local `json` builder.

    gsm8k_generate(dir, n)   generate_until: "Question: ...\\nAnswer:", zero-shot, greedy,
                             scored as lm-eval's own gsm8k task scores (the "#### N" answer:
                             strict-match, or the last number: flexible-extract)
    gsm8k_choice(dir, n)     multiple_choice (log-likelihood): the true final answer against
                             the same number plus one, in a fixed random order

`run(tasks, model, model_args, ...)` is lm_eval.simple_evaluate with these tasks only (not
lm-eval's built-in ones) and the hub switched off (HF_DATASETS_OFFLINE, HF_HUB_OFFLINE).
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
from pathlib import Path

GSM8K_TEST = Path(__file__).resolve().parents[1] / "ascend_dspark" / "training" / "data" / "gsm8k_test.jsonl.gz"
FINAL = re.compile(r"####\s*(-?[0-9.,]+)")
UNTIL = ["Question:", "</s>", "<|im_end|>", "\n\n"]


def gsm8k_docs(n: int, offset: int = 0) -> list[dict]:
    """The first `n` documents (after `offset`) of the shipped GSM8K test split, each with its
    final answer (`final`) and two choices for the log-likelihood task."""
    rng = random.Random(0)
    docs = []
    with gzip.open(GSM8K_TEST, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i < offset:
                continue
            if len(docs) == n:
                break
            doc = json.loads(line)
            final = FINAL.search(doc["answer"]).group(1).replace(",", "")
            wrong = str(int(float(final)) + 1)
            label = rng.randrange(2)
            choices = [final, wrong] if label == 0 else [wrong, final]     # lm-eval puts " " before each
            docs.append({**doc, "final": final, "choices": choices, "label": label})
    return docs


def _write(docs: list[dict], directory: Path, name: str) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return str(path)


def _dataset(path: str) -> dict:
    return {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": path}}, "test_split": "test"}


def gsm8k_generate(directory: Path, n: int, max_gen_toks: int = 256, offset: int = 0,
                   name: str = "gsm8k_shipped") -> dict:
    path = _write(gsm8k_docs(n, offset), directory, name)
    return {
        "task": name, **_dataset(path), "output_type": "generate_until",
        "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": UNTIL, "do_sample": False, "temperature": 0.0, "max_gen_toks": max_gen_toks},
        "num_fewshot": 0,
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "ignore_case": True, "ignore_punctuation": False,
                         "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"]}],
        "filter_list": [
            {"name": "strict-match", "filter": [{"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
                                                {"function": "take_first"}]},
            {"name": "flexible-extract", "filter": [{"function": "regex", "group_select": -1,
                                                     "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                                                    {"function": "take_first"}]}],
    }


def gsm8k_choice(directory: Path, n: int, name: str = "gsm8k_shipped_choice") -> dict:
    path = _write(gsm8k_docs(n), directory, name)
    return {"task": name, **_dataset(path), "output_type": "multiple_choice",
            "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{label}}", "num_fewshot": 0,
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}


def run(tasks: list[dict], model: str, model_args: dict, apply_chat_template: bool = False,
        log_samples: bool = True) -> dict:
    """lm_eval.simple_evaluate over these task dicts, offline (nothing from a hub)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    # Only these tasks: indexing lm-eval's thousands of built-in task files takes ~25 s.
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, log_samples=log_samples,
                                   apply_chat_template=apply_chat_template, batch_size=1,
                                   task_manager=TaskManager(include_defaults=False))
