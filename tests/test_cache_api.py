"""The per-layer cache API (cache.py): layouts from `GemmaConfig.layer_cache_specs`, snapshot /
restore of positions, prefix copy-out / copy-in, layers that read another layer's cache.

References: transformers' config (which layers slide, heads, head size) and transformers' logits
of the whole sequence, uncached, on the same random weights. Tiny Gemma 2 / 3 models with a
window of 8, so every prompt here wraps the rings.
"""

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_gemma.cache import ModelCache, SharedKVCache
from mlx_gemma.config import LayerCacheSpec
from mlx_gemma.convert import hf as hf_convert
from mlx_gemma.generation import DecodeStep, generate_step, prefill
from mlx_gemma.loading import build_model, read_config

from tiny import make_hf_model, random_ids, save_hf_model

WINDOW = 8


@pytest.fixture(scope="module", params=["gemma3_text", "gemma2"])
def pair(request, tmp_path_factory):
    hf = make_hf_model(request.param)
    path = save_hf_model(hf, tmp_path_factory.mktemp(request.param))
    ours = build_model(read_config(path), hf_convert.load_safetensors(hf_convert.safetensors_files(path)),
                       str(path), "float32")
    return hf, ours


def hf_logits(hf, ids) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().numpy()


def decode_logits(model, cache, token: int, pos: int) -> np.ndarray:
    step = DecodeStep(model)
    return np.array(step(cache, mx.array([[token]], mx.int32), mx.array([pos], mx.int32), pos + 1))[0]


def test_layer_specs_follow_the_transformers_config(pair):
    hf, ours = pair
    c = hf.config
    specs = ours.config.layer_cache_specs()
    assert len(specs) == c.num_hidden_layers
    for i, spec in enumerate(specs):
        sliding = c.layer_types[i] == "sliding_attention"
        assert spec == LayerCacheSpec(c.num_key_value_heads, c.head_dim, c.sliding_window if sliding else None, i)
    assert any(s.window for s in specs) and any(s.window is None for s in specs)
    cache = ours.make_cache()
    assert cache.specs == tuple(specs) and [c.window for c in cache] == [s.window for s in specs]


@pytest.mark.parametrize("host", [False, True])
def test_restore_undoes_rejected_positions(pair, host):
    """Prefill 14 tokens (past the window), snapshot, write 5 junk positions, keep 2: the next
    decode equals transformers on prompt + 2 kept tokens + the new one; without the restore the
    ring would hold the junk keys (the logits differ), so the test can tell."""
    from mlx_gemma import backend

    hf, ours = pair
    ids = random_ids(512, (22,), seed=1).tolist()
    prompt, junk, nxt = ids[:14], ids[14:19], 400
    keep = 2
    with backend.override(host_decode=host):
        results = []
        for restore in (True, False):
            cache = ours.make_cache()
            prefill(ours, mx.array([prompt]), cache)
            cache.reserve(1, mx.float32, 14 + len(junk))
            snap = cache.snapshot(14, len(junk))
            step = DecodeStep(ours)
            for i, t in enumerate(junk):  # one at a time: the host step writes in place
                step(cache, mx.array([[t]], mx.int32), mx.array([14 + i], mx.int32), 15 + i)
            if restore:
                cache.restore(snap, keep)
            results.append(decode_logits(ours, cache, nxt, 14 + keep))
    want = hf_logits(hf, prompt + junk[:keep] + [nxt])[-1]
    np.testing.assert_allclose(results[0], want, atol=1e-4)
    assert np.abs(results[1] - want).max() > 1e-3


def test_restore_per_row_keep_in_a_batch(pair):
    """Two rows at different positions, one snapshot, a different keep per row."""
    hf, ours = pair
    a, b = random_ids(512, (20,), seed=2).tolist(), random_ids(512, (20,), seed=3).tolist()
    cache = ours.make_cache()
    prefill(ours, mx.array([a[:12], b[:12]]), cache, start=0)
    pos = mx.array([12, 12], mx.int32)
    cache.reserve(2, mx.float32, 16)
    snap = cache.snapshot(pos, 4)
    ours.model(mx.array([a[12:16], b[12:16]]), cache=cache, pos=pos)  # a 4-token verify forward
    cache.restore(snap, mx.array([3, 1], mx.int32))
    step = DecodeStep(ours)
    logits = np.array(step(cache, mx.array([[a[15]], [b[13]]]), mx.array([15, 13], mx.int32), 16))
    np.testing.assert_allclose(logits[0], hf_logits(hf, a[:16])[-1], atol=1e-4)
    np.testing.assert_allclose(logits[1], hf_logits(hf, b[:14])[-1], atol=1e-4)


def test_snapshot_longer_than_a_ring_is_refused(pair):
    _, ours = pair
    cache = ours.make_cache()
    cache.reserve(1, mx.float32, 20)
    assert cache.max_snapshot == WINDOW
    with pytest.raises(ValueError, match="ring"):
        cache.snapshot(0, WINDOW + 1)


@pytest.mark.parametrize("n", [5, 13, 20])
def test_prefix_copy_out_in_then_decode_equals_uninterrupted(pair, n):
    """n <= window and n > window: the prefix of a prefilled row, copied into a fresh cache,
    continues exactly like the row that was never interrupted (token ids and transformers' logits)."""
    hf, ours = pair
    ids = random_ids(512, (n + 1,), seed=n).tolist()
    whole = [t.item() for t in generate_step(ours, mx.array([ids]), max_tokens=6)]
    cache = ours.make_cache()
    prefill(ours, mx.array([ids[:n]]), cache)
    prefix = cache.copy_out(0, n)
    fresh = ours.make_cache()
    fresh.copy_in(prefix)
    resumed = [t.item() for t in generate_step(ours, mx.array([ids[n:]]), cache=fresh, start=n, max_tokens=6)]
    assert resumed == whole
    fresh = ours.make_cache()
    fresh.copy_in(prefix)
    np.testing.assert_allclose(decode_logits(ours, fresh, ids[n], n), hf_logits(hf, ids)[-1], atol=1e-4)
    # bytes: per owning layer, keys + values of (1, K, m, D) float32, m = n or the ring's slots
    expect = sum(2 * 4 * s.kv_heads * s.head_dim * (min(n, s.window) if s.window else n)
                 for s in ours.config.layer_cache_specs())
    assert prefix.nbytes == expect


def test_prefix_is_detached_and_goes_into_a_row_of_a_batch(pair):
    """Decoding on (in place, on the host) after copy-out leaves the prefix as it was; copied into
    row 1 of a two-row cache it decodes like the uninterrupted sequence, and row 0 is untouched."""
    from mlx_gemma import backend

    hf, ours = pair
    ids, other = random_ids(512, (16,), seed=7).tolist(), random_ids(512, (11,), seed=8).tolist()
    cache = ours.make_cache()
    prefill(ours, mx.array([ids[:15]]), cache)
    prefix = cache.copy_out(0, 15)
    before = [np.array(k) for k, _ in prefix.layers]
    with backend.override(host_decode=True):
        for p in range(15, 24):
            decode_logits(ours, cache, 300 + p, p)
    assert all(np.array_equal(b, np.array(k)) for b, (k, _) in zip(before, prefix.layers))
    batch = ours.make_cache()
    prefill(ours, mx.array([other[:10]]), batch)
    second = ours.make_cache()
    prefill(ours, mx.array([random_ids(512, (30,), seed=9).tolist()]), second)  # junk in the row
    batch.concat(second)
    batch.copy_in(prefix, row=1)
    step = DecodeStep(ours)
    logits = np.array(step(batch, mx.array([[other[10]], [ids[15]]]), mx.array([10, 15], mx.int32), 16))
    np.testing.assert_allclose(logits[0], hf_logits(hf, other)[-1], atol=1e-4)
    np.testing.assert_allclose(logits[1], hf_logits(hf, ids)[-1], atol=1e-4)


def test_the_ring_rule_for_prefixes(pair):
    """A ring keeps the first n positions only while the row holds <= max(n, window)."""
    _, ours = pair
    cache = ours.make_cache()
    prefill(ours, mx.array([random_ids(512, (12,), seed=4).tolist()]), cache)  # holds 12 > window
    assert cache.prefix_fits(12, 12) and not cache.prefix_fits(11, 12) and not cache.prefix_fits(5, 12)
    with pytest.raises(ValueError, match="overwritten"):
        cache.copy_out(0, 11, held=12)
    short = ours.make_cache()
    prefill(ours, mx.array([random_ids(512, (7,), seed=5).tolist()]), short)
    assert short.prefix_fits(3, 7) and short.prefix_fits(3, WINDOW) and not short.prefix_fits(3, WINDOW + 1)


def test_a_layer_reading_another_layers_cache_owns_nothing():
    """Layer 2 reads layer 0's ring: it returns what layer 0's update returned in this forward,
    holds no arrays, and rows move with its source."""
    specs = [LayerCacheSpec(2, 4, 8, 0), LayerCacheSpec(1, 6, None, 1), LayerCacheSpec(2, 4, 8, 0)]
    cache = ModelCache(specs)
    assert isinstance(cache[2], SharedKVCache) and [s for s, _ in cache.owners()] == specs[:2]
    cache.reserve(1, mx.float32, 3)
    assert cache[0].keys.shape == (1, 2, 8, 4) and cache[1].keys.shape == (1, 1, 256, 6)
    assert cache.nbytes == 2 * 4 * (2 * 8 * 4 + 1 * 256 * 6)
    k = mx.arange(24, dtype=mx.float32).reshape(1, 2, 3, 4)
    out = cache[0].update(k, k + 1, mx.array([0]), fresh=True)
    shared = cache[2].update(None, None, mx.array([0]), fresh=True)
    assert shared[0] is out[0] and shared[1] is out[1]
    assert np.array_equal(np.array(cache[2].mask(mx.array([0]), 3, True)), np.array(cache[0].mask(mx.array([0]), 3, True)))
    with pytest.raises(ValueError, match="not an earlier layer"):
        ModelCache([LayerCacheSpec(2, 4, None, 1), LayerCacheSpec(2, 4, None, 1)])
