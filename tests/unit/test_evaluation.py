"""eval.py's tasks beyond val loss: multiple choice, BLEU, the lm-eval adapter, val/mlm_accuracy, bad inputs.

Scores are checked against hand computations on models whose log-probabilities are easy to write down
(a bigram table: log p(next | prev) = log_softmax(table[prev])) and on tiny random GPT / T5 models; the
end-to-end path goes through `run.evaluate` on hand-written lmforge checkpoints (no training needed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from lmforge.data.tokenizer import ByteTokenizerSpec, Tokenizer
from lmforge.errors import ConfigError, DataError
from lmforge.evaluation import input_file, results_files
from lmforge.evaluation.bleu import bleu_score, evaluate_bleu, load_pairs
from lmforge.evaluation.lm_eval_adapter import HarnessLM, flatten_results, make_lm_eval_model
from lmforge.evaluation.multiple_choice import (
    MCExample,
    evaluate_mc,
    fewshot_prefix,
    load_mc_examples,
    score_continuations,
)
from lmforge.models import build

CONF = Path(__file__).resolve().parents[2] / "conf"
GPT = {"family": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 32, "max_seq_len": 64, "dropout": 0.0}
T5 = {
    "family": "t5",
    "n_layer": 1,
    "n_head": 2,
    "n_embd": 32,
    "head_dim": 16,
    "intermediate_size": 64,
    "dropout": 0.0,
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return ByteTokenizerSpec().train([])


class Bigram(nn.Module):
    """A 'decoder' whose next-token logits depend on the previous token only: scores computable by hand."""

    def __init__(self, vocab: int, max_seq_len: int | None = 64, seed: int = 0) -> None:
        super().__init__()
        self.table = nn.Parameter(
            3 * torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed))
        )
        self.config = SimpleNamespace(kind="decoder", family="bigram", max_seq_len=max_seq_len)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.table[input_ids]


def manual_logp(model: Bigram, tok: Tokenizer, context: str, continuation: str) -> float:
    """Σ log p over the continuation's bytes (one token per byte), each given the previous byte."""
    ctx = tok.encode(context) or [tok.eos_id]
    ids = ctx + tok.encode(continuation)
    logp = model.table.detach().log_softmax(-1)
    return sum(float(logp[ids[j - 1], ids[j]]) for j in range(len(ctx), len(ids)))


EXAMPLES = [
    MCExample("The cat sat on the", ["mat", "moon", "xylophone"], 0),
    MCExample("Two plus two is", ["four", "five"], 0),
    MCExample("", ["a", "bb"], 0),
    MCExample("Colour of the sky:", ["blue", "green", "red", "grey"], 0),
]


def test_mc_scores_accuracy_and_norm_match_a_hand_computation(tok: Tokenizer) -> None:
    model = Bigram(tok.vocab_size)
    manual = [[manual_logp(model, tok, ex.context, " " + c) for c in ex.choices] for ex in EXAMPLES]
    best = [max(range(len(s)), key=s.__getitem__) for s in manual]
    # labels: right for examples 0 and 2, wrong for 1 and 3 -> acc = 0.5 exactly
    examples = [
        MCExample(ex.context, ex.choices, best[i] if i in (0, 2) else (best[i] + 1) % len(ex.choices))
        for i, ex in enumerate(EXAMPLES)
    ]
    result = evaluate_mc(model, tok, examples, batch_size=3)
    for got, want in zip(result.scores, manual):
        assert got == pytest.approx(want, abs=1e-4)
    assert result.predictions == best and result.metrics["mc/acc"] == 0.5 and result.metrics["mc/n"] == 4
    normed = [
        max(range(len(s)), key=lambda c, s=s, ex=ex: s[c] / len(ex.choices[c].encode()))
        for s, ex in zip(manual, examples)
    ]
    assert result.metrics["mc/acc_norm"] == sum(p == ex.label for p, ex in zip(normed, examples)) / 4
    assert evaluate_mc(model, tok, examples, limit=2).metrics["mc/n"] == 2


def test_fewshot_prefix_is_deterministic_excludes_itself_and_is_scored(tok: Tokenizer) -> None:
    a, b = fewshot_prefix(EXAMPLES, 1, 2, seed=3), fewshot_prefix(EXAMPLES, 1, 2, seed=3)
    assert a == b and a.count("\n\n") == 2 and "Two plus two is" not in a
    assert fewshot_prefix(EXAMPLES, 0, 10, seed=0).count("\n\n") == 3  # capped at the other examples
    model = Bigram(tok.vocab_size)
    result = evaluate_mc(model, tok, EXAMPLES, num_fewshot=2, seed=3)
    ctx = fewshot_prefix(EXAMPLES, 1, 2, seed=3) + EXAMPLES[1].context
    assert result.scores[1] == pytest.approx(
        [manual_logp(model, tok, ctx, " " + c) for c in EXAMPLES[1].choices], abs=1e-4
    )


def test_batching_padding_and_truncation_leave_scores_unchanged(tok: Tokenizer) -> None:
    torch.manual_seed(0)
    gpt = build(GPT, vocab_size=tok.vocab_size).eval()
    pairs = [(ex.context, " " + c) for ex in EXAMPLES for c in ex.choices]
    one = score_continuations(gpt, tok, pairs, batch_size=1)
    many = score_continuations(gpt, tok, pairs, batch_size=5)
    assert [s for s, _ in one] == pytest.approx([s for s, _ in many], abs=1e-4)
    # a bigram's scores do not depend on how much context precedes the previous token: truncation is exact
    short, full = Bigram(tok.vocab_size, max_seq_len=8), Bigram(tok.vocab_size, max_seq_len=None)
    long_pairs = [("a long context that is cut on the left", " end")]
    assert score_continuations(short, tok, long_pairs)[0][0] == pytest.approx(
        score_continuations(full, tok, long_pairs)[0][0], abs=1e-4
    )


def test_mc_refuses_encoder_and_encoder_decoder_models(tok: Tokenizer) -> None:
    bert = build(
        {
            "family": "bert",
            "n_layer": 1,
            "n_head": 2,
            "n_embd": 32,
            "intermediate_size": 64,
            "max_seq_len": 32,
        },
        vocab_size=tok.vocab_size,
    )
    t5 = build(T5, vocab_size=tok.vocab_size)
    for model, kind in ((bert, "encoder"), (t5, "encoder_decoder")):
        with pytest.raises(ConfigError, match=f"decoder's log-likelihood; this is a {kind} model"):
            evaluate_mc(model, tok, EXAMPLES)


def test_bad_task_files_name_file_and_line(tmp_path: Path) -> None:
    good = json.dumps({"context": "c", "choices": ["x", "y"], "label": 1})
    cases = {
        "not json": "not valid JSON",
        json.dumps({"context": "c", "choices": ["x"], "label": "0"}): "'label' must be a int",
        json.dumps({"context": "c", "choices": ["x"], "label": 1}): "'label' 1 is not an index",
        json.dumps({"context": "c", "choices": [], "label": 0}): "non-empty list",
        "[1]": "expected a JSON object",
    }
    for i, (bad, why) in enumerate(cases.items()):
        f = tmp_path / f"bad{i}.jsonl"
        f.write_text(f"{good}\n\n{bad}\n")
        with pytest.raises(DataError, match=f"bad{i}.jsonl:3: .*{why}"):
            load_mc_examples(f)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no examples"):
        load_mc_examples(tmp_path / "empty.jsonl")
    with pytest.raises(ConfigError, match="tasks_file: .*is not a file"):
        input_file(tmp_path / "missing.jsonl", "tasks_file", "jsonl")
    with pytest.raises(ConfigError, match="pairs_file: is required"):
        input_file(None, "pairs_file", "tsv")
    (tmp_path / "p.tsv").write_text("a\tb\nonly one field\n")
    with pytest.raises(DataError, match="p.tsv:2: expected 'source<TAB>target'"):
        load_pairs(tmp_path / "p.tsv")
    (tmp_path / "p.jsonl").write_text('{"source": "a", "target": "b"}\n{"source": "a"}\n')
    with pytest.raises(DataError, match="p.jsonl:2: field 'target'"):
        load_pairs(tmp_path / "p.jsonl")


def test_bleu_matches_torchmetrics_and_known_values(tmp_path: Path) -> None:
    from torchmetrics.text import BLEUScore

    hyps = ["the cat is on the mat", "there is a cat on the mat today"]
    refs = ["the cat is on the mat", "a cat is on the mat"]
    assert bleu_score(hyps, refs) == pytest.approx(float(BLEUScore()(hyps, [[r] for r in refs])))
    assert bleu_score(refs, refs) == pytest.approx(1.0) and bleu_score(["zzz qqq"], ["a b c d"]) == 0.0
    (tmp_path / "p.tsv").write_text("hello\tbonjour\n\nworld\tmonde\n")
    (tmp_path / "p.jsonl").write_text(
        '{"source": "hello", "target": "bonjour"}\n{"source": "world", "target": "monde"}\n'
    )
    assert (
        load_pairs(tmp_path / "p.tsv")
        == load_pairs(tmp_path / "p.jsonl")
        == [("hello", "bonjour"), ("world", "monde")]
    )


def test_lm_eval_adapter_methods_match_direct_computation(tok: Tokenizer) -> None:
    model = Bigram(tok.vocab_size, max_seq_len=6)  # rolling windows of 6 tokens over longer texts
    lm = HarnessLM(model, tok, batch_size=2)
    req = [SimpleNamespace(args=("The cat", " sat")), SimpleNamespace(args=("", "hello"))]
    got = lm.loglikelihood(req)
    assert [g for g, _ in got] == pytest.approx(
        [manual_logp(model, tok, "The cat", " sat"), manual_logp(model, tok, "", "hello")], abs=1e-4
    )
    assert all(isinstance(g, bool) for _, g in got)
    texts = ["a rolling text longer than one window", "x"]
    rolled = lm.loglikelihood_rolling([SimpleNamespace(args=(t,)) for t in texts])
    assert rolled == pytest.approx([manual_logp(model, tok, "", t) for t in texts], abs=1e-4)
    torch.manual_seed(0)
    gpt = build(GPT, vocab_size=tok.vocab_size).eval()
    out = HarnessLM(gpt, tok).generate_until(
        [SimpleNamespace(args=("ab", {"until": ["\n"], "max_gen_toks": 12}))]
    )
    from lmforge.generation.engine import TextGenerator

    want = TextGenerator(gpt, tok).complete(["ab"], max_new_tokens=12, stop=["\n"], temperature=0.0)[0].text
    assert out == [want] and "\n" not in out[0]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "lm_eval", None)
        with pytest.raises(ConfigError, match="pip install lm-eval"):
            make_lm_eval_model(gpt, tok)
    flat = flatten_results(
        {"results": {"hellaswag": {"acc,none": 0.25, "acc_stderr,none": 0.01, "alias": "hellaswag"}}}
    )
    assert flat == {"lm_eval/hellaswag/acc": 0.25, "lm_eval/hellaswag/acc_stderr": 0.01}


class Echo(nn.Module):
    """An 'encoder' predicting its own input token: right exactly where the objective left the token as is."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return nn.functional.one_hot(input_ids, self.vocab).float()


def test_mlm_accuracy_is_the_share_of_masked_positions_predicted_right(tok: Tokenizer) -> None:
    from lmforge.objectives.base import batch_generator
    from lmforge.objectives.mlm import _SALT, MaskedLM
    from lmforge.stages.pretrain import PretrainStage

    mtok = Tokenizer.from_json(tok.to_json())
    mtok.add_special_tokens(MaskedLM().special_tokens())
    objective = MaskedLM(
        mask_prob=0.3, mask_replace_prob=0.5, random_replace_prob=0.0
    )  # ~half the selected kept as is
    objective.bind(mtok)
    stage = PretrainStage(model_cfg={"family": "bert"}, objective=objective)
    stage.model = Echo(mtok.vocab_size)
    stage.eval()
    logged: dict[str, torch.Tensor] = {}
    stage.log_dict = lambda metrics, **_: logged.update(metrics)  # no trainer: capture what would be logged
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 256, (3, 24), generator=g)} for _ in range(2)]
    kept = total = 0
    per_batch = []
    for i, batch in enumerate(batches):
        stage.validation_step(batch, i)
        inputs, targets = objective.corrupt(
            batch["input_ids"], objective.real_tokens(batch), batch_generator(batch["input_ids"], _SALT)
        )
        sel = targets != -100
        kept += int(
            (inputs[sel] == targets[sel]).sum()
        )  # the echo is right exactly at the unmasked selected tokens
        total += int(sel.sum())
        per_batch.append(int(sel.sum()))
    stage.on_validation_epoch_end()
    assert 0 < kept < total
    assert (
        float(logged["val/mlm_accuracy"]) == pytest.approx(kept / total)
        and float(logged["val/tokens"]) == total
    )
    stage.train()
    assert objective(stage.model, batches[0]).correct is None  # training steps skip the argmax
    stage.eval()
    stage.validation_step(batches[0], 0)
    stage.on_validation_epoch_end()  # the counters were reset: one batch's count now
    assert float(logged["val/tokens"]) == per_batch[0] and "val/mlm_accuracy" in logged


def write_checkpoint(path: Path, model_cfg: dict, tok: Tokenizer, seed: int = 0) -> Path:
    """An lmforge checkpoint by hand: what load_model reads (config, tokenizer, `model.`-prefixed weights)."""
    torch.manual_seed(seed)
    model = build(model_cfg, vocab_size=tok.vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "lmforge": {
                "config": {"model": {**model_cfg, "vocab_size": tok.vocab_size}},
                "tokenizer": tok.to_json(),
                "stage": "PretrainStage",
                "peft": None,
            },
        },
        path,
    )
    return path


def run_eval(tmp_path: Path, *overrides: str) -> dict:
    from lmforge.run import evaluate

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "eval",
            overrides=[
                f"paths.output_dir={tmp_path / 'eval'}",
                f"paths.log_dir={tmp_path / 'logs'}",
                "device=cpu",
                *overrides,
            ],
        )
    return evaluate(cfg)


def test_eval_tasks_end_to_end_write_json_beside_the_checkpoint(
    tok: Tokenizer, tmp_path: Path, capsys
) -> None:
    gpt_ckpt = write_checkpoint(tmp_path / "gpt" / "checkpoints" / "last.ckpt", GPT, tok)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(
        "".join(
            json.dumps({"context": e.context, "choices": e.choices, "label": e.label}) + "\n"
            for e in EXAMPLES
        )
    )
    metrics = run_eval(
        tmp_path, "task=mc", f"ckpt_path={gpt_ckpt}", f"tasks_file={tasks}", "num_fewshot=1", "batch_size=4"
    )
    assert set(metrics) == {"mc/acc", "mc/acc_norm", "mc/n"} and metrics["mc/n"] == 4
    beside = gpt_ckpt.parent / "eval_mc.json"
    saved = json.loads(beside.read_text())
    assert saved["mc/acc"] == metrics["mc/acc"] and saved["num_fewshot"] == 1
    assert json.loads((tmp_path / "eval" / "eval_mc.json").read_text()) == saved
    assert '"mc/acc"' in capsys.readouterr().out

    t5_tok = Tokenizer.from_json(tok.to_json())
    t5_ckpt = write_checkpoint(
        tmp_path / "t5" / "checkpoints" / "last.ckpt", {**T5, "pad_token_id": t5_tok.pad_id}, t5_tok
    )
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("hello\tbonjour\ngood night\tbonne nuit\n")
    bleu = run_eval(tmp_path, "task=bleu", f"ckpt_path={t5_ckpt}", f"pairs_file={pairs}", "max_new_tokens=6")
    assert bleu["n"] == 2 and 0.0 <= bleu["bleu"] <= 100.0
    assert json.loads((t5_ckpt.parent / "eval_bleu.json").read_text())["bleu"] == bleu["bleu"]
    with pytest.raises(ConfigError, match="this is a encoder_decoder model"):
        run_eval(tmp_path, "task=mc", f"ckpt_path={t5_ckpt}", f"tasks_file={tasks}")
    with pytest.raises(ConfigError, match="task: unknown task 'nope'"):
        run_eval(tmp_path, "task=nope", f"ckpt_path={t5_ckpt}")
    with pytest.MonkeyPatch.context() as mp:  # as without the optional extra, installed or not
        mp.setitem(sys.modules, "lm_eval", None)
        with pytest.raises(ConfigError, match="pip install lm-eval"):
            run_eval(tmp_path, "task=lm_eval", f"ckpt_path={gpt_ckpt}", "lm_eval.tasks=[hellaswag]")
    assert results_files(str(gpt_ckpt), tmp_path / "eval", "mc") == [
        beside,
        tmp_path / "eval" / "eval_mc.json",
    ]


def test_bleu_of_a_model_that_copies_is_100(tok: Tokenizer, monkeypatch) -> None:
    """evaluate_bleu scores what translate produced: a stub that returns the references gets 100."""
    import lmforge.evaluation.bleu as bleu_mod

    pairs = [("a", "the cat is on the mat"), ("b", "a dog")]
    monkeypatch.setattr(
        bleu_mod, "translate", lambda model, tok, sources, *a: [dict(pairs)[s] for s in sources]
    )
    assert evaluate_bleu(None, tok, pairs) == {"bleu": pytest.approx(100.0), "n": 2}


def full_checkpoint(tmp_path: Path, tok: Tokenizer) -> Path:
    """A checkpoint whose saved config is a whole resolved train config (what task=lm rebuilds the data from):
    a tiny GPT over three text files (one held out for val), byte tokenizer, no training."""
    from omegaconf import OmegaConf

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(["the cat sat on the mat. " * 6, "a dog ran in the park! " * 7, "sky is blue? " * 9]):
        (corpus / f"doc{i}.txt").write_text(text)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "model=gpt-nano", "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.max_seq_len=64",
                f"model.vocab_size={tok.vocab_size}", "tokenizer=byte", "data=text_files", "data.clean=null",
                f"data.corpus.train_glob={corpus}/*.txt", "data.corpus.val_every=3", "data.block_size=16",
                "data.batch_size=2", f"paths.output_dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}",
            ],
        )
    resolved = OmegaConf.to_container(cfg, resolve=True)
    torch.manual_seed(0)
    model = build(resolved["model"])
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "lmforge": {"config": resolved, "tokenizer": tok.to_json(), "stage": "PretrainStage"}}, path)
    return path


def test_task_lm_measures_the_split_asked_for(tok: Tokenizer, tmp_path: Path, capsys) -> None:
    """split=train reads every train block (tail included): train/* metrics equal a direct computation, the
    val results stay under val/* and eval_lm.json; an unknown split names the key and the choices."""
    import math

    from lmforge.data.packed import PackedBlocks
    from lmforge.losses.logprobs import token_logprobs

    ckpt = full_checkpoint(tmp_path, tok)
    cache = f"paths.cache_dir={tmp_path / 'cache'}"
    val = run_eval(tmp_path, f"ckpt_path={ckpt}", cache)
    train = run_eval(tmp_path, f"ckpt_path={ckpt}", cache, "split=train", "batch_size=3")
    assert set(val) >= {"val/loss", "val/ppl", "val/bpb", "val/tokens"}
    assert set(train) == {k.replace("val/", "train/") for k in val}
    saved_ckpt = torch.load(ckpt, weights_only=True)
    model = build(saved_ckpt["lmforge"]["config"]["model"]).eval()
    model.load_state_dict({k.removeprefix("model."): v for k, v in saved_ckpt["state_dict"].items()})
    for split, metrics, docs in (("train", train, [0, 1]), ("val", val, [2])):
        ids: list[int] = []
        for i in docs:  # the token stream: each document then EOS, as the token cache writes it
            ids += [*tok.encode((tmp_path / "corpus" / f"doc{i}.txt").read_text()), tok.eos_id]
        blocks = PackedBlocks(torch.tensor(ids).numpy(), 16, tok.pad_id, include_tail=True)
        nll = n = 0.0
        with torch.no_grad():
            for j in range(len(blocks)):
                b = blocks[j]
                logp = token_logprobs(model(b["input_ids"][None]), b["targets"][None])
                nll, n = nll - float(logp.sum()), n + float((b["targets"] != -100).sum())
        assert metrics[f"{split}/tokens"] == n and metrics[f"{split}/loss"] == pytest.approx(nll / n, rel=1e-4)
        assert metrics[f"{split}/ppl"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert train["train/loss"] != val["val/loss"]
    saved = json.loads((ckpt.parent / "eval_lm_train.json").read_text())
    assert saved["split"] == "train" and saved["train/loss"] == train["train/loss"]
    assert json.loads((ckpt.parent / "eval_lm.json").read_text())["val/loss"] == val["val/loss"]
    assert '"split": "train"' in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"split: PackedTextDataModule has no split 'test'; it offers train, val\. "
                       r"Fix: pass split=train or split=val"):
        run_eval(tmp_path, f"ckpt_path={ckpt}", cache, "split=test")
