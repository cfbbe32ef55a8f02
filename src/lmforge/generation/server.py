"""An OpenAI-compatible HTTP API over one loaded model, on the standard library's ThreadingHTTPServer.

    GET  /v1/models             the one model served
    POST /v1/completions        {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "stream", "n", ...}
    POST /v1/chat/completions   {"model", "messages", ...}: rendered with ChatML, ended by <|im_end|>
    GET  /health

Requests and responses follow OpenAI's JSON shapes, so `openai` clients and tools that speak that API work
unchanged; `"stream": true` answers with server-sent events (`data: {...}\\n\\n` ..., `data: [DONE]\\n\\n`).
vLLM's extra sampling keys `top_k`, `min_p`, `repetition_penalty` and `seed` are accepted too.
Connections are handled in threads, but generation is serialized by one lock: a small model on a CPU or
a single GPU gains nothing from interleaving requests without a batching scheduler, and the lock keeps
the model's state (its KV cache) to one request at a time.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from lmforge.data.chat import IM_END, encode_chatml, im_end_id
from lmforge.errors import LmforgeError
from lmforge.generation.engine import Completion, TextGenerator
from lmforge.generation.stop_strings import normalize_stop

log = logging.getLogger("lmforge.serve")

_UNSUPPORTED = {  # OpenAI keys we cannot honour: refused rather than silently ignored
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "suffix": (None, ""), "best_of": (None, 1),
    "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
    "tools": (None, []), "response_format": (None, {"type": "text"}),
}


class RequestError(Exception):
    """A bad request: answered with OpenAI's error object and an HTTP status, never a traceback."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _number(body: dict[str, Any], key: str, default: float | None, lo: float, hi: float, integer: bool = False) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise RequestError(f"'{key}' must be {'an integer' if integer else 'a number'}, got {value!r}", key)
    if not lo <= value <= hi:
        raise RequestError(f"'{key}' must be in [{lo}, {hi}], got {value!r}", key)
    return int(value) if integer else float(value)


class OpenAIApp:
    """Request JSON -> generation -> response JSON or SSE chunks; the HTTP plumbing is in `_Handler`."""

    def __init__(self, generator: TextGenerator, model_name: str, defaults: dict[str, Any] | None = None) -> None:
        self.gen, self.model_name = generator, model_name
        self.defaults = dict(defaults or {})  # server-wide generate() keywords, e.g. num_draft_tokens
        self.lock = threading.Lock()
        self.created = int(time.time())

    def models(self) -> dict[str, Any]:
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "lmforge",
                "max_model_len": self.gen.context or self.gen.model.config.max_seq_len}
        return {"object": "list", "data": [card]}

    # --- request parsing ---------------------------------------------------------------------------
    def _settings(self, body: dict[str, Any], prompt_lens: list[int], chat: bool) -> dict[str, Any]:
        model = body.get("model")
        if model not in (None, self.model_name):
            raise RequestError(f"The model '{model}' does not exist; this server serves '{self.model_name}'", "model", 404, "model_not_found")
        for key, allowed in _UNSUPPORTED.items():
            if body.get(key) not in allowed:
                raise RequestError(f"'{key}' is not supported by this server", key)
        ctx, longest = self.gen.context, max(prompt_lens)
        room = None if ctx is None else ctx - longest  # positions past the context were never trained: refuse, as OpenAI does
        if room is not None and room < 1:
            raise RequestError(f"the prompt has {longest} tokens; this model's context is {ctx}", "messages" if chat else "prompt")
        key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _number(body, key, None if chat else 16, 1, 1 << 30, integer=True)
        if max_tokens is None:  # chat's default (as OpenAI's): whatever the context leaves
            max_tokens = room if room is not None else self.gen.model.config.max_seq_len
        if room is not None and max_tokens > room:
            raise RequestError(f"'{key}' is {max_tokens}, but the prompt ({longest} tokens) leaves room for "
                               f"{room} in this model's context of {ctx}", key)
        try:
            stop = normalize_stop(body.get("stop"))
        except LmforgeError as err:
            raise RequestError(str(err), "stop") from None
        settings: dict[str, Any] = {
            **self.defaults,
            "max_new_tokens": max_tokens,
            "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
            "stop": stop,
            "seed": _number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True),
        }
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        if top_p <= 0:
            raise RequestError("'top_p' must be in (0, 1]", "top_p")
        if top_p < 1:
            settings["top_p"] = top_p
        top_k = _number(body, "top_k", None, -1, 1 << 30, integer=True)
        if top_k is not None and top_k > 0:  # vLLM: -1 (or 0) = off
            settings["top_k"] = top_k
        min_p = _number(body, "min_p", None, 0.0, 1.0)
        if min_p:
            settings["min_p"] = min_p
        penalty = _number(body, "repetition_penalty", None, 1e-6, 100.0)
        if penalty is not None and penalty != 1.0:
            settings["repetition_penalty"] = penalty
        return settings

    def _n(self, body: dict[str, Any]) -> int:
        return _number(body, "n", 1, 1, 16, integer=True)

    def _prompts(self, body: dict[str, Any]) -> list[list[int]]:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts: list[Any] = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            prompts = prompt
        else:
            raise RequestError("'prompt' must be a string, a list of strings, or token ids", "prompt")
        vocab = self.gen.tokenizer.vocab_size
        rows = []
        for p in prompts:
            if isinstance(p, str):
                rows.append(self.gen.encode(p))
            elif p and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in p):
                rows.append(list(p))
            else:
                raise RequestError(f"token-id prompts must be non-empty lists of ids in [0, {vocab})", "prompt")
        return rows

    def _messages(self, body: dict[str, Any]) -> list[dict[str, str]]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty list of {role, content} objects", "messages")
        out = []
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # content parts: only text parts carry meaning for a text model
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                    raise RequestError(f"messages[{i}].content: only text parts are supported", "messages")
                content = "".join(p["text"] for p in content)
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
                raise RequestError(f"messages[{i}] must be an object with string 'role' and 'content'", "messages")
            out.append({"role": m["role"], "content": content})
        return out

    # --- generation --------------------------------------------------------------------------------
    def _run(self, rows: list[list[int]], settings: dict[str, Any], on_text: Callable[[int, str], None] | None) -> list[Completion]:
        with self.lock:
            try:
                return self.gen.complete(rows, on_text=on_text, **settings)
            except LmforgeError as err:
                raise RequestError(str(err)) from None

    def completions(self, body: dict[str, Any], send: Callable[[dict[str, Any] | str], None] | None) -> dict[str, Any] | None:
        """`send` given: stream (each chunk, then "[DONE]"); else return the whole response."""
        prompts, n = self._prompts(body), self._n(body)
        settings = self._settings(body, [len(p) for p in prompts], chat=False)
        echo = bool(body.get("echo"))
        rows = [p for p in prompts for _ in range(n)]
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": self.model_name}

        def chunk(index: int, text: str, finish: str | None) -> dict[str, Any]:
            return {**meta, "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}

        if send is not None:
            if echo:
                for i, row in enumerate(rows):
                    send(chunk(i, self.gen.tokenizer.decode(row), None))
            outs = self._run(rows, settings, lambda i, delta: send(chunk(i, delta, None)))
            for i, c in enumerate(outs):
                send(chunk(i, "", c.finish_reason))
            self._send_usage(body, meta, outs, n, send)
            send("[DONE]")
            return None
        outs = self._run(rows, settings, None)
        choices = [{"index": i, "text": (self.gen.tokenizer.decode(row) if echo else "") + c.text, "logprobs": None,
                    "finish_reason": c.finish_reason} for i, (row, c) in enumerate(zip(rows, outs))]
        return {**meta, "choices": choices, "usage": self._usage(outs, n)}

    def chat_completions(self, body: dict[str, Any], send: Callable[[dict[str, Any] | str], None] | None) -> dict[str, Any] | None:
        messages, n = self._messages(body), self._n(body)
        try:
            ids = encode_chatml(self.gen.tokenizer, messages)
        except LmforgeError as err:
            raise RequestError(str(err), "messages") from None
        settings = self._settings(body, [len(ids)], chat=True)
        end_id = im_end_id(self.gen.tokenizer)
        settings["eos_token_ids"] = [end_id] if end_id is not None else []
        if end_id is None:
            settings["stop"] = [*settings["stop"], IM_END]
        rows = [ids] * n
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()), "model": self.model_name}

        def chunk(index: int, delta: dict[str, str], finish: str | None) -> dict[str, Any]:
            return {**meta, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if send is not None:
            for i in range(n):
                send(chunk(i, {"role": "assistant", "content": ""}, None))
            outs = self._run(rows, settings, lambda i, delta: send(chunk(i, {"content": delta}, None)))
            for i, c in enumerate(outs):
                send(chunk(i, {}, c.finish_reason))
            self._send_usage(body, meta, outs, n, send)
            send("[DONE]")
            return None
        outs = self._run(rows, settings, None)
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                    "finish_reason": c.finish_reason} for i, c in enumerate(outs)]
        return {**meta, "object": "chat.completion", "choices": choices, "usage": self._usage(outs, n)}

    @staticmethod
    def _usage(outs: list[Completion], n: int) -> dict[str, int]:
        """OpenAI counts each prompt once, however many choices (`n`) were sampled from it."""
        prompt = sum(c.prompt_tokens for c in outs[::n])
        completion = sum(c.completion_tokens for c in outs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _send_usage(self, body: dict[str, Any], meta: dict[str, Any], outs: list[Completion], n: int, send: Callable[[Any], None]) -> None:
        if isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage"):
            send({**meta, "choices": [], "usage": self._usage(outs, n)})


class _Handler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer  # with an `app` attribute (see make_server)
    protocol_version = "HTTP/1.0"  # one request per connection: an SSE stream simply ends when the socket closes

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - BaseHTTPRequestHandler's signature
        log.info("%s %s", self.address_string(), format % args)

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        app: OpenAIApp = self.server.app  # type: ignore[attr-defined]
        if self.path.rstrip("/") == "/v1/models":
            self._json(200, app.models())
        elif self.path.rstrip("/") == "/health":
            self._json(200, {"status": "ok"})
        else:
            self._json(404, RequestError(f"no route GET {self.path}", status=404).body())

    def do_POST(self) -> None:  # noqa: N802
        app: OpenAIApp = self.server.app  # type: ignore[attr-defined]
        route = {"/v1/completions": app.completions, "/v1/chat/completions": app.chat_completions}.get(self.path.rstrip("/"))
        if route is None:
            self._json(404, RequestError(f"no route POST {self.path}", status=404).body())
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"null")
            if not isinstance(body, dict):
                raise RequestError("the request body must be a JSON object")
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise RequestError("'stream' must be true or false", "stream")
            if not stream:
                self._json(200, route(body, None))
                return
            started = []

            def send(event: dict[str, Any] | str) -> None:
                if not started:  # headers go out with the first event, so request errors can still be a 400
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Cache-Control", "no-cache")
                    self.end_headers()
                    started.append(True)
                data = event if isinstance(event, str) else json.dumps(event)
                self.wfile.write(f"data: {data}\n\n".encode())
                self.wfile.flush()

            try:
                route(body, send)
            except RequestError as err:
                if not started:
                    raise
                send(err.body())
                send("[DONE]")
        except json.JSONDecodeError as err:
            self._json(400, RequestError(f"the request body is not JSON: {err.msg}").body())
        except RequestError as err:
            self._json(err.status, err.body())
        except (BrokenPipeError, ConnectionResetError):
            log.info("client went away during a streamed response")
        except Exception as err:  # a bug, not a bad request: keep the server up, log the traceback
            log.exception("request failed")
            self._json(500, RequestError(f"internal error: {type(err).__name__}: {err}", status=500).body())


def make_server(app: OpenAIApp, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A bound server (port 0 = any free port: read it from `server.server_address`); call serve_forever()."""
    httpd = ThreadingHTTPServer((host, port), _Handler)
    httpd.daemon_threads = True
    httpd.app = app  # type: ignore[attr-defined]
    return httpd
