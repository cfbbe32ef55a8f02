"""Post-training records (SFT pairs, preference triples, prompts) from jsonl files, HF datasets or the plays.

Every row is checked and brought to one canonical form per kind, so the datamodules never see a
malformed example:

* "sft":        {"prompt": P, "response": str}          from {"prompt", "response"|"completion"} or
                {"messages": [...]} whose last message is the assistant's (the response)
* "preference": {"prompt": P, "chosen": str, "rejected": str}  from prompt/chosen/rejected texts, from
                chosen/rejected message lists (HF / TRL conversational; the shared turns are the prompt), or
                from chosen/rejected full texts without a prompt (their shared prefix, cut at a word boundary)
* "prompts":    {"prompt": P, "metadata": {every other field}}  from {"prompt"} or {"messages"}

P is a string or a list of {"role", "content"} messages (the conversation so far). A bad row fails with
`file:line` (or `dataset[split] row i`) and the fix, or with `on_error=skip` is counted and logged.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from lmforge.data.readers import ON_ERROR, ReadStats
from lmforge.errors import ConfigError, DataError

KINDS = ("sft", "preference", "prompts")
SOURCE_KEYS = {
    "shakespeare": {"kind", "val_plays", "max_chars", "min_chars", "p_random"},
    "jsonl": {"kind", "train", "val", "val_fraction", "on_error", "fields"},
    "hf": set(
        "kind path name data_files data_dir split_train split_val val_fraction on_error fields revision "
        "cache_dir".split()
    ),
}
_FORMS = {
    "sft": '{"prompt": "...", "response": "..."} or {"messages": [{"role": "user", "content": "..."}, '
    '{"role": "assistant", "content": "..."}]}',
    "preference": '{"prompt": "...", "chosen": "...", "rejected": "..."} '
    "(chosen/rejected may be message lists)",
    "prompts": '{"prompt": "...", ...extra fields kept as metadata} or {"messages": [...]}',
}


class BadRow(ValueError):
    """A row that does not fit its kind: `reason` is the short form counted when skipping."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


# --- one row ---------------------------------------------------------------------------------------
def _messages(value: Any, field: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise BadRow(
            f"{field} not a message list",
            f"field {field!r} must be a non-empty list of {{'role', 'content'}} messages",
        )
    for i, m in enumerate(value):
        if (
            not isinstance(m, Mapping)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise BadRow(
                f"bad message in {field}", f"{field}[{i}] must be {{'role': str, 'content': str}}, got {m!r}"
            )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _text(row: Mapping[str, Any], field: str) -> str:
    if field not in row:
        raise BadRow(f"no field {field!r}", f"no field {field!r}")
    if not isinstance(row[field], str):
        raise BadRow(f"{field} not a string", f"field {field!r} is {type(row[field]).__name__}, not a string")
    return row[field]


def _prompt(row: Mapping[str, Any]) -> str | list[dict[str, str]]:
    value = row.get("prompt")
    return _messages(value, "prompt") if isinstance(value, list) else _text(row, "prompt")


def _as_messages(prompt: str | list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _split_conversation(conv: list[dict[str, str]], field: str) -> tuple[list[dict[str, str]], str]:
    """(the turns before, the final assistant turn's text)."""
    if conv[-1]["role"] != "assistant":
        raise BadRow(
            f"{field} not ending with assistant",
            f"the last message of {field!r} must be the assistant's "
            f"(it is the completion), got role {conv[-1]['role']!r}",
        )
    return conv[:-1], conv[-1]["content"]


def _shared_prefix(a: str, b: str) -> int:
    """Length of the common prefix of a and b, moved back to just after whitespace so no word is cut."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    if n < min(len(a), len(b)):  # they differ inside a word: the prompt ends at the last whitespace before it
        while n > 0 and not a[n - 1].isspace():
            n -= 1
    return n


def sft_record(row: Mapping[str, Any]) -> dict[str, Any]:
    if "messages" in row:
        context, response = _split_conversation(_messages(row["messages"], "messages"), "messages")
        return {"prompt": context, "response": response}
    return {
        "prompt": _prompt(row),
        "response": _text(row, "completion" if "completion" in row and "response" not in row else "response"),
    }


def preference_record(row: Mapping[str, Any]) -> dict[str, Any]:
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if isinstance(chosen, list) or isinstance(rejected, list):
        c_ctx, c_text = _split_conversation(_messages(chosen, "chosen"), "chosen")
        r_ctx, r_text = _split_conversation(_messages(rejected, "rejected"), "rejected")
        if c_ctx != r_ctx:
            raise BadRow(
                "chosen/rejected contexts differ",
                "chosen and rejected must share every message before their last",
            )
        prompt = (_as_messages(_prompt(row)) if "prompt" in row else []) + c_ctx
        if not prompt:
            raise BadRow("no prompt", "no prompt: give a 'prompt' field or the user turns in chosen/rejected")
        return {"prompt": prompt, "chosen": c_text, "rejected": r_text}
    c_text, r_text = _text(row, "chosen"), _text(row, "rejected")
    if "prompt" in row:
        return {"prompt": _prompt(row), "chosen": c_text, "rejected": r_text}
    n = _shared_prefix(c_text, r_text)
    if n == 0 or n == len(c_text) or n == len(r_text):
        raise BadRow(
            "no prompt",
            "no 'prompt' field, and chosen/rejected share no prefix (or one is the prefix of the other) "
            "to take as the prompt",
        )
    return {"prompt": c_text[:n], "chosen": c_text[n:], "rejected": r_text[n:]}


def prompt_record(row: Mapping[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in row.items() if k not in ("prompt", "messages", "metadata")}
    if isinstance(row.get("metadata"), Mapping):
        meta.update(row["metadata"])
    if "messages" in row and "prompt" not in row:
        conv = _messages(row["messages"], "messages")
        if conv[-1]["role"] == "assistant":  # an SFT conversation: its answer is the reference
            conv, meta["reference"] = conv[:-1], conv[-1]["content"]
        if not conv:
            raise BadRow("no prompt", "'messages' holds only an assistant turn: nothing to prompt with")
        return {"prompt": conv, "metadata": meta}
    return {"prompt": _prompt(row), "metadata": meta}


VALIDATORS = {"sft": sft_record, "preference": preference_record, "prompts": prompt_record}


def prompt_text(prompt: str | list[dict[str, str]]) -> str:
    """The prompt as plain text (for rewards, logs, tokenizer training): a conversation's contents by line."""
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


def record_text(record: Mapping[str, Any]) -> str:
    """The text a record teaches (prompt + response/chosen): what a tokenizer for this data is trained on."""
    tail = record.get("response", record.get("chosen"))
    return prompt_text(record["prompt"]) + ("" if tail is None else "\n" + tail)


# --- many rows -------------------------------------------------------------------------------------
class RecordReader:
    """Validates rows of one kind, failing on the first bad one or (on_error=skip) counting them."""

    def __init__(
        self,
        kind: str,
        on_error: str = "fail",
        fields: Mapping[str, str] | None = None,
        key: str = "data.source",
    ) -> None:
        if kind not in KINDS:
            raise ConfigError(f"{key}.kind", f"unknown record kind {kind!r}", f"use one of {KINDS}")
        if on_error not in ON_ERROR:
            raise ConfigError(
                f"{key}.on_error",
                f"{on_error!r} is not one of {ON_ERROR}",
                f"set {key}.on_error=fail or skip",
            )
        self.kind, self.on_error, self.key = kind, on_error, key
        self.fields = dict(fields or {})
        self.stats = ReadStats()

    def _rename(self, row: Mapping[str, Any]) -> dict[str, Any]:
        row = dict(row)
        for canonical, source in self.fields.items():
            if source in row:
                row[canonical] = row.pop(source)
        return row

    def rows(self, rows: Iterable[tuple[str, Any]]) -> list[dict[str, Any]]:
        """Canonical records of (where, row) pairs; `where` names the row in errors (`file:line`)."""
        out = []
        for where, row in rows:
            try:
                if isinstance(row, BadRow):
                    raise row
                if not isinstance(row, Mapping):
                    raise BadRow("not an object", f"a row must be a JSON object, got {type(row).__name__}")
                out.append(VALIDATORS[self.kind](self._rename(row)))
            except BadRow as bad:
                if self.on_error == "fail":
                    raise DataError(
                        f"{where}: {bad.detail}. Fix: write {self.kind} rows as {_FORMS[self.kind]} (or map "
                        f"your field names with {self.key}.fields), or set {self.key}.on_error=skip"
                    ) from None
                self.stats.skip_row(bad.reason, where)
        return out


def _jsonl_rows(paths: list[Path]) -> Iterator[tuple[str, Any]]:
    for path in paths:
        try:
            with path.open(encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row: Any = json.loads(line)
                    except json.JSONDecodeError as err:
                        row = BadRow("not valid JSON", f"not valid JSON ({err.msg} at column {err.colno})")
                    yield f"{path}:{lineno}", row
        except UnicodeDecodeError as err:
            raise DataError(
                f"{path}: byte {err.object[err.start]:#04x} at offset {err.start} is not UTF-8. "
                "Fix: convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
            ) from None


def _expand(pattern: str, key: str) -> list[Path]:
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(
            key,
            f"must be a path or glob, got {pattern!r}",
            f"set {key}='data/train.jsonl' (globs like 'data/*.jsonl' work)",
        )
    paths = sorted(
        Path(p) for p in glob.glob(str(Path(pattern).expanduser()), recursive=True) if Path(p).is_file()
    )
    if not paths:
        raise DataError(
            f"{key}={pattern!r} matches no file. Fix: point {key} at existing .jsonl files "
            "(globs like 'data/*.jsonl' work)"
        )
    return paths


def load_jsonl(
    pattern: str,
    kind: str,
    on_error: str = "fail",
    fields: Mapping[str, str] | None = None,
    key: str = "data.source.train",
) -> list[dict[str, Any]]:
    """Every row of the jsonl files matching `pattern`, validated as `kind`."""
    reader = RecordReader(kind, on_error, fields, key.rsplit(".", 1)[0])
    paths = _expand(pattern, key)
    records = reader.rows(_jsonl_rows(paths))
    reader.stats.files_read = len(paths)
    return _non_empty(records, reader, f"{key}={pattern!r}")


def load_hf(
    path: str,
    split: str,
    kind: str,
    on_error: str = "fail",
    fields: Mapping[str, str] | None = None,
    key: str = "data.source",
    **load_kwargs: Any,
) -> list[dict[str, Any]]:
    """Validated rows of one split of a `datasets` dataset (local dir, data files or save_to_disk output)."""
    import datasets

    reader = RecordReader(kind, on_error, fields, key)
    try:
        saved = Path(path).is_dir() and any(
            (Path(path) / f).is_file() for f in ("dataset_dict.json", "state.json")
        )
        if saved:
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"Unknown split {split!r}; available: {list(ds)}")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(
                path, split=split, **{k: v for k, v in load_kwargs.items() if v is not None}
            )
    except (ValueError, KeyError) as err:
        raise DataError(
            f"{key}: cannot load split {split!r} of dataset {path!r} ({err}). Fix: set {key}.split_train / "
            f"{key}.split_val to existing splits"
        ) from None
    except OSError as err:
        raise DataError(
            f"{key}.path={path!r}: no such local dataset and not reachable on the Hub ({err}). Fix: point "
            f"{key}.path at a dataset dir or data files, or pre-download it"
        ) from None
    records = reader.rows((f"{path}[{split}] row {i}", row) for i, row in enumerate(ds))
    return _non_empty(records, reader, f"{key}.path={path!r} split {split!r}")


def _non_empty(records: list[dict[str, Any]], reader: RecordReader, what: str) -> list[dict[str, Any]]:
    reader.stats.warn_if_skipped(reader.key)
    if not records:
        raise DataError(
            f"{what} gives no {reader.kind} record ({reader.stats.summary()}"
            f"{', e.g. ' + '; '.join(reader.stats.examples) if reader.stats.examples else ''}). "
            f"Fix: point it at rows like {_FORMS[reader.kind]}"
        )
    return records


# --- a source config -------------------------------------------------------------------------------
def _hold_out(records: list[dict[str, Any]], fraction: Any, key: str) -> dict[str, list[dict[str, Any]]]:
    """Every k-th record (k = round(1 / fraction)) to val: deterministic, independent of the run's seed."""
    if not isinstance(fraction, (int, float)) or not 0 < fraction <= 0.5:
        raise ConfigError(
            f"{key}.val_fraction",
            f"must be in (0, 0.5] when no val data is given, got {fraction!r}",
            f"set {key}.val_fraction=0.05 or give {key}.val",
        )
    every = max(2, round(1 / fraction))
    if len(records) < 2:
        raise DataError(
            f"{key}: {len(records)} record, need 2+ to hold one out for validation. "
            f"Fix: add data or give {key}.val"
        )
    val = records[every - 1 :: every] or records[-1:]
    held = {id(r) for r in val}
    return {"train": [r for r in records if id(r) not in held], "val": val}


def load_source(
    source: Mapping[str, Any] | None, kind: str, seed: int = 0, key: str = "data.source"
) -> dict[str, list[dict[str, Any]]]:
    """{"train": records, "val": records} of kind `kind` from a `data.source` mapping
    (`kind: shakespeare|jsonl|hf`)."""
    if not isinstance(source, Mapping) or "kind" not in source:
        raise ConfigError(
            key,
            f"must be a mapping with a `kind`, got {source!r}",
            f"set {key}={{kind: shakespeare}} or {{kind: jsonl, train: 'data/*.jsonl'}} "
            "or {kind: hf, path: ...}",
        )
    source_kind = source["kind"]
    if source_kind not in SOURCE_KEYS:
        raise ConfigError(
            f"{key}.kind", f"unknown source kind {source_kind!r}", f"use one of {sorted(SOURCE_KEYS)}"
        )
    unknown = sorted(set(source) - SOURCE_KEYS[source_kind])
    if unknown:
        raise ConfigError(
            f"{key}.{unknown[0]}",
            f"is not a setting of a {source_kind} source",
            f"use only {sorted(SOURCE_KEYS[source_kind] - {'kind'})}",
        )
    opts = {k: v for k, v in source.items() if k != "kind"}
    if source_kind == "shakespeare":
        from lmforge.data.shakespeare_tasks import ShakespeareTasks

        p_random = opts.pop("p_random", 0.0)
        if p_random and kind != "preference":
            raise ConfigError(f"{key}.p_random", "only applies to preference data", f"remove {key}.p_random")
        tasks = ShakespeareTasks(**opts)
        if kind == "sft":
            return {s: tasks.sft_records(s) for s in ("train", "val")}
        if kind == "preference":
            # val rejections use a fixed seed: val metrics stay comparable across run seeds
            return {
                "train": tasks.preference_records("train", seed=seed, p_random=p_random),
                "val": tasks.preference_records("val", seed=0, p_random=p_random),
            }
        return {s: tasks.prompt_records(s) for s in ("train", "val")}
    on_error, fields, fraction = (
        opts.get("on_error", "fail"),
        opts.get("fields"),
        opts.get("val_fraction", 0.05),
    )
    if fields is not None and not isinstance(fields, Mapping):
        raise ConfigError(
            f"{key}.fields",
            f"must map record fields to your column names, got {fields!r}",
            f"set e.g. {key}.fields={{prompt: question, response: answer}}",
        )
    if source_kind == "jsonl":
        train = load_jsonl(opts.get("train"), kind, on_error, fields, f"{key}.train")
        if opts.get("val"):
            return {"train": train, "val": load_jsonl(opts["val"], kind, on_error, fields, f"{key}.val")}
        return _hold_out(train, fraction, key)
    path = opts.pop("path", None)
    if not isinstance(path, str) or not path:
        raise ConfigError(
            f"{key}.path",
            f"must name a dataset, got {path!r}",
            f"set {key}.path to a local dataset dir, or json with data_files",
        )
    load_kwargs = {k: opts.get(k) for k in ("name", "data_files", "data_dir", "revision", "cache_dir")}
    train = load_hf(path, opts.get("split_train", "train"), kind, on_error, fields, key, **load_kwargs)
    if opts.get("split_val"):
        return {
            "train": train,
            "val": load_hf(path, opts["split_val"], kind, on_error, fields, key, **load_kwargs),
        }
    return _hold_out(train, fraction, key)
