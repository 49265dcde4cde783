"""Making a model trainable: QLoRA quantization, LoRA layers, gradient checkpointing, and the
default optimizer (AdamW with warmup and a decay schedule).

    adapter_config = setup(model, args)            # args: a TrainArgs
    optimizer = make_optimizer(args, total_steps)
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from ..lora import apply_lora, load_adapter, lora_layers
from .args import TrainArgs

def setup(model, args: TrainArgs) -> dict:
    """Make `model` trainable as `args` says: quantize the base (QLoRA, when args.quantize_bits),
    wrap the targets in LoRA (MLX's RNG seeded with args.seed first, so the init is reproducible),
    and turn on per-layer gradient checkpointing (args.grad_checkpoint). Returns the adapter config.

    With args.adapter_init the LoRA layers (and their rank, alpha, targets) are that adapter's, its
    weights loaded: training continues from it (the preference stage after SFT). Preference tuning
    (args.method dpo / orpo) runs without LoRA dropout, as TRL's disable_dropout does: the policy
    must equal its reference until it is trained."""
    if args.quantize_bits:
        from ..quant import quantize_model

        quantize_model(model, bits=int(args.quantize_bits), group_size=int(args.quantize_group_size))
    mx.random.seed(args.seed)
    if args.adapter_init:
        config = load_adapter(model, args.adapter_init)
    else:
        targets = args.targets if args.targets == "all-linear" else tuple(t.strip() for t in args.targets.split(","))
        config = apply_lora(model, targets=targets, rank=int(args.rank), alpha=float(args.alpha),
                            dropout=float(args.dropout), num_layers=args.num_layers, base_model=str(args.model))
    if args.method != "sft":
        for _, layer in lora_layers(model):
            layer.dropout = nn.Dropout(0.0)
    if args.grad_checkpoint:
        enable_grad_checkpoint(model)
    return config


def _checkpointed_class(cls):
    """A subclass of a decoder-layer class whose call recomputes its activations in the backward pass."""
    if getattr(cls, "_grad_checkpointed", False):
        return cls

    def __call__(self, x, *rest):  # rest: the layer's other arguments (mask, cache, pos, ...), as given
        def inner(params, x):
            self.update(params)
            return cls.__call__(self, x, *rest)

        return mx.checkpoint(inner)(self.trainable_parameters(), x)

    return type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__, "_grad_checkpointed": True})


def enable_grad_checkpoint(model) -> None:
    """Per layer instance (not class-wide, so other models in the process are untouched)."""
    for layer in model.layers:
        if layer.self_attn.kv_crosses_layers:
            continue  # Gemma 4 / 3n KV sharing: k/v pass between layers outside the checkpointed call
        layer.__class__ = _checkpointed_class(type(layer))


WSD_DECAY = 0.2  # share of the steps the wsd schedule spends decaying


def make_schedule(args: TrainArgs, total_steps: int):
    """Linear warmup to args.lr (default 5% of the steps), then args.lr_schedule: a cosine decay to
    args.min_lr; wsd: args.lr held, then a linear decay to args.min_lr over the last WSD_DECAY of
    the steps (warmup-stable-decay: most steps at the peak rate); or args.lr held to the end."""
    warmup = args.warmup if args.warmup is not None else max(1, round(0.05 * total_steps))
    warmup = min(int(warmup), total_steps)
    rest = max(total_steps - warmup, 1)
    kind = args.lr_schedule or "cosine"
    if kind == "cosine":
        pieces, bounds = [optim.cosine_decay(args.lr, rest, end=args.min_lr)], []
    elif kind == "constant":
        pieces, bounds = [lambda s: mx.array(args.lr, mx.float32)], []
    else:  # wsd
        decay = min(max(1, round(WSD_DECAY * total_steps)), rest)
        pieces = [lambda s: mx.array(args.lr, mx.float32),
                  optim.linear_schedule(args.lr, args.min_lr, max(decay - 1, 1))]
        bounds = [rest - decay]
        if bounds[0] <= 0:
            pieces, bounds = pieces[1:], []
    if warmup > 0:
        ramp = optim.linear_schedule(args.lr / warmup, args.lr, warmup - 1) if warmup > 1 else \
            (lambda s: mx.array(args.lr, mx.float32))
        pieces, bounds = [ramp] + pieces, [warmup] + [warmup + b for b in bounds]
    return pieces[0] if len(pieces) == 1 else optim.join_schedules(pieces, bounds)


def make_optimizer(args: TrainArgs, total_steps: int) -> optim.Optimizer:
    """The default optimizer: AdamW with `make_schedule` and args.weight_decay."""
    return optim.AdamW(learning_rate=make_schedule(args, total_steps), weight_decay=args.weight_decay)


