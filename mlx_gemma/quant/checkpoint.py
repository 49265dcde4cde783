"""`mlx-gemma quantize` as a function: load a checkpoint, quantize it, save it, compare both.

This is a command, above the library: it imports `loading` (which itself imports the
quantization library to rebuild quantized checkpoints) and `evaluate`. Nothing in the library
imports it, `mlx_gemma.quant` included.
"""

from __future__ import annotations

from pathlib import Path

from ..data import DATA_DIR
from ..errors import UserError
from ..files import check_new_output_dir
from ..evaluate import perplexity, read_eval_text
from ..loading import load, resolve, save_model
from .calibration import DEFAULT_TOKENS, calibration_windows, check_calibration_tokens, resolve_sources
from .gptq import check_calibration
from .layers import quantized_layers
from .quantize import check_quantizable, check_settings, parameter_bytes, quantization_plan, quantize_model


def disk_bytes(path) -> int:
    """Size of a model's weights on disk: a .gguf file, or the *.safetensors of a model dir."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.glob("*.safetensors") if not f.name.startswith("adapter"))



def quantize_checkpoint(src, out, bits: int = 4, group_size: int = 64, quantize_embedding: bool = True,
                        eval_text=None, max_seq_len: int = 1024, force: bool = False, progress=None,
                        calibration="auto", calibration_tokens: int = DEFAULT_TOKENS, recipe: str = "uniform",
                        dtype: str = "float32") -> dict:
    """Load SRC, quantize it, save it to OUT (atomically) and measure both models: the one
    quantize pipeline (`mlx-gemma quantize` and `mlx-gemma convert -q` both run it).

    Every setting, the output path and the calibration / evaluation files are checked before
    the model is loaded, so a mistake costs no slow work and writes nothing.

    eval_text: a text file for the perplexity comparison, "default" for the project's held-out
    Chinese + English text (mlx_gemma/data/heldout_zh_en.txt), or None to skip it.
    calibration: "auto" (GPTQ on the bundled calibration text for 4-bit, none for 8-bit),
    "none", or a list of .txt / .jsonl files; calibration_tokens: how many tokens of them.
    recipe: "uniform" or "mixed" (see `quantize_model`). dtype: the dtype SRC is loaded in
    (float32 by default), which the scales and any unquantized weights keep.
    Returns {"original": {...}, "quantized": {...}, "bits", "group_size", "out"}, each side with
    disk_bytes, param_bytes and (when evaluated) loss / perplexity / tokens.
    """
    say = progress or (lambda msg: None)
    check_settings(bits, group_size, recipe)
    check_calibration_tokens(calibration_tokens)
    check_new_output_dir(Path(out), force)
    sources = resolve_sources(calibration, bits)
    text = None
    if eval_text is not None:
        text_path = DATA_DIR / "heldout_zh_en.txt" if eval_text == "default" else Path(eval_text)
        if not text_path.is_file():
            raise UserError(f"{text_path}: no such text file for the perplexity check; pass another eval_text, "
                            "or eval_text=None to skip the check")
        if max_seq_len < 2:  # checked with the text, before the slow load
            raise UserError("max_seq_len must be at least 2, got {max_seq_len}", max_seq_len=max_seq_len)
        text = read_eval_text(text_path)
    src_path = resolve(src)
    model, tokenizer = load(src, dtype=dtype)
    if model.config.quantization or quantized_layers(model):
        raise UserError(f"{src} is already quantized; quantize the original full-precision model instead")
    quantization_plan(model, check_quantizable(model, bits, group_size, quantize_embedding), bits, group_size,
                      recipe)  # refuses a bad recipe before any slow work
    windows = None if sources is None else calibration_windows(tokenizer, sources, calibration_tokens)
    if windows is not None:
        check_calibration(model, windows)
    original = {"disk_bytes": disk_bytes(src_path), "param_bytes": parameter_bytes(model)}
    if text is not None:
        say(f"perplexity of the original model on {text_path.name} ...")
        original.update(perplexity(model, tokenizer, text, max_seq_len=max_seq_len))
    method = ("error-minimising grid, no calibration" if windows is None else
              f"GPTQ on {windows.size} calibration tokens of {', '.join(p.name for p in sources)}")
    say(f"quantizing to {bits} bits, group size {group_size} ({method}) ...")
    quantize_model(model, bits=bits, group_size=group_size, quantize_embedding=quantize_embedding,
                   calibration=windows, progress=say, recipe=recipe)
    save_model(model, tokenizer, out, force=force)
    quantized = {"disk_bytes": disk_bytes(out), "param_bytes": parameter_bytes(model)}
    if text is not None:
        say("perplexity of the quantized model ...")
        quantized.update(perplexity(model, tokenizer, text, max_seq_len=max_seq_len))
    return {"original": original, "quantized": quantized, "bits": bits, "group_size": group_size,
            "method": method, "recipe": recipe, "out": str(out), "text": text_path.name if text is not None else None}


def format_report(result: dict) -> str:
    """The table `mlx-gemma quantize` prints from quantize_checkpoint's result."""
    o, q = result["original"], result["quantized"]
    bits = "4/8-bit mixed" if result.get("recipe") == "mixed" and result["bits"] == 4 else f"{result['bits']}-bit"
    label = f"{bits}, group {result['group_size']}"
    lines = [f"wrote {result['out']} ({result.get('method', '')})",
             f"{'':18s}{'original':>14s}{label:>22s}{'change':>10s}"]
    if "perplexity" in o:
        change = q["perplexity"] / o["perplexity"] - 1
        lines.append(f"{'perplexity':18s}{o['perplexity']:14.3f}{q['perplexity']:22.3f}{change:+10.1%}"
                     f"   ({o['tokens']} tokens of {result['text']})")
    for key, name in (("disk_bytes", "size on disk"), ("param_bytes", "param memory")):
        lines.append(f"{name:18s}{o[key] / 1e6:11.1f} MB{q[key] / 1e6:19.1f} MB{q[key] / o[key] - 1:+10.1%}")
    return "\n".join(lines)
