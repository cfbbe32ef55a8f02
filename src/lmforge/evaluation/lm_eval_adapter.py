"""EleutherAI lm-eval-harness over an lmforge model + tokenizer: standard benchmarks on our checkpoints.

`HarnessLM` implements the harness's three request types on plain `.args` tuples (testable without the
harness installed); `make_lm_eval_model` mixes it into `lm_eval.api.model.LM` when the optional extra is
there. lm_eval is imported lazily: it is heavy and needs datasets downloaded, so lmforge never requires it.

- loglikelihood((context, continuation)) -> (log p, is_greedy): the same scoring as task=mc.
- loglikelihood_rolling((text,)) -> log p(text) after an EOS document break, in windows of the model's
  context, each with as much preceding text as fits (lm-eval's rolling windows).
- generate_until((context, {"until": [...], "max_gen_toks": n, ...})) -> greedy text cut at a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import ConfigError
from lmforge.evaluation.multiple_choice import check_decoder, score_continuations, score_rows
from lmforge.generation.state import context_limit

INSTALL_HINT = "pip install lm-eval (or pip install 'lmforge[lm_eval]')"


class HarnessLM:
    """lm-eval's LM methods over an lmforge model; requests are anything with `.args`."""

    def __init__(
        self, model: nn.Module, tokenizer: Tokenizer, batch_size: int = 8, max_gen_toks: int = 256
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_gen_toks = int(batch_size), int(max_gen_toks)

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        pairs = [(str(r.args[0]), str(r.args[1])) for r in requests]
        return score_continuations(self.model, self.tokenizer, pairs, self.batch_size) if pairs else []

    def loglikelihood_rolling(self, requests: Sequence[Any]) -> list[float]:
        check_decoder(self.model, "loglikelihood_rolling")
        limit = context_limit(self.model)
        rows: list[tuple[list[int], int]] = []
        owner: list[int] = []
        for k, req in enumerate(requests):
            tokens = [self.tokenizer.eos_id, *self.tokenizer.encode(str(req.args[0]))]
            step = limit or len(tokens)
            for s in range(1, len(tokens), step):  # targets tokens[s:e], inputs up to `limit` tokens before e
                e = min(s + step, len(tokens))
                begin = max(0, e - 1 - limit) if limit else 0
                rows.append((tokens[begin:e], e - s))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (logp, _) in zip(owner, score_rows(self.model, rows, self.tokenizer.pad_id, self.batch_size)):
            totals[k] += logp
        return totals

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        from lmforge.generation.engine import TextGenerator

        engine = TextGenerator(self.model, self.tokenizer)
        out: list[str] = []
        for req in requests:  # one at a time: each request carries its own stop strings and length
            context, kwargs = str(req.args[0]), dict(req.args[1] if len(req.args) > 1 else {})
            until = kwargs.get("until") or []
            stop = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            done = engine.complete(
                [context],
                max_new_tokens=int(kwargs.get("max_gen_toks", self.max_gen_toks)),
                stop=stop or None,
                temperature=temperature,
            )
            out.append(done[0].text)
        return out


def import_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError as err:
        raise ConfigError(
            "task", "task=lm_eval needs EleutherAI's lm-eval harness, which is not installed", INSTALL_HINT
        ) from err
    return lm_eval


def make_lm_eval_model(
    model: nn.Module, tokenizer: Tokenizer, batch_size: int = 8, max_gen_toks: int = 256
) -> Any:
    """A `lm_eval.api.model.LM` instance whose methods are HarnessLM's."""
    import_lm_eval()
    from lm_eval.api.model import LM

    class LmforgeLM(HarnessLM, LM):  # HarnessLM first: its methods implement LM's abstract ones
        def __init__(self) -> None:
            LM.__init__(self)
            HarnessLM.__init__(self, model, tokenizer, batch_size, max_gen_toks)

    return LmforgeLM()


def flatten_results(results: dict[str, Any]) -> dict[str, float]:
    """{"results": {task: {"acc,none": x}}} -> {"lm_eval/<task>/acc": x}: numbers only, no `,none`."""
    flat: dict[str, float] = {}
    for task, metrics in (results.get("results") or {}).items():
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metric, _, filt = str(name).partition(",")
                flat[f"lm_eval/{task}/{metric}" + (f"_{filt}" if filt and filt != "none" else "")] = float(
                    value
                )
    return flat


def harness_evaluate(
    model: nn.Module,
    tokenizer: Tokenizer,
    *,
    tasks: Sequence[str] | str | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    max_gen_toks: int = 256,
    seed: int | None = None,
    include_path: str | Sequence[str] | None = None,
    include_defaults: bool = True,
    **kwargs: Any,
) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` on the named tasks: the harness's whole result dict (results, samples, configs).

    `include_path`: directories of your own task YAMLs (e.g. a local jsonl through `dataset_path: json` and
    `dataset_kwargs: {data_files: ...}`); `include_defaults=false` skips indexing the harness's ~10K built-in
    tasks (seconds) when only those are wanted. Other keys (bootstrap_iters, gen_kwargs, ...) go to
    simple_evaluate as they are.
    """
    names = [tasks] if isinstance(tasks, str) else list(tasks or [])
    if not names:
        raise ConfigError(
            "lm_eval.tasks", "is empty", "name lm-eval tasks, e.g. lm_eval.tasks=[hellaswag,arc_easy]"
        )
    lm_eval = import_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [include_path] if isinstance(include_path, str) else list(include_path or [])
    for path in paths:
        if not Path(path).is_dir():
            raise ConfigError(
                "lm_eval.include_path", f"{path!r} is not a directory", "pass directories of task YAML files"
            )
    if not paths and not include_defaults:
        raise ConfigError(
            "lm_eval.include_defaults",
            "is false and no include_path is given: no task can be found",
            "pass lm_eval.include_path=<dir of task YAMLs> or set lm_eval.include_defaults=true",
        )
    manager = TaskManager(include_path=paths or None, include_defaults=include_defaults)
    unknown = [n for n in names if n not in manager.all_tasks and not Path(n).is_file()]
    if unknown:
        where = f" or under {paths}" if paths else ""
        raise ConfigError(
            "lm_eval.tasks",
            f"{unknown} are not lm-eval tasks, groups or tags{where}",
            "use names from `lm-eval ls tasks`, or a task YAML's `task:` name with lm_eval.include_path=<its dir>",
        )
    lm = make_lm_eval_model(model, tokenizer, batch_size, max_gen_toks)
    if seed is not None:
        for key in ("random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed"):
            kwargs.setdefault(key, seed)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager, **kwargs
    )
    return results or {}


def run_lm_eval(model: nn.Module, tokenizer: Tokenizer, **options: Any) -> dict[str, float]:
    """eval.py task=lm_eval: `harness_evaluate`'s metrics, flattened to `lm_eval/<task>/<metric>`."""
    return flatten_results(harness_evaluate(model, tokenizer, **options))
