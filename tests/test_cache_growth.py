"""Generations long enough to grow the KV caches, against uncached full forward passes.

Cache buffers grow in 256-slot steps (`cache.STEP`); the sliding layers' ring grows until it holds
`sliding_window` slots and then wraps; the compiled decode step retraces at every new buffer
shape. Generation tests elsewhere stay under 256 positions, so none of that runs there. Here a
tiny model with a 640-token context and a 384-token window (neither a multiple of 256) decodes
past 256, past the window, past 512 and up to 600 positions, and the logits of every step must
equal those of one forward pass over the whole final sequence with no cache at all.
"""

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma.cache import STEP
from mlx_gemma.convert import hf as hf_convert
from mlx_gemma.generation import BatchGenerator, Request, SamplingParams, generate_step
from mlx_gemma.loading import build_model, read_config

from tiny import make_hf_model, random_ids, save_hf_model

WINDOW, CONTEXT, TOTAL = 384, 640, 600


def load_dir(path):
    return build_model(read_config(path), hf_convert.load_safetensors(hf_convert.safetensors_files(path)),
                       str(path), "float32")


@pytest.fixture(scope="module", params=["gemma3_text", "gemma2"])
def model(request, tmp_path_factory):
    hf = make_hf_model(request.param, sliding_window=WINDOW, max_position_embeddings=CONTEXT)
    return load_dir(save_hf_model(hf, tmp_path_factory.mktemp(request.param)))


def recorder():
    seen = []

    def record(history, logits):
        seen.append(np.array(logits[0]))
        return logits

    return seen, record


def full_logits(model, sequence):
    return np.array(model(mx.array([sequence])))[0]


@pytest.mark.parametrize("compile", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_one_row_past_256_and_past_the_window(model, compile):
    prompt = random_ids(512, (1, 20), seed=3)
    steps = TOTAL - 20
    seen, record = recorder()
    cache = model.make_cache()
    tokens = [t.item() for t in generate_step(model, mx.array(prompt), cache=cache, max_tokens=steps,
                                              logits_processors=[record], compile=compile)]
    sequence = [int(t) for t in prompt[0]] + tokens
    full = full_logits(model, sequence)
    for i in range(steps):
        np.testing.assert_allclose(seen[i], full[19 + i], atol=1e-4, err_msg=f"position {19 + i}")
        assert int(np.argmax(full[19 + i])) == tokens[i]
    # The full caches grew in 256-slot steps to hold every fed position (599 of them); the rings
    # stopped at the window.
    assert {c.capacity for c in cache if not c.window} == {3 * STEP}
    assert {c.capacity for c in cache if c.window} == {WINDOW}


def test_engine_rows_at_different_positions_past_the_window(model):
    """Two rows of one continuous batch, prompts of 30 and 200 tokens: they cross 256 and the window
    at different steps (the batch buffers grow for the longer row), each equal to its own full pass."""
    prompts = [random_ids(512, (30,), seed=4).tolist(), random_ids(512, (200,), seed=5).tolist()]
    steps = 400  # the second row ends at 600 positions, the first at 430
    engine = BatchGenerator(model, tokenizer=_NoTokenizer())
    records = []
    for p in prompts:
        seen, record = recorder()
        records.append(seen)
        engine.submit(Request(p, SamplingParams(max_tokens=steps), processors=[record]))
    generated = {0: [], 1: []}
    while engine.busy:
        for event in engine.step():
            generated[event.rid].append(event.token)
    for rid, p in enumerate(prompts):
        full = full_logits(model, p + generated[rid])
        assert len(records[rid]) == steps
        for i in range(steps):
            np.testing.assert_allclose(records[rid][i], full[len(p) - 1 + i], atol=1e-4,
                                       err_msg=f"row {rid}, position {len(p) - 1 + i}")


class _NoTokenizer:
    """What BatchGenerator needs of a tokenizer for id-only prompts: no stop ids, bytes-free text."""

    stop_ids = ()

    def token_bytes(self, token_id, skip_special=True):
        return b""
