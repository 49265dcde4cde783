"""How batch generation ends each row, on a tiny model whose weights FORCE what it emits.

The model is a tiny Gemma 3 with the real 262,144-token tokenizer, every attention and MLP output
projection zeroed (so each layer adds nothing to the residual stream: the final hidden state is
the normalised embedding of the current token) and an untied LM head built so that the argmax
after token a is succ(a) for a chosen successor table. So the greedy continuation of a prompt
ending in a is a, succ(a), succ(succ(a)), ...: known in advance, step by step, whatever else is
in the batch. That reaches code a random model never does: `<end_of_turn>` and `<eos>` stops,
stop strings, the context-length stop, and what `batch_generate(..., details=True)` reports.
The successor table is checked against full forward passes first, so the test cannot pass
because the model does something else.
"""

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_gemma.generation import batch_generate, stream_generate
from mlx_gemma.loading import build_model, read_config, resolve
from mlx_gemma.convert import hf as hf_convert
from mlx_gemma.tokenizer import GemmaTokenizer

from tiny import make_hf_model, save_hf_model

CONTEXT = 48  # max_position_embeddings of the scripted model: the context-length stop is reachable


@pytest.fixture(scope="module")
def tok():
    return GemmaTokenizer(resolve("gemma-3-270m"))


def words(tok, text):
    """Token ids of `text` (no <bos>), each used once in the scripts below."""
    return tok.encode(text, add_bos=False)


@pytest.fixture(scope="module")
def chains(tok):
    """Named scripts: each is the prompt's last token followed by the tokens the model must emit."""
    eot, eos = tok.end_of_turn_id, tok.eos_id
    return {
        "eot": words(tok, " Alpha") + words(tok, " bravo charlie") + [eot],
        "eos": words(tok, " Delta") + words(tok, " echo foxtrot golf") + [eos],
        "string": words(tok, " Hotel") + words(tok, " india STOP juliet kilo"),
        "loop": words(tok, " Lima") + words(tok, " mike november") ,  # november -> mike: never stops
    }


def successors(chains):
    succ = {}
    for name, ids in chains.items():
        assert len(set(ids)) == len(ids), f"{name}: a token repeats, the script would be ambiguous"
        for a, b in zip(ids, ids[1:]):
            assert succ.setdefault(a, b) == b, f"token {a} has two successors"
    loop = chains["loop"]
    succ[loop[-1]] = loop[1]  # november -> mike -> november -> ...
    tail = chains["string"]
    succ[tail[-1]] = tail[1]  # kilo -> india: the row must already have stopped at STOP
    return succ


@pytest.fixture(scope="module")
def scripted(chains, tmp_path_factory):
    """The tiny model whose greedy next token after a is successors[a]."""
    succ = successors(chains)
    hf = make_hf_model("gemma3_text", vocab_size=262144, tie_word_embeddings=False,
                       max_position_embeddings=CONTEXT)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        hf.model.norm.weight.zero_()  # final norm scale 1 + 0
        emb, head = hf.model.embed_tokens.weight, hf.lm_head.weight
        head.copy_(torch.randn(head.shape, generator=gen) * 0.01)
        for a, b in succ.items():
            e = torch.randn(emb.shape[1], generator=gen)
            emb[a] = e
            head[b] += 8.0 * e / e.norm()  # logit of b after a: 8·|n(e)|·cos = 8·8 = 64 vs ~0.1
    path = save_hf_model(hf, tmp_path_factory.mktemp("scripted"))
    model = build_model(read_config(path), hf_convert.load_safetensors(hf_convert.safetensors_files(path)),
                        str(path), "float32")
    # The script holds in full forward passes (no cache), at every position of a long sequence.
    for name, ids in chains.items():
        seq = [2] + ids
        logits = np.array(model(mx.array([seq])))[0]
        for i in range(1, len(seq) - 1):
            assert int(np.argmax(logits[i])) == seq[i + 1], f"{name}: step {i}"
    return model


def test_each_row_stops_its_own_way_in_one_batch(scripted, tok, chains):
    prompts = [[2, ids[0]] for ids in chains.values()]
    outs = batch_generate(scripted, tok, prompts, max_tokens=20, stop=["STOP"], details=True)
    eot, eos, string, loop = outs
    # <end_of_turn>: the stop token is reported, kept out of tokens and text.
    assert (eot.finish_reason, eot.stop_token) == ("stop", tok.end_of_turn_id)
    assert eot.tokens == chains["eot"][1:-1] and eot.text == " bravo charlie"
    # <eos>: the same, with its own id.
    assert (eos.finish_reason, eos.stop_token) == ("stop", tok.eos_id)
    assert eos.tokens == chains["eos"][1:-1] and eos.text == " echo foxtrot golf"
    # A stop string: the text is cut before it; no stop token; the tokens up to the one completing it.
    assert (string.finish_reason, string.stop_token) == ("stop", None)
    assert string.text == " india "
    stop_at = chains["string"].index(words(tok, " STOP")[-1])
    assert string.tokens == chains["string"][1:stop_at + 1]
    # max_tokens: the looping row runs to exactly 20 tokens.
    assert (loop.finish_reason, loop.stop_token, len(loop.tokens)) == ("length", None, 20)
    assert loop.tokens[:4] == chains["loop"][1:] * 2
    # Without details: the texts alone, the same.
    assert batch_generate(scripted, tok, prompts, max_tokens=20, stop=["STOP"]) == [o.text for o in outs]


def test_rows_stop_the_same_alone_and_in_a_batch(scripted, tok, chains):
    prompts = [[2, 300, 301, ids[0]] if i % 2 else [2, ids[0]] for i, ids in enumerate(chains.values())]
    together = batch_generate(scripted, tok, prompts, max_tokens=12, stop=["STOP"], details=True)
    alone = [batch_generate(scripted, tok, [p], max_tokens=12, stop=["STOP"], details=True)[0] for p in prompts]
    assert together == alone


def test_context_length_ends_a_row(scripted, tok, chains):
    """A row that never stops ends at the model's context: prompt + new tokens == CONTEXT."""
    prompt = [2] + [300] * 10 + [chains["loop"][0]]
    out = batch_generate(scripted, tok, [prompt, [2, chains["eot"][0]]], max_tokens=1000, details=True)
    assert out[0].finish_reason == "length"
    assert len(prompt) + len(out[0].tokens) == CONTEXT
    assert out[1].finish_reason == "stop" and out[1].stop_token == tok.end_of_turn_id
    # The streaming path reports the same end.
    chunks = list(stream_generate(scripted, tok, prompt, max_tokens=1000))
    assert chunks[-1].finish_reason == "length" and len(chunks[-1].tokens) == CONTEXT - len(prompt)


def test_chat_prompt_answer_stops_at_end_of_turn(scripted, tok, chains):
    """Through the chat template: the template ends in '\\n'; the model's answer after a scripted
    first token stops at <end_of_turn> with the answer text only."""
    eot = chains["eot"]
    msgs = [{"role": "user", "content": "hi"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True) + [eot[0]]
    out = batch_generate(scripted, tok, [ids], max_tokens=20, details=True)[0]
    assert out.text == " bravo charlie" and out.stop_token == tok.end_of_turn_id


# ---- the same through the command line: --stop, --system and sampling on a successful run ----


@pytest.fixture(scope="module")
def scripted_dir(scripted, tok, tmp_path_factory):
    from mlx_gemma.loading import save_model

    return save_model(scripted, tok, tmp_path_factory.mktemp("scripted_cli") / "model")


def cli(*args):
    from click.testing import CliRunner

    from mlx_gemma.cli import main

    return CliRunner().invoke(main, list(args))


def test_cli_stop_string_and_sampling(scripted_dir, tok, chains):
    assert tok.decode(chains["string"][:1]) == " Hotel"  # --raw " Hotel" is <bos> + that one token
    result = cli("generate", "--model", str(scripted_dir), "--raw", "--prompt", " Hotel", "--stop", "STOP",
                 "--temp", "0.7", "--top-p", "0.9", "--min-p", "0.05", "--repetition-penalty", "1.1", "--seed", "0")
    assert result.exit_code == 0, result.output
    # stdout: the text cut before the stop string, then the stats line (stderr, mixed in by CliRunner).
    assert result.output.startswith(" india \n")
    assert "STOP" not in result.output and "juliet" not in result.output
    # The row ends with the token that completes "STOP": india, STOP.
    n = chains["string"].index(words(tok, " STOP")[-1])
    assert "prompt: 2 tokens" in result.output and f"generation: {n} tokens" in result.output


def test_cli_system_prompt_goes_into_the_template(scripted_dir, tok, chains):
    """--system is folded into the first user turn: the prompt token count says it was sent."""
    system, user = "Answer briefly.", "hi"
    result = cli("generate", "--model", str(scripted_dir), "--system", system, "--prompt", user,
                 "--max-tokens", "3")
    assert result.exit_code == 0, result.output
    expected = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": user}],
                                       add_generation_prompt=True, tokenize=True)
    without = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, tokenize=True)
    assert len(expected) > len(without)
    assert f"prompt: {len(expected)} tokens" in result.output and "generation: 3 tokens" in result.output


def test_on_step_sees_every_token_once(scripted, tok, chains):
    """batch_generate's progress hook: one call per engine step with that step's events; the
    events add up to every row's tokens (stop token included) and each row finishes exactly once."""
    prompts = [[2, ids[0]] for ids in chains.values()]
    seen = []
    outs = batch_generate(scripted, tok, prompts, max_tokens=20, stop=["STOP"], details=True, on_step=seen.append)
    events = [e for step in seen for e in step]
    assert all(len(step) <= len(prompts) for step in seen)
    assert len(seen) == max(len(o.tokens) + (o.stop_token is not None) for o in outs)
    assert len(events) == sum(len(o.tokens) + (o.stop_token is not None) for o in outs)
    assert sorted(e.rid for e in events if e.finish_reason) == sorted({e.rid for e in events})
