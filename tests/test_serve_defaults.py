"""`mlx-gemma serve` with nothing but its defaults: the API key read from MLX_GEMMA_API_KEY and the
4 MiB request-body limit. A tiny random Gemma 3 (real process, loopback only) keeps it quick."""

import json
import os
import sys

import pytest

from test_lora import tiny_tokenizer_model
from test_serve import free_port, raw, start_server, stop_server

pytestmark = pytest.mark.slow  # starts a server process

ENV_KEY = "key-from-the-environment"
MIB4 = 4 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import mlx.core as mx

    from mlx_gemma.config import GemmaConfig
    from mlx_gemma.loading import save_model
    from mlx_gemma.model import Gemma
    from mlx_gemma.tokenizer import GemmaTokenizer

    from tiny import TINY

    root = tmp_path_factory.mktemp("serve-defaults")
    tokenizer = GemmaTokenizer.from_bytes(tiny_tokenizer_model())
    cfg = {k: v for k, v in TINY["gemma3_text"].items() if k != "sliding_window_pattern"}
    cfg["vocab_size"] = tokenizer.vocab_size  # every id the model can sample is a piece of the tokenizer
    mx.random.seed(0)
    model = Gemma(GemmaConfig.from_dict(dict(cfg, model_type="gemma3_text")))
    model_dir = save_model(model, tokenizer, root / "model")
    port, log = free_port(), root / "server.log"
    cmd = [sys.executable, "-m", "mlx_gemma.cli", "serve", "--model", str(model_dir), "--port", str(port)]
    proc = start_server(cmd, port, log, env=dict(os.environ, MLX_GEMMA_API_KEY=ENV_KEY))  # no --api-key, --max-body
    yield port
    stop_server(proc)


def test_api_key_comes_from_the_environment(server):
    assert raw(server, "GET", "/v1/models")[0] == 401
    assert raw(server, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
    status, body = raw(server, "GET", "/v1/models", headers={"Authorization": f"Bearer {ENV_KEY}"})
    assert status == 200 and json.loads(body)["data"]


def test_default_body_limit_is_4_mib(server):
    headers = {"Authorization": f"Bearer {ENV_KEY}"}
    head = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "user": "'
    tail = b'"}'

    def body_of(size):
        return head + b"x" * (size - len(head) - len(tail)) + tail

    status, payload = raw(server, "POST", "/v1/chat/completions", body_of(MIB4 + 1), headers)
    assert status == 413, payload
    assert json.loads(payload)["error"]["message"]
    status, payload = raw(server, "POST", "/v1/chat/completions", body_of(MIB4), headers)
    assert status == 200, payload  # exactly the limit is accepted
    assert json.loads(payload)["choices"][0]["finish_reason"] in ("stop", "length")
