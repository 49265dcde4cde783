"""DPO and ORPO against TRL 1.16 (DPOTrainer, experimental ORPOTrainer) with PEFT on torch: the
same tiny Gemma, the same LoRA weights (B non-zero, so the adapter and the reference differ), the
same token ids (TRL tokenizes; we train on the ids it produced), the same batch and beta.

TRL's settings are spelled out: no dropout (disable_dropout, lora_dropout 0), no truncation
(max_length above every pair), right padding, the reference from the PEFT model with its adapter
disabled (precompute_ref_log_probs False), AdamW with a constant rate and no clipping.
"""

import dataclasses

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_gemma import backend
from mlx_gemma.convert.peft import from_peft
from mlx_gemma.lora import fuse_lora, lora_layers, load_adapter
from mlx_gemma.training import data as D
from mlx_gemma.training import trainer as T
from mlx_gemma.training.preference import DPO, ORPO, adapter_off, sequence_logps
from tiny import TINY, make_hf_model, randomize_peft_lora_b, save_hf_model

torch = pytest.importorskip("torch")
MODEL = "gemma3_text"
PAIRS = 3
BETA = 0.1
LR = 1e-2
# Adam's first update is g / (|g| + eps): with eps 1e-8 a gradient entry at float noise (1e-9
# here, 1.1e-9 there) moves its weight by a whole learning rate either way, so two correct
# implementations part after one step. eps 1e-3 keeps such entries still on both sides.
EPS = 1e-3
CHUNK = 100  # vocabulary chunks of the LM-head loss: 512 words in 6 chunks


def hf_tokenizer(vocab: int):
    """A word-level HF tokenizer over ids 4..vocab-1 ("w4 w9 ..."), Gemma's special ids (pad 0,
    eos 1, bos 2), <bos> prepended: what TRL tokenizes the pairs with."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3} | {f"w{i}": i for i in range(4, vocab)}
    tk = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def text_pairs(n: int, vocab: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)

    def words(k):
        return " ".join(f"w{i}" for i in rng.integers(4, vocab, k))

    return [{"prompt": words(int(rng.integers(3, 7))), "chosen": " " + words(int(rng.integers(2, 6))),
             "rejected": " " + words(int(rng.integers(2, 6)))} for _ in range(n)]


@pytest.fixture(scope="module")
def setup_dirs(tmp_path_factory):
    """The tiny model's HF dir and two PEFT adapters on it (q, k, v, o; r 4): "fresh" as PEFT
    initialises one (B = 0: the model is the base), "adapter" with random B (an SFT adapter to
    start from: TRL then keeps a copy of it as the reference, as our cached reference does)."""
    from peft import LoraConfig, get_peft_model

    d = tmp_path_factory.mktemp("pref")
    save_hf_model(make_hf_model(MODEL), d / "model")
    torch.manual_seed(2)
    peft = get_peft_model(make_hf_model(MODEL), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    peft.save_pretrained(str(d / "fresh"))
    randomize_peft_lora_b(peft, seed=1).save_pretrained(str(d / "adapter"))
    return d


class Tok:
    pad_id, bos_id, eos_id = 0, 2, 1


def ours(dirs, start="adapter"):
    from mlx_gemma.loading import read_config
    from mlx_gemma.convert import hf as hf_convert
    from mlx_gemma.loading import build_model

    path = dirs / "model"
    model = build_model(read_config(path), hf_convert.load_safetensors(hf_convert.safetensors_files(path)),
                        str(path), "float32")
    config = load_adapter(model, dirs / start)
    return model, config


def peft_model(dirs, start):
    from peft import PeftModel

    return PeftModel.from_pretrained(make_hf_model(MODEL), str(dirs / start), is_trainable=True)


def trl_trainer(kind: str, dirs, tmp_path, loss_types=("sigmoid",), steps: int = 1, start="adapter"):
    from datasets import Dataset

    common = dict(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=PAIRS, learning_rate=LR,
                  lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
                  max_steps=steps, logging_steps=1, report_to=[], use_cpu=True, disable_dropout=True, seed=0,
                  save_strategy="no", max_length=512, gradient_accumulation_steps=1, adam_beta1=0.9,
                  adam_beta2=0.999, adam_epsilon=EPS, gradient_checkpointing=False)
    data = Dataset.from_list(text_pairs(PAIRS, TINY[MODEL]["vocab_size"]))
    tok = hf_tokenizer(TINY[MODEL]["vocab_size"])
    if kind == "dpo":
        from trl import DPOConfig, DPOTrainer

        cfg = DPOConfig(beta=BETA, loss_type=list(loss_types), precompute_ref_log_probs=False,
                        truncation_mode="keep_start", pad_to_multiple_of=None, **common)
        return DPOTrainer(model=peft_model(dirs, start), args=cfg, train_dataset=data, processing_class=tok)
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    cfg = ORPOConfig(beta=BETA, max_completion_length=None, **common)
    return ORPOTrainer(model=peft_model(dirs, start), args=cfg, train_dataset=data, processing_class=tok)


def pair_dataset(kind: str, trainer) -> D.PairDataset:
    """The pairs as TRL tokenized them, in our layout (answer tokens carry the loss)."""
    ds = D.PairDataset(name="train")
    for row in trainer.train_dataset:
        for side in ("chosen", "rejected"):
            if kind == "dpo":
                ids = row["prompt_ids"] + row[f"{side}_ids"]
                mask = [0] * len(row["prompt_ids"]) + [1] * len(row[f"{side}_ids"])
            else:
                ids, mask = row[f"{side}_input_ids"], [int(x != -100) for x in row[f"{side}_labels"]]
            mask[0] = 0
            ds.examples.append((np.array(ids, np.int32), np.array(mask, np.int32)))
    return ds


def trl_loss_and_grads(trainer):
    """TRL's loss, its logged metrics and the LoRA gradients for one batch of every pair."""
    model = trainer.model
    model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(PAIRS)])
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            grads.update(from_peft({name.replace(".default", ""): p.grad.numpy()}, "torch"))
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()} if hasattr(trainer, "_metrics") else {}
    return loss.item(), metrics, grads


def objective_for(kind: str, loss_types=("sigmoid",), start="adapter"):
    """Ours as TRL runs it: from a trained adapter, DPO's reference is that adapter (cached)."""
    if kind == "orpo":
        return ORPO(alpha=BETA)
    return DPO(beta=BETA, loss_types=loss_types, cached_reference=start == "adapter", loss_chunk=CHUNK)


CASES = [("dpo", ("sigmoid",), "fresh"), ("dpo", ("sigmoid",), "adapter"), ("dpo", ("ipo",), "adapter"),
         ("dpo", ("sigmoid", "hinge"), "adapter"), ("orpo", (), "adapter")]
IDS = ["dpo-sigmoid-adapter-off", "dpo-sigmoid-cached", "dpo-ipo", "dpo-sigmoid+hinge", "orpo"]


@pytest.mark.parametrize("kind,loss_types,start", CASES, ids=IDS)
@pytest.mark.parametrize("host_head", [True, False], ids=["numpy-head", "mlx-head"])
def test_one_step_loss_and_gradients_equal_trl(kind, loss_types, start, host_head, setup_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(backend, "_current", dataclasses.replace(backend.policy(), host_loss=host_head))
    trainer = trl_trainer(kind, setup_dirs, tmp_path, loss_types, start=start)
    expected, trl_metrics, trl_grads = trl_loss_and_grads(trainer)
    model, _ = ours(setup_dirs, start)
    model.train()
    objective = objective_for(kind, loss_types, start)
    ds = pair_dataset(kind, trainer)
    objective.prepare(model, ds, 0, 512)
    batch = objective.make_batch(ds, [[i] for i in range(PAIRS)], 0, 512)
    (loss_sum, count, sums), grads = objective.grad_fn(model, CHUNK)(*objective.device_batch(model, batch))
    assert count.item() == PAIRS
    assert abs(loss_sum.item() / PAIRS - expected) < 1e-5, (loss_sum.item() / PAIRS, expected)
    flat = {k: np.array(v) / PAIRS for k, v in tree_flatten(grads)}
    assert set(flat) == set(trl_grads) and len(flat) == 4 * TINY[MODEL]["num_hidden_layers"] * 2
    assert max(np.abs(v).max() for v in flat.values()) > 1e-3  # gradients reach A and B
    scale = max(1.0, max(np.abs(g).max() for g in trl_grads.values()))  # IPO's gradients reach ~3
    for name, g in flat.items():
        np.testing.assert_allclose(g, trl_grads[name], atol=1e-5 * scale, rtol=0, err_msg=name)
    names = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected")
    if kind == "dpo":  # ORPO's metrics come back from get_batch_loss_metrics, checked in the 3-step test
        for name in names:
            assert abs(sums[name].item() / PAIRS - trl_metrics[name]) < 1e-5, name


def our_run(kind, dirs, tmp_path, loss_types, steps, start):
    model, config = ours(dirs, start)
    trainer = trl_trainer(kind, dirs, tmp_path / "tok", loss_types, steps=1, start=start)  # for its token ids only
    ds = pair_dataset(kind, trainer)
    args = T.TrainArgs(out=str(tmp_path / "ours"), iters=steps, batch_size=PAIRS, lr=LR, lr_schedule="constant",
                       warmup=0, max_grad_norm=0.0, eval_every=0, save_every=0, max_seq_len=512, test=False,
                       method=kind)
    opt = optim.AdamW(learning_rate=LR, betas=[0.9, 0.999], eps=EPS, weight_decay=0.0, bias_correction=True)
    objective = objective_for(kind, loss_types, start)
    result = T.train(model, Tok(), args, ds, adapter_config=config, optimizer=opt, loss=objective, progress=False)
    after = T.evaluate_dataset(model, Tok(), ds, PAIRS, 512, objective=objective)["loss"]
    return result, after


@pytest.mark.slow
@pytest.mark.parametrize("kind,loss_types,start", [CASES[0], CASES[1], CASES[4]], ids=[IDS[0], IDS[1], IDS[4]])
def test_three_optimizer_steps_follow_trl(kind, loss_types, start, setup_dirs, tmp_path):
    """Three AdamW steps on TRL's loss (its compute_loss, torch.optim.AdamW with the same settings)
    against our `train`. (HF Trainer.train() itself is not the reference here: on this machine its
    first-step loss already differs from its own compute_loss on the same batch by 4e-5.)"""
    trainer = trl_trainer(kind, setup_dirs, tmp_path, loss_types, start=start)
    model = trainer.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=EPS, weight_decay=0.0)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(PAIRS)])
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        model.eval()
        trl_after = trainer.compute_loss(model, batch).item()
    result, after = our_run(kind, setup_dirs, tmp_path, loss_types, 3, start)
    ours_losses = [m["loss"] for m in result.metrics if "loss" in m]
    assert len(ours_losses) == 3
    np.testing.assert_allclose(ours_losses, losses, atol=1e-4, rtol=0)
    assert abs(losses[0] - losses[2]) > 1e-2  # it trained
    assert abs(after - trl_after) < 1e-4, (after, trl_after)
    last = [m for m in result.metrics if "loss" in m][-1]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected"):
        assert name in last


def test_reference_is_the_base_model_and_a_cached_reference_is_the_fused_adapter(setup_dirs, tmp_path):
    """Adapter off == the base model without LoRA layers; the cached reference of a run started
    from an adapter == the log-probs of that adapter fused into the weights."""
    from mlx_gemma.loading import read_config
    from mlx_gemma.convert import hf as hf_convert
    from mlx_gemma.loading import build_model

    path = setup_dirs / "model"

    def base():
        return build_model(read_config(path), hf_convert.load_safetensors(hf_convert.safetensors_files(path)),
                           str(path), "float32")

    trainer = trl_trainer("dpo", setup_dirs, tmp_path)
    ds = pair_dataset("dpo", trainer)
    dpo = DPO(beta=BETA)
    batch = dpo.make_batch(ds, [[i] for i in range(PAIRS)], 0, 512)
    arrays = dpo.answer_arrays(batch)
    model, _ = ours(setup_dirs)
    with adapter_off(model):
        off = np.array(sequence_logps(model, arrays))
    on = np.array(sequence_logps(model, arrays))
    plain = np.array(sequence_logps(base(), arrays))
    np.testing.assert_array_equal(off, plain)
    assert np.abs(on - plain).max() > 1e-3  # the adapter matters, so the check above can fail
    np.testing.assert_array_equal(np.array(dpo.reference(model, arrays, batch)), plain)

    cached = DPO(beta=BETA, cached_reference=True)
    cached.prepare(model, ds, 0, 512)
    fused = fuse_lora(ours(setup_dirs)[0])
    assert not lora_layers(fused)
    np.testing.assert_allclose(ds.reference, np.array(sequence_logps(fused, arrays)).reshape(2, -1).T,
                               atol=2e-5, rtol=0)
    # PEFT's own answer: the adapter disabled (what TRL's reference is for a new adapter)
    peft = peft_model(setup_dirs, "adapter").eval()
    with torch.no_grad(), peft.disable_adapter():
        logits = peft(input_ids=torch.tensor(batch["inputs"]).long()).logits.float()
    token = torch.log_softmax(logits, -1).gather(-1, torch.tensor(batch["targets"]).long()[..., None])[..., 0]
    np.testing.assert_allclose((token * torch.tensor(batch["weights"])).sum(1).numpy(), plain, atol=1e-4, rtol=0)
