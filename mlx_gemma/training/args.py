"""TrainArgs: every training option, its help text, its type and its valid range.

The `mlx-gemma train` command builds one click option per field (help and default from the
field), a YAML/JSON config file may give any of them, and `check_args` rejects impossible values
before any slow work (model load, tokenization). Field names are the option names with `_` for
`-`, so the messages name the option a user typed (`--lr`) and the key of a config file (`lr`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import UserError
from ..loading import DEFAULT_MODEL
from ..files import read_text
from .loss import DEFAULT_CHUNK

DEFAULT_OUT = "adapters/gemma-3-270m-zh"
QUANTIZE_GROUP_SIZES = (32, 64, 128)


def _opt(default, help, **kw):
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class TrainArgs:
    """Every training option; `mlx-gemma train` builds its options (and their help) from these fields."""

    model: str = _opt(DEFAULT_MODEL, "Base model: dir, .gguf, HF repo id or alias.")
    method: str = _opt("sft", "sft (chat / completion / text records), or preference tuning on prompt/chosen/rejected "
                              "records: dpo or orpo.", choices=("sft", "dpo", "orpo"))
    beta: float = _opt(0.1, "DPO: how far the tuned model may move from the reference (TRL's beta).")
    dpo_loss: str = _opt("sigmoid", "DPO loss: sigmoid, ipo, hinge, or several comma-separated (added, as TRL's "
                                    "loss_type list).")
    orpo_alpha: float = _opt(0.1, "ORPO: weight of the odds-ratio term on the chosen answers' NLL (TRL's beta).")
    adapter_init: Optional[str] = _opt(None, "Start from this adapter dir (e.g. an SFT run's --out); with --method "
                                             "dpo it is also the reference, its log-probs computed once.")
    preference_stage: Optional[str] = _opt(
        None, "After SFT with --report: answer --pair-questions training questions with the SFT adapter, turn "
              "its loops and unfinished answers into preference pairs, and DPO-tune on them (dpo), or not (none). "
              "Default dpo in the main job, none otherwise.", choices=("dpo", "none"))
    pair_questions: int = _opt(150, "Preference stage: training questions the SFT adapter answers.")
    preference_iters: int = _opt(40, "Preference stage: DPO steps (batch --batch-size pairs, --beta, --dpo-loss).")
    preference_lr: float = _opt(2e-5, "Preference stage: DPO learning rate (constant after the warmup).")
    data: Optional[str] = _opt(None, "JSONL/JSON file, or dir with train/valid/test files "
                                     "(default: the bundled zh_baike chat splits).")
    out: str = _opt(DEFAULT_OUT, "Adapter dir to write (adapter, checkpoints, metrics, loss curve).")
    rank: int = _opt(16, "LoRA rank r.")
    alpha: float = _opt(32.0, "LoRA alpha (scale = alpha / r).")
    dropout: float = _opt(0.05, "LoRA dropout.")
    targets: str = _opt("q_proj,k_proj,v_proj,o_proj", "Comma-separated modules to adapt, or all-linear.")
    num_layers: Optional[int] = _opt(None, "Adapt only the last N decoder layers (default: all).")
    quantize_bits: Optional[int] = _opt(None, "Quantize the base to 4 or 8 bits first (QLoRA).", choices=(4, 8))
    quantize_group_size: int = _opt(64, "Group size for --quantize-bits.")
    lr: float = _opt(2e-4, "Peak learning rate (AdamW).")
    min_lr: float = _opt(0.0, "Learning rate at the end of the decay.")
    lr_schedule: Optional[str] = _opt(None, "After the warmup: cosine (decay to --min-lr over the remaining "
                                            "steps), wsd (hold --lr, then decay linearly to --min-lr over the last "
                                            "20% of the steps) or constant (default cosine; wsd in the main job).",
                                      choices=("cosine", "wsd", "constant"))
    warmup: Optional[int] = _opt(None, "Linear warmup steps (default: 5% of the steps).")
    weight_decay: float = _opt(0.0, "AdamW weight decay.")
    max_grad_norm: float = _opt(1.0, "Clip the gradient to this global norm (0: off).")
    epochs: Optional[int] = _opt(None, "Passes over the training set (default 1; the main job, on the bundled "
                                       "data without --epochs/--iters: 200 steps, then the preference stage).")
    iters: Optional[int] = _opt(None, "Optimizer steps (overrides --epochs).")
    batch_size: Optional[int] = _opt(None, "Rows per micro-batch, over all ranks together (default 4; 2 in the "
                                           "main job).")
    grad_accum: int = _opt(1, "Micro-batches per optimizer step.")
    max_seq_len: int = _opt(512, "Tokens per record; longer records are truncated (or dropped with --drop-long).")
    drop_long: bool = _opt(False, "Drop records longer than --max-seq-len instead of truncating them.")
    pack: bool = _opt(False, "Pack short records into rows of --max-seq-len (attention stays inside each).")
    train_on_prompt: bool = _opt(False, "Put loss on prompt tokens too (default: assistant answers only).")
    grad_checkpoint: bool = _opt(False, "Recompute each layer's activations in the backward pass (less memory).")
    eval_every: Optional[int] = _opt(None, "Validate every N steps and before the first (0: only at the end; "
                                           "default 50; the main job: the first and last step).")
    eval_batches: Optional[int] = _opt(None, "Validation batches per evaluation (default: the whole split).")
    save_every: int = _opt(100, "Checkpoint every N steps (0: only at the end).")
    seed: int = _opt(0, "Seed for data order, LoRA init and dropout.")
    dtype: str = _opt("auto", "Compute dtype: auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16.",
                      choices=("auto", "float32", "bfloat16", "float16"))
    loss_chunk: int = _opt(DEFAULT_CHUNK, "Vocabulary chunk of the cross-entropy.")
    plot_log_scale: bool = _opt(False, "Draw loss.png with a logarithmic loss axis.")
    test: bool = _opt(True, "Evaluate on the test split at the end (when there is one).")
    resume: bool = _opt(False, "Continue from the latest checkpoint in --out (its options are restored from "
                               "train_config.json).")
    force: bool = _opt(False, "Start over in an --out dir that holds another run.")

    # options that shape the adapter (its tensors, their scale, the base they sit on, the objective)
    # or the step sequence: a resumed run must keep them (`resume_conflict`); --iters / --epochs may grow
    RESUME_KEYS = ("model", "rank", "alpha", "dropout", "targets", "num_layers", "quantize_bits",
                   "quantize_group_size", "dtype", "batch_size", "grad_accum", "max_seq_len", "drop_long", "pack",
                   "train_on_prompt", "seed", "lr", "min_lr", "lr_schedule", "warmup", "weight_decay",
                   "max_grad_norm", "method", "beta", "dpo_loss", "orpo_alpha", "adapter_init")
    # options that describe one invocation, never restored from a previous run's train_config.json
    PER_RUN_KEYS = ("resume", "force")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def train_fields() -> list:
    return dataclasses.fields(TrainArgs)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ---- types: a value from a config file (or a Python caller) against the field's type ---------


def _field_kind(f) -> tuple[type, bool]:
    """(int | float | str | bool, whether None is allowed) of a TrainArgs field."""
    hint = typing.get_type_hints(TrainArgs)[f.name]
    args = typing.get_args(hint)
    if type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def coerce_value(name: str, value, where: str):
    """`value` for field `name` as its declared type, or a UserError naming `where` and the key.

    ints must be whole numbers (3.7 is refused, not truncated); floats take numbers and numeric
    strings (YAML 1.1 reads `1e-4` as a string); `targets` takes a list of module names too.
    """
    f = next(f for f in train_fields() if f.name == name)
    kind, optional = _field_kind(f)
    if value is None:
        if optional:
            return None
        raise UserError(f"{where}: {name} needs a value ({kind.__name__})")
    if name == "targets" and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return ",".join(v.strip() for v in value)
    bad = UserError(f"{where}: {name} must be {_kind_words(kind)}, got {value!r}")
    if kind is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if kind is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise bad
        return value
    if kind is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if not isinstance(value, str):
        raise bad
    return value


def _kind_words(kind) -> str:
    return {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}[kind]


def load_config_file(path) -> dict:
    """A YAML or JSON file of TrainArgs fields -> {field: value of the field's type}.

    UserError (one line naming the file and key) for a missing or unparsable file, an unknown key
    or a value of the wrong type.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"config file {path} not found")
    text = read_text(path)
    try:
        if path.suffix == ".json":
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as exc:  # json / yaml parse errors
        raise UserError(f"{path}: cannot parse ({str(exc).splitlines()[0]})") from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a config file must be a mapping of option: value")
    names = {f.name for f in train_fields()}
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise UserError(f"{path}: unknown key {key!r}; valid keys are the `mlx-gemma train` options "
                            f"({', '.join(sorted(names))})")
        out[name] = coerce_value(name, value, str(path))
    return out


# ---- defaults and ranges ----------------------------------------------------------------------


# The main job: `mlx-gemma train` on the bundled data without --epochs/--iters. Measured on
# questions that are not the test split (README, "How the preset was chosen"): batch 2 gives twice
# the optimizer steps of batch 4 for the same tokens; more passes over the bundled data teach
# stopping better than one pass over more data; wsd (the peak rate held for 80% of the steps)
# better than cosine; and a DPO stage on the SFT adapter's own failures teaches stopping and not
# looping where more SFT steps do not (200 SFT steps + the stage beat 400 SFT steps, in about the
# same time). Validation at the first and the last step only: the stage needs the time.
MAIN_JOB = {"iters": 200, "batch_size": 2, "eval_every": 200, "lr_schedule": "wsd", "preference_stage": "dpo"}
DEFAULTS = {"batch_size": 4, "eval_every": 50, "lr_schedule": "cosine", "preference_stage": "none"}
PRESET_FIELDS = ("iters", "batch_size", "eval_every", "lr_schedule", "preference_stage")


def is_main_job(args: TrainArgs) -> bool:
    return args.data is None and args.epochs is None and args.iters is None and args.method == "sft"


def resolve_defaults(args: TrainArgs) -> TrainArgs:
    """A copy with the options left at None filled: the main job's preset (only where the user
    gave no value) on the bundled data without --epochs/--iters, the usual defaults otherwise."""
    preset = MAIN_JOB if is_main_job(args) else {}
    changes = {name: preset.get(name, DEFAULTS.get(name)) for name in PRESET_FIELDS if getattr(args, name) is None}
    return dataclasses.replace(args, **changes)


# (field, lowest allowed, whether the lowest itself is allowed, highest or None); None values skip
_RANGES = (
    ("rank", 1, True, None), ("batch_size", 1, True, None), ("grad_accum", 1, True, None),
    ("max_seq_len", 2, True, None), ("loss_chunk", 1, True, None), ("epochs", 1, True, None),
    ("iters", 1, True, None), ("num_layers", 1, True, None), ("warmup", 0, True, None),
    ("eval_every", 0, True, None), ("eval_batches", 1, True, None), ("save_every", 0, True, None),
    ("seed", 0, True, 2 ** 32 - 1), ("lr", 0.0, False, None), ("min_lr", 0.0, True, None),
    ("alpha", 0.0, False, None), ("dropout", 0.0, True, 0.99), ("weight_decay", 0.0, True, None),
    ("max_grad_norm", 0.0, True, None), ("beta", 0.0, False, None), ("orpo_alpha", 0.0, False, None),
    ("pair_questions", 1, True, None), ("preference_iters", 1, True, None), ("preference_lr", 0.0, False, None),
)
DPO_LOSSES = ("sigmoid", "ipo", "hinge")


def check_args(args: TrainArgs) -> None:
    """Reject wrong types and impossible values with one line naming the option (before slow work)."""
    for f in train_fields():
        coerce_value(f.name, getattr(args, f.name), "option " + _flag(f.name))
    for name, lo, inclusive, hi in _RANGES:
        v = getattr(args, name)
        if v is None:
            continue
        if not math.isfinite(v):
            raise UserError(f"{_flag(name)} must be a finite number, got {v}")
        if v < lo or (v == lo and not inclusive) or (hi is not None and v > hi):
            above = f"at least {lo:g}" if inclusive else f"above {lo:g}"
            raise UserError(f"{_flag(name)} must be {above}" + (f" and at most {hi}" if hi is not None else "")
                            + f", got {v}")
    if args.quantize_bits not in (None, 4, 8):
        raise UserError(f"--quantize-bits must be 4 or 8, got {args.quantize_bits}")
    if args.quantize_group_size not in QUANTIZE_GROUP_SIZES:
        raise UserError(f"--quantize-group-size must be one of {', '.join(map(str, QUANTIZE_GROUP_SIZES))}, "
                        f"got {args.quantize_group_size}")
    if args.min_lr > args.lr:
        raise UserError(f"--min-lr ({args.min_lr:g}) must not exceed --lr ({args.lr:g})")
    _check_method(args)
    for name in ("dtype", "lr_schedule", "method", "preference_stage"):
        choices = TrainArgs.__dataclass_fields__[name].metadata["choices"]
        if getattr(args, name) is not None and getattr(args, name) not in choices:  # None: the default applies
            raise UserError(f"{_flag(name)} must be one of {', '.join(choices)}, got {getattr(args, name)!r}")


# Checked by run_training before the model loads, and where the data is read. Not in check_args:
# `train()` takes its datasets from the caller and never reads args.data.
PREFERENCE_NEEDS_DATA = ("{method} needs {data}: a preference set (prompt/chosen/rejected records; "
                         "`mlx-gemma data pairs` makes one)")


def _check_method(args: TrainArgs) -> None:
    """The preference options: known DPO losses, no packing (a pair's two answers share a prompt)."""
    losses = [t.strip() for t in str(args.dpo_loss).split(",")]
    bad = [t for t in losses if t not in DPO_LOSSES] or ([] if len(set(losses)) == len(losses) else ["(repeated)"])
    if bad:
        raise UserError(f"--dpo-loss must be one or more of {', '.join(DPO_LOSSES)} (comma-separated, each once), "
                        f"got {args.dpo_loss!r}")
    if args.method in ("dpo", "orpo") and args.preference_stage == "dpo":
        raise UserError(f"--preference-stage follows supervised tuning; with --method {args.method} leave it out "
                        "(or pass --preference-stage none)")
    if args.method in ("dpo", "orpo") and args.pack:
        raise UserError(f"--pack does not apply to --method {args.method} (chosen and rejected rows are batched "
                        "side by side); leave it out")


def resume_conflict(saved: dict, options: dict, where: str) -> None:
    """UserError when `options` (a resumed run's) differ from `saved` (its train_config.json) in
    a RESUME_KEYS option: the checkpoint's tensors were made with the saved ones (a rank-4
    adapter resumed at --rank 8 wrote r=8 over rank-4 weights). Keys the saved config lacks (an
    older run) are not compared."""
    for name in TrainArgs.RESUME_KEYS:
        if name not in saved or name not in options:
            continue
        before = coerce_value(name, saved[name], where) if saved[name] is not None else None
        now = options[name]
        if isinstance(before, float) and isinstance(now, (int, float)) and not isinstance(now, bool):
            now = float(now)
        if before != now:
            shown = {True: "on", False: "off", None: "the default"}
            raise UserError(f"--resume: {_flag(name)} {shown.get(now, now)} differs from the run in {where} "
                            f"({_flag(name)} {shown.get(before, before)}); a resumed run keeps the options that "
                            f"shaped its adapter: drop {_flag(name)}, or start a new run (another --out, or --force)")


# ---- the adapter's size against the model, before the model loads ----------------------------

# bytes per trained parameter: the float32 weight, its gradient and AdamW's two moments
_TRAIN_BYTES_PER_PARAM = 4 * 4


def _layer_shapes(config) -> dict:
    """{target: (in features, out features)} of one decoder layer's linear layers."""
    h, q, kv = config.hidden_size, config.num_attention_heads * config.head_dim, \
        config.num_key_value_heads * config.head_dim
    i = config.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def check_rank(args: TrainArgs, config, memory_bytes: Optional[int] = None) -> None:
    """UserError when --rank exceeds the smallest adapted layer (B @ A has rank <= min(in, out),
    so more only costs memory), or when the LoRA weights with their gradients and AdamW state
    would not fit in `memory_bytes` (default: this machine's RAM). `config` is the model's
    GemmaConfig, read without loading the weights."""
    shapes = _layer_shapes(config)
    names = list(shapes) if args.targets == "all-linear" else [t.strip() for t in args.targets.split(",")]
    names = [n for n in names if n in shapes]  # unknown names: apply_lora words that error
    if not names:
        return
    smallest = min(names, key=lambda n: min(shapes[n]))
    limit = min(shapes[smallest])
    if args.rank > limit:
        raise UserError(f"--rank {args.rank} is above what LoRA can use on this model: {smallest} maps "
                        f"{shapes[smallest][0]} to {shapes[smallest][1]} features, so its update has rank at most "
                        f"{limit}; use --rank {limit} or less")
    layers = min(args.num_layers or config.num_hidden_layers, config.num_hidden_layers)
    params = layers * sum(args.rank * sum(shapes[n]) for n in names)
    need = params * _TRAIN_BYTES_PER_PARAM
    memory_bytes = memory_bytes or _physical_memory()
    if memory_bytes and need > memory_bytes:
        raise UserError(f"--rank {args.rank} trains {params:,} LoRA parameters: about {need / 2 ** 30:.1f} GiB with "
                        f"their gradients and AdamW state, more than this machine's {memory_bytes / 2 ** 30:.1f} GiB "
                        "of memory; lower --rank, --num-layers or --targets")


def _physical_memory() -> Optional[int]:
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on every platform
        return None
