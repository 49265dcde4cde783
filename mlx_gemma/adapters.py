"""Several LoRA adapters over one base model, chosen per batch row (the server's `model` field).

A LoRA adapter adds x·Aᵀ·Bᵀ·scale to a linear layer's output. That delta is per row, so rows
that use different adapters (or none) can share every base matmul of a batch: each adapted
layer becomes a `MultiLoRALinear` holding the adapters' matrices stacked, index 0 being the
base (zeros), and gathers each row's A and B by the row's adapter index.

    model = load(base)[0]
    index = load_adapters(model, {"zh": "adapters/zh", "sql": "adapters/sql"})  # {"zh": 1, "sql": 2}
    set_row_adapters(model, mx.array([0, 1, 2, 1]))  # row 0 base, rows 1 and 3 "zh", row 2 "sql"

Adapters are read with `lora.load_adapter`, so the same strict checks apply (a missing tensor,
a wrong shape or an adapter made for another model is a UserError naming it). Ranks may
differ: smaller ones are zero-padded to the largest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten


class _RowAdapters:
    """The per-row adapter indices (B,) shared by every MultiLoRALinear of one model."""

    def __init__(self):
        self.rows: Optional[mx.array] = None


class MultiLoRALinear(nn.Module):
    """A frozen linear layer plus N stacked LoRA updates; row b uses update rows[b] (0 = none)."""

    def __init__(self, base: nn.Module, lora_a: mx.array, lora_b: mx.array, scales: mx.array, ref: _RowAdapters):
        super().__init__()
        self.base = base
        self.lora_a = lora_a  # (N, r, in)
        self.lora_b = lora_b  # (N, out, r)
        self.scales = scales  # (N,)
        self._ref = ref
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)  # (B, L, out)
        rows = self._ref.rows
        if rows is None:
            return y
        a = self.lora_a[rows]  # (B, r, in)
        b = self.lora_b[rows]  # (B, out, r)
        z = (x @ a.swapaxes(-1, -2)) @ b.swapaxes(-1, -2)  # (B, L, r) -> (B, L, out)
        return y + (self.scales[rows][:, None, None] * z).astype(x.dtype)


def set_row_adapters(model, rows: Optional[mx.array]) -> None:
    """Say which adapter each row of the next forward uses (None: the base for every row)."""
    ref = getattr(model, "_row_adapters", None)
    if ref is not None:
        ref.rows = rows
    elif rows is not None:
        raise ValueError("this model has no adapters loaded for per-row selection (load_adapters)")


def load_adapters(model, adapters: dict) -> dict:
    """Load the adapter dirs {name: dir} for per-row use; returns {name: row index (1, 2, ...)}.

    The model's linear layers that any adapter targets become MultiLoRALinear layers. Call once,
    on a model without LoRA layers of its own.
    """
    from .lora import LoRALinear, load_adapter

    per_adapter = []  # [{module path: (A, B, scale)}]
    for name, path in adapters.items():
        load_adapter(model, Path(path))
        found = {}
        restore = []
        for module_path, module in model.named_modules():
            if isinstance(module, LoRALinear):
                found[module_path] = (module.lora_A, module.lora_B, module.scale)
                restore.append((module_path, module.base))
        model.update_modules(_tree(restore))
        per_adapter.append(found)
    ref = _RowAdapters()
    layers = {}
    paths = sorted(set().union(*per_adapter)) if per_adapter else []
    modules = dict(model.named_modules())
    for module_path in paths:
        base = modules[module_path]
        present = [found.get(module_path) for found in per_adapter]
        r = max(a.shape[0] for a, _, _ in filter(None, present))
        out_dims, in_dims = next((b.shape[0], a.shape[1]) for a, b, _ in filter(None, present))
        stack_a = [mx.zeros((r, in_dims))]
        stack_b = [mx.zeros((out_dims, r))]
        scales = [0.0]
        for item in present:
            a, b, scale = item if item is not None else (mx.zeros((r, in_dims)), mx.zeros((out_dims, r)), 0.0)
            stack_a.append(mx.pad(a.astype(mx.float32), [(0, r - a.shape[0]), (0, 0)]))
            stack_b.append(mx.pad(b.astype(mx.float32), [(0, 0), (0, r - b.shape[1])]))
            scales.append(scale)
        dtype = base.scales.dtype if hasattr(base, "scales") else base.weight.dtype
        layers[module_path] = MultiLoRALinear(base, mx.stack(stack_a).astype(dtype), mx.stack(stack_b).astype(dtype),
                                              mx.array(scales, mx.float32), ref)
    model.update_modules(_tree(list(layers.items())))
    object.__setattr__(model, "_row_adapters", ref)
    return {name: i + 1 for i, name in enumerate(adapters)}


def _tree(items: list) -> dict:
    """[("model.layers.0.self_attn.q_proj", module), ...] -> the nested dict/list tree update_modules takes."""
    return tree_unflatten(items)
