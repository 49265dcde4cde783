"""LoRA on Gemma 4 / 3n against PEFT on transformers' model, and the HF export read back by transformers.

- Gradients: the same LoRA matrices (B non-zero) on attention and MLP, the same next-token loss;
  every lora_A / lora_B gradient equals PEFT's.
- PEFT loads the adapter we save onto transformers' model and gives our logits.
- convert_to_hf writes a dir that transformers loads with its Gemma 4 / 3n classes: the same
  logits as the source checkpoint, the same tensors.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from mlx_gemma.convert import hf as hf_convert
from mlx_gemma.loading import build_model, read_config
from mlx_gemma.lora import apply_lora, fuse_lora, lora_layers, save_adapter

from gemma4_tiny import make_hf_model, random_ids, save, vocab_of

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 4, 8.0


def load_dir(path):
    config = read_config(path)
    return build_model(config, hf_convert.load_safetensors(hf_convert.safetensors_files(path)), str(path), "float32")


def _peft_model(hf):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS)
    model = get_peft_model(hf, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    return model


def _peft_lora_tensors(model) -> dict:
    """{our LoRA parameter name: torch parameter} (base_model.model.model.layers.i... -> model.layers.i...)."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            ours = name.replace("base_model.model.", "", 1).replace(".default.weight", "")
            out[ours] = p
    return out


@pytest.mark.parametrize("kind", ["gemma4_e2b", "gemma4_moe", "gemma3n"])
def test_lora_gradients_equal_peft(kind, tmp_path):
    hf = make_hf_model(kind)
    path = save(hf, tmp_path / kind)
    ours = load_dir(path)
    peft_model = _peft_model(hf)
    ref = _peft_lora_tensors(peft_model)
    apply_lora(ours, TARGETS, rank=RANK, alpha=ALPHA, dropout=0.0)
    names = {n for n, _ in lora_layers(ours)}
    assert {n.rsplit(".", 1)[0] for n in ref} == names  # the same modules got LoRA (no k/v on shared layers)
    ours.update(_unflatten({n: mx.array(p.detach().numpy()) for n, p in ref.items()}))

    ids = random_ids(vocab_of(hf), (2, 20), seed=5)
    logits = peft_model(torch.tensor(ids[:, :-1])).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.tensor(ids[:, 1:]).reshape(-1))
    loss.backward()

    x, y = mx.array(ids[:, :-1]), mx.array(ids[:, 1:])
    value, grads = nn.value_and_grad(ours, lambda m: nn.losses.cross_entropy(m(x), y).mean())(ours)
    assert abs(value.item() - loss.item()) <= 1e-4
    grads = dict(tree_flatten(grads))
    assert sorted(grads) == sorted(ref)
    for name, p in ref.items():
        g = np.array(grads[name])
        # float32 through 6-8 layers (and a MoE's routed sums): 1e-4 of the largest gradient entry
        assert np.abs(g - p.grad.numpy()).max() <= 1e-4 * np.abs(p.grad.numpy()).max(), name


def _unflatten(flat):
    from mlx.utils import tree_unflatten

    return tree_unflatten(list(flat.items()))


@pytest.mark.parametrize("kind", ["gemma4_e2b", "gemma3n"])
def test_peft_loads_our_adapter_and_fuse_matches(kind, tmp_path):
    from peft import PeftModel

    hf = make_hf_model(kind)
    path = save(hf, tmp_path / kind)
    ours = load_dir(path)
    apply_lora(ours, TARGETS, rank=RANK, alpha=ALPHA, dropout=0.0)
    mx.random.seed(3)
    for _, layer in lora_layers(ours):
        layer.lora_B = mx.random.normal(layer.lora_B.shape) * 0.05
    config = {"r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0, "target_modules": TARGETS, "peft_type": "LORA",
              "task_type": "CAUSAL_LM", "bias": "none"}
    save_adapter(ours, tmp_path / "adapter", config)
    ids = random_ids(vocab_of(hf), (1, 18))
    got = np.array(ours(mx.array(ids)))
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        expected = peft_model(torch.tensor(ids)).logits.numpy()
    assert np.abs(got - expected).max() <= 1e-4
    fuse_lora(ours)
    assert not lora_layers(ours)
    assert np.abs(np.array(ours(mx.array(ids))) - expected).max() <= 1e-4


@pytest.mark.parametrize("kind", ["gemma4_e2b", "gemma4_moe", "gemma4_multimodal", "gemma3n"])
def test_convert_to_hf_is_read_by_transformers(kind, tmp_path):
    import transformers as tf
    from mlx_gemma.export import convert_to_hf
    from mlx_gemma.tokenizer import GemmaTokenizer
    from test_export import VOCAB, tiny_tokenizer_bytes

    size = {"vocab_size": VOCAB, "vocab_size_per_layer_input": VOCAB if kind != "gemma3n" else 300}
    hf = make_hf_model(kind, **size)
    src = save(hf, tmp_path / "src")
    GemmaTokenizer.from_bytes(tiny_tokenizer_bytes()).save(src)
    out = convert_to_hf(str(src), tmp_path / "out", dtype="float32")
    back = tf.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    expected_cls = "Gemma3nForCausalLM" if kind == "gemma3n" else "Gemma4ForCausalLM"
    assert type(back).__name__ == expected_cls
    ids = random_ids(vocab_of(hf), (1, 20))
    with torch.no_grad():
        a = hf(torch.tensor(ids)).logits.numpy()
        b = back(torch.tensor(ids)).logits.numpy()
    assert np.abs(a - b).max() <= 1e-4  # (transformers picks sdpa for the reload, eager for the source)
    source = {k.replace("model.language_model.", "model."): v for k, v in hf.state_dict().items()}
    for name, tensor in back.state_dict().items():
        if name in source:  # every exported tensor is the source's, bit for bit
            assert torch.equal(tensor, source[name]), name
    assert set(back.state_dict()) <= set(source) | {"lm_head.weight"}
    # and our loader reads the export back to the same network
    assert np.abs(np.array(load_dir(out)(mx.array(ids))) - a).max() <= 1e-4


@pytest.mark.parametrize("kind", ["gemma4_moe", "gemma4_e2b", "gemma3n"])
def test_quantized_model_equals_transformers_on_its_dequantized_weights(kind, tmp_path):
    """quantize (8-bit, group 32; the 3-D expert tensors too, routing matrices kept dense), save,
    load back; then the HF export of the quantized dir (dequantized weights) in transformers gives
    our quantized model's logits."""
    import transformers as tf
    from mlx_gemma.export import convert_to_hf
    from mlx_gemma.loading import load, save_model
    from mlx_gemma.quant import quantize_model
    from mlx_gemma.tokenizer import GemmaTokenizer
    from test_export import VOCAB, tiny_tokenizer_bytes

    widths = {} if kind == "gemma4_moe" else {"hidden_size_per_layer_input": 32, "vocab_size_per_layer_input": VOCAB}
    if kind == "gemma3n":
        widths.update(laurel_rank=32, vocab_size_per_layer_input=300)
    hf = make_hf_model(kind, vocab_size=VOCAB, **widths)
    src = save(hf, tmp_path / "src")
    GemmaTokenizer.from_bytes(tiny_tokenizer_bytes()).save(src)
    model, tokenizer = load(str(src), dtype="float32")
    quantize_model(model, bits=8, group_size=32)
    layer = model.model.layers[0]
    if kind == "gemma4_moe":
        assert layer.experts.gate_up_proj.dtype == mx.uint32 and "gate_up_proj_scales" in layer.experts
        assert layer.router.proj.weight.dtype == mx.float32  # routing stays dense
    assert layer.mlp.gate_proj.weight.dtype == mx.uint32
    ids = random_ids(VOCAB, (1, 20))
    quantized = np.array(model(mx.array(ids)))
    save_model(model, tokenizer, tmp_path / "q8")
    again, _ = load(str(tmp_path / "q8"), dtype="float32")
    assert np.array_equal(np.array(again(mx.array(ids))), quantized)
    out = convert_to_hf(str(tmp_path / "q8"), tmp_path / "hf", dtype="float32")
    back = tf.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = back(torch.tensor(ids)).logits.numpy()
    assert np.abs(quantized - expected).max() <= 1e-4


@pytest.mark.parametrize("kind", ["gemma4_e2b", "gemma3n"])
def test_gradient_checkpointing_keeps_kv_sharing_gradients(kind, tmp_path):
    """Shared keys/values flow between layers outside a checkpointed call: those layers are left
    unchecked, so the gradients equal the plain ones (a checkpointed source layer lost them)."""
    from mlx_gemma.training.setup import enable_grad_checkpoint

    path = save(make_hf_model(kind), tmp_path / kind)
    ids = mx.array(random_ids(256, (2, 16)))

    def grads(checkpoint):
        model = load_dir(path)
        mx.random.seed(0)
        apply_lora(model, TARGETS, rank=RANK, alpha=ALPHA, dropout=0.0)
        for _, layer in lora_layers(model):
            layer.lora_B = mx.full(layer.lora_B.shape, 0.01)
        if checkpoint:
            enable_grad_checkpoint(model)
        loss = lambda m: nn.losses.cross_entropy(m(ids[:, :-1]), ids[:, 1:]).mean()  # noqa: E731
        return dict(tree_flatten(nn.value_and_grad(model, loss)(model)[1]))

    plain, checkpointed = grads(False), grads(True)
    assert max(float(mx.abs(plain[k] - checkpointed[k]).max()) for k in plain) <= 1e-6


def test_convert_to_gguf_refuses_a_gemma4_config_llamacpp_runs_differently_and_writes_nothing(tmp_path):
    """gemma4_tiny's E2B shape shares KV from a sliding last unshared layer, which llama.cpp maps
    differently (test_gguf_gemma4 exports the shapes it runs alike)."""
    from mlx_gemma.errors import UserError
    from mlx_gemma.export import convert_to_gguf
    from mlx_gemma.tokenizer import GemmaTokenizer
    from test_export import VOCAB, tiny_tokenizer_bytes

    src = save(make_hf_model("gemma4_e2b", vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB), tmp_path / "src")
    GemmaTokenizer.from_bytes(tiny_tokenizer_bytes()).save(src)
    with pytest.raises(UserError, match="sliding then full"):
        convert_to_gguf(str(src), tmp_path / "out.gguf", out_type="f32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_qlora_on_quantized_moe_equals_peft_on_the_dequantized_model(tmp_path):
    """QLoRA: LoRA over the 8-bit Gemma 4 MoE (experts quantized); PEFT with our adapter on
    transformers' model holding the dequantized weights gives the same logits."""
    import transformers as tf
    from peft import PeftModel
    from mlx_gemma.export import convert_to_hf
    from mlx_gemma.loading import load, save_model
    from mlx_gemma.quant import quantize_model
    from mlx_gemma.tokenizer import GemmaTokenizer
    from test_export import VOCAB, tiny_tokenizer_bytes

    src = save(make_hf_model("gemma4_moe", vocab_size=VOCAB), tmp_path / "src")
    GemmaTokenizer.from_bytes(tiny_tokenizer_bytes()).save(src)
    model, tokenizer = load(str(src), dtype="float32")
    save_model(quantize_model(model, bits=8, group_size=32), tokenizer, tmp_path / "q8")
    base = tf.AutoModelForCausalLM.from_pretrained(str(convert_to_hf(str(tmp_path / "q8"), tmp_path / "hf",
                                                                     dtype="float32")), dtype=torch.float32)
    model, _ = load(str(tmp_path / "q8"), dtype="float32")
    config = apply_lora(model, TARGETS, rank=RANK, alpha=ALPHA, dropout=0.0)
    mx.random.seed(4)
    for _, layer in lora_layers(model):
        layer.lora_B = mx.random.normal(layer.lora_B.shape) * 0.05
    save_adapter(model, tmp_path / "adapter", config)
    ids = random_ids(VOCAB, (1, 18))
    peft_model = PeftModel.from_pretrained(base.eval(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        expected = peft_model(torch.tensor(ids)).logits.numpy()
    assert np.abs(np.array(model(mx.array(ids))) - expected).max() <= 1e-4


def test_parameter_count_unpacks_quantized_experts(tmp_path):
    from mlx_gemma.lora import count_parameters
    from mlx_gemma.quant import quantize_model

    model = load_dir(save(make_hf_model("gemma4_moe"), tmp_path / "moe"))
    dense = count_parameters(model)["total"]
    quantize_model(model, bits=4, group_size=32)
    assert count_parameters(model)["total"] == dense


@pytest.mark.parametrize("sort", [False, True])
@pytest.mark.parametrize("bits", [None, 8])
def test_experts_sorted_and_routing_order_products_equal_transformers(sort, bits, tmp_path):
    """The experts multiply (token, expert) pairs either sorted by expert (many tokens: training,
    prefill) or in routing order (decode): both give transformers' Gemma4TextExperts output and its
    gradients for the input, the routing weights and (dense) the expert matrices; quantized
    experts against transformers on their dequantized matrices."""
    from mlx_gemma.quant.layers import dense_like, quantize_layer

    hf = make_hf_model("gemma4_moe")
    ref = hf.model.layers[0].experts
    ours = load_dir(save(hf, tmp_path / "moe")).model.layers[0].experts
    if bits:
        ours = quantize_layer(ours, group_size=32, bits=bits)
        dense = dense_like(ours)
        with torch.no_grad():
            for name in ("gate_up_proj", "down_proj"):
                getattr(ref, name).copy_(torch.tensor(np.array(dense[name])))
    rng = np.random.default_rng(3)
    n, k, X = 48, hf.config.top_k_experts, ref.num_experts
    x = rng.standard_normal((n, ref.hidden_dim)).astype(np.float32)
    idx = np.stack([rng.choice(X, k, replace=False) for _ in range(n)]).astype(np.int64)
    w = rng.uniform(0.2, 1.5, (n, k)).astype(np.float32)
    cot = rng.standard_normal((n, ref.hidden_dim)).astype(np.float32)

    tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    (ref(tx, torch.tensor(idx), tw) * torch.tensor(cot)).sum().backward()
    expected = ref(torch.tensor(x), torch.tensor(idx), torch.tensor(w)).detach().numpy()

    def f(x, w, mats):
        ours.update(mats)
        return ours(x, w, mx.array(idx.astype(np.uint32)), sort=sort)

    mats = {} if bits else {name: ours[name] for name in ("gate_up_proj", "down_proj")}
    out = f(mx.array(x), mx.array(w), mats)
    assert np.abs(np.array(out) - expected).max() <= 1e-5 * np.abs(expected).max()
    grads = mx.grad(lambda *a: (f(*a) * mx.array(cot)).sum(), argnums=(0, 1, 2))(mx.array(x), mx.array(w), mats)
    pairs = [(grads[0], tx.grad), (grads[1], tw.grad)]
    pairs += [(grads[2][name], getattr(ref, name).grad) for name in mats]
    for got, want in pairs:
        want = want.numpy()
        assert np.abs(np.array(got) - want).max() <= 1e-5 * np.abs(want).max()
