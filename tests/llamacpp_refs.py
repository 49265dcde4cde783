"""llama.cpp's own q8_0 quantization as a reference for the q8_0 GGUF files `convert-to-gguf` writes
(shared by test_llamacpp.py and test_gguf_gemma4.py; needs llama-cpp-python)."""

import numpy as np


def llamacpp_q8_0(llama_cpp, f32_path, out_path):
    """Quantize the f32 GGUF file `f32_path` to q8_0 with llama.cpp itself; returns out_path."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(f32_path).encode(), str(out_path).encode(), params) == 0
    return out_path


def assert_same_q8_0_files(ours, theirs) -> tuple:
    """Same tensor names and types, non-Q8_0 tensors byte-identical, Q8_0 scales identical and codes
    within one (x / scale on a rounding tie). Returns (Q8_0 blocks, blocks with a differing code)."""
    import gguf

    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    assert a.keys() == b.keys()
    blocks = differing = 0
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, name
        x, y = np.asarray(a[name].data), np.asarray(b[name].data)
        if a[name].tensor_type != gguf.GGMLQuantizationType.Q8_0:
            assert np.array_equal(x, y), name
            continue
        # Q8_0 block: a float16 scale then 32 int8 codes (34 bytes)
        xb, yb = x.reshape(-1, 34), y.reshape(-1, 34)
        assert np.array_equal(xb[:, :2], yb[:, :2]), name
        codes = np.abs(xb[:, 2:].view(np.int8).astype(np.int16) - yb[:, 2:].view(np.int8).astype(np.int16))
        assert codes.max() <= 1, name
        blocks, differing = blocks + len(xb), differing + int((codes > 0).any(axis=1).sum())
    return blocks, differing


def assert_tokenizes_like_us(llm, tok, texts, markers) -> None:
    """llama.cpp's tokenizer (from the GGUF metadata) gives our ids on each text (with <bos>, special
    tokens parsed) and decodes them back to the text; each marker is one token, our id."""
    for text in texts:
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        assert theirs == tok.encode(text), text
        assert llm.detokenize(theirs[1:], special=True).decode("utf-8") == text
    for marker in markers:
        assert llm.tokenize(marker.encode(), add_bos=False, special=True) == [tok.piece_to_id(marker)]
