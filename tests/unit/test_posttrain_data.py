"""Post-training data: SFT / preference / prompt datamodules, records (jsonl, HF), the Shakespeare tasks."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from lmforge.data.chat import CHATML_SPECIALS, IM_END, IM_START, encode_chatml
from lmforge.data.examples import Example, build_example
from lmforge.data.preference import PreferenceDataModule
from lmforge.data.prompts import PromptDataModule
from lmforge.data.records import load_jsonl, load_source
from lmforge.data.sft import SFTDataModule
from lmforge.data.shakespeare_tasks import ShakespeareTasks, parse_play, shuffle_words
from lmforge.data.tokenizer import ByteTokenizerSpec, Tokenizer
from lmforge.errors import ConfigError, DataError

IGNORE = -100
VAL_PLAYS = ("tragedies/hamlet.md", "romances/the-tempest.md")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """One token per byte + eos/bos/pad + the ChatML markers: no training needed."""
    tokenizer = ByteTokenizerSpec().train(iter([""]))
    tokenizer.add_special_tokens(CHATML_SPECIALS)
    return tokenizer


def write_jsonl(path: Path, rows: list[Any]) -> str:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return str(path)


def jsonl_source(
    tmp_path: Path, train: list[Any], val: list[Any] | None = None, **extra: Any
) -> dict[str, Any]:
    source = {"kind": "jsonl", "train": write_jsonl(tmp_path / "train.jsonl", train), **extra}
    if val is not None:
        source["val"] = write_jsonl(tmp_path / "val.jsonl", val)
    return source


def module(cls: type, tok: Tokenizer, **kwargs: Any) -> Any:
    dm = cls(**kwargs)
    dm.set_tokenizer(tok)
    dm.setup()
    return dm


def trained(tok: Tokenizer, targets: torch.Tensor) -> str:
    return tok.decode([t for t in targets.tolist() if t != IGNORE], skip_special_tokens=False)


# --- SFT ---------------------------------------------------------------------------------------------
def test_sft_chatml_trains_only_the_response_and_its_end_tokens(tmp_path: Path, tok: Tokenizer) -> None:
    rows = [{"prompt": "Hi", "response": "Yo"}, {"prompt": "Say more", "response": "Ok then"}]
    dm = module(SFTDataModule, tok, source=jsonl_source(tmp_path, rows, rows), batch_size=2, max_length=64)
    batch = next(iter(dm.val_dataloader()))
    start, end = tok.hf.token_to_id(IM_START), tok.hf.token_to_id(IM_END)
    prompt = [start, *tok.encode("user\nHi"), end, *tok.encode("\n"), start, *tok.encode("assistant\n")]
    ids = prompt + tok.encode("Yo") + [end, tok.eos_id]
    T = len(ids) - 1
    assert batch["input_ids"][0, :T].tolist() == ids[:-1]
    for t in range(T):  # token by token: the target of position t is ids[t+1] iff ids[t+1] is response or end
        expected = ids[t + 1] if t + 1 >= len(prompt) else IGNORE
        assert batch["targets"][0, t].item() == expected, t
    assert trained(tok, batch["targets"][0]) == f"Yo{IM_END}<|eos|>"
    # padding: the first row is shorter than the second
    assert batch["attention_mask"][0].tolist() == [1] * T + [0] * (batch["input_ids"].size(1) - T)
    assert (batch["input_ids"][0, T:] == tok.pad_id).all() and (batch["targets"][0, T:] == IGNORE).all()
    assert trained(tok, batch["targets"][1]) == f"Ok then{IM_END}<|eos|>"
    assert dm.special_tokens() == CHATML_SPECIALS
    assert prompt == encode_chatml(tok, [{"role": "user", "content": "Hi"}])  # what chat / serving send


def test_chatml_without_marker_tokens_spells_them_as_text(tmp_path: Path) -> None:
    bare = ByteTokenizerSpec().train(iter([""]))  # no <|im_start|>/<|im_end|> ids
    rows = [{"prompt": "Hi", "response": "Yo"}] * 2
    dm = module(SFTDataModule, bare, source=jsonl_source(tmp_path, rows, rows), batch_size=2)
    batch = next(iter(dm.val_dataloader()))
    prompt = encode_chatml(bare, [{"role": "user", "content": "Hi"}])
    assert batch["input_ids"][0, : len(prompt)].tolist() == prompt
    assert trained(bare, batch["targets"][0]) == f"Yo{IM_END}<|eos|>"


def test_sft_plain_template_and_messages(tmp_path: Path, tok: Tokenizer) -> None:
    rows = [
        {
            "messages": [
                {"role": "user", "content": "A"},
                {"role": "assistant", "content": "B"},
                {"role": "user", "content": "C"},
                {"role": "assistant", "content": "D"},
            ]
        },
        {"prompt": "Who?", "completion": "Me."},
    ]
    dm = module(SFTDataModule, tok, source=jsonl_source(tmp_path, rows, rows), template="plain", batch_size=2)
    batch = next(iter(dm.val_dataloader()))
    ids = tok.encode("A\nB\nC\n") + tok.encode("D") + [tok.eos_id]
    assert batch["input_ids"][0, : len(ids) - 1].tolist() == ids[:-1]
    assert trained(tok, batch["targets"][0]) == "D<|eos|>"
    assert trained(tok, batch["targets"][1]) == "Me.<|eos|>"
    assert dm.special_tokens() == {}
    assert "Who?\nMe." in [d.text for d in dm.corpus.documents("train")]


def test_sft_system_prompt_is_a_context_turn(tmp_path: Path, tok: Tokenizer) -> None:
    rows = [{"prompt": "Hi", "response": "Yo"}] * 2
    dm = module(
        SFTDataModule, tok, source=jsonl_source(tmp_path, rows, rows), system_prompt="Be brief.", batch_size=2
    )
    text = tok.decode(next(iter(dm.val_dataloader()))["input_ids"][0].tolist(), skip_special_tokens=False)
    assert text.startswith(f"{IM_START}system\nBe brief.{IM_END}\n{IM_START}user\nHi")


def test_truncation_cuts_the_prompt_left_then_the_response_and_keeps_the_end() -> None:
    end = [98, 99]
    e = build_example(list(range(10)), [50, 51, 52], end, max_length=8)  # prompt cut from the left
    assert e.ids == (4, 5, 6, 7, 8, 9, 50, 51, 52, 98, 99)[-9:] and len(e) == 8 and e.n_prompt == 4
    assert e.targets() == [IGNORE] * 3 + [50, 51, 52, 98, 99]
    e = build_example(
        list(range(10)), list(range(50, 70)), end, max_length=8
    )  # then the response from the right
    assert e.ids == (9, 50, 51, 52, 53, 54, 55, 98, 99) and e.n_prompt == 1
    assert e.targets()[-2:] == end and e.targets()[0] == 50  # the first response token stays a target
    assert build_example([1, 2], [3], end, max_length=8).ids == (1, 2, 3, 98, 99)  # short: untouched


def test_sft_truncated_batch_ends_with_trained_end_tokens(tmp_path: Path, tok: Tokenizer) -> None:
    rows = [{"prompt": "p" * 50, "response": "r" * 50}] * 2
    dm = module(SFTDataModule, tok, source=jsonl_source(tmp_path, rows, rows), batch_size=2, max_length=24)
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape == (2, 24)
    assert batch["targets"][0, -2:].tolist() == [tok.hf.token_to_id(IM_END), tok.eos_id]
    assert tok.decode(batch["input_ids"][0].tolist(), skip_special_tokens=False).startswith(
        "\n"
    )  # end of "assistant\n"


def test_packing_gives_the_same_targets_and_a_block_diagonal_mask(tmp_path: Path, tok: Tokenizer) -> None:
    rows = [{"prompt": f"q{i}" * (i % 4 + 1), "response": f"a{i}" * (3 - i % 3)} for i in range(12)]
    src = jsonl_source(tmp_path, rows, rows)
    plain = module(SFTDataModule, tok, source=src, batch_size=4, max_length=80)
    packed = module(SFTDataModule, tok, source=src, batch_size=64, max_length=80, packing=True)
    examples: list[Example] = plain.datasets["val"]
    rows_ = packed.datasets["val"]
    assert [e for row in rows_ for e in row] == examples and len(rows_) < len(
        examples
    )  # never split, in order
    batch = next(iter(packed.val_dataloader()))
    assert set(batch) == {"input_ids", "targets", "attention_mask", "position_ids"}
    B, T = batch["input_ids"].shape
    assert batch["attention_mask"].shape == (B, 1, T, T) and batch["attention_mask"].dtype == torch.bool
    k = 0
    for r, row in enumerate(rows_):
        seg = torch.full((T,), len(row))
        at = 0
        for s, e in enumerate(row):
            n = len(e)
            assert batch["targets"][r, at : at + n].tolist() == e.targets() == examples[k].targets()
            assert batch["input_ids"][r, at : at + n].tolist() == e.inputs()
            assert batch["position_ids"][r, at : at + n].tolist() == list(range(n))
            seg[at : at + n] = s
            at, k = at + n, k + 1
        assert (batch["targets"][r, at:] == IGNORE).all()
        expected = (seg[:, None] == seg[None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
        assert torch.equal(batch["attention_mask"][r, 0], expected)


def test_train_loader_is_seeded_and_resumable(tmp_path: Path, tok: Tokenizer) -> None:
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(40)]
    src = jsonl_source(tmp_path, rows)
    first = [
        next(iter(module(SFTDataModule, tok, source=src, batch_size=4, seed=3).train_dataloader()))[
            "input_ids"
        ]
        for _ in range(2)
    ]
    assert torch.equal(*first)
    loader = module(SFTDataModule, tok, source=src, batch_size=4, seed=3).train_dataloader()
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    want = next(it)["input_ids"]
    resumed = module(SFTDataModule, tok, source=src, batch_size=4, seed=3).train_dataloader()
    resumed.load_state_dict(state)
    assert torch.equal(next(iter(resumed))["input_ids"], want)


def test_max_examples_and_config_errors(tmp_path: Path, tok: Tokenizer) -> None:
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(40)]
    dm = SFTDataModule(source=jsonl_source(tmp_path, rows), max_examples=5)
    assert len(dm.records["train"]) == 5 and dm.records["train"][0]["prompt"] == "p0"
    assert len(dm.records["val"]) == 2  # val_fraction 0.05 → every 20th row
    with pytest.raises(ConfigError, match=r"data\.source\.globb"):
        SFTDataModule(source={"kind": "jsonl", "globb": "x"})
    with pytest.raises(ConfigError, match=r"data\.source\.kind.*'csv'"):
        SFTDataModule(source={"kind": "csv"})
    with pytest.raises(ConfigError, match="data.template"):
        SFTDataModule(source=jsonl_source(tmp_path, rows), template="llama")
    with pytest.raises(ConfigError, match="data.max_length"):
        SFTDataModule(source=jsonl_source(tmp_path, rows), max_length=2)


def test_pad_to_multiple_of_bounds_the_batch_lengths_and_leaves_every_token_where_it_was(tmp_path: Path, tok: Tokenizer) -> None:
    """`data.pad_to_multiple_of`: each batch's length is a multiple (or max_length, the cap), and the longer batch is the
    shorter one with more padding: right padding for SFT (plain and packed) and preference pairs, left for prompts."""
    rows = [{"prompt": "q" * (3 + 7 * i), "response": "a" * (2 + 5 * i), "chosen": "c" * (1 + 3 * i), "rejected": "r" * (9 - i)}
            for i in range(10)]
    src = jsonl_source(tmp_path, rows, rows)
    fills = {"input_ids": tok.pad_id, "targets": IGNORE, "attention_mask": 0, "position_ids": None}

    def compare(plain: dict, padded: dict, cap: int, left: bool = False) -> set[int]:
        widths = set()
        for key, value in plain.items():
            if not isinstance(value, torch.Tensor) or key == "index":
                continue
            more = padded[key]
            w, W = value.size(-1), more.size(-1)
            assert W % 16 == 0 or W == cap, (key, W)
            assert W >= w and W - w < 16, (key, w, W)
            if key.endswith("attention_mask") and value.dim() == 4:  # packed: (B, 1, T, T), padding a segment of its own
                assert torch.equal(more[..., :w, :w], value) and not more[..., :w, w:].any()
                continue
            kept = more[..., W - w:] if left else more[..., :w]
            extra = more[..., : W - w] if left else more[..., w:]
            assert torch.equal(kept, value), key
            fill = next(v for k, v in fills.items() if key.endswith(k))
            assert fill is None or (extra == fill).all(), key
            widths.add(W)
        return widths

    widths = set()
    for cls, kwargs, cap, left in ((SFTDataModule, {"max_length": 70}, 70, False),
                                   (SFTDataModule, {"max_length": 70, "packing": True}, 70, False),
                                   (PreferenceDataModule, {"max_length": 70}, 70, False),
                                   (PromptDataModule, {"max_prompt_length": 40}, 40, True)):
        plain = module(cls, tok, source=src, batch_size=2, **kwargs)
        padded = module(cls, tok, source=src, batch_size=2, pad_to_multiple_of=16, **kwargs)
        for a, b in zip(plain.val_dataloader(), padded.val_dataloader(), strict=True):
            widths |= compare(a, b, cap, left)
    assert {32, 48, 64, 40, 70} <= widths  # several multiples, and both caps (max_length, max_prompt_length) reached
    with pytest.raises(ConfigError, match="data.pad_to_multiple_of"):
        SFTDataModule(source=src, pad_to_multiple_of=0)


def test_sft_loss_is_the_same_on_a_batch_padded_to_a_multiple(tmp_path: Path, tok: Tokenizer) -> None:
    """The extra right padding is masked out of the loss and, causal, out of every real position's attention: the same
    loss (plain and packed rows) up to the summation order of a longer sequence."""
    from lmforge.models import build
    from lmforge.objectives.clm import CausalLM

    rows = [{"prompt": "q" * (3 + 7 * i), "response": "a" * (2 + 5 * i)} for i in range(6)]
    src = jsonl_source(tmp_path, rows, rows)
    torch.manual_seed(0)
    model = build({"family": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32, "intermediate_size": 64,
                   "vocab_size": tok.vocab_size, "max_seq_len": 128}).eval()
    for packing in (False, True):
        plain, padded = (module(SFTDataModule, tok, source=src, batch_size=3, max_length=96, packing=packing,
                                pad_to_multiple_of=m) for m in (None, 32))
        for a, b in zip(plain.val_dataloader(), padded.val_dataloader(), strict=True):
            assert b["input_ids"].size(1) > a["input_ids"].size(1) or b["input_ids"].size(1) == 96
            with torch.no_grad():
                torch.testing.assert_close(CausalLM()(model, b).loss, CausalLM()(model, a).loss, atol=1e-6, rtol=1e-6)


# --- records -----------------------------------------------------------------------------------------
def test_jsonl_errors_name_file_and_line(tmp_path: Path) -> None:
    good = {"prompt": "a", "response": "b"}
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            good,
            "{not json",
            {"prompt": "a"},
            {"prompt": "a", "response": 3},
            {"messages": [{"role": "user", "content": "x"}]},
            "",
            good,
        ],
    )
    cases = {2: "not valid JSON", 3: "no field 'response'", 4: "not a string", 5: "must be the assistant's"}
    for line, problem in cases.items():
        lines = Path(path).read_text().splitlines()
        single = tmp_path / f"case{line}.jsonl"
        single.write_text("\n".join([lines[0], *[""] * (line - 2), lines[line - 1]]) + "\n")
        with pytest.raises(DataError, match=rf"case{line}\.jsonl:{line}: .*{problem}.*Fix:.*on_error=skip"):
            load_jsonl(str(single), "sft")
    records = load_jsonl(path, "sft", on_error="skip")
    assert records == [{"prompt": "a", "response": "b"}] * 2
    with pytest.raises(DataError, match="gives no sft record"):
        load_jsonl(write_jsonl(tmp_path / "empty.jsonl", ["{}", ""]), "sft", on_error="skip")
    with pytest.raises(DataError, match="matches no file"):
        load_jsonl(str(tmp_path / "nope*.jsonl"), "sft")


def test_preference_record_forms(tmp_path: Path) -> None:
    def conv(last: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": last}]

    rows = [
        {"prompt": "Q?", "chosen": "good", "rejected": "bad"},
        {"chosen": conv("good"), "rejected": conv("bad")},
        {
            "prompt": [{"role": "user", "content": "Q?"}],
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
        },
        {"chosen": "Human: Q? Assistant: goodness", "rejected": "Human: Q? Assistant: gone"},
    ]
    recs = load_jsonl(write_jsonl(tmp_path / "p.jsonl", rows), "preference")
    assert recs[0] == {"prompt": "Q?", "chosen": "good", "rejected": "bad"}
    assert (
        recs[1]
        == recs[2]
        == {"prompt": [{"role": "user", "content": "Q?"}], "chosen": "good", "rejected": "bad"}
    )
    assert recs[3] == {"prompt": "Human: Q? Assistant: ", "chosen": "goodness", "rejected": "gone"}
    bad = [
        {
            "chosen": conv("good"),
            "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "x"}],
        }
    ]
    with pytest.raises(DataError, match=r"p2\.jsonl:1: .*share every message"):
        load_jsonl(write_jsonl(tmp_path / "p2.jsonl", bad), "preference")


def test_prompt_records_keep_metadata(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Hi", "topic": "greeting"},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "id": 7},
    ]
    recs = load_jsonl(write_jsonl(tmp_path / "q.jsonl", rows), "prompts")
    assert recs[0] == {"prompt": "Hi", "metadata": {"topic": "greeting"}}
    assert recs[1] == {"prompt": [{"role": "user", "content": "Q"}], "metadata": {"id": 7, "reference": "A"}}


def test_hf_source_with_field_mapping(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "hf.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(10)])
    splits = load_source(
        {
            "kind": "hf",
            "path": "json",
            "data_files": path,
            "val_fraction": 0.2,
            "fields": {"prompt": "question", "response": "answer"},
            "cache_dir": str(tmp_path / "hf"),
        },
        "sft",
    )
    assert [r["prompt"] for r in splits["val"]] == ["q4", "q9"] and len(splits["train"]) == 8
    assert splits["train"][0] == {"prompt": "q0", "response": "a0"}


# --- preference and prompts --------------------------------------------------------------------------
def test_preference_batch(tmp_path: Path, tok: Tokenizer) -> None:
    rows = [
        {"prompt": "Q?", "chosen": "a fine answer", "rejected": "no"},
        {"prompt": "Longer question", "chosen": "x", "rejected": "yy"},
    ]
    dm = module(PreferenceDataModule, tok, source=jsonl_source(tmp_path, rows, rows), batch_size=2)
    batch = next(iter(dm.val_dataloader()))
    names = [
        f"{side}_{k}" for side in ("chosen", "rejected") for k in ("input_ids", "targets", "attention_mask")
    ]
    assert sorted(batch) == sorted([*names, "index"])  # index: the pair's position in its split (DPO reference cache)
    assert batch["index"].tolist() == list(range(len(batch["index"])))
    assert len({tuple(batch[k].shape) for k in names}) == 1  # chosen and rejected share the width
    assert trained(tok, batch["chosen_targets"][0]) == f"a fine answer{IM_END}<|eos|>"
    assert trained(tok, batch["rejected_targets"][0]) == f"no{IM_END}<|eos|>"
    n_prompt = (batch["chosen_targets"][0] == IGNORE).nonzero()[0].item()  # first untrained position
    assert torch.equal(batch["chosen_input_ids"][0, :n_prompt], batch["rejected_input_ids"][0, :n_prompt])
    for side in ("chosen", "rejected"):
        real = batch[f"{side}_attention_mask"].bool()
        assert (batch[f"{side}_input_ids"][~real] == tok.pad_id).all() and (
            batch[f"{side}_targets"][~real] == IGNORE
        ).all()


def test_prompts_are_left_padded_with_text_and_metadata(tmp_path: Path, tok: Tokenizer) -> None:
    rows = [{"prompt": "Hi", "k": 1}, {"prompt": "A much longer prompt", "k": 2}]
    dm = module(PromptDataModule, tok, source=jsonl_source(tmp_path, rows, rows), batch_size=2)
    batch = next(iter(dm.val_dataloader()))
    assert batch["prompts"] == ["Hi", "A much longer prompt"] and batch["metadata"] == [{"k": 1}, {"k": 2}]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    n = int(mask[0].sum())
    assert mask[0].tolist() == [0] * (ids.size(1) - n) + [1] * n and mask[1].all()
    assert (ids[0, : ids.size(1) - n] == tok.pad_id).all()
    tail = tok.encode("assistant\n")
    assert (
        ids[0, -len(tail) :].tolist() == ids[1, -len(tail) :].tolist() == tail
    )  # both end where the answer starts
    assert (
        tok.decode(ids[0, -n:].tolist(), skip_special_tokens=False)
        == f"{IM_START}user\nHi{IM_END}\n{IM_START}assistant\n"
    )
    short = module(
        PromptDataModule, tok, source=jsonl_source(tmp_path, rows, rows), batch_size=2, max_prompt_length=5
    )
    assert next(iter(short.val_dataloader()))["input_ids"].shape == (2, 5)


# --- Shakespeare tasks -------------------------------------------------------------------------------
def test_parse_play() -> None:
    play = (
        "# A Play\n\n## ACT I\n\n### SCENE I. A room.\n\n_Enter A and B_\n\n"
        "**A**  \nHello there,  \nfriend.\n\n_Exit B_\n\nStill A speaking.\n\n"
        "**B**  \n_\\[Aside]_  \nGood \\[sic] day.\n\n### SCENE II. Elsewhere.\n\n"
        "**FIRST LORD**  \nNew scene.\n"
    )
    scenes = parse_play(play)
    assert [[(s.speaker, s.text) for s in sc] for sc in scenes] == [
        [("A", "Hello there,\nfriend.\nStill A speaking."), ("B", "Good day.")],
        [("FIRST LORD", "New scene.")],
    ]
    assert scenes[1][0].render() == "FIRST LORD: New scene."


@pytest.fixture(scope="module")
def tasks() -> ShakespeareTasks:
    return ShakespeareTasks(VAL_PLAYS, max_chars=200)


def test_shakespeare_tasks_split_by_play_and_deterministic(tasks: ShakespeareTasks) -> None:
    val_plays = {where["play"] for _, _, where in tasks.pairs("val")}
    train_plays = {where["play"] for _, _, where in tasks.pairs("train")}
    assert val_plays == set(VAL_PLAYS) and not train_plays & set(VAL_PLAYS) and len(train_plays) > 30
    sft = tasks.sft_records("val")
    assert sft == ShakespeareTasks(VAL_PLAYS, max_chars=200).sft_records("val")
    assert all(len(r["prompt"]) <= 200 + 40 and re.match(r"[^:\n]+: \S", r["response"]) for r in sft)
    prompts = tasks.prompt_records("val")
    assert [p["prompt"] for p in prompts] == [r["prompt"] for r in sft]
    assert all(p["metadata"]["reference"].startswith(p["metadata"]["next_speaker"] + ": ") for p in prompts)


def test_shakespeare_rejected_is_the_shuffled_chosen(tasks: ShakespeareTasks) -> None:
    pref = tasks.preference_records("val", seed=1)
    assert pref == tasks.preference_records("val", seed=1) and pref != tasks.preference_records("val", seed=2)
    for r in pref:
        assert r["rejected"] != r["chosen"]
        assert Counter(r["rejected"].split()) == Counter(r["chosen"].split())
        assert r["rejected"].split(": ", 1)[0] == r["chosen"].split(": ", 1)[0]  # same speaker
        assert [len(x) for x in re.findall(r"\s+", r["rejected"])] == [
            len(x) for x in re.findall(r"\s+", r["chosen"])
        ]
    mixed = tasks.preference_records("val", seed=1, p_random=0.5)
    assert (
        sum(Counter(r["rejected"].split()) != Counter(r["chosen"].split()) for r in mixed) > len(mixed) // 4
    )
    import random

    assert (
        shuffle_words("ho ho", random.Random(0)) == "ho ho"
    )  # nothing to reorder: returned unchanged (and skipped)


def test_shakespeare_datamodule(tok: Tokenizer) -> None:
    dm = module(
        SFTDataModule, tok, source={"kind": "shakespeare", "max_chars": 200}, max_examples=64, batch_size=8
    )
    assert len(dm.datasets["train"]) == len(dm.datasets["val"]) == 64
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and (batch["targets"][:, :-1] != IGNORE).any()
    assert {d.name.split("#")[0] for d in dm.corpus.documents("val")} == {"sft:val"}
    with pytest.raises(ConfigError, match="p_random"):
        SFTDataModule(source={"kind": "shakespeare", "p_random": 0.5})


def test_hf_preference_dataset_loads_through_the_pref_hf_config(tmp_path: Path, tok: Tokenizer) -> None:
    """HF datasets with chosen/rejected columns (here the json builder, as hh-rlhf's shared-prefix layout)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from lmforge.preflight import check_stage_data

    rows = [{"chosen": f"Human: hi {i} Assistant: hello there", "rejected": f"Human: hi {i} Assistant: go away"} for i in range(20)]
    files = write_jsonl(tmp_path / "hh.jsonl", rows)
    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=["stage=dpo", "data=pref_hf", "data.source.path=json", f"data.source.data_files={files}",
                                          f"paths.output_dir={tmp_path}"])
    check_stage_data(cfg)  # pref_hf feeds dpo
    dm = instantiate(cfg.data, _convert_="all")
    assert len(dm.records["train"]) + len(dm.records["val"]) == 20
    first = dm.records["train"][0]
    assert first["chosen"].strip() == "hello there" and first["rejected"].strip() == "go away" and "Human: hi 0" in first["prompt"]
