"""LoRA / QLoRA invariants, and adapter parity with peft on transformers' Gemma (both directions)."""

import json
import math
import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from mlx_gemma.convert import hf as hf_convert
from mlx_gemma.convert.peft import from_peft, to_peft
from mlx_gemma.errors import UserError
from mlx_gemma.loading import build_model, read_config
from mlx_gemma.lora import (LoRALinear, apply_lora, count_parameters, dense_weight, fuse_lora, load_adapter,
                            lora_layers, lora_parameters, save_adapter)
from mlx_gemma.quant import QuantizedLinear, dequantize_model, quantize_model

from tiny import TINY, make_hf_model, random_ids, randomize_peft_lora_b, save_hf_model


def load_dir(path):
    config = read_config(path)
    return build_model(config, hf_convert.load_safetensors(hf_convert.safetensors_files(path)), str(path), "float32")


def randomize_lora(model, seed=0, std=0.05):
    """Non-zero B (and fresh A) so that the adapter changes the output."""
    mx.random.seed(seed)
    for _, layer in lora_layers(model):
        layer.lora_A = mx.random.normal(layer.lora_A.shape) * std
        layer.lora_B = mx.random.normal(layer.lora_B.shape) * std


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


@pytest.fixture(scope="module", params=list(TINY))
def hf_dir(request, tmp_path_factory):
    hf = make_hf_model(request.param)
    return request.param, save_hf_model(hf, tmp_path_factory.mktemp(request.param))


# ---- the layer ------------------------------------------------------------------------------------------


def test_init_matches_peft_kaiming_uniform():
    # PEFT: nn.init.kaiming_uniform_(A, a=sqrt(5)) -> U(-1/sqrt(in), 1/sqrt(in)); B = 0; scale = alpha / r.
    base = nn.Linear(4096, 32, bias=False)
    layer = LoRALinear.from_base(base, rank=16, alpha=32.0)
    ref = torch.empty(16, 4096)
    torch.nn.init.kaiming_uniform_(ref, a=math.sqrt(5))
    a = np.array(layer.lora_A)
    assert a.shape == (16, 4096) and layer.lora_B.shape == (32, 16)
    assert abs(np.abs(a).max() - ref.abs().max().item()) < 1e-3
    assert abs(a.std() - ref.std().item()) < 1e-3
    assert not np.array(layer.lora_B).any()
    assert layer.scale == 2.0


def test_dropout_only_on_the_lora_path():
    mx.random.seed(0)
    base = nn.Linear(64, 32, bias=False)
    x = mx.random.normal((8, 64))
    layer = LoRALinear.from_base(base, rank=4, alpha=8.0, dropout=0.5)
    layer.train()
    # B = 0: the output is the base's, dropout or not (dropout never touches the base path).
    np.testing.assert_array_equal(np.array(layer(x)), np.array(base(x)))
    layer.lora_B = mx.random.normal(layer.lora_B.shape)
    train_out = np.array(layer(x))
    layer.eval()
    eval_out = np.array(layer(x))
    expected = np.array(base(x)) + 2.0 * np.array(x) @ np.array(layer.lora_A).T @ np.array(layer.lora_B).T
    np.testing.assert_allclose(eval_out, expected, atol=1e-5)
    assert np.abs(train_out - eval_out).max() > 1e-2


def test_lora_at_init_leaves_logits_unchanged_and_new_layers_follow_eval_mode(hf_dir):
    model_type, path = hf_dir
    model = load_dir(path)
    ids = mx.array(random_ids(TINY[model_type]["vocab_size"], (2, 12)))
    before = np.array(model(ids))
    apply_lora(model, "all-linear", rank=4, dropout=0.5)
    assert all(not layer.training for _, layer in lora_layers(model))
    np.testing.assert_array_equal(np.array(model(ids)), before)


def test_only_lora_parameters_are_trainable_and_get_gradients(tmp_path):
    model = load_dir(save_hf_model(make_hf_model("gemma3_text"), tmp_path))
    cfg = apply_lora(model, ["q_proj", "down_proj"], rank=4, num_layers=2)
    randomize_lora(model)
    n = len(model.model.layers)
    assert cfg["layers_to_transform"] == [n - 2, n - 1]
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert sorted(trainable) == sorted(
        f"model.layers.{i}.{m}.{ab}" for i in (n - 2, n - 1) for m in ("self_attn.q_proj", "mlp.down_proj")
        for ab in ("lora_A", "lora_B"))
    ids = mx.array(random_ids(512, (2, 10)))

    def loss(model):
        return nn.losses.cross_entropy(model(ids[:, :-1]), ids[:, 1:]).mean()

    _, grads = nn.value_and_grad(model, loss)(model)
    flat = dict(tree_flatten(grads))
    assert sorted(flat) == sorted(trainable)
    assert all(np.abs(np.array(g)).max() > 0 for g in flat.values())
    counts = count_parameters(model)
    assert counts["trainable"] == sum(v.size for v in trainable.values())
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    assert counts["total"] == total and abs(counts["percent"] - 100 * counts["trainable"] / total) < 1e-9


def test_bad_targets_and_layers_are_user_errors(tmp_path):
    model = load_dir(save_hf_model(make_hf_model("gemma"), tmp_path))
    with pytest.raises(UserError, match="unknown LoRA target 'qproj'.*q_proj, k_proj"):
        apply_lora(model, ["qproj"])
    with pytest.raises(UserError, match="num_layers = 3"):
        apply_lora(model, num_layers=3)
    assert not lora_layers(model)


# ---- fusing ---------------------------------------------------------------------------------------------


def test_fused_equals_unfused_dense(hf_dir):
    model_type, path = hf_dir
    model = load_dir(path)
    apply_lora(model, "all-linear", rank=4, alpha=8.0)
    randomize_lora(model)
    ids = mx.array(random_ids(TINY[model_type]["vocab_size"], (2, 12), seed=1))
    unfused = np.array(model(ids))
    plain = np.array(load_dir(path)(ids))
    assert np.abs(unfused - plain).max() > 1e-2  # the adapter does change the output
    name, layer = lora_layers(model)[0]
    merged = np.array(layer.fuse().weight)
    expected = np.array(layer.base.weight) + 2.0 * np.array(layer.lora_B) @ np.array(layer.lora_A)
    np.testing.assert_allclose(merged, expected, atol=1e-6)
    fuse_lora(model)
    assert not lora_layers(model)
    assert all(type(m) is nn.Linear for _, m in model.named_modules() if isinstance(m, nn.Linear))
    assert np.abs(np.array(model(ids)) - unfused).max() <= 1e-5


def test_fuse_without_lora_is_a_noop(tmp_path):
    model = load_dir(save_hf_model(make_hf_model("gemma2"), tmp_path))
    before = dict(tree_flatten(model.parameters()))
    assert fuse_lora(model) is model
    after = dict(tree_flatten(model.parameters()))
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)


@pytest.fixture(scope="module")
def tiny3_dir(tmp_path_factory):
    return save_hf_model(make_hf_model("gemma3_text"), tmp_path_factory.mktemp("tiny3"))


def quantized_tiny(path):
    model = load_dir(path)
    quantize_model(model, bits=4, group_size=32)
    return model


def test_qlora_forward_matches_dequantized_base_plus_lora(tiny3_dir):
    model = quantized_tiny(tiny3_dir)
    apply_lora(model, "all-linear", rank=4, alpha=8.0)
    randomize_lora(model)
    layers = lora_layers(model)
    assert all(isinstance(layer.base, QuantizedLinear) for _, layer in layers)
    ids = mx.array(random_ids(512, (2, 12), seed=2))
    qlora = np.array(model(ids))
    # Reference: every base dequantized to a dense nn.Linear, same A/B.
    dense = quantized_tiny(tiny3_dir)
    apply_lora(dense, "all-linear", rank=4, alpha=8.0)
    for (_, ours), (_, ref) in zip(layers, lora_layers(dense)):
        ref.lora_A, ref.lora_B = ours.lora_A, ours.lora_B
    dequantize_model(dense)
    assert all(type(layer.base) is nn.Linear for _, layer in lora_layers(dense))
    assert np.abs(qlora - np.array(dense(ids))).max() <= 1e-4


def test_qlora_fuse_requantizes_within_rounding_or_exactly_dense(tiny3_dir):
    model = quantized_tiny(tiny3_dir)
    apply_lora(model, ["q_proj", "up_proj"], rank=4, alpha=8.0)
    randomize_lora(model)
    ids = mx.array(random_ids(512, (1, 10), seed=3))
    unfused = np.array(model(ids))
    for _, layer in lora_layers(model):
        target = np.array(dense_weight(layer.base)) + np.array(layer.delta())
        fused = layer.fuse()
        assert type(fused) is type(layer.base)
        assert (fused.bits, fused.group_size, fused.mode) == (4, 32, "affine")
        # Affine rounding onto each group's fitted grid (whose range may be clipped): on average
        # a weight lands well within one quantization step (its group's scale) of W + scale * B @ A.
        err = np.abs(np.array(dense_weight(fused)) - target).reshape(target.shape[0], -1, 32)
        step = np.abs(np.array(fused.scales))[..., None]
        assert err.mean() < 0.35 * step.mean()
        # requantized with the package's quantizer: per group no worse than mx.quantize's grid
        rtn = np.array(mx.dequantize(*mx.quantize(mx.array(target), group_size=32, bits=4), group_size=32, bits=4))
        err_rtn = ((rtn - target) ** 2).reshape(target.shape[0], -1, 32).sum(-1)
        assert ((err ** 2).sum(-1) <= err_rtn * (1 + 1e-4) + 1e-10).all()
        exact = layer.fuse(dequantize=True)
        assert type(exact) is nn.Linear
        np.testing.assert_allclose(np.array(exact.weight), target, atol=1e-6)
    dense = quantized_tiny(tiny3_dir)
    apply_lora(dense, ["q_proj", "up_proj"], rank=4, alpha=8.0)
    for (_, a), (_, b) in zip(lora_layers(model), lora_layers(dense)):
        b.lora_A, b.lora_B = a.lora_A, a.lora_B
    fuse_lora(dense, dequantize=True)
    assert dense.config.quantization is None
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in dense.named_modules())
    assert np.abs(np.array(dense(ids)) - unfused).max() <= 1e-4
    fuse_lora(model)
    assert model.config.quantization == {"group_size": 32, "bits": 4, "mode": "affine"}
    requantized = np.array(model(ids))
    assert 0 < np.abs(requantized - unfused).max() < 0.5


# ---- adapters: PEFT format ------------------------------------------------------------------------------


def test_peft_name_mapping_round_trips():
    ours = {"model.layers.3.self_attn.q_proj.lora_A": 1, "model.layers.3.mlp.down_proj.lora_B": 2}
    peft = to_peft(ours)
    assert sorted(peft) == ["base_model.model.model.layers.3.mlp.down_proj.lora_B.weight",
                            "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"]
    assert from_peft(peft, "x") == ours
    # Multimodal Gemma 3 checkpoints nest the text model.
    assert from_peft({"base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight": 1}, "x") == \
        {"model.layers.0.self_attn.q_proj.lora_A": 1}
    with pytest.raises(UserError, match="embedding"):
        from_peft({"base_model.model.model.embed_tokens.lora_embedding_A": 1}, "f.safetensors")


def test_peft_loads_our_adapter_with_matching_logits(hf_dir, tmp_path):
    from peft import PeftModel

    model_type, path = hf_dir
    ours = load_dir(path)
    cfg = apply_lora(ours, ["q_proj", "v_proj", "o_proj", "gate_proj"], rank=4, alpha=8.0, num_layers=2,
                     base_model=str(path))
    randomize_lora(ours)
    adapter = save_adapter(ours, tmp_path / "adapter", cfg)
    hf = PeftModel.from_pretrained(make_hf_model(model_type), str(adapter)).eval()
    ids = random_ids(TINY[model_type]["vocab_size"], (2, 12), seed=4)
    expected = hf_logits(hf, ids)
    plain = hf_logits(make_hf_model(model_type), ids)
    assert np.abs(expected - plain).max() > 1e-2
    assert np.abs(np.array(ours(mx.array(ids))) - expected).max() <= 1e-3


@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_saved_by_peft_loads_with_matching_logits(hf_dir, tmp_path, rslora):
    from peft import LoraConfig, get_peft_model

    model_type, path = hf_dir
    n = TINY[model_type]["num_hidden_layers"]
    config = LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["k_proj", "up_proj", "down_proj"],
                        layers_to_transform=[0, n - 1], use_rslora=rslora, task_type="CAUSAL_LM")
    hf = randomize_peft_lora_b(get_peft_model(make_hf_model(model_type), config), seed=1)
    hf.save_pretrained(str(tmp_path / "peft"))
    ids = random_ids(TINY[model_type]["vocab_size"], (2, 12), seed=5)
    expected = hf_logits(hf.eval(), ids)
    ours = load_dir(path)
    raw = load_adapter(ours, tmp_path / "peft")
    assert raw["r"] == 4
    layers = lora_layers(ours)
    assert len(layers) == 6 and {int(name.split(".")[2]) for name, _ in layers} == {0, n - 1}
    assert layers[0][1].scale == pytest.approx(16 / 2 if rslora else 16 / 4)
    assert not layers[0][1].training
    assert np.abs(np.array(ours(mx.array(ids))) - expected).max() <= 1e-3


def test_save_adapter_round_trips_and_keeps_other_files(tmp_path):
    path = save_hf_model(make_hf_model("gemma"), tmp_path / "model")
    model = load_dir(path)
    cfg = apply_lora(model, "all-linear", rank=2, alpha=4.0)
    randomize_lora(model)
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_log.jsonl").write_text("{}\n")
    save_adapter(model, out, cfg, extra_files={"notes.txt": "hi", "args.json": {"lr": 1e-4}})
    randomize_lora(model, seed=7)
    save_adapter(model, out, cfg)  # overwrite in place
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "args.json", "notes.txt", "train_log.jsonl"]
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    reloaded = load_dir(path)
    load_adapter(reloaded, out)
    ids = mx.array(random_ids(512, (1, 9)))
    np.testing.assert_array_equal(np.array(reloaded(ids)), np.array(model(ids)))


# ---- adapters that do not fit ---------------------------------------------------------------------------


def _adapter_from(model_type, tmp_path, targets, **kwargs):
    model = load_dir(save_hf_model(make_hf_model(model_type), tmp_path / f"m-{model_type}"))
    cfg = apply_lora(model, targets, rank=4, base_model="tiny-" + model_type, **kwargs)
    return save_adapter(model, tmp_path / f"adapter-{model_type}", cfg)


def test_adapter_for_another_model_is_one_clear_error(tmp_path):
    gemma2 = load_dir(save_hf_model(make_hf_model("gemma2"), tmp_path / "g2"))
    # Gemma 3 tiny: 1 KV head, Gemma 2 tiny: 2 -> k_proj's B has another shape.
    adapter = _adapter_from("gemma3_text", tmp_path, ["k_proj"])
    with pytest.raises(UserError) as err:
        load_adapter(gemma2, adapter)
    msg = str(err.value)
    assert "adapter_model.safetensors: tensor base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight" in msg
    assert "has shape (16, 4), this model needs (32, 4)" in msg and "tiny-gemma3_text" in msg
    assert not lora_layers(gemma2)  # nothing applied
    # Layers the model does not have (Gemma 3 tiny: 6 layers, Gemma 2 tiny: 4).
    adapter = _adapter_from("gemma3_text", tmp_path, ["q_proj"], num_layers=1)
    with pytest.raises(UserError, match="layer 5 does not exist, this model has 4 layers"):
        load_adapter(gemma2, adapter)


def test_bad_adapter_dirs_are_user_errors(tmp_path):
    model = load_dir(save_hf_model(make_hf_model("gemma"), tmp_path / "g"))
    with pytest.raises(UserError, match="adapter dir .*nowhere not found"):
        load_adapter(model, tmp_path / "nowhere")
    adapter = _adapter_from("gemma", tmp_path, ["q_proj"])
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    for change, pattern in [({"target_modules": ["qkv"]}, "match no linear layer.*valid names: q_proj"),
                            ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
                            ({"peft_type": "IA3"}, "LoRA adapters only"),
                            ({"target_modules": ["q_proj", "v_proj"]}, "v_proj.lora_A.weight is missing")]:
        cfg_path.write_text(json.dumps({**cfg, **change}))
        with pytest.raises(UserError, match=pattern):
            load_adapter(model, adapter)
        assert not lora_layers(model)
    cfg_path.write_text(json.dumps(cfg))
    (adapter / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="adapter_model.safetensors: cannot read"):
        load_adapter(model, adapter)
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="adapter_model.safetensors not found"):
        load_adapter(model, adapter)


# ---- `mlx-gemma fuse` -----------------------------------------------------------------------------------


def tiny_tokenizer_model() -> bytes:
    """A small Gemma-shaped SentencePiece vocabulary (specials, bytes, a few words) for model dirs."""
    from mlx_gemma.convert.spm import tokenizer_model_from_gguf_fields

    tokens, types = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], [3, 3, 3, 2, 3, 3]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    words = ["▁", "h", "i", "hi", "▁hi"]
    scores = [0.0] * len(tokens) + [-float(k) for k in range(len(words))]
    return tokenizer_model_from_gguf_fields(tokens + words, scores, types + [1] * len(words), 2, 1, 3, 0)


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    """A tiny Gemma 3 model dir that `mlx_gemma.loading.load` accepts, plus an adapter for it."""
    root = tmp_path_factory.mktemp("cli")
    path = save_hf_model(make_hf_model("gemma3_text"), root / "model")
    (path / "tokenizer.model").write_bytes(tiny_tokenizer_model())
    model = load_dir(path)
    cfg = apply_lora(model, ["q_proj", "down_proj"], rank=4, alpha=8.0)
    randomize_lora(model)
    save_adapter(model, root / "adapter", cfg)
    ids = mx.array(random_ids(512, (1, 11), seed=6))
    return root, path, root / "adapter", ids, np.array(model(ids))


def run_cli(*args):
    from click.testing import CliRunner

    from mlx_gemma.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_fuse_writes_a_model_equal_to_base_plus_adapter(cli_model):
    root, path, adapter, ids, expected = cli_model
    out = root / "fused"
    result = run_cli("fuse", "--model", path, "--adapter", adapter, out)
    assert result.exit_code == 0, result.output
    assert f"fused 12 LoRA layers of {adapter}" in result.output
    fused = load_dir(out)
    assert not lora_layers(fused) and (out / "tokenizer.model").exists()
    assert np.abs(np.array(fused(ids)) - expected).max() <= 1e-5
    # OUT exists: refused in one line unless --force.
    result = run_cli("fuse", "--model", path, "--adapter", adapter, out)
    assert result.exit_code == 1 and result.output.strip().count("\n") == 0
    assert "already exists" in result.output and "--force" in result.output
    assert run_cli("fuse", "--model", path, "--adapter", adapter, out, "--force").exit_code == 0


def test_cli_fuse_quantized_model_requantizes_or_dequantizes(cli_model):
    from mlx_gemma.loading import load, save_model

    root, path, adapter, ids, expected = cli_model
    model, tokenizer = load(path, dtype="float32")
    quantize_model(model, bits=8, group_size=32)
    save_model(model, tokenizer, root / "q8")
    assert run_cli("fuse", "-m", root / "q8", "-a", adapter, root / "q8-fused").exit_code == 0
    assert json.loads((root / "q8-fused" / "config.json").read_text())["quantization"]["bits"] == 8
    assert run_cli("fuse", "-m", root / "q8", "-a", adapter, root / "q8-dense", "--dequantize").exit_code == 0
    assert "quantization" not in json.loads((root / "q8-dense" / "config.json").read_text())
    base = np.array(load(root / "q8", dtype="float32")[0](ids))
    unfused = np.array(load(root / "q8", dtype="float32", adapter=adapter)[0](ids))  # QLoRA
    dense = np.array(load_dir(root / "q8-dense")(ids))
    requantized = np.array(load_dir(root / "q8-fused")(ids))
    assert np.abs(dense - unfused).max() <= 1e-4  # dequantize + add is exact
    # Requantizing W + delta rounds it to 8 bits: an error far below what the adapter changes.
    assert np.abs(requantized - unfused).max() < 0.2 * np.abs(unfused - base).max()


def test_cli_fuse_with_an_adapter_for_another_model_is_one_line(cli_model, tmp_path):
    root, path, _, _, _ = cli_model
    other = _adapter_from("gemma", tmp_path, ["q_proj"])  # Gemma 1 tiny: q_proj is 64 -> 128
    result = run_cli("fuse", "--model", path, "--adapter", other, tmp_path / "out")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "adapter_model.safetensors: tensor" in lines[0]
    assert not (tmp_path / "out").exists()
    result = run_cli("fuse", "--model", path, "--adapter", tmp_path / "missing", tmp_path / "out")
    assert result.exit_code == 1 and "adapter dir" in result.output and "not found" in result.output


# ---- the real Gemma 3 270M ----------------------------------------------------------------------------


@pytest.mark.slow  # the 270M model's weights: minutes on a 2-core CPU
def test_real_270m_adapter_matches_peft_and_fuses(gguf_path, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mlx_gemma.loading import load, resolve

    model, tokenizer = load("gemma-3-270m")
    cfg = apply_lora(model, "all-linear", rank=8, alpha=16.0, base_model="gemma-3-270m")
    # r * (in + out) per layer: q, o (640 <-> 4 x 256), k, v (640 -> 256), gate, up, down (640 <-> 2048)
    per_layer = 8 * (2 * (640 + 1024) + 2 * (640 + 256) + 3 * (640 + 2048))
    assert count_parameters(model)["trainable"] == 18 * per_layer == 1_898_496
    randomize_lora(model, std=0.01)
    adapter = save_adapter(model, tmp_path / "adapter", cfg)
    ids = np.array([tokenizer.encode("The capital of France is Paris, and the capital of Italy is")])
    ours = np.array(model(mx.array(ids)))
    hf = AutoModelForCausalLM.from_pretrained(str(resolve("gemma-3-270m")), dtype=torch.float32)
    expected = hf_logits(PeftModel.from_pretrained(hf, str(adapter)).eval(), ids)
    assert np.abs(ours - expected).max() <= 1e-3
    fuse_lora(model)
    assert np.abs(np.array(model(mx.array(ids))) - ours).max() <= 1e-3
