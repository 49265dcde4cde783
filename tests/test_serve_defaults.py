"""`mlx-gemma serve` with nothing but its defaults: the API key read from MLX_GEMMA_API_KEY and the
4 MiB request-body limit. A tiny random Gemma 3 (real process, loopback only) keeps it quick."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from test_lora import tiny_tokenizer_model
from test_serve import free_port, raw

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
    cfg = {k: v for k, v in TINY["gemma3_text"].items() if k != "sliding_window_pattern"}
    mx.random.seed(0)
    model = Gemma(GemmaConfig.from_dict(dict(cfg, model_type="gemma3_text")))
    model_dir = save_model(model, GemmaTokenizer.from_bytes(tiny_tokenizer_model()), root / "model")
    port, log = free_port(), root / "server.log"
    env = dict(os.environ, MLX_GEMMA_API_KEY=ENV_KEY)
    with open(log, "w") as out:  # no --api-key, no --max-body
        proc = subprocess.Popen([sys.executable, "-m", "mlx_gemma.cli", "serve", "--model", str(model_dir),
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if raw(port, "GET", "/health")[0] == 200:
                break
        except OSError:
            time.sleep(0.3)
        assert proc.poll() is None, log.read_text()
    else:
        proc.kill()
        pytest.fail("server did not come up:\n" + log.read_text())
    yield port
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


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
