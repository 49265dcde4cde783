"""The chunked LM-head cross-entropy (training/loss.py) against a full-logits cross-entropy written
here, in this test: the loss value in float64 numpy from the model's full (B, L, V) logits, and the
LoRA gradients through mx.grad of the same few lines in MLX. Both trainer paths are checked: the
numpy head of the CPU (`loss_and_grad`) and the MLX head a GPU compiles (`batch_loss`)."""

import dataclasses

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_gemma import backend
from mlx_gemma.lora import apply_lora
from mlx_gemma.training import data as D
from mlx_gemma.training import loss as loss_lib
from test_train import tiny_model
from test_train_data import random_chat, tiny_tokenizer, write_jsonl


def full_cross_entropy(model, inputs, targets, weights):
    """Sum of -log softmax(logits)[target] over the weighted positions, and the weight total."""
    logits = model(inputs).astype(mx.float32)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return ((mx.logsumexp(logits, axis=-1) - picked) * weights).sum(), weights.sum()


def numpy_cross_entropy(logits, targets, weights) -> float:
    logits = np.asarray(logits, np.float64)
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return float(((lse - picked) * weights).sum() / weights.sum())


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
@pytest.mark.parametrize("host_head", [True, False], ids=["numpy-head", "mlx-head"])
def test_chunked_loss_and_gradient_equal_a_cross_entropy_written_here(model_type, host_head, tmp_path, monkeypatch):
    monkeypatch.setattr(backend, "_current", dataclasses.replace(backend.policy(), host_loss=host_head))
    tok = tiny_tokenizer()
    rng = np.random.default_rng(0)
    write_jsonl(tmp_path / "train.jsonl", [random_chat(rng, turns=2) for _ in range(4)])
    ds = D.load_dataset(tmp_path / "train.jsonl", tok, max_seq_len=64)
    batch = D.make_batch(ds, [[0], [1], [2], [3]], tok.pad_id, 64)
    model = tiny_model(model_type)
    apply_lora(model, dropout=0.0)
    for _, m in model.named_modules():
        if hasattr(m, "lora_B"):  # non-zero B, so gradients reach A too
            m.lora_B = mx.random.normal(m.lora_B.shape) * 0.1
    inputs, targets, weights = (mx.array(batch[k]) for k in ("inputs", "targets", "weights"))
    idx, w = loss_lib.loss_positions(batch["weights"], multiple=64)
    assert len(idx) > batch["weights"].sum()  # bucket padding is exercised (on both paths)

    (ref_sum, ref_n), ref_grads = nn.value_and_grad(model, full_cross_entropy)(model, inputs, targets, weights)
    reference = numpy_cross_entropy(model(inputs), batch["targets"], batch["weights"])
    assert abs(ref_sum.item() / ref_n.item() - reference) < 1e-5  # the MLX lines above agree with float64
    if host_head:
        (ours, n), grads = loss_lib.loss_and_grad(model, chunk=100)(inputs, targets, mx.array(idx), mx.array(w))
    else:
        (ours, n), grads = nn.value_and_grad(model, lambda m, *a: loss_lib.batch_loss(m, *a, chunk=100))(
            model, inputs, targets, mx.array(idx), mx.array(w))
    assert n.item() == batch["weights"].sum()
    assert abs(ours.item() / n.item() - reference) < 1e-5
    ref_grads, grads = dict(tree_flatten(ref_grads)), dict(tree_flatten(grads))
    assert ref_grads.keys() == grads.keys() and len(grads) > 0
    for k in ref_grads:  # the reference differentiates the sum: divide both by the token count
        g, r = grads[k] / n, ref_grads[k] / ref_n
        assert mx.abs(g - r).max().item() <= 1e-5 + 1e-4 * mx.abs(r).max().item(), k
