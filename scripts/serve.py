"""Serve one model over an OpenAI-compatible HTTP API (completions, chat completions, streaming).

    python scripts/serve.py --ckpt logs/train/runs/<ts>/checkpoints/last.ckpt --port 8000
    python scripts/serve.py --hf-dir exported/ --dtype bf16 --quantize int8_weight
    curl localhost:8000/v1/completions -d '{"prompt": "ROMEO:", "max_tokens": 50, "temperature": 0.8}'
    curl -N localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}], "stream": true}'

Binds 127.0.0.1 unless --host says otherwise; --port 0 takes a free port. The first line on stdout is
`serving <model> on http://<host>:<port>`. Ctrl-C or SIGTERM stops it cleanly.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import torch

from lmforge.errors import LmforgeError
from lmforge.generation.engine import TextGenerator
from lmforge.generation.loading import load_model
from lmforge.generation.quantize import QUANTIZE_MODES
from lmforge.generation.server import OpenAIApp, make_server


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="an lmforge .ckpt")
    src.add_argument("--hf-dir", help="a local Hugging Face model directory (e.g. from scripts/export.py)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port")
    p.add_argument("--model-name", help="the id clients pass as `model` (default: the --ckpt / --hf-dir path)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:<n>")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--quantize", default=None, choices=QUANTIZE_MODES)
    p.add_argument("--draft-ckpt", help="speculative decoding: a small lmforge .ckpt with the same tokenizer")
    p.add_argument("--num-draft-tokens", type=int, default=4)
    return p.parse_args(argv)


def build_app(args: argparse.Namespace) -> OpenAIApp:
    loaded = load_model(args.ckpt, args.hf_dir, device=args.device, dtype=args.dtype, quantize=args.quantize, keys=("--ckpt", "--hf-dir"))
    draft, defaults = None, {}
    if args.draft_ckpt:
        draft = load_model(args.draft_ckpt, device=args.device, dtype=args.dtype, keys=("--draft-ckpt", "--draft-ckpt")).model
        defaults["num_draft_tokens"] = args.num_draft_tokens
    return OpenAIApp(TextGenerator(loaded.model, loaded.tokenizer, draft), args.model_name or loaded.name, defaults)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s", stream=sys.stderr)
    torch.set_grad_enabled(False)
    try:
        app = build_app(args)
        httpd = make_server(app, args.host, args.port)
    except (LmforgeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    host, port = httpd.server_address[:2]
    print(f"serving {app.model_name} on http://{host}:{port}", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    print("server stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
