"""Tiny Gemma-shaped tokenizers (and a tiny random model) for chat-template and tool-calling tests.

A SentencePiece BPE vocabulary of a few hundred pieces is trained here on a small text, with the
control pieces of Gemma 1-3 (`<start_of_turn>`, `<end_of_turn>`) or of Gemma 4 (`<|turn>`,
`<turn|>`, `<|tool>`, `<|tool_call>`, `<|tool_response>`, `<|"|>`, `<|channel>`, ...). Saved with
`GemmaTokenizer.save`, it is a tokenizer.json that transformers reads on its own: the reference
tokenizer of the tests is transformers', not ours.
"""

import io
from pathlib import Path

GEMMA3_SPECIALS = ["<start_of_turn>", "<end_of_turn>"]
GEMMA4_SPECIALS = ["<|turn>", "<turn|>", "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>",
                   "<|tool_response>", "<tool_response|>", '<|"|>', "<|channel>", "<channel|>", "<|think|>",
                   "<|image|>", "<|audio|>", "<|video|>"]

_TEXT = """The weather in Paris is sunny and warm today.
What is the capital of France? It is Paris.
Call the function get_weather with the city and the unit.
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
```tool_call
{"name": "search", "arguments": {"query": "rain", "filters": {"tags": ["a", "b"], "limit": 3}}}
```
The result was 21 degrees; tell the user the answer in one sentence.
Quotes " and braces { } [ ] and colons : and commas , appear in strings.
你好，世界。天气很好。 Привет, мир! Ünïcödé café naïve 🤗 ✨
def f(x): return x * 2  # numbers 0 1 2 3 4 5 6 7 8 9 -1.5 3.14 true false null
You are a helpful assistant. Answer briefly and use tools when they help.
"""


def spm_bytes(gemma4: bool, vocab_size: int = 400) -> bytes:
    """A small SentencePiece model with Gemma's special ids (pad 0, eos 1, bos 2, unk 3)."""
    import sentencepiece as spm

    lines = [line for line in _TEXT.splitlines() if line] * 4
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab_size, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", control_symbols=GEMMA3_SPECIALS + (GEMMA4_SPECIALS if gemma4 else []),
        user_defined_symbols=["\n", "\t"], byte_fallback=True, add_dummy_prefix=False,
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        character_coverage=1.0, normalization_rule_name="identity", hard_vocab_limit=False, minloglevel=2)
    return out.getvalue()


def tokenizer_dir(path: Path, gemma4: bool, template: str = None) -> Path:
    """A dir with tokenizer.model/.json/_config.json (and chat_template.jinja when given)."""
    from mlx_gemma.tokenizer import GemmaTokenizer

    path.mkdir(parents=True, exist_ok=True)
    GemmaTokenizer.from_bytes(spm_bytes(gemma4)).save(path)
    if template is not None:
        (path / "chat_template.jinja").write_text(template, encoding="utf-8")
    return path


def hf_tokenizer(path: Path):
    """transformers' tokenizer of such a dir, from its tokenizer.json alone."""
    from transformers import PreTrainedTokenizerFast

    import json

    config = json.loads((path / "tokenizer_config.json").read_text())
    return PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), bos_token="<bos>",
                                   eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                                   chat_template=config.get("chat_template"))


def trl_template(name: str) -> str:
    """A chat template TRL ships (Google's Gemma templates among them), read from the installed package."""
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


def tiny_model_dir(path: Path, gemma4: bool, seed: int = 0, template: str = None) -> Path:
    """A tiny random Gemma 3 network (transformers-made) with a tiny tokenizer of either format.
    The network is Gemma 3's: the chat and tool formats are the tokenizer's, not the network's."""
    from mlx_gemma.tokenizer import GemmaTokenizer
    from tiny import make_hf_model, save_hf_model

    tokenizer_dir(path, gemma4, template)
    vocab = GemmaTokenizer(path).vocab_size  # every id the network can sample decodes
    save_hf_model(make_hf_model("gemma3_text", seed=seed, vocab_size=vocab, max_position_embeddings=2048), path)
    return path
