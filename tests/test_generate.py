"""Generation: cached decoding vs full forward passes, sampling filters vs hand-computed numbers and
transformers' warpers, seeds, stopping, streaming UTF-8, batching, chat cache reuse, CLI errors,
and greedy parity with transformers' `generate` on the embedded 270M model."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

from mlx_gemma.convert import hf as hf_convert
from mlx_gemma.errors import UserError
from mlx_gemma.generation import (ChatSession, batch_generate, generate, generate_step, make_sampler,
                                min_p_filter, repetition_penalty_processor, stream_generate, top_k_filter,
                                top_p_filter)
from mlx_gemma.loading import build_model, read_config

from tiny import make_hf_model, random_ids, save_hf_model

NEG = -np.inf


def load_dir(path):
    config = read_config(path)
    return build_model(config, hf_convert.load_safetensors(hf_convert.safetensors_files(path)), str(path), "float32")


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory):
    """Gemma 3 tiny: sliding window 8, two local layers per global one, MQA."""
    return load_dir(save_hf_model(make_hf_model("gemma3_text"), tmp_path_factory.mktemp("g3")))


@pytest.fixture(scope="module")
def tiny2(tmp_path_factory):
    """Gemma 2 tiny: window 8 and attention soft-capping (the non-fused attention path)."""
    return load_dir(save_hf_model(make_hf_model("gemma2"), tmp_path_factory.mktemp("g2")))


@pytest.fixture(scope="module")
def tiny3_text(tmp_path_factory):
    """Gemma 3 tiny with the real 262,144-token vocabulary, for prompts that go through the tokenizer."""
    return load_dir(save_hf_model(make_hf_model("gemma3_text", vocab_size=262144), tmp_path_factory.mktemp("g3v")))


@pytest.fixture(scope="module")
def tokenizer():
    """The real Gemma 3 tokenizer; its ids below 512 (specials, byte pieces) fit the tiny models."""
    from mlx_gemma.loading import resolve
    from mlx_gemma.tokenizer import GemmaTokenizer

    return GemmaTokenizer(resolve("gemma-3-270m"))


def forcing(script):
    """A logits processor that makes step i produce script[i] (then anything)."""
    state = {"step": 0}

    def process(history, logits):
        i = state["step"]
        state["step"] += 1
        if i >= len(script):
            return logits
        bias = mx.where(mx.arange(logits.shape[-1]) == script[i], 1e4, 0.0)
        return logits + bias

    return process


def byte_ids(tokenizer, text):
    return [tokenizer.piece_to_id(f"<0x{b:02X}>") for b in text.encode("utf-8")]


# ---- the engine ----------------------------------------------------------------------------


@pytest.mark.parametrize("compile", [True, False])
@pytest.mark.parametrize("which", ["tiny3", "tiny2"])
def test_cached_decode_matches_full_forward_every_step(which, compile, request):
    model = request.getfixturevalue(which)
    prompt = random_ids(512, (1, 13), seed=1)
    seen = []

    def record(history, logits):
        seen.append(np.array(logits[0]))
        return logits

    cache = model.make_cache()
    # prefill_step 5 < window 8 < prompt 13: chunked prefill through a wrapping ring buffer.
    tokens = [t.item() for t in generate_step(model, mx.array(prompt), cache=cache, max_tokens=40,
                                              logits_processors=[record], prefill_step=5, compile=compile)]
    assert len(tokens) == 40 == len(seen)
    sequence = [int(t) for t in prompt[0]] + tokens
    full = np.array(model(mx.array([sequence])))[0]  # (53, V): no cache at all
    for i in range(40):
        np.testing.assert_allclose(seen[i], full[12 + i], atol=1e-4, err_msg=f"step {i}")
        assert int(np.argmax(full[12 + i])) == tokens[i]
    # Sliding layers keep window = 8 keys however long the sequence; global layers keep all.
    assert {c.keys.shape[2] for c in cache if c.window} == {8}
    # prompt + 39 fed tokens (the 40th was never fed): positions 0..51 hold keys, 52 on none
    full_cache = next(c for c in cache if not c.window)
    assert mx.all(full_cache.keys[0, :, 51] != 0).item() and mx.all(full_cache.keys[0, :, 52:] == 0).item()


def test_left_padded_batch_equals_one_by_one(tiny3, tokenizer):
    prompts = [[2] + [int(t) for t in random_ids(512, (n,), seed=n)] for n in (17, 6, 11)]
    alone = [generate(tiny3, tokenizer, p, max_tokens=20) for p in prompts]
    together = batch_generate(tiny3, tokenizer, prompts, max_tokens=20, prefill_step=7)
    assert together == alone
    assert any(alone)


# ---- sampling ------------------------------------------------------------------------------


def test_top_k_top_p_min_p_by_hand():
    logits = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda x: np.isfinite(np.array(x))[0].tolist()  # noqa: E731
    assert kept(top_k_filter(logits, 2)) == [True, True, False, False]
    assert kept(top_k_filter(logits, 0)) == [True] * 4
    # Kept while the mass ranked above is < p: above = 0, .5, .8, .95.
    assert kept(top_p_filter(logits, 0.7)) == [True, True, False, False]
    assert kept(top_p_filter(logits, 0.9)) == [True, True, True, False]
    assert kept(top_p_filter(logits, 0.1)) == [True, False, False, False]
    # min_p 0.2: threshold 0.2 * 0.5 = 0.1.
    assert kept(min_p_filter(logits, 0.2)) == [True, True, True, False]
    assert kept(min_p_filter(logits, 0.7)) == [True, False, False, False]
    # Kept logits are unchanged.
    np.testing.assert_allclose(np.array(top_p_filter(logits, 0.7))[0, :2], np.log([0.5, 0.3]), rtol=1e-6)


def test_repetition_penalty_by_hand():
    logits = mx.array([[2.0, -1.0, 3.0, 0.5]])
    history = mx.array([[0, 1, 1]])
    out = np.array(repetition_penalty_processor(2.0, window=64)(history, logits))
    np.testing.assert_allclose(out, [[1.0, -2.0, 3.0, 0.5]])
    out = np.array(repetition_penalty_processor(2.0, window=1)(history, logits))  # only the last token
    np.testing.assert_allclose(out, [[2.0, -2.0, 3.0, 0.5]])


def test_filters_match_transformers_warpers():
    from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 1000)).astype(np.float32) * 3
    ids = torch.tensor(rng.integers(0, 1000, size=(3, 20)))
    t = torch.tensor(logits)
    cases = [
        (top_k_filter(mx.array(logits), 50), TopKLogitsWarper(50)(ids, t.clone())),
        (top_p_filter(mx.array(logits), 0.9), TopPLogitsWarper(0.9)(ids, t.clone())),
        (min_p_filter(mx.array(logits), 0.05), MinPLogitsWarper(0.05)(ids, t.clone())),
        (repetition_penalty_processor(1.3, window=20)(mx.array(ids.numpy()), mx.array(logits)),
         RepetitionPenaltyLogitsProcessor(1.3)(ids, t.clone())),
    ]
    for ours, ref in cases:
        ours, ref = np.array(ours), ref.numpy()
        assert (np.isfinite(ours) == np.isfinite(ref)).all()
        np.testing.assert_allclose(ours[np.isfinite(ours)], ref[np.isfinite(ref)], rtol=1e-6)


def test_sampled_frequencies_follow_the_filtered_distribution():
    probs = np.array([0.4, 0.3, 0.2, 0.1])
    logits = mx.broadcast_to(mx.log(mx.array(probs, mx.float32)), (20000, 4))
    counts = np.bincount(np.array(make_sampler(temp=1.0, top_k=3, seed=0)(logits)), minlength=4) / 20000
    np.testing.assert_allclose(counts, [4 / 9, 3 / 9, 2 / 9, 0], atol=0.015)
    # temp 0.5 squares the probabilities: 16:9:4:1.
    counts = np.bincount(np.array(make_sampler(temp=0.5, seed=1)(logits)), minlength=4) / 20000
    np.testing.assert_allclose(counts, np.array([16, 9, 4, 1]) / 30, atol=0.015)


def test_same_seed_same_sample(tiny3, tokenizer):
    prompt = [2, 300, 301, 302]
    run = lambda seed: generate(tiny3, tokenizer, prompt, max_tokens=24, temp=1.5, top_p=0.95, seed=seed)  # noqa
    assert run(7) == run(7)
    assert run(7) != run(8)


@pytest.mark.parametrize("bad,message", [
    (dict(temp=-1), "temp must be >= 0"), (dict(top_p=0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), "top_p must be in"), (dict(top_k=-1), "top_k must be >= 0"),
])
def test_bad_sampling_options(tiny3, tokenizer, bad, message):
    with pytest.raises(UserError, match=message):
        generate(tiny3, tokenizer, [2, 300], **bad)


def test_empty_and_too_long_prompts(tiny3, tokenizer):
    with pytest.raises(UserError, match="prompt is empty"):
        generate(tiny3, tokenizer, "  ")
    with pytest.raises(UserError, match="context is 256 tokens"):  # tiny max_position_embeddings
        generate(tiny3, tokenizer, [2] + [300] * 300)
    with pytest.raises(UserError, match="token id 23391 is outside the model's vocabulary"):
        generate(tiny3, tokenizer, [2, 23391])  # vocab 512: a tokenizer that does not fit the model


# ---- stopping and streaming ----------------------------------------------------------------


def test_stops_at_end_of_turn(tiny3, tokenizer):
    text_ids = byte_ids(tokenizer, "ok!")
    chunks = list(stream_generate(tiny3, tokenizer, [2, 300], max_tokens=50,
                                  logits_processors=[forcing(text_ids + [tokenizer.end_of_turn_id])]))
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].tokens == text_ids + [tokenizer.end_of_turn_id]
    assert "".join(c.text for c in chunks) == "ok!"
    # max_tokens ends it otherwise
    chunks = list(stream_generate(tiny3, tokenizer, [2, 300], max_tokens=2, logits_processors=[forcing(text_ids)]))
    assert chunks[-1].finish_reason == "length" and "".join(c.text for c in chunks) == "ok"


def test_streamed_chunks_are_whole_utf8_and_join_to_the_text(tiny3, tokenizer):
    # Every character sent as single bytes: 你 is E4 BD A0, so two of every three tokens end mid-character.
    text = "Hi 你好，世界! ok"
    script = byte_ids(tokenizer, text)
    chunks = list(stream_generate(tiny3, tokenizer, [2, 300], max_tokens=len(script),
                                  logits_processors=[forcing(script)]))
    assert [t for t in chunks[-1].tokens] == script
    assert "".join(c.text for c in chunks) == text
    for c in chunks:
        assert "\ufffd" not in c.text
        c.text.encode("utf-8")  # strict: no lone surrogates
    assert "" in [c.text for c in chunks[:-1]]  # bytes were held back while a character was incomplete
    assert generate(tiny3, tokenizer, [2, 300], max_tokens=len(script), logits_processors=[forcing(script)]) == text


def test_stop_string_is_never_streamed(tiny3, tokenizer):
    script = byte_ids(tokenizer, "one two STOP three")
    chunks = list(stream_generate(tiny3, tokenizer, [2, 300], max_tokens=40, stop=["STOP"],
                                  logits_processors=[forcing(script)]))
    assert "".join(c.text for c in chunks) == "one two "
    assert all("S" not in c.text for c in chunks)
    assert chunks[-1].finish_reason == "stop"
    out = batch_generate(tiny3, tokenizer, [[2, 300]], max_tokens=40, stop=["STOP"])
    assert "STOP" not in out[0]


# ---- chat ----------------------------------------------------------------------------------


def test_chat_reuses_the_cache_and_matches_a_fresh_run(tiny3_text, tokenizer):
    tiny3 = tiny3_text
    session = ChatSession(tiny3, tokenizer, max_tokens=6)
    first = "".join(c.text for c in session.send("hello"))
    assert session.last_stats.prompt_tokens == len(tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=True))
    cached = session.cached
    before = list(session.ids)
    answer = list(session.send("and again"))
    new = session.last_stats.prompt_tokens
    assert new == len(before) + (0 if before[-1] == tokenizer.end_of_turn_id else 1) + \
        len(tokenizer.encode("\n<start_of_turn>user\nand again<end_of_turn>\n<start_of_turn>model\n",
                             add_bos=False)) - cached
    assert new < cached  # only the new turn was processed
    # Same answer as a fresh, uncached run over the whole conversation.
    prompt = session.ids[: len(session.ids) - len(answer[-1].tokens)]
    fresh = [t.item() for t in generate_step(tiny3, mx.array([prompt]), max_tokens=len(answer[-1].tokens))]
    assert fresh == answer[-1].tokens
    session.reset()
    assert session.cached == 0
    assert "".join(c.text for c in session.send("hello")) == first


# ---- the CLI -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tiny3_text, tokenizer, tmp_path_factory):
    """A tiny Gemma 3 model dir with the real tokenizer (context 256), for fast CLI runs."""
    from mlx_gemma.loading import save_model

    return save_model(tiny3_text, tokenizer, tmp_path_factory.mktemp("cli") / "model")


def run_cli(*args, stdin=None):
    from click.testing import CliRunner

    from mlx_gemma.cli import main

    return CliRunner().invoke(main, list(args), input=stdin)


@pytest.mark.parametrize("args,message", [
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", "hi", "--temp", "-0.5"], "temp must be >= 0"),
    (["--prompt", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["--prompt", "hi", "--top-p", "1.2"], "top_p must be in (0, 1]"),
    (["--prompt", "hi", "--top-k", "-3"], "top_k must be >= 0"),
    (["--prompt", "word " * 400, "--raw"], "but the model's context is 256 tokens"),
])
def test_cli_bad_input_is_one_line_exit_1(tiny_dir, args, message):
    result = run_cli("generate", "--model", str(tiny_dir), *args)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"error: {result.output.strip()[7:]}"]
    assert message in result.output


def test_cli_adapter_for_another_model(tiny_dir, tmp_path):
    from mlx_gemma.lora import apply_lora, save_adapter

    other = load_dir(save_hf_model(make_hf_model("gemma3_text", hidden_size=48, vocab_size=262144),
                                   tmp_path / "other"))
    save_adapter(other, tmp_path / "adapter", apply_lora(other, rank=4))
    result = run_cli("generate", "--model", str(tiny_dir), "--prompt", "hi", "--adapter", str(tmp_path / "adapter"))
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert result.output.startswith("error: ") and "adapter" in result.output


def test_cli_generate_streams_text_and_stats(tiny_dir, tokenizer):
    result = run_cli("generate", "--model", str(tiny_dir), "--prompt", "-", "--raw", "--max-tokens", "5",
                     stdin="hello there")
    assert result.exit_code == 0, result.output
    expected = generate(load_dir(tiny_dir), tokenizer, "hello there", max_tokens=5)
    assert result.stdout == expected + "\n"
    assert "prompt: 3 tokens" in result.stderr and "peak memory" in result.stderr


# ---- the real model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real():
    from mlx_gemma.loading import load

    return load("gemma-3-270m", dtype="float32")


@pytest.mark.slow  # the 270M model's weights: minutes on a 2-core CPU
def test_greedy_matches_transformers_generate_64_tokens(real):
    from transformers import AutoModelForCausalLM

    from mlx_gemma.loading import resolve

    model, tok = real
    ids = tok.encode("The history of the printing press begins")
    got = [t.item() for t in generate_step(model, mx.array([ids]), max_tokens=64)]
    hf = AutoModelForCausalLM.from_pretrained(str(resolve("gemma-3-270m")), dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert got == out[0, len(ids):].tolist()


@pytest.mark.slow  # the 270M model's weights: minutes on a 2-core CPU
def test_chat_repl_piped_stdin_reuses_the_cache(real):
    _, tok = real
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    stdin = "Hi there!\nWhat is the capital of France?\n/reset\nHi there!\n/exit\nnever read\n"
    proc = subprocess.run([sys.executable, "-m", "mlx_gemma.cli", "chat", "--max-tokens", "4"], input=stdin,
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    stats = [line for line in proc.stderr.splitlines() if line.startswith("prompt:")]
    assert len(stats) == 3 and "(conversation reset)" in proc.stderr
    n = [int(line.split()[1]) for line in stats]
    first = len(tok.apply_chat_template([{"role": "user", "content": "Hi there!"}], add_generation_prompt=True,
                                        tokenize=True))
    suffix = len(tok.encode("\n<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n"
                            "<start_of_turn>model\n", add_bos=False))
    assert n[0] == first and n[2] == first  # after /reset the whole template again
    # Turn 2 feeds only the new turn (plus the unfed last answer token and <end_of_turn> at max-tokens).
    assert n[1] in (suffix, suffix + 2)
    assert proc.stdout.strip()


# ---- speculative decoding (n-gram drafts) ---------------------------------------------------


def test_ngram_draft_copies_what_followed_the_latest_match():
    from mlx_gemma.generation import ngram_draft

    assert ngram_draft([5, 6, 7, 8, 9, 5, 6, 7], 3) == [8, 9, 5]  # the 3-gram 5 6 7 matched
    assert ngram_draft([1, 2, 3, 1, 2, 4, 1, 2], 2) == [4, 1]  # the latest of two matches
    assert ngram_draft([1, 2, 3, 4, 9, 4], 5) == [9, 4]  # 1-gram fallback, cut at the end
    assert ngram_draft([1, 2, 3], 4) == [] and ngram_draft([1, 2, 1], 0) == []


@pytest.mark.parametrize("which", ["tiny3", "tiny2"])
def test_speculative_greedy_equals_plain_greedy(which, tokenizer, request):
    """Window-8 rings wrap many times over 80 tokens: rejected drafts must not corrupt them."""
    from mlx_gemma.generation import stream_generate

    model = request.getfixturevalue(which)
    prompts = [[2] + [10, 11, 12, 13] * 6, [2] + random_ids(512, 20, seed=4).tolist(), [2, 300, 301, 300, 301, 302]]
    drafted = accepted = 0
    for ids in prompts:
        plain = [c.token for c in stream_generate(model, tokenizer, ids, max_tokens=80, temp=0.0)]
        chunks = list(stream_generate(model, tokenizer, ids, max_tokens=80, temp=0.0, speculative="ngram"))
        assert [c.token for c in chunks] == plain
        drafted, accepted = drafted + chunks[-1].stats.drafted, accepted + chunks[-1].stats.accepted
    assert 0 < accepted < drafted  # drafts were both taken and rejected


def test_speculative_option_checked(tiny3, tokenizer):
    from mlx_gemma.generation import stream_generate

    with pytest.raises(UserError, match="unknown speculative 'medusa'"):
        list(stream_generate(tiny3, tokenizer, [2, 5], max_tokens=2, speculative="medusa"))


def perturbed_copy(model, scale: float, seed: int):
    """The model with every weight moved by `scale` of Gaussian noise: a drafter that mostly agrees."""
    from mlx.utils import tree_map

    other = type(model)(copy.deepcopy(model.config))
    key = iter(mx.random.split(mx.random.key(seed), 4096))
    other.update(tree_map(lambda w: w + scale * mx.random.normal(w.shape, key=next(key)), model.parameters()))
    mx.eval(other.parameters())
    return other


@pytest.mark.parametrize("which", ["tiny3", "tiny2"])
def test_draft_model_greedy_equals_plain_greedy(which, tokenizer, request):
    """A drafter that mostly agrees (the model with noise), a 4-bit copy (the native kernel's path)
    and the model itself: the tokens are always plain greedy's, also where windows of 8 wrap many
    times and drafts are rejected (both models' rings must get their keys back); the model as its
    own drafter has every draft accepted."""
    from mlx_gemma.generation import stream_generate
    from mlx_gemma.quant import quantize_model

    model = request.getfixturevalue(which)
    quantized = perturbed_copy(model, 0.0, 0)
    quantize_model(quantized, bits=4, group_size=32)
    prompts = [[2] + random_ids(512, 20, seed=5).tolist(), [2, 300, 301, 300, 301, 302]]
    for drafter in (perturbed_copy(model, 0.01, 1), quantized, model):
        drafted = accepted = 0
        for ids in prompts:
            plain = [c.token for c in stream_generate(model, tokenizer, ids, max_tokens=60, temp=0.0)]
            chunks = list(stream_generate(model, tokenizer, ids, max_tokens=60, temp=0.0, draft_model=drafter))
            assert [c.token for c in chunks] == plain
            drafted, accepted = drafted + chunks[-1].stats.drafted, accepted + chunks[-1].stats.accepted
        if drafter is model:
            assert accepted == drafted > 0
        else:
            assert 0 < accepted < drafted


def test_draft_model_checks(tiny3, tiny2, tokenizer, tiny_dir, tmp_path):
    """A drafter with another vocabulary, or two draft sources, are refused in one line; the CLI
    words the second as its flags."""
    from mlx_gemma.generation import stream_generate

    other = load_dir(save_hf_model(make_hf_model("gemma3_text", vocab_size=640), tmp_path / "v640"))
    with pytest.raises(UserError, match="vocabulary has 640 tokens and the model's 512"):
        list(stream_generate(tiny3, tokenizer, [2, 5], max_tokens=2, draft_model=other))
    with pytest.raises(UserError, match="speculative='ngram' and a draft model"):
        list(stream_generate(tiny3, tokenizer, [2, 5], max_tokens=2, speculative="ngram", draft_model=tiny2))
    result = run_cli("generate", "--model", str(tiny_dir), "--prompt", "hi", "--draft", "ngram",
                     "--draft-model", str(tiny_dir))
    assert result.exit_code == 1
    assert result.output.strip() == "error: --draft ngram and --draft-model both propose drafts; use one"


def test_cli_draft_model_gives_plain_greedy_text(tiny_dir, tokenizer):
    plain = run_cli("generate", "--model", str(tiny_dir), "--prompt", "hello there", "--raw", "--max-tokens", "12")
    drafted = run_cli("generate", "--model", str(tiny_dir), "--prompt", "hello there", "--raw", "--max-tokens", "12",
                      "--draft-model", str(tiny_dir))
    assert plain.exit_code == drafted.exit_code == 0, drafted.output
    assert drafted.stdout == plain.stdout
    assert "drafts: " in drafted.stderr and "drafts: " not in plain.stderr


@pytest.mark.slow  # the 270M model's weights
def test_speculative_chinese_qa_equals_plain_greedy(real):
    """The 270M on bundled Chinese Q&A questions (system prompt included): same answer, drafts used."""
    from mlx_gemma.generation import stream_generate

    model, tok = real
    lines = (Path(__file__).resolve().parent.parent / "data" / "zh_baike" / "test.jsonl").read_text("utf-8").splitlines()
    drafted = 0
    for line in lines[:2]:
        messages = [m for m in json.loads(line)["messages"] if m["role"] != "assistant"]
        plain = [c.token for c in stream_generate(model, tok, messages, max_tokens=40, temp=0.0)]
        chunks = list(stream_generate(model, tok, messages, max_tokens=40, temp=0.0, speculative="ngram"))
        assert [c.token for c in chunks] == plain
        drafted += chunks[-1].stats.drafted
    assert drafted > 0


# ---- the CPU one-row LM head ---------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny3", "tiny2"])
def test_one_row_head_equals_the_model_head(which, request):
    """OneRowHead (cblas_sgemv in MLX's own OpenBLAS) gives model.logits' numbers, soft-cap
    included (tiny2 is Gemma 2: final soft-cap 30), for a tied head and an untied lm_head; a
    quantized head is left to MLX. Greedy decoding is the same with the host head on and off."""
    from mlx_gemma import backend
    from mlx_gemma.generation import OneRowHead
    from mlx_gemma.cpu import BLAS_STATUS

    if not BLAS_STATUS.get("library"):
        pytest.skip("no OpenBLAS loaded by mlx_gemma.cpu.runtime (macOS, or MLX_GEMMA_NO_OPENBLAS)")
    assert backend.policy().host_gemv == (backend.policy().device == "cpu")
    model = request.getfixturevalue(which)
    hidden = mx.array(np.random.default_rng(3).standard_normal((1, model.config.hidden_size)).astype(np.float32))
    head = OneRowHead.of(model)
    np.testing.assert_allclose(np.array(head(hidden)), np.array(model.logits(hidden)), atol=1e-5, rtol=1e-5)
    if model.config.final_logit_softcapping:
        assert np.abs(np.array(head(hidden * 100))).max() <= model.config.final_logit_softcapping

    untied = type(model)(model.config)
    untied.update(model.parameters())
    untied.lm_head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    mx.eval(untied.parameters())
    np.testing.assert_allclose(np.array(OneRowHead.of(untied)(hidden)), np.array(untied.logits(hidden)),
                               atol=1e-5, rtol=1e-5)
    quantized = type(model)(model.config)
    quantized.update(model.parameters())
    nn.quantize(quantized, group_size=32, bits=8, class_predicate=lambda p, m: isinstance(m, nn.Embedding))
    assert OneRowHead.of(quantized) is None

    prompt = mx.array(random_ids(512, (1, 9), seed=4))
    on = [t.item() for t in generate_step(model, prompt, max_tokens=24)]
    with backend.override(host_gemv=False):
        off = [t.item() for t in generate_step(model, prompt, max_tokens=24)]
    assert on == off
