"""Making a model trainable: QLoRA quantization, LoRA layers, gradient checkpointing, and the
default optimizer (AdamW, bias-corrected as torch's, with transformers' warmup and decay schedules).

    adapter_config = setup(model, args)            # args: a TrainArgs
    optimizer = make_optimizer(args, total_steps)
"""

from __future__ import annotations

import math

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
    """The learning rate of each optimizer step (0-based), as transformers' schedulers give it, so a
    run's rates equal those of the TRL/PEFT recipe we follow (tests/test_optimizer_torch.py):
    a linear warmup from 0 (wsd: from args.min_lr) reaching args.lr at step `warmup` (default 5%
    of the steps), then args.lr_schedule: cosine (`get_cosine_with_min_lr_schedule_with_warmup`:
    a half cosine to args.min_lr at step total_steps), wsd (`get_wsd_schedule`, linear decay: args.lr
    held, then a linear decay over the last WSD_DECAY of the steps, reaching args.min_lr one step
    after the last) or constant. Written with mx ops: the compiled update calls it on a traced step."""
    lr, floor = float(args.lr), float(args.min_lr)
    warmup = args.warmup if args.warmup is not None else max(1, round(0.05 * total_steps))
    warmup = min(int(warmup), total_steps)
    kind = args.lr_schedule or "cosine"
    decay = min(max(1, round(WSD_DECAY * total_steps)), max(total_steps - warmup, 1))
    start = floor if kind == "wsd" else 0.0  # where transformers starts each warmup

    def schedule(step):
        s = step.astype(mx.float32)
        ramp = start + (lr - start) * s / max(1, warmup)
        if kind == "cosine":
            progress = mx.minimum((s - warmup) / max(1, total_steps - warmup), 1.0)
            after = floor + (lr - floor) * 0.5 * (1.0 + mx.cos(math.pi * progress))
        elif kind == "wsd":
            progress = mx.clip((s - (total_steps - decay)) / decay, 0.0, 1.0)
            after = lr - (lr - floor) * progress
        else:
            after = mx.array(lr, mx.float32)
        return mx.where(s < warmup, ramp, after)

    return schedule


def make_optimizer(args: TrainArgs, total_steps: int) -> optim.Optimizer:
    """The default optimizer: AdamW with `make_schedule` and args.weight_decay. Bias-corrected as in
    the Adam and AdamW papers and torch.optim.AdamW (MLX's AdamW leaves it off by default)."""
    return optim.AdamW(learning_rate=make_schedule(args, total_steps), weight_decay=args.weight_decay,
                       bias_correction=True)


