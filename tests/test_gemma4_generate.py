"""Cached generation of Gemma 4 / 3n through the engine: per-layer cache layouts, no cache for
KV-shared layers, sliding windows per kind, rows at different positions.

- generate_step's greedy ids equal transformers' `generate` (greedy, its own cache), past the
  sliding window (the rings wrap);
- a continuous batch (BatchGenerator, rows joining while others decode, small prefill chunks)
  gives each row the ids it gets alone.
"""

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_gemma.cache import SharedKVCache
from mlx_gemma.convert import hf as hf_convert
from mlx_gemma.generation import BatchGenerator, Request, SamplingParams, generate_step
from mlx_gemma.loading import build_model, read_config

from gemma4_tiny import make_hf_model, random_ids, save, vocab_of
from test_engine import NoStops

KINDS = ["gemma4_e2b", "gemma4_moe", "gemma4_unified", "gemma3n"]


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    hf = make_hf_model(request.param)
    path = save(hf, tmp_path_factory.mktemp(request.param))
    config = read_config(path)
    ours = build_model(config, hf_convert.load_safetensors(hf_convert.safetensors_files(path)), str(path), "float32")
    return hf, ours


def test_cache_layout_follows_the_layers(pair):
    hf, ours = pair
    text = hf.config.get_text_config()
    cache = ours.make_cache()
    for i, (spec, c) in enumerate(zip(cache.specs, cache)):
        shared = text.num_kv_shared_layers and i >= text.num_hidden_layers - text.num_kv_shared_layers
        assert isinstance(c, SharedKVCache) == bool(shared)
        assert spec.head_dim == ours.layers[i].self_attn.head_dim
        assert spec.kv_heads == ours.layers[i].self_attn.n_kv_heads
        assert (spec.window is not None) == (text.layer_types[i] == "sliding_attention")


@pytest.mark.parametrize("compile", [True, False])
def test_cached_greedy_equals_transformers_generate(pair, compile):
    hf, ours = pair
    prompt = random_ids(vocab_of(hf), (1, 11), seed=7)
    new = 14  # 25 positions in all: the sliding rings (8) wrap several times
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompt), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          top_k=None, top_p=None)[0, prompt.shape[1]:].tolist()
    got = [int(t.item()) for t in generate_step(ours, mx.array(prompt), max_tokens=new, compile=compile,
                                                prefill_step=4)]
    assert got == ref


def _greedy_alone(model, ids, n):
    seq = list(ids)
    for _ in range(n):
        seq.append(int(mx.argmax(model(mx.array([seq]))[0, -1]).item()))
    return seq[len(ids):]


def test_continuous_batch_rows_equal_each_row_alone(pair):
    hf, ours = pair
    vocab = vocab_of(hf)
    prompts = [list(map(int, random_ids(vocab, (n,), seed=n))) for n in (13, 3, 9, 5)]
    lengths = [12, 6, 15, 9]
    expected = [_greedy_alone(ours, p, n) for p, n in zip(prompts, lengths)]
    engine = BatchGenerator(ours, NoStops(), prefill_step=4)
    joins = {0: prompts[:2], 3: prompts[2:3], 7: prompts[3:]}
    n_of = dict(zip(map(tuple, prompts), lengths))
    out, widest, step, order = {}, 0, 0, []
    while engine.busy or joins:
        for p in joins.pop(step, []):
            order.append(engine.submit(Request(p, SamplingParams(max_tokens=n_of[tuple(p)]))))
        for event in engine.step():
            if event.finish_reason:
                out[event.rid] = event.tokens
        widest = max(widest, len(engine.active))
        step += 1
    assert widest >= 3  # rows really decoded together, at different positions
    assert [out[rid] for rid in order] == expected
