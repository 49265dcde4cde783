"""Choose the CPU paths by measurement on the machine that runs them, and remember the choice.

Each path in mlx_gemma.cpu.PATHS is timed against what MLX does without it, on the model's own
shapes, alternating the two for at least ROUNDS rounds and until SPEND seconds have gone (more
rounds for the cheap calls), keeping the fastest time of each (other processes only ever add
time). A path is switched on only where MLX's time divided by the path's time is at least
MARGIN; the decision and that ratio are stored in $MLX_GEMMA_HOME/calibration/<key>.json, where
the key hashes the CPU's model name and instruction-set features, the MLX and numpy versions and
a hash of this package's CPU code. A cache written under another key is never read: a new CPU, a
new MLX or a changed kernel is timed again. A measurement taken while the 1-minute load average
exceeded half the core count is stored marked busy (one other busy process on a 2-core machine
moved the attention ratio anywhere between 1.0 and 2.5 where a quiet machine measured
1.35-1.53): later processes reuse it (measuring again under load would cost as much again), and
the first one that finds the machine quiet measures it again and replaces it, since on an
oversubscribed machine a timing measures the scheduler as much as the kernels.

MLX_GEMMA_CPU_PATHS forces choices instead (`mlx_gemma.cpu.forced`); forced paths are not timed.

The backend policy is one per process: `prepare(model)` sets it from that model's choices, so with
two models (a target and a quantized draft model) the one prepared last decides. Call `prepare`
again after changing a model's storage (`quantize_model` after `load`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import backend
from ..files import home_dir, write_json_atomic
from ..engine.step import DecodeStep
from ..model import attention
from ..training.loss import HostHead, chunked_cross_entropy
from . import enabled, fastmath, forced
from .hostdecode import HostDecoder, _Affine, _mv, _product
from .hostloss import host_cross_entropy
from .machine import code_version, cpu_name, isa_features, library_versions
from .native import qgemv

MARGIN = 1.15  # a path must beat MLX by 15 %: a smaller win is within what load moves a timing
ROUNDS = 5  # at least this many alternating rounds per pair ...
SPEND, MAX_ROUNDS = 0.25, 40  # ... and more, up to MAX_ROUNDS, until the pair has run SPEND seconds
CHUNK = 256  # prompt tokens per timed attention / GELU call (a prefill chunk's scale)
LOSS_ROWS, LOSS_VOCAB, LOSS_CHUNK = 32, 16384, 8192  # a slice of the head: the per-element costs, not V's


@dataclass(frozen=True)
class Choice:
    on: bool
    ratio: Optional[float]  # MLX's time / the path's time (None: forced or not applicable)
    how: str  # "measured", "cached", "forced", "n/a" (the model has nothing this path runs)


LAST: dict = {}  # {path: Choice} of the latest prepared model, for `mlx-gemma info`


def machine_key() -> dict:
    """What a stored choice depends on besides the model's shapes."""
    return {"cpu": cpu_name(), "isa": list(isa_features()), **library_versions(), "code": code_version()}


def machine_is_quiet() -> bool:
    """Whether the 1-minute load average is at most half the core count (measurements worth
    storing: MLX's and OpenBLAS's kernels use every core, so one other busy process already
    skews which path wins)."""
    return os.getloadavg()[0] <= max(1, os.cpu_count() or 1) / 2


def cache_file(key: dict):
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return home_dir() / "calibration" / f"{digest}.json"


def shape_signature(model) -> str:
    """The model's shapes and storage that the timings depend on."""
    c = model.config
    quant = sorted({f"{m.bits}b{m.group_size}" for _, m in model.named_modules() if "scales" in m})
    dtype = str(model.model.norm.weight.dtype).replace("mlx.core.", "")
    return (f"E{c.hidden_size}-I{c.intermediate_size}-H{c.num_attention_heads}-K{c.num_key_value_heads}-"
            f"D{c.head_dim}-L{c.num_hidden_layers}-V{c.vocab_size}-{dtype}-{'+'.join(quant) or 'dense'}")


def time_pair(ours: Callable, theirs: Callable, rounds: int = ROUNDS, spend: float = SPEND,
              max_rounds: int = MAX_ROUNDS) -> float:
    """MLX's time / the path's time: one warm-up call each, then alternating calls, at least
    `rounds` of them and more (up to `max_rounds`) until `spend` seconds have gone; fastest of each."""
    ours(), theirs()
    best = [float("inf"), float("inf")]
    start_all, done = time.perf_counter(), 0
    while done < rounds or (done < max_rounds and time.perf_counter() - start_all < spend):
        for i, fn in enumerate((ours, theirs)):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
        done += 1
    return best[1] / best[0]


def _forced_policy(**fields):
    """A callable running fn under these policy fields (a candidate and its baseline differ only so)."""
    def run(fn):
        def call():
            with backend.override(**fields):
                fn()
        return call
    return run


def _random(*shape):
    x = mx.random.normal(shape, key=mx.random.key(0))
    mx.eval(x)
    return x


def fast_math_pair(model, decided: dict):
    """GELU over a chunk's MLP activations, the attention softmax, the loss's exp."""
    c = model.config
    x, s, z = _random(CHUNK, c.intermediate_size), _random(c.num_attention_heads, CHUNK, CHUNK), _random(64, 8192)

    def work():
        mx.eval(fastmath.gelu_tanh(x), fastmath.softmax(s, axis=-1), fastmath.exp(z))
    return _forced_policy(fast_math=True)(work), _forced_policy(fast_math=False)(work)


def attention_pair(model, decided: dict):
    """Explicit scores + (fast, where chosen) softmax vs MLX's fused SDPA, one chunk, causal."""
    c = model.config
    if c.attn_logit_softcapping is not None:
        return None  # soft-capped scores always take the explicit path: nothing to choose
    q = _random(1, c.num_attention_heads, CHUNK, c.head_dim)
    k, v = _random(1, c.num_key_value_heads, CHUNK, c.head_dim), _random(1, c.num_key_value_heads, CHUNK, c.head_dim)
    scale = c.query_pre_attn_scalar ** -0.5
    run = _forced_policy(fast_math=decided["fast_math"])
    return (run(lambda: mx.eval(attention(q, k, v, scale=scale, mask="causal", logit_cap=None, fused=False))),
            run(lambda: mx.eval(attention(q, k, v, scale=scale, mask="causal", logit_cap=None, fused=True))))


class _HeadSlice(nn.Module):
    """The first rows of a model's LM head as a tied float32 head (what both losses read)."""

    def __init__(self, model, rows: int):
        super().__init__()
        head = model.lm_head if "lm_head" in model else model.model.embed_tokens
        weight = head.weight[:rows] if "scales" not in head else mx.dequantize(
            head.weight[:rows], head.scales[:rows], head.biases[:rows], group_size=head.group_size, bits=head.bits)
        self.config = model.config
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(*weight.shape)
        self.model.embed_tokens.weight = mx.array(np.array(weight.astype(mx.float32)))


def host_loss_pair(model, decided: dict):
    """The loss and its gradient for LOSS_ROWS positions over a LOSS_VOCAB slice of the head:
    numpy vs MLX's chunked cross-entropy (with the fast math just chosen)."""
    head = _HeadSlice(model, min(LOSS_VOCAB, model.config.vocab_size))
    h = _random(LOSS_ROWS, model.config.hidden_size)
    t = mx.array(np.arange(LOSS_ROWS, dtype=np.int32) * 7)
    h_np, t_np, host_head = np.array(h), np.array(t), HostHead(head)
    grad = mx.value_and_grad(lambda x: chunked_cross_entropy(x, t, head, LOSS_CHUNK).sum())
    return (lambda: host_cross_entropy(h_np, t_np, host_head, LOSS_CHUNK, grad=True),
            _forced_policy(fast_math=decided["fast_math"])(lambda: mx.eval(grad(h))))


def native_pair(model, decided: dict):
    """The first layer's seven products for one row: qgemv.c vs MLX's quantized_matmul."""
    layer = model.model.layers[0]
    modules = [getattr(getattr(layer, a), b) for a, b in HostDecoder.PRODUCTS]
    if not all("scales" in m for m in modules) or qgemv() is None:
        return None
    with backend.override(native_kernel=True):
        products = [_product(m) for m in modules]
    if not all(isinstance(p, _Affine) for p in products):
        return None
    xs = [_random(1, m.weight.shape[1] * 32 // m.bits) for m in modules]
    xs_np = [np.array(x[0]) for x in xs]
    outs = [np.empty(p.shape[0], np.float32) for p in products]
    work = np.empty(2 * max(p.shape[1] for p in products), np.float32)

    def ours():
        for p, x, out in zip(products, xs_np, outs):
            _mv(p, x, out, work)
    kernel = _forced_policy(quantized_path="kernel")
    return ours, kernel(lambda: mx.eval([m(x) for m, x in zip(modules, xs)]))


def row_decode_pair(model, decided: dict):
    """One decode step of one row: the host step vs MLX's compiled step (each with the fast
    math and native kernel just chosen)."""
    with backend.override(native_kernel=decided["native"]):
        host = HostDecoder.of(model)
    if host is None:
        return None
    with backend.override(host_decode=False, host_gemv=False, fast_math=decided["fast_math"]):
        step = DecodeStep(model)
    cache_h, cache_m = model.make_cache(), model.make_cache()
    token, pos = mx.array([[5]], mx.int32), mx.array([0], mx.int32)
    step(cache_h, token, pos, 1)  # reserves the buffers the host step writes into

    def ours():
        mx.eval(host.logits(host(cache_h, 5, 0)))
    return ours, _forced_policy(fast_math=decided["fast_math"])(lambda: mx.eval(step(cache_m, token, pos, 1)))


# In dependency order: attention and the loss are timed with the fast math chosen, the host
# step with the native kernel chosen.
CANDIDATES = {"fast_math": fast_math_pair, "attention": attention_pair, "host_loss": host_loss_pair,
              "native": native_pair, "row_decode": row_decode_pair}


def _read(path, key: dict) -> dict:
    """The stored choices {signature: {path: {...}}}, or {} when absent, unreadable or stored
    under another machine key."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data.get("models", {}) if data.get("machine") == key else {}


def stored_choices() -> dict:
    """{model signature: {path: Choice}} measured earlier on this machine (this key's cache file)."""
    key = machine_key()
    return {sig: {name: _cached(c) for name, c in paths.items()} for sig, paths in _read(cache_file(key), key).items()}


def _cached(entry: dict) -> Choice:
    busy = f", measured at load {entry.get('load')}" if entry.get("busy") else ""
    return Choice(entry["on"], entry["ratio"], "cached" + busy)


def calibrate(model, measure: Callable = time_pair) -> dict:
    """{path: Choice} for `model` on this machine: forced, cached, or measured now (and stored)."""
    force, key = forced(), machine_key()
    path = cache_file(key)
    models = _read(path, key)
    stored = models.setdefault(shape_signature(model), {})
    choices, decided, changed = {}, {}, False
    quiet = machine_is_quiet()
    for name, pair in CANDIDATES.items():
        if name in force:
            choice = Choice(force[name], None, "forced")
        elif name in stored and not (quiet and stored[name].get("busy")):  # busy: measure again when quiet
            choice = _cached(stored[name])
        else:
            candidates = pair(model, decided)
            ratio = None if candidates is None else round(measure(*candidates), 3)
            choice = Choice(ratio is not None and ratio >= MARGIN, ratio, "n/a" if ratio is None else "measured")
            stored[name] = {"on": choice.on, "ratio": ratio, "load": round(os.getloadavg()[0], 1), "busy": not quiet}
            changed = True
        choices[name], decided[name] = choice, choice.on
    if changed:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, {"machine": key, "models": models})
        except OSError:  # an unwritable cache: the choice holds for this process only
            pass
    return choices


def prepare(model) -> dict:
    """Calibrate `model` (`calibrate`) and switch the winning paths on in the backend policy,
    when the CPU paths are enabled (`mlx_gemma.cpu.enable()`) and MLX runs on the CPU; else {}."""
    if not enabled() or backend.policy().device != "cpu":
        return {}
    choices = calibrate(model)
    backend.configure(**backend.cpu_path_fields({name: c.on for name, c in choices.items()}))
    LAST.clear()
    LAST.update(choices)
    return choices


def describe(choices: dict) -> list:
    """One line per path: on/off, how decided, the measured ratio."""
    lines = []
    for name, c in choices.items():
        ratio = "" if c.ratio is None else f", MLX time / path time {c.ratio:.2f} (on from {MARGIN:.2f})"
        lines.append(f"{name:11s} {'on ' if c.on else 'off'} ({c.how}{ratio})")
    return lines


__all__ = ["CANDIDATES", "Choice", "LAST", "MARGIN", "calibrate", "describe", "machine_key", "prepare"]
