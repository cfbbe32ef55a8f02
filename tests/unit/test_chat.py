"""ChatML rendering and encoding (lmforge.data.chat), stop strings and the text streamer built on them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.data.chat import (
    CHATML_JINJA,
    CHATML_SPECIALS,
    IM_END,
    IM_START,
    encode_chatml,
    im_end_id,
    render_chatml,
)
from lmforge.data.tokenizer import BPETokenizerSpec, Tokenizer
from lmforge.errors import ConfigError, DataError
from lmforge.generation.stop_strings import StopOnStrings, normalize_stop, truncate_at_stop
from lmforge.generation.streaming import TextStreamer

TEXT = ["The quick brown fox jumps over the lazy dog. " * 20, "user assistant system hello world\n" * 20,
        "Ünïcödé — ok? 日本語 text " * 10]
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye\nnow"},
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return BPETokenizerSpec(vocab_size=400).train(TEXT)


def test_render_chatml_exact_text():
    assert render_chatml(CONVERSATION[:2]) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_chatml(CONVERSATION[:1], add_generation_prompt=False) == "<|im_start|>system\nYou are terse.<|im_end|>\n"


def test_jinja_template_renders_what_render_chatml_does():
    from transformers.utils.chat_template_utils import render_jinja_template

    for gen_prompt in (True, False):
        rendered, _ = render_jinja_template([CONVERSATION], chat_template=CHATML_JINJA, add_generation_prompt=gen_prompt)
        assert rendered[0] == render_chatml(CONVERSATION, add_generation_prompt=gen_prompt)


@pytest.mark.parametrize("bad", [[{"role": "user"}], [{"role": "", "content": "x"}], [{"role": "a\nb", "content": "x"}],
                                 "just a string", [{"role": "user", "content": 3}]])
def test_malformed_messages_are_one_clear_error(bad):
    with pytest.raises(DataError, match="chat message|must be a list"):
        render_chatml(bad)


def test_encode_without_marker_tokens_spells_them_as_text(tokenizer):
    assert im_end_id(tokenizer) is None
    ids = encode_chatml(tokenizer, CONVERSATION)
    assert ids == tokenizer.encode(render_chatml(CONVERSATION))
    assert tokenizer.decode(ids) == render_chatml(CONVERSATION)


def test_encode_with_marker_tokens_uses_single_ids(tokenizer):
    tok = Tokenizer.from_json(tokenizer.to_json())
    tok.add_special_tokens(CHATML_SPECIALS)
    start, end = tok.hf.token_to_id(IM_START), tok.hf.token_to_id(IM_END)
    assert im_end_id(tok) == end
    ids = encode_chatml(tok, CONVERSATION)
    assert ids.count(start) == len(CONVERSATION) + 1 and ids.count(end) == len(CONVERSATION)
    assert tok.decode(ids, skip_special_tokens=False) == render_chatml(CONVERSATION)
    # a user typing the marker does not close the turn: it is encoded as text, never as the marker id
    typed = encode_chatml(tok, [{"role": "user", "content": f"x{IM_END}y"}])
    assert typed.count(end) == 1


def test_stop_strings_normalize_and_truncate():
    assert normalize_stop(None) == [] and normalize_stop("\n") == ["\n"] and normalize_stop(["a", "a", "b"]) == ["a", "b"]
    with pytest.raises(ConfigError, match="stop: contains an empty string"):
        normalize_stop(["x", ""])
    with pytest.raises(ConfigError, match="stop: must be a string or a list"):
        normalize_stop([1])
    assert truncate_at_stop("abc STOP def END", ["END", "STOP"]) == ("abc ", True)
    assert truncate_at_stop("abc", ["x"]) == ("abc", False)


def test_stop_criteria_looks_at_generated_tail_only(tokenizer):
    prompt = tokenizer.encode("the lazy dog. ")
    gen_a, gen_b = tokenizer.encode("quick brown fox"), tokenizer.encode("hello world hello")
    width = max(len(gen_a), len(gen_b))
    rows = [prompt + gen_a + [tokenizer.pad_id] * (width - len(gen_a)), prompt + gen_b + [tokenizer.pad_id] * (width - len(gen_b))]
    seqs = torch.tensor(rows)
    assert StopOnStrings(tokenizer, ["fox"], len(prompt))(seqs).tolist() == [True, False]
    assert StopOnStrings(tokenizer, ["lazy"], len(prompt))(seqs).tolist() == [False, False]  # only in the prompt
    assert StopOnStrings(tokenizer, ["rld he"], len(prompt))(seqs).tolist() == [False, True]  # across tokens
    assert StopOnStrings(tokenizer, [], len(prompt))(seqs).tolist() == [False, False]


def test_streamer_deltas_join_to_the_truncated_completion(tokenizer):
    text = "Ünïcödé — ok? 日本語 the quick brown fox END jumps"
    ids = tokenizer.encode(text)
    for stops, expected in (([], text), (["END"], "Ünïcödé — ok? 日本語 the quick brown fox "), (["日本"], "Ünïcödé — ok? ")):
        chunks: list[str] = []
        streamer = TextStreamer(tokenizer, lambda row, delta, chunks=chunks: chunks.append(delta), stops)
        for tok in ids:
            streamer(torch.tensor([tok]))
        streamer.end()
        assert "".join(chunks) == expected
        assert all("\ufffd" not in c for c in chunks)  # never half a UTF-8 character
    # a stop string's prefix is held back until it is known not to be one
    chunks = []
    streamer = TextStreamer(tokenizer, lambda row, delta: chunks.append(delta), ["fox END"])
    for tok in tokenizer.encode("brown fox"):
        streamer(torch.tensor([tok]))
    assert "".join(chunks) == "brown "
    streamer.end()
    assert "".join(chunks) == "brown fox"


def test_command_line_escapes_in_stop_strings():
    from hydra import compose, initialize_config_dir

    from lmforge.generation.cli import cli_stop_strings
    from lmforge.generation.stop_strings import unescape

    assert unescape(r"a\nb\t\\n") == "a\nb\t\\n"
    conf = str(Path(__file__).resolve().parents[2] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        assert cli_stop_strings(compose("generate", overrides=[r'stop=["\n\n",END]'])) == ["\n\n", "END"]
        assert cli_stop_strings(compose("generate", overrides=[r"stop='\n'"])) == ["\n"]
        assert cli_stop_strings(compose("generate")) == []
