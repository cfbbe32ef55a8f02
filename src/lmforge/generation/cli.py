"""`python generate.py`: one prompt streamed to stdout, a prompts file to a jsonl, or an interactive chat.

    python generate.py ckpt_path=last prompt="ROMEO:" temperature=0.8 top_p=0.9
    python generate.py hf_dir=exported/ prompts_file=prompts.jsonl output_file=out.jsonl temperature=0
    python generate.py ckpt_path=last chat=true          # stdin lines are user turns (ChatML)
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from lmforge.data.chat import IM_END, encode_chatml, im_end_id
from lmforge.errors import ConfigError, DataError
from lmforge.generation.engine import TextGenerator
from lmforge.generation.loading import load_model
from lmforge.generation.stop_strings import normalize_stop, unescape
from lmforge.kernels.cpu_kernels import set_cpu_kernels
from lmforge.utils.io import atomic_write_text

log = logging.getLogger("lmforge")


def _opt(cfg: DictConfig, key: str) -> Any:
    return cfg.get(key) if key in cfg else None


def sampling_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The decoding settings of the config, as `lmforge.generation.generate` keywords, checked up front."""
    from lmforge.generation.sampling import check_sampling_args

    kwargs: dict[str, Any] = {"temperature": float(cfg.get("temperature", 0.0))}
    for key in ("top_k", "top_p", "min_p", "repetition_penalty"):
        if _opt(cfg, key) is not None:
            kwargs[key] = cfg[key]
    try:
        check_sampling_args(kwargs["temperature"], kwargs.get("top_p"), kwargs.get("min_p"), kwargs.get("repetition_penalty"))
    except ValueError as err:  # the message starts with the key's name
        raise ConfigError(str(err).split()[0], str(err), "see conf/generate.yaml for each key's range") from None
    beams = int(cfg.get("num_beams", 1))
    if beams < 1:
        raise ConfigError("num_beams", f"must be >= 1, got {beams}", "set num_beams=1 (sampling) or more (beam search)")
    if beams > 1:
        if _opt(cfg, "draft_ckpt_path"):
            raise ConfigError("num_beams", "beam search and speculative decoding (draft_ckpt_path) cannot be combined", "set num_beams=1 or draft_ckpt_path=null")
        # beam search is deterministic: the sampling warpers do not apply to it
        kwargs = {k: v for k, v in kwargs.items() if k == "repetition_penalty"}
        kwargs.update(temperature=0.0, num_beams=beams, length_penalty=float(cfg.get("length_penalty", 1.0)))
    if _opt(cfg, "draft_ckpt_path"):
        kwargs["num_draft_tokens"] = int(cfg.get("num_draft_tokens", 4))
        if kwargs["num_draft_tokens"] < 1:
            raise ConfigError("num_draft_tokens", f"must be >= 1, got {kwargs['num_draft_tokens']}", "set num_draft_tokens=4")
    return kwargs


def cli_stop_strings(cfg: DictConfig) -> list[str]:
    """`stop` as a list, with command-line escapes decoded (stop='\\n' is a newline)."""
    stop = OmegaConf.to_container(cfg.stop) if OmegaConf.is_list(cfg.get("stop")) else _opt(cfg, "stop")
    stops = normalize_stop(stop)
    return normalize_stop([unescape(s) for s in stops])


def load_generator(cfg: DictConfig) -> TextGenerator:
    """The model (ckpt_path or hf_dir) and, for speculative decoding, a draft sharing its tokenizer."""
    common = {"device": cfg.get("device", "auto"), "dtype": cfg.get("dtype", "auto"), "log_dir": cfg.paths.log_dir,
              "task_name": cfg.get("train_task_name", "train")}
    main = load_model(_opt(cfg, "ckpt_path"), _opt(cfg, "hf_dir"), quantize=_opt(cfg, "quantize"), **common)
    draft = None
    if _opt(cfg, "draft_ckpt_path"):
        path = str(cfg.draft_ckpt_path)
        as_dir = Path(path).is_dir()
        draft = load_model(None if as_dir else path, path if as_dir else None, keys=("draft_ckpt_path", "draft_ckpt_path"), **common)
        if draft.tokenizer.hf.get_vocab(with_added_tokens=True) != main.tokenizer.hf.get_vocab(with_added_tokens=True):
            raise ConfigError("draft_ckpt_path", f"{path} uses a different tokenizer than the main model, so its token ids mean other things",
                              "use a draft model trained with the main model's tokenizer")
    log.info("generating with %s", main.name)
    return TextGenerator(main.model, main.tokenizer, draft.model if draft else None)


def _stdout(_row: int, text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def single_prompt(gen: TextGenerator, cfg: DictConfig, settings: dict[str, Any]) -> list[str]:
    """`num_samples` continuations of `prompt`; one sample is streamed to stdout token by token."""
    n = int(cfg.get("num_samples", 1))
    if n < 1:
        raise ConfigError("num_samples", f"must be >= 1, got {n}", "set num_samples=1 or more")
    prompt = str(cfg.prompt)
    texts = []
    if n == 1 and settings.get("num_beams", 1) == 1:  # beam search only knows its tokens at the end
        print("--- sample 0 ---", flush=True)
        _stdout(0, prompt)
        out = gen.complete([prompt], on_text=_stdout, **settings)
        print(flush=True)
        return [prompt + out[0].text]
    for i, c in enumerate(gen.complete([prompt] * n, **settings)):
        texts.append(prompt + c.text)
        print(f"--- sample {i} ---\n{texts[-1]}", flush=True)
    return texts


def read_prompts(path: str) -> list[dict[str, Any]]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError("prompts_file", f"{path!r} does not exist", "pass a .jsonl file with one {\"prompt\": ...} object per line")
    records = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"prompts_file {path}:{n} is not JSON ({err.msg}). Fix: one JSON object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise DataError(f'prompts_file {path}:{n} has no string "prompt". Fix: write lines like {{"prompt": "ROMEO:"}}')
        records.append(record)
    return records


def prompts_file(gen: TextGenerator, cfg: DictConfig, settings: dict[str, Any]) -> list[str]:
    """Every prompt of a jsonl, `batch_size` at a time (left-padded), to `output_file` with its completion."""
    if not _opt(cfg, "output_file"):
        raise ConfigError("output_file", "is required with prompts_file", "pass output_file=<path>.jsonl")
    if int(cfg.get("num_samples", 1)) != 1:
        raise ConfigError("num_samples", "applies to a single prompt only", "set num_samples=1 with prompts_file (repeat lines instead)")
    batch = int(cfg.get("batch_size", 8))
    if batch < 1:
        raise ConfigError("batch_size", f"must be >= 1, got {batch}", "set batch_size=8")
    records = read_prompts(str(cfg.prompts_file))
    lines = []
    for start in range(0, len(records), batch):
        chunk = records[start:start + batch]
        for record, c in zip(chunk, gen.complete([r["prompt"] for r in chunk], **settings)):
            lines.append(json.dumps({**record, "completion": c.text, "finish_reason": c.finish_reason}, ensure_ascii=False))
        log.info("%d/%d prompts", min(start + batch, len(records)), len(records))
    atomic_write_text(cfg.output_file, "".join(line + "\n" for line in lines))
    print(f"wrote {len(lines)} completions to {cfg.output_file}", flush=True)
    return [json.loads(line)["completion"] for line in lines]


def chat(gen: TextGenerator, cfg: DictConfig, settings: dict[str, Any]) -> list[str]:
    """Each stdin line is a user turn; the answer streams to stdout. `/reset` forgets, `/exit` or EOF ends.

    The whole conversation is re-rendered with ChatML every turn; the oldest turns are dropped (the
    system prompt kept) when it would not fit the context together with max_new_tokens.
    """
    tok = gen.tokenizer
    end_id = im_end_id(tok)
    settings = dict(settings)
    settings["eos_token_ids"] = [end_id] if end_id is not None else []
    settings["stop"] = list(settings.get("stop") or []) + ([] if end_id is not None else [IM_END])
    system = [{"role": "system", "content": str(cfg.system)}] if _opt(cfg, "system") else []
    history: list[dict[str, str]] = []
    answers = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:  # the prompt marker goes to stderr: stdout holds only the answers
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            history = []
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        ids = encode_chatml(tok, system + history)
        while gen.context is not None and len(ids) + settings["max_new_tokens"] > gen.context and len(history) > 1:
            history.pop(0)
            ids = encode_chatml(tok, system + history)
        out = gen.complete([ids], on_text=None if settings.get("num_beams", 1) > 1 else _stdout, **settings)[0]
        if settings.get("num_beams", 1) > 1:
            _stdout(0, out.text)
        print(flush=True)
        history.append({"role": "assistant", "content": out.text})
        answers.append(out.text)
    return answers


def generate(cfg: DictConfig) -> list[str]:
    """Pick the mode from the config: chat=true, prompts_file=..., or the single `prompt`."""
    if _opt(cfg, "seed") is not None:  # seed=0 seeds too; `generate` also gets its own seeded generator
        torch.manual_seed(int(cfg.seed))
    if cfg.get("chat") and _opt(cfg, "prompts_file"):
        raise ConfigError("chat", "and prompts_file are two different modes", "pass either chat=true or prompts_file=..., not both")
    if int(cfg.max_new_tokens) < 0:
        raise ConfigError("max_new_tokens", f"must be >= 0, got {cfg.max_new_tokens}", "set max_new_tokens=200")
    set_cpu_kernels(cfg.get("cpu_kernels", "lmforge"))
    gen = load_generator(cfg)
    settings = {**sampling_kwargs(cfg), "max_new_tokens": int(cfg.max_new_tokens), "seed": _opt(cfg, "seed"),
                "stop": cli_stop_strings(cfg)}
    if cfg.get("chat"):
        return chat(gen, cfg, settings)
    if _opt(cfg, "prompts_file"):
        return prompts_file(gen, cfg, settings)
    return single_prompt(gen, cfg, settings)
