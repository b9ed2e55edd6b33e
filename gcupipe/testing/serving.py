"""Tiny models vLLM can actually serve: a tiny checkpoint plus a 256-token byte tokenizer.

vLLM needs a tokenizer (and the chat endpoint a chat template); the tiny checkpoints have a
256-entry vocabulary, so a byte-level tokenizer with no merges fits them exactly: any text
encodes, nothing is downloaded. Owner: serving engineer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

VLLM_CPU_OVERRIDES: dict[str, Any] = {"head_dim": 32}
"""vLLM's CPU attention kernels accept head sizes 32, 64, 80, 96, 112, 128... (not 16)."""


def byte_tokenizer(path: Path | str, chat_template: bool = True) -> Path:
    """Write a byte-level BPE tokenizer with exactly 256 tokens (ids 0-255) into `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda char: _byte_of(char))
    vocab = {char: index for index, char in enumerate(byte_chars)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=byte_chars[1], eos_token=byte_chars[2]
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return path


def _byte_of(char: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode for one character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    if ord(char) in printable:
        return ord(char)
    missing = [b for b in range(256) if b not in printable]
    return missing[ord(char) - 256]


def servable_tiny_model(arch: str, path: Path | str, **overrides: Any) -> Path:
    """`tiny_model(arch, path)` with head sizes vLLM's CPU kernels take, plus the tokenizer."""
    from gcupipe.testing.tiny_models import tiny_model

    settings = {**VLLM_CPU_OVERRIDES, **overrides}
    if arch == "qwen2" and "head_dim" not in overrides:
        settings.pop("head_dim")  # qwen2 derives it: hidden 128 / 4 heads = 32
    model_dir = tiny_model(arch, path, **settings)
    byte_tokenizer(model_dir)
    return model_dir


FAKE_OPENAI_SERVER = '''
"""A stand-in for vLLM's OpenAI server: same flags, same endpoints, scripted failures."""
import argparse, json, os, signal, subprocess, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, default=8000)
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--model", default="model")
parser.add_argument("--served-model-name", default=None)
parser.add_argument("--quantization", default=None)
args, _ = parser.parse_known_args()
behaviour = os.environ.get("FAKE_SERVER_BEHAVIOUR", "ok")
# a grandchild, like vLLM's engine core: it must not survive the stop
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("starting fake server", flush=True)
known = (None, "compressed-tensors", "gptq", "awq") + (() if behaviour == "noplugin" else ("gcu",))
if args.quantization not in known:
    print("Value error, Unknown quantization method: %s. Must be one of [...]" % args.quantization)
    sys.exit(1)
if behaviour == "crash":
    print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB", flush=True)
    sys.exit(3)
if behaviour == "stubborn":
    signal.signal(signal.SIGTERM, lambda *a: print("ignoring SIGTERM", flush=True))
if behaviour == "never":
    time.sleep(600)
name = args.served_model_name or args.model


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, body, code=200):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            return self._send({})
        self._send({"data": [{"id": name}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if behaviour == "badchat" and self.path == "/v1/chat/completions":
            return self._send({"error": "no chat template"}, 400)
        usage = {"completion_tokens": body["max_tokens"]}
        if self.path == "/v1/completions":
            return self._send({"choices": [{"text": " Paris."}], "usage": usage})
        self._send({"choices": [{"message": {"content": "Paris"}}], "usage": usage})


HTTPServer((args.host, args.port), Handler).serve_forever()
'''


def write_fake_server(path: Path | str) -> Path:
    """Write the fake OpenAI server script (behaviour via $FAKE_SERVER_BEHAVIOUR: ok, crash,
    stubborn, never, badchat, noplugin) and return its path."""
    path = Path(path)
    path.write_text(FAKE_OPENAI_SERVER)
    return path
