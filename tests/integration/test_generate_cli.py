"""generate.py on a real (briefly trained) checkpoint: single prompt, prompts file, stop strings, chat, HF dirs.

Entry-point behaviour (exit codes, stdout, stdin) runs as a subprocess; the rest calls the same
`lmforge.generation.cli.generate` in-process on a config composed from conf/generate.yaml, which is
what generate.py does, without paying the interpreter start-up per case.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from lmforge.checkpoint import load_checkpoint, model_state_dict
from lmforge.data.chat import encode_chatml
from lmforge.data.tokenizer import Tokenizer
from lmforge.generation import generate
from lmforge.generation.cli import generate as cli_generate
from lmforge.generation.engine import TextGenerator
from lmforge.interop.export import export_checkpoint
from lmforge.models import build

pytestmark = pytest.mark.slow

PROMPTS = ["ROMEO:", "To be, or not to be, that is the question:", "", "KING"]
# A 6-step model greedily says only "\n"; a repetition penalty makes greedy output varied (and tests it too).
# fp32 as the in-process reference: `dtype=auto` is bf16 on AVX512-BF16/AMX CPUs, whose rounding flips near-tied argmaxes
GREEDY = ("temperature=0", "repetition_penalty=3.0", "dtype=fp32")


ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models: one thread is several times faster on a shared 2-core machine


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The in-process runs use one thread too, as the subprocesses do, so both run the same kernels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpt(cli, cache_dir, tmp_path_factory) -> Path:
    logs = tmp_path_factory.mktemp("gen_logs")
    run_dir = logs / "debug" / "runs" / "gen"
    proc = cli("train.py", "debug=fast", f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache_dir}", f"paths.log_dir={logs}",
               "callbacks.progress_bar=null", "callbacks.samples=null", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def loaded(ckpt: Path) -> tuple[torch.nn.Module, Tokenizer]:
    data = load_checkpoint(ckpt)
    model = build(data["lmforge"]["config"]["model"])
    model.load_state_dict(model_state_dict(data))
    return model.eval(), Tokenizer.from_json(data["lmforge"]["tokenizer"])


def config(*overrides: str):
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"):
        return compose("generate", overrides=list(overrides))


def direct(model: torch.nn.Module, tok: Tokenizer, prompt: str, n: int) -> str:
    """The reference: `lmforge.generation.generate` on the prompt's ids, greedy, decoded by hand."""
    ids = torch.tensor([tok.encode(prompt) or [tok.eos_id]])
    out = generate(model, ids, max_new_tokens=n, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, repetition_penalty=3.0)
    return tok.decode(out[0, ids.size(1):].tolist())


class Recorder(io.StringIO):
    """stdout that remembers each write: streaming means many writes, not one at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


def test_single_prompt_greedy_cli_equals_direct_generate(ckpt, loaded, cli, tmp_path):
    proc = cli("generate.py", f"ckpt_path={ckpt}", "prompt=ROMEO:", "max_new_tokens=16", *GREEDY, f"hydra.run.dir={tmp_path}", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout.split("--- sample 0 ---\n", 1)[1]
    expected = "ROMEO:" + direct(*loaded, "ROMEO:", 16)
    assert printed.removesuffix("\n") == expected
    assert len(expected) > len("ROMEO:")


def test_single_prompt_streams_token_by_token(ckpt, loaded, monkeypatch):
    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    texts = cli_generate(config(f"ckpt_path={ckpt}", "max_new_tokens=16", *GREEDY))
    monkeypatch.undo()
    assert texts == ["ROMEO:" + direct(*loaded, "ROMEO:", 16)]
    assert out.getvalue() == f"--- sample 0 ---\n{texts[0]}\n"
    assert len([w for w in out.writes if w.strip()]) >= 4  # the text came in pieces, as it was generated


def test_prompts_file_batched_equals_one_by_one(ckpt, loaded, tmp_path):
    prompts_file, output = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS)))
    cli_generate(config(f"ckpt_path={ckpt}", f"prompts_file={prompts_file}", f"output_file={output}", "batch_size=3",
                        "max_new_tokens=10", *GREEDY))
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS and [r["id"] for r in rows] == list(range(len(PROMPTS)))
    assert all(r["finish_reason"] in ("stop", "length") for r in rows)
    model, tok = loaded
    for row in rows:  # each alone: no padding at all
        assert row["completion"] == direct(model, tok, row["prompt"], 10), row["prompt"]


def test_stop_strings_cut_the_output_streamed_or_not(ckpt, loaded, tmp_path, monkeypatch):
    full = direct(*loaded, "ROMEO:", 24)
    stop = full[len(full) // 2: len(full) // 2 + 3]  # a piece of what greedy decoding will say
    assert stop.strip(), f"pick another slice of {full!r}"
    expected = full[: full.find(stop)]
    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    texts = cli_generate(config(f"ckpt_path={ckpt}", "max_new_tokens=24", *GREEDY, f"stop={json.dumps([stop])}"))
    monkeypatch.undo()
    assert texts == ["ROMEO:" + expected]
    assert out.getvalue() == f"--- sample 0 ---\nROMEO:{expected}\n"  # no half of the stop string leaked
    gen = TextGenerator(*loaded)
    [c] = gen.complete(["ROMEO:"], max_new_tokens=24, stop=[stop], temperature=0.0, repetition_penalty=3.0)
    assert (c.text, c.finish_reason) == (expected, "stop")


def test_chat_answers_two_turns_and_keeps_the_conversation(ckpt, loaded, root, tmp_path, monkeypatch):
    proc = subprocess.run([sys.executable, str(root / "generate.py"), f"ckpt_path={ckpt}", "chat=true", "max_new_tokens=8",
                           *GREEDY, f"hydra.run.dir={tmp_path}"],
                          input="Hello there\nWho are you?\n", capture_output=True, text=True, timeout=300, cwd=root,
                          env={**os.environ, **ONE_THREAD})
    assert proc.returncode == 0, proc.stderr[-3000:]
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\n\n/reset\nHello there\nWho are you?\n/exit\nignored\n"))
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    answers = cli_generate(config(f"ckpt_path={ckpt}", "chat=true", "max_new_tokens=8", *GREEDY))
    monkeypatch.undo()
    assert len(answers) == 3 and answers[0] == answers[1]  # /reset forgot the first exchange
    assert proc.stdout == "".join(a + "\n" for a in answers[1:])
    model, tok = loaded
    gen = TextGenerator(model, tok)
    turns = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": answers[1]},
             {"role": "user", "content": "Who are you?"}]
    for i, n in ((1, 1), (2, 3)):  # turn 2 sees turn 1's answer in its prompt
        [c] = gen.complete([encode_chatml(tok, turns[:n])], max_new_tokens=8, stop=["<|im_end|>"], temperature=0.0,
                           repetition_penalty=3.0)
        assert c.text == answers[i]


def test_hf_dir_generates_what_the_checkpoint_does(ckpt, loaded, tmp_path, monkeypatch):
    hf_dir = export_checkpoint(ckpt, tmp_path / "hf")
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    texts = cli_generate(config(f"hf_dir={hf_dir}", "max_new_tokens=12", *GREEDY))
    monkeypatch.undo()
    assert texts == ["ROMEO:" + direct(*loaded, "ROMEO:", 12)]


def test_bert_checkpoint_is_refused_in_one_line(loaded, cli, tmp_path):
    _, tok = loaded
    cfg = {"family": "bert", "n_layer": 1, "n_head": 2, "n_embd": 32, "intermediate_size": 64, "max_seq_len": 64,
           "vocab_size": tok.vocab_size}
    bert = build(cfg)
    path = tmp_path / "bert.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in bert.state_dict().items()},
                "lmforge": {"schema_version": 1, "config": {"model": cfg}, "tokenizer": tok.to_json()}}, path)
    proc = cli("generate.py", f"ckpt_path={path}", f"hydra.run.dir={tmp_path / 'run'}", env=ONE_THREAD)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert errors == [errors[-1]] and errors[0].startswith("error: ckpt_path: holds a bert model (encoder-only)"), proc.stderr
    assert "Fix: pass a checkpoint of a decoder" in errors[0]


def test_bad_keys_are_one_clear_line(ckpt, tmp_path):
    from lmforge.errors import ConfigError

    with pytest.raises(ConfigError, match="ckpt_path / hf_dir: exactly one of them must be set"):
        cli_generate(config())
    with pytest.raises(ConfigError, match="top_p: top_p must be in"):
        cli_generate(config(f"ckpt_path={ckpt}", "top_p=1.5"))
    with pytest.raises(ConfigError, match="output_file: is required with prompts_file"):
        cli_generate(config(f"ckpt_path={ckpt}", f"prompts_file={tmp_path / 'p.jsonl'}"))
    with pytest.raises(ConfigError, match="cpu_kernels: unknown value 'mkl'"):
        cli_generate(config(f"ckpt_path={ckpt}", "cpu_kernels=mkl"))


def test_cpu_kernels_key_switches_the_kernels_and_keeps_the_text(ckpt, loaded):
    from lmforge.kernels import cpu_kernels

    try:
        ours = cli_generate(config(f"ckpt_path={ckpt}", "max_new_tokens=12", *GREEDY))
        assert cpu_kernels.cpu_kernels() == "lmforge"
        theirs = cli_generate(config(f"ckpt_path={ckpt}", "max_new_tokens=12", *GREEDY, "cpu_kernels=torch"))
        assert cpu_kernels.cpu_kernels() == "torch"
    finally:
        cpu_kernels.set_cpu_kernels("lmforge")
    assert ours == theirs


def test_eval_quantize_key_reports_a_close_loss(ckpt, cache_dir, tmp_path, capsys):
    """`eval.py quantize=...` (run.evaluate in-process, on 2 val batches): int8 costs little loss."""
    from lmforge.run import evaluate

    def run(*overrides: str) -> dict[str, float]:
        with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"):
            cfg = compose("eval", overrides=[f"ckpt_path={ckpt}", f"paths.cache_dir={cache_dir}", f"paths.output_dir={tmp_path}",
                                             "trainer.limit_val_batches=2", *overrides])
        return evaluate(cfg)

    base = run()
    for mode in ("int8_dynamic", "int8_weight"):
        quantized = run(f"quantize={mode}")
        assert f'"quantize": "{mode}"' in capsys.readouterr().out
        assert quantized["val/tokens"] == base["val/tokens"]
        assert quantized["val/loss"] != base["val/loss"], f"{mode} changed nothing: the key is not wired"
        assert abs(quantized["val/loss"] - base["val/loss"]) < 0.01 * base["val/loss"], mode


def test_speculative_and_beam_search_run_through_the_cli(ckpt, loaded, monkeypatch):
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    # greedy speculative decoding is exact: with any draft (here the model itself) it says what greedy says
    texts = cli_generate(config(f"ckpt_path={ckpt}", f"draft_ckpt_path={ckpt}", "num_draft_tokens=3", "max_new_tokens=12", *GREEDY))
    assert texts == ["ROMEO:" + direct(*loaded, "ROMEO:", 12)]
    # beam search ignores the sampling keys (temperature 0.8 / top_p 0.9 from generate.yaml) instead of failing
    [beam] = cli_generate(config(f"ckpt_path={ckpt}", "num_beams=3", "max_new_tokens=8", "repetition_penalty=3.0"))
    assert beam.startswith("ROMEO:") and len(beam) > len("ROMEO:")
    monkeypatch.undo()
