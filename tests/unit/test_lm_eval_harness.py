"""The lm-eval adapter against the real EleutherAI harness (skipped without the optional `lm_eval` extra).

Two tasks of our own, read from local jsonl files (`dataset_path: json`, no download): a multiple-choice task
scored by log-likelihood and a generate_until task scored by exact match. The harness's numbers must equal
what lmforge computes itself on the same items: `evaluate_mc` (task=mc) and greedy `TextGenerator` text.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_evaluation import GPT, run_eval, write_checkpoint

from lmforge.data.tokenizer import ByteTokenizerSpec, Tokenizer
from lmforge.errors import ConfigError
from lmforge.evaluation.lm_eval_adapter import flatten_results, harness_evaluate
from lmforge.evaluation.multiple_choice import MCExample, evaluate_mc
from lmforge.generation.engine import TextGenerator
from lmforge.models import build

pytest.importorskip("lm_eval")

QUESTIONS = [
    ("The cat sat on the", ["mat", "moon", "xylophone"]),
    ("Two plus two is", ["four", "five"]),
    ("Colour of the sky:", ["blue", "green", "red", "grey"]),
    ("Opposite of hot:", ["cold", "warm"]),
    ("Romeo loves", ["Juliet", "Hamlet", "nobody at all"]),
    ("To be, or not to", ["be", "see"]),
]
PROMPTS = ["ROMEO:", "To be, or", "x", "Once upon"]
GEN_TOKENS = 6


def task_yaml(name: str, data: Path, cache: Path, body: str) -> str:
    return (
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files: {{test: {data}}}\n"
        f"  cache_dir: {cache}\ntest_split: test\n{body}"
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, torch.nn.Module, Tokenizer, list[MCExample], list[str]]:
    """A tiny random GPT, its task dir, and what lmforge itself says about the items (labels are chosen so
    that exactly half of the MC answers and half of the generations are right)."""
    tmp = tmp_path_factory.mktemp("lm_eval")
    tok = ByteTokenizerSpec().train([])
    torch.manual_seed(0)
    model = build({**GPT, "vocab_size": tok.vocab_size}).eval()
    preds = evaluate_mc(model, tok, [MCExample(c, ch, 0) for c, ch in QUESTIONS]).predictions
    examples = [
        MCExample(c, ch, p if i % 2 == 0 else (p + 1) % len(ch))
        for i, ((c, ch), p) in enumerate(zip(QUESTIONS, preds))
    ]
    texts = [
        g.text
        for g in TextGenerator(model, tok).complete(
            PROMPTS, max_new_tokens=GEN_TOKENS, stop=["\n"], temperature=0.0
        )
    ]
    (tmp / "mc.jsonl").write_text("".join(json.dumps(e.__dict__) + "\n" for e in examples))
    (tmp / "gen.jsonl").write_text(
        "".join(
            json.dumps({"prompt": p, "target": t if i % 2 == 0 else t + "!"}) + "\n"
            for i, (p, t) in enumerate(zip(PROMPTS, texts))
        )
    )
    tasks = tmp / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(
        task_yaml(
            "lmforge_mc",
            tmp / "mc.jsonl",
            tmp / "hf",
            (
                "output_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: label\n"
                "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
            ),
        )
    )
    (tasks / "gen.yaml").write_text(
        task_yaml(
            "lmforge_gen",
            tmp / "gen.jsonl",
            tmp / "hf",
            (
                "output_type: generate_until\ndoc_to_text: prompt\ndoc_to_target: target\n"
                f'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: {GEN_TOKENS}\n  do_sample: false\n'
                "metric_list:\n  - metric: exact_match\n"
            ),
        )
    )
    return tasks, model, tok, examples, texts


def test_harness_numbers_equal_lmforge_scoring(setup) -> None:
    tasks, model, tok, examples, texts = setup
    results = harness_evaluate(
        model,
        tok,
        tasks=["lmforge_mc", "lmforge_gen"],
        include_path=str(tasks),
        include_defaults=False,
        seed=0,
        bootstrap_iters=0,
        batch_size=4,
    )
    flat = flatten_results(results)
    ours = evaluate_mc(model, tok, examples)
    assert ours.metrics["mc/acc"] == 0.5
    assert flat["lm_eval/lmforge_mc/acc"] == ours.metrics["mc/acc"]
    assert flat["lm_eval/lmforge_mc/acc_norm"] == ours.metrics["mc/acc_norm"]
    samples = sorted(results["samples"]["lmforge_mc"], key=lambda s: s["doc_id"])
    for sample, ex, scores in zip(
        samples, examples, ours.scores
    ):  # the same log-likelihood, choice by choice
        assert [a[1] for a in sample["arguments"]] == [" " + c for c in ex.choices]
        assert [r[0] for r in sample["filtered_resps"]] == pytest.approx(scores, abs=1e-5)
    assert flat["lm_eval/lmforge_gen/exact_match"] == 0.5
    generated = sorted(results["samples"]["lmforge_gen"], key=lambda s: s["doc_id"])
    assert [s["filtered_resps"][0] for s in generated] == texts  # greedy, cut at "\n", max_gen_toks tokens


def test_eval_py_task_lm_eval_runs_local_tasks(setup, tmp_path: Path) -> None:
    tasks, model, tok, examples, _ = setup
    ckpt = write_checkpoint(
        tmp_path / "run" / "checkpoints" / "last.ckpt", GPT, tok
    )  # the fixture's weights (seed 0)
    metrics = run_eval(
        tmp_path,
        "task=lm_eval",
        f"ckpt_path={ckpt}",
        "lm_eval.tasks=[lmforge_mc]",
        f"lm_eval.include_path={tasks}",
        "lm_eval.include_defaults=false",
        "+lm_eval.bootstrap_iters=0",
    )
    assert metrics["lm_eval/lmforge_mc/acc"] == evaluate_mc(model, tok, examples).metrics["mc/acc"] == 0.5
    saved = json.loads((ckpt.parent / "eval_lm_eval.json").read_text())
    assert saved["lm_eval/lmforge_mc/acc_norm"] == metrics["lm_eval/lmforge_mc/acc_norm"]
    with pytest.raises(ConfigError, match=r"lm_eval.tasks: \['nope'\] are not lm-eval tasks"):
        harness_evaluate(model, tok, tasks=["nope"], include_path=str(tasks), include_defaults=False)
    with pytest.raises(ConfigError, match="lm_eval.include_path: .* is not a directory"):
        harness_evaluate(model, tok, tasks=["lmforge_mc"], include_path=str(tmp_path / "missing"))
