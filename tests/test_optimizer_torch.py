"""The trainer held to torch: `train()` against PEFT + `torch.optim.AdamW` + `clip_grad_norm_` on
transformers' Gemma 3, and its learning-rate schedules against transformers' schedulers.

Both sides start from the same tiny random Gemma 3 (saved by transformers, loaded by mlx-gemma),
the same LoRA A and B (PEFT's, with B away from its zero init so every matrix gets a gradient),
the same records, lr, betas, eps, weight decay, max grad norm and 2 micro-batches per step.
The torch side is written here from torch's own parts: each micro-batch's summed token loss is
back-propagated, the summed gradient divided by the step's loss tokens (the token mean over the
whole step, as transformers' Trainer does with `num_items_in_batch`), clipped, stepped, and the
scheduler advanced. The 4 records fill one step exactly (batch 2 x accumulation 2), so the step's
gradient does not depend on the order the trainer draws them in; padding is on the right, which a
causal model never sees.

Only the public entry points are used (`train`, `TrainArgs`, `load`, `load_adapter`), so the test
survives the trainer's internal layout changing.
"""

import json
import math

import numpy as np
import peft
import pytest
import torch
import transformers
from mlx.utils import tree_flatten

from mlx_gemma.loading import load
from mlx_gemma.lora import load_adapter
from mlx_gemma.training.data import Dataset
from mlx_gemma.training.trainer import TrainArgs, train
from test_lora import tiny_tokenizer_model
from tiny import make_hf_model, save_hf_model

pytestmark = pytest.mark.slow  # trains (seconds each on tiny models, but they are training runs)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 4, 8.0
LENGTHS = (11, 17, 24, 30)  # different loss-token counts per record and per micro-batch
PAD = 0


def _records(vocab: int) -> list:
    """(ids, loss mask) pairs: a prompt part without loss, then an answer with loss."""
    rng = np.random.default_rng(7)
    out = []
    for n in LENGTHS:
        ids = rng.integers(3, vocab, n).astype(np.int32)
        ids[0] = 2  # <bos>
        mask = np.zeros(n, np.int32)
        mask[n // 3:] = 1
        out.append((ids, mask))
    return out


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    return make_start(tmp_path_factory.mktemp("torch-ref"))


def make_start(root):
    """A tiny HF Gemma 3 dir and a PEFT adapter dir with random non-zero A and B (the shared start)."""
    hf = make_hf_model("gemma3_text", seed=3)
    save_hf_model(hf, root / "model")
    (root / "model" / "tokenizer.model").write_bytes(tiny_tokenizer_model())  # load() wants one; pad id 0
    cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, bias="none")
    pm = peft.get_peft_model(hf, cfg)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    pm.save_pretrained(str(root / "adapter"))
    return root


def _peft_model(root):
    model = transformers.Gemma3ForCausalLM.from_pretrained(str(root / "model"), torch_dtype=torch.float32,
                                                          attn_implementation="eager")
    pm = peft.PeftModel.from_pretrained(model, str(root / "adapter"), is_trainable=True)
    pm.train()
    return pm


def _torch_lora(pm) -> dict:
    """{"model.layers.N....q_proj.lora_A": array}: PEFT's trainable matrices under mlx-gemma's names."""
    out = {}
    for name, p in pm.named_parameters():
        if p.requires_grad:
            assert name.startswith("base_model.model.") and name.endswith(".default.weight"), name
            out[name[len("base_model.model."):-len(".default.weight")]] = p.detach().numpy().copy()
    return out


def _torch_run(root, records, args: TrainArgs, scheduler) -> tuple[list, list]:
    """3 steps of PEFT + torch AdamW + clip_grad_norm_; returns (LoRA weights after each step, lr of each step)."""
    torch.manual_seed(0)
    pm = _peft_model(root)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay)
    sched = scheduler(opt)
    weights, lrs = [], []
    micro_batches = [records[:2], records[2:]]  # any split gives the same step (see the module doc)
    for _ in range(args.iters):
        opt.zero_grad()
        tokens = 0
        for micro in micro_batches:
            total = 0.0
            for ids, mask in micro:
                ids_t = torch.tensor(ids[None].astype(np.int64))
                logits = pm(input_ids=ids_t[:, :-1]).logits[0].float()
                per_token = torch.nn.functional.cross_entropy(logits, ids_t[0, 1:], reduction="none")
                w = torch.tensor(mask[1:], dtype=torch.float32)
                total = total + (per_token * w).sum()
                tokens += int(mask[1:].sum())
            total.backward()
        for p in params:
            p.grad /= tokens
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
        weights.append(_torch_lora(pm))
    return weights, lrs


def _our_run(root, records, args: TrainArgs) -> tuple[list, list, list]:
    """The same 3 steps through `train()`; returns (LoRA weights after each step, metrics lr, grad norms seen)."""
    model, tokenizer = load(str(root / "model"), dtype="float32")
    assert tokenizer.pad_id == PAD
    adapter_config = load_adapter(model, root / "adapter")
    ds = Dataset("train", [(ids.copy(), mask.copy()) for ids, mask in records], formats={"tokens": len(records)})
    weights = []

    def on_step(step, rec):
        weights.append({k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())})

    res = train(model, tokenizer, args, ds, adapter_config=adapter_config, on_step=on_step,
                progress=False)
    lrs = [m["lr"] for m in res.metrics if "loss" in m]
    return weights, lrs, res.metrics


def _args(out, **kw) -> TrainArgs:
    base = dict(out=str(out), iters=3, batch_size=2, grad_accum=2, max_seq_len=64, lr=2e-3, min_lr=0.0,
                warmup=1, lr_schedule="cosine", weight_decay=0.1, max_grad_norm=1.0, dropout=0.0, seed=0,
                eval_every=0, save_every=0, test=False, pack=False)
    base.update(kw)
    return TrainArgs(**base)


def _grad_norms(root, records) -> list:
    """The step gradient's global norm at the start (what clip_grad_norm_ returns), torch side."""
    pm = _peft_model(root)
    params = [p for p in pm.parameters() if p.requires_grad]
    tokens = 0
    for ids, mask in records:
        ids_t = torch.tensor(ids[None].astype(np.int64))
        logits = pm(input_ids=ids_t[:, :-1]).logits[0]
        per_token = torch.nn.functional.cross_entropy(logits, ids_t[0, 1:], reduction="none")
        (per_token * torch.tensor(mask[1:], dtype=torch.float32)).sum().backward()
        tokens += int(mask[1:].sum())
    return float(torch.sqrt(sum((p.grad / tokens).pow(2).sum() for p in params)))


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_three_steps_equal_peft_torch_adamw_with_clipping_and_accumulation(start, tmp_path, schedule):
    records = _records(512)
    args = _args(tmp_path / "ours", lr_schedule=schedule, warmup=1 if schedule == "cosine" else 0)
    # the clipping must bite, or a wrong clip could pass unseen
    assert _grad_norms(start, records) > 2 * args.max_grad_norm
    if schedule == "cosine":
        def scheduler(opt):
            return transformers.get_cosine_schedule_with_warmup(opt, args.warmup, args.iters)
    else:
        def scheduler(opt):  # our wsd: decay linearly over the last 20 % of the steps (at least one)
            return transformers.get_wsd_schedule(opt, args.warmup, num_decay_steps=1, num_training_steps=args.iters,
                                                 decay_type="linear")
    ref_weights, ref_lrs = _torch_run(start, records, args, scheduler)
    our_weights, our_lrs, _ = _our_run(start, records, args)
    assert len(our_weights) == len(ref_weights) == 3
    assert our_lrs == pytest.approx(ref_lrs, rel=1e-6, abs=1e-12)
    initial = _torch_lora(_peft_model(start))
    for step, (ours, ref) in enumerate(zip(our_weights, ref_weights), start=1):
        assert ours.keys() == ref.keys() and len(ref) == 2 * 6 * len(TARGETS)
        worst = max(float(np.abs(ours[k] - ref[k]).max()) for k in ref)
        moved = max(float(np.abs(ref[k] - initial[k]).max()) for k in ref)
        assert worst <= 1e-5, f"step {step}: LoRA weights differ from torch's by {worst:.2e}"
        if ref_lrs[step - 1] > 0:  # the weights really moved, so agreeing is not trivial
            assert moved > 100 * 1e-5, (step, moved)


@pytest.mark.parametrize("schedule,warmup,min_lr", [("cosine", 3, 0.0), ("cosine", 4, 2e-4), ("wsd", 3, 0.0),
                                                     ("wsd", 2, 1e-4), ("constant", 3, 0.0)])
def test_learning_rate_per_step_equals_transformers_schedulers(start, tmp_path, schedule, warmup, min_lr):
    """metrics.jsonl's lr at every step of a 12-step run is transformers' scheduler's lr for that step."""
    lr, steps = 1e-3, 12
    records = _records(512)
    args = _args(tmp_path / "lr", iters=steps, lr=lr, min_lr=min_lr, warmup=warmup, lr_schedule=schedule)
    _, ours, metrics = _our_run(start, records, args)
    saved = [json.loads(line) for line in (tmp_path / "lr" / "metrics.jsonl").read_text().splitlines()]
    assert [m["lr"] for m in saved if "loss" in m] == ours  # the file says what the run used
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    if schedule == "cosine":
        sched = transformers.get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, steps, min_lr=min_lr)
    elif schedule == "wsd":
        decay = max(1, round(0.2 * steps))
        sched = transformers.get_wsd_schedule(opt, warmup, num_decay_steps=decay, num_training_steps=steps,
                                              decay_type="linear", min_lr_ratio=min_lr / lr)
    else:
        sched = transformers.get_constant_schedule_with_warmup(opt, warmup)
    ref = []
    for _ in range(steps):
        ref.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert len(ours) == steps
    assert ours == pytest.approx(ref, rel=1e-6, abs=1e-12)
    assert math.isclose(max(ours), lr, rel_tol=1e-6)
