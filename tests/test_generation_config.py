"""generation_config.json's end-of-generation ids, held to the references: transformers' Gemma 4
converter (`models/gemma4/convert_gemma4_weights.py` writes `eos_token_id` as the ids of
`[eos_token, eot_token, str_token]` = `<eos>`, `<turn|>`, `<|tool_response>` for instruction-tuned
models), read back with transformers' `GenerationConfig` and tokenizer; and Google's Gemma 4 chat
templates (shipped verbatim by TRL), whose model turn ends with `<turn|>`, or with
`<|tool_response>` right after a tool call: generation has to stop at both.
"""

import pytest

from chat_tiny import hf_tokenizer, tiny_model_dir, trl_template

transformers = pytest.importorskip("transformers")

CALL = {"role": "assistant", "tool_calls": [
    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{format: a tiny model dir saved by `save_model`} for the Gemma 4 and Gemma 3 tokenizers."""
    from mlx_gemma.loading import load, save_model

    root = tmp_path_factory.mktemp("gencfg")
    out = {}
    for name, gemma4 in (("gemma4", True), ("gemma3", False)):
        model, tok = load(str(tiny_model_dir(root / f"{name}-src", gemma4=gemma4)), dtype="float32")
        out[name] = save_model(model, tok, root / name)
    return out


def test_gemma4_stop_ids_are_transformers_converters(saved):
    out = saved["gemma4"]
    hf_tok = hf_tokenizer(out)
    expected = hf_tok.convert_tokens_to_ids([hf_tok.eos_token, "<turn|>", "<|tool_response>"])
    assert len(set(expected)) == 3 and hf_tok.unk_token_id not in expected
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == expected


def test_gemma4_stop_ids_end_every_model_turn_of_googles_template(saved):
    """The piece that closes the model's turn in Google's template, for an answer and for a tool
    call, is an eos id of the saved generation_config."""
    out = saved["gemma4"]
    hf_tok = hf_tokenizer(out)
    eos = transformers.GenerationConfig.from_pretrained(out).eos_token_id
    template = trl_template("gemma4_v5")
    user = {"role": "user", "content": "weather in Paris?"}
    answer = hf_tok.apply_chat_template([user, {"role": "assistant", "content": "Sunny."}], chat_template=template,
                                        tokenize=True, return_dict=False)
    call = hf_tok.apply_chat_template([user, CALL], tools=TOOLS, chat_template=template, tokenize=True,
                                      return_dict=False)
    assert hf_tok.convert_ids_to_tokens(answer[-2:]) == ["<turn|>", "\n"]
    assert hf_tok.convert_ids_to_tokens(call[-1:]) == ["<|tool_response>"]
    assert answer[-2] in eos and call[-1] in eos


def test_gemma3_stop_ids_are_unchanged(saved):
    out = saved["gemma3"]
    hf_tok = hf_tokenizer(out)
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == \
        hf_tok.convert_tokens_to_ids([hf_tok.eos_token, "<end_of_turn>"])
