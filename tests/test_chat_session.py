"""ChatSession renders a conversation with the model dir's own chat template, as `generate` and
the server do (chat_template.py), not with our fallback, while it keeps its KV cache across turns.

The model is a tiny random Gemma 4 (E2B-like) built by transformers, with a tiny Gemma 4 tokenizer
and a template of the dir's own that differs from our fallback the way Google's newer Gemma 4
templates do: a default system turn, and a generation prompt that opens an empty thought channel.
References: transformers' `apply_chat_template` on the same tokenizer.json and template (the ids
fed), and transformers' Gemma 4 forward (each answer token is its greedy choice).
"""

import numpy as np
import pytest

from chat_tiny import hf_tokenizer, tokenizer_dir
from gemma4_tiny import make_hf_model, save

torch = pytest.importorskip("torch")

TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] != 'system' -%}{{ '<|turn>system\\nAnswer in one sentence.<turn|>\\n' }}{%- endif -%}"
    "{%- for m in messages -%}"
    "{{ '<|turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' + m['content'] | trim + '<turn|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|turn>model\\n<|channel>thought\\n<channel|>' }}{%- endif -%}"
)


@pytest.fixture(scope="module")
def gemma4_dir(tmp_path_factory):
    """(model dir, transformers' model): a tiny Gemma 4 network, its tokenizer and TEMPLATE."""
    from mlx_gemma.tokenizer import GemmaTokenizer

    path = tmp_path_factory.mktemp("g4chat")
    tokenizer_dir(path, gemma4=True, template=TEMPLATE)
    vocab = GemmaTokenizer(path).vocab_size  # every id the network can sample decodes
    hf = make_hf_model("gemma4_e2b", seed=3, vocab_size=vocab, vocab_size_per_layer_input=vocab)
    save(hf, path)
    return path, hf


def render(hf_tok, messages, gen: bool, tokenize: bool):
    return hf_tok.apply_chat_template(messages, chat_template=TEMPLATE, add_generation_prompt=gen,
                                      tokenize=tokenize, return_dict=False)


def assert_greedy(hf, ids: list, prompt_len: int):
    """Every token after the prompt is transformers' argmax after the tokens before it."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float().numpy()
    assert list(np.argmax(logits[prompt_len - 1:len(ids) - 1], axis=-1)) == ids[prompt_len:]


def test_chat_session_renders_the_dirs_own_template(gemma4_dir):
    from mlx_gemma.generation import ChatSession
    from mlx_gemma.loading import load

    path, hf = gemma4_dir
    model, tok = load(str(path), dtype="float32")
    hf_tok = hf_tokenizer(path)
    assert tok.chat_template == TEMPLATE
    user1 = {"role": "user", "content": "What is the weather in Paris?"}
    prompt1 = render(hf_tok, [user1], True, True)
    fallback = tok.encode("".join(p for p, _ in tok.chat_segments([user1], add_generation_prompt=True)), add_bos=False)
    assert prompt1 != fallback  # the template is not ours: using ours would feed other ids

    session = ChatSession(model, tok, max_tokens=5)
    answer1 = list(session.send(user1["content"]))[-1].tokens
    assert session.last_stats.prompt_tokens == len(prompt1)
    assert session.ids == prompt1 + answer1
    assert_greedy(hf, session.ids, len(prompt1))

    # Turn 2: the cache keeps turn 1 (answer ids as generated); the template renders what follows.
    before, cached = list(session.ids), session.cached
    user2 = {"role": "user", "content": "And tomorrow?"}
    history = session.messages[:2]  # user1 and the answer as text
    assert history[0] == user1 and history[1]["role"] == "assistant"
    full = render(hf_tok, history + [user2], True, False)
    through = render(hf_tok, history, False, False).rstrip()
    assert full.startswith(through) and through.endswith("<turn|>")
    end = hf_tok.convert_tokens_to_ids("<turn|>")
    close = [] if before[-1] == end else [end]
    prompt2 = before + close + hf_tok.encode(full[len(through):], add_special_tokens=False)
    answer2 = list(session.send(user2["content"]))[-1].tokens
    assert session.ids == prompt2 + answer2
    assert session.last_stats.prompt_tokens == len(prompt2) - cached < len(prompt2)  # only the new turn was fed
    assert_greedy(hf, session.ids, len(prompt2))
