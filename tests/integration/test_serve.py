"""The OpenAI-compatible server, spoken to over real HTTP (urllib) on localhost: in a thread for the API,
and scripts/serve.py as a subprocess for start-up, a request and a clean SIGTERM shutdown.

A tiny GPT trained for a few seconds is enough: the server's job is shapes, streaming and text equal to
the engine's (an untrained one would emit stray bytes, not text to compare).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lmforge.data.chat import encode_chatml
from lmforge.data.tokenizer import BPETokenizerSpec, Tokenizer
from lmforge.generation.engine import TextGenerator
from lmforge.generation.server import OpenAIApp, make_server
from lmforge.models import build

pytestmark = pytest.mark.slow

MODEL = {"family": "gpt", "n_layer": 2, "n_head": 2, "n_embd": 32, "max_seq_len": 192}
TEXT = ["But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. " * 30,
        "To be, or not to be, that is the question: whether tis nobler in the mind to suffer. " * 30]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models: one thread is several times faster than two on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return BPETokenizerSpec(vocab_size=320).train(TEXT)


@pytest.fixture(scope="module")
def generator(tokenizer: Tokenizer) -> TextGenerator:
    torch.manual_seed(0)
    model = build(MODEL, vocab_size=tokenizer.vocab_size)
    ids = torch.tensor(tokenizer.encode(" ".join(TEXT)))
    blocks = ids[: len(ids) // 33 * 33].view(-1, 33)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        batch = blocks[torch.randint(0, len(blocks), (8,))]
        loss = torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return TextGenerator(model.eval(), tokenizer)


@pytest.fixture(scope="module")
def url(generator: TextGenerator) -> Iterator[str]:
    httpd = make_server(OpenAIApp(generator, "tiny"), "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)
    assert not thread.is_alive()


def post(url: str, path: str, body: Any, raw: bool = False) -> tuple[int, Any, str]:
    """(status, parsed JSON or list of SSE data payloads, content type)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, ctype, text = resp.status, resp.headers.get("Content-Type"), resp.read().decode()
    except urllib.error.HTTPError as err:
        status, ctype, text = err.code, err.headers.get("Content-Type"), err.read().decode()
    if ctype == "text/event-stream":
        assert text.endswith("data: [DONE]\n\n")
        events = [block.removeprefix("data: ") for block in text.split("\n\n") if block]
        return status, [json.loads(e) for e in events[:-1]], ctype
    return status, json.loads(text), ctype


def greedy(generator: TextGenerator, prompt: Any, n: int, stop: list[str] | None = None, **kw: Any):
    return generator.complete([prompt], max_new_tokens=n, temperature=0.0, stop=stop, **kw)[0]


def test_models_lists_the_one_model(url):
    with urllib.request.urlopen(url + "/v1/models", timeout=30) as resp:
        body = json.loads(resp.read())
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["tiny"]
    assert body["data"][0]["object"] == "model" and body["data"][0]["max_model_len"] == MODEL["max_seq_len"]


def test_completion(url, generator, tokenizer):
    status, body, _ = post(url, "/v1/completions", {"model": "tiny", "prompt": "But soft", "max_tokens": 12, "temperature": 0})
    assert status == 200 and body["object"] == "text_completion" and body["model"] == "tiny"
    expected = greedy(generator, "But soft", 12)
    [choice] = body["choices"]
    assert choice == {"index": 0, "text": expected.text, "logprobs": None, "finish_reason": expected.finish_reason}
    assert len(expected.text) > 0
    prompt_tokens = len(tokenizer.encode("But soft"))
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": expected.completion_tokens,
                             "total_tokens": prompt_tokens + expected.completion_tokens}


def test_streamed_completion_equals_the_whole_one(url):
    req = {"prompt": "To be, or not", "max_tokens": 16, "temperature": 0}
    _, whole, _ = post(url, "/v1/completions", req)
    status, events, ctype = post(url, "/v1/completions", {**req, "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200 and ctype == "text/event-stream"
    chunks = [e for e in events if e["choices"]]
    assert all(e["object"] == "text_completion" and e["id"] == chunks[0]["id"] for e in chunks)
    assert "".join(e["choices"][0]["text"] for e in chunks) == whole["choices"][0]["text"]
    assert len(chunks) > 2  # token by token, not one blob
    assert [e["choices"][0]["finish_reason"] for e in chunks][-1] == whole["choices"][0]["finish_reason"]
    assert all(e["choices"][0]["finish_reason"] is None for e in chunks[:-1])
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]


def test_stop_sequences_cut_streamed_and_whole(url, generator):
    full = greedy(generator, "But soft", 24).text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    expected = full[: full.find(stop)]
    req = {"prompt": "But soft", "max_tokens": 24, "temperature": 0, "stop": stop}
    _, whole, _ = post(url, "/v1/completions", req)
    assert whole["choices"][0]["text"] == expected and whole["choices"][0]["finish_reason"] == "stop"
    _, events, _ = post(url, "/v1/completions", {**req, "stream": True})
    assert "".join(e["choices"][0]["text"] for e in events) == expected


def test_batch_of_prompts_and_n(url, generator):
    prompts = ["But soft", "To be, or not to be, that is"]
    _, body, _ = post(url, "/v1/completions", {"prompt": prompts, "n": 2, "max_tokens": 8, "temperature": 0})
    texts = [c["text"] for c in sorted(body["choices"], key=lambda c: c["index"])]
    assert texts == [greedy(generator, p, 8).text for p in prompts for _ in range(2)]
    assert body["usage"]["prompt_tokens"] == sum(len(generator.tokenizer.encode(p)) for p in prompts)


def test_chat_completion_whole_and_streamed(url, generator, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is the sun?"}]
    req = {"model": "tiny", "messages": messages, "max_tokens": 10, "temperature": 0}
    status, whole, _ = post(url, "/v1/chat/completions", req)
    assert status == 200 and whole["object"] == "chat.completion"
    expected = greedy(generator, encode_chatml(tokenizer, messages), 10, stop=["<|im_end|>"])
    [choice] = whole["choices"]
    assert choice["message"] == {"role": "assistant", "content": expected.text}
    assert choice["finish_reason"] == expected.finish_reason
    assert whole["usage"]["prompt_tokens"] == len(encode_chatml(tokenizer, messages))
    _, events, _ = post(url, "/v1/chat/completions", {**req, "stream": True})
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == expected.text
    assert events[-1]["choices"][0]["delta"] == {} and events[-1]["choices"][0]["finish_reason"] == expected.finish_reason


def test_concurrent_requests_are_serialized_and_all_answered(url):
    results: list[Any] = []

    def call() -> None:
        results.append(post(url, "/v1/completions", {"prompt": "But soft", "max_tokens": 8, "temperature": 0})[1])

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 3 and len({r["choices"][0]["text"] for r in results}) == 1


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10_000}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": 3}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "logprobs": 5}, 400, "logprobs"),
    ("/v1/completions", {"prompt": 42}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages"),
    ("/v1/nope", {}, 404, None),
])
def test_bad_requests_get_openai_error_objects(url, path, body, status, param):
    code, payload, ctype = post(url, path, body)
    assert code == status and ctype == "application/json"
    assert payload["error"]["param"] == param and payload["error"]["message"]


def test_serve_script_starts_answers_and_stops_on_sigterm(generator, tokenizer, root, tmp_path):
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in generator.model.state_dict().items()},
                "lmforge": {"schema_version": 1, "config": {"model": {**MODEL, "vocab_size": tokenizer.vocab_size}},
                            "tokenizer": tokenizer.to_json()}}, ckpt)
    proc = subprocess.Popen([sys.executable, str(root / "scripts" / "serve.py"), "--ckpt", str(ckpt), "--port", "0",
                             "--model-name", "tiny", "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        first = proc.stdout.readline()
        if not first.startswith("serving tiny on http://127.0.0.1:"):
            proc.kill()
            pytest.fail(first + proc.communicate()[1][-2000:])
        url = first.split()[-1]
        _, body, _ = post(url, "/v1/completions", {"prompt": "But soft", "max_tokens": 6, "temperature": 0})
        assert body["choices"][0]["text"] == greedy(generator, "But soft", 6).text
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "server stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_script_refuses_a_missing_checkpoint_in_one_line(root: Path, tmp_path: Path):
    proc = subprocess.run([sys.executable, str(root / "scripts" / "serve.py"), "--ckpt", str(tmp_path / "none.ckpt"), "--port", "0"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and proc.stderr.startswith("error: ckpt_path=") and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
