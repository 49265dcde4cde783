"""README.md as tests: every code block a user would paste is checked, so the README cannot drift.

README is read at run time, so sections other people add are covered without editing this file:

- Every fenced block is found (```bash / ```sh / ```console / ```python; other fences, e.g. plain
  ``` trees and tables, are not code to paste). A block right after `<!-- not-run: REASON -->`
  is only parsed, with REASON shown in the test id.
- Every `mlx-gemma ...` command in a shell block (a `$ ` line in a console block, any line in a
  bash block, `\\` continuations joined, `# comments` dropped, the part after `|` or `&&`) is parsed
  by the real click CLI: a renamed or removed option, a bad choice or a missing argument fails.
- Commands are also RUN, in a temporary folder with the session's isolated MLX_GEMMA_HOME,
  against the embedded Gemma 3 270M (the README's default model), unless NOT_RUN below names
  them with a reason. Where README shows the output (a console block), the run's output is
  compared with it (`...` in README matches anything).
- Python blocks run as written, in a subprocess: against the embedded 270M (slow), and the API
  tour also against a tiny random model with the real tokenizer (fast: it catches an import or
  a signature that drifted).

A command that is not in NOT_RUN is run: a new README command fails here until it works as
written or is listed with its reason.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh"}

# Commands parsed but not run, by prefix, each with why. Keep reasons concrete.
NOT_RUN = {
    "mlx-gemma train": "trains for minutes to hours (the main job is 17 min on 2 cores); test_train and "
                       "test_main_job run the trainer on the same code paths",
    "mlx-gemma convert google/": "needs the Hugging Face Hub (no network in tests)",
    "mlx-gemma convert gemma-3-270m q4-270m -q": "GPTQ on the 270M takes 4-5 min; test_gptq covers convert -q",
    "mlx-gemma quantize": "each 270M quantization takes 1.5-5 min; test_quant_quality runs "
                          "`--bits 4 --calibration none` and test_gptq / test_quantize the rest on tiny models",
    "mlx-gemma evaluate --model q8-270m": "needs q8-270m from the (not run) quantize line above",
    "mlx-gemma generate --draft-model q8-270m": "needs q8-270m from the (not run) quantize line; "
                                               "test_generate runs --draft-model on a tiny model",
    "mlx-gemma evaluate --adapter adapters/gemma-3-270m-zh": "needs the main job's trained adapter",
    "mlx-gemma generate --system \"请用中文回答\"": "needs the main job's trained adapter "
                                                "(adapters/gemma-3-270m-zh, 17 min of training)",
    "mlx-gemma generate --model google/": "needs the Hugging Face Hub",
    "mlx-gemma evaluate --model google/": "needs the Hugging Face Hub",
    "mlx-gemma convert-to-hf google/": "needs the Hugging Face Hub",
    "mlx-gemma fuse --adapter adapters/my-run": "needs an adapter from a (not run) train line",
    "mlx-gemma data pairs": "needs the main job's trained adapter (17 min of training); test_dpo_cli runs "
                            "`data pairs` on a tiny model and reads its pairs back",
    "mlx-gemma data hc3 baike.jsonl": "needs HC3-Chinese's baike.jsonl from the Hub; the same command runs "
                                      "on the bundled raw data in the console block",
    "mlx-gemma convert-to-hf gemma-3-270m": "needs the `./ad` adapter of the reader's own run; test_export "
                                            "writes and reads back HF dirs from adapters",
    "mlx-gemma convert-to-gguf gemma-3-270m": "needs the `./ad` adapter; test_export checks the GGUF writer",
    "mlx-gemma convert model.gguf": "the reader's own .gguf; test_gguf converts GGUF files",
    "mlx-gemma generate --prompt \"Invent a person.\" --json-schema": "needs the reader's person.schema.json; the "
        "Python block beside it runs a schema; tests/test_cli_constrained.py runs --json-schema FILE",
    "mlx-gemma convert gemma_zh": "the reader's Keras files from Kaggle; test_keras converts presets and "
                                  ".weights.h5 files that keras-hub writes",
    "mlx-gemma generate --model gemma-2b-zh": "needs the Keras model converted by the (not run) line above",
    "mlx-gemma train --model gemma-2b-zh": "needs the Keras model converted by the (not run) line above",
    "mlx-gemma convert-to-hf gemma-2b-zh": "needs the converted Keras model and an adapter trained on it",
    "mlx-gemma generate --prompt - --temp": "samples 256 tokens of the 270M (~1-2 min on 2 cores); the "
                                               "same options run on a tiny model in test_generate",
}
# Never run, whether README has them yet or not (not checked for staleness).
ALWAYS_NOT_RUN = {
    "mlx-gemma serve": "a server runs until stopped; test_serve runs it with the openai client",
}
# Lines in shell blocks that are not mlx-gemma commands and are never run (set-up, other tools).
OTHER_TOOLS = ("pip ", "huggingface-cli ", "python ", "SYS=", "time ", "curl ", "mlx.launch ", "cat ")

# Python blocks that are not run, by a distinctive line in them, with why.
PY_NOT_RUN = {
    "from transformers import AutoModelForCausalLM": "needs gemma-2b from the Hub and its tuned export",
    "from openai import OpenAI": "talks to a running `mlx-gemma serve`; test_serve and test_structured_serve make "
                                 "these calls with the openai client against a real server",
    "gemma_lm.save_weights": "runs on Kaggle with the reader's KerasHub model; test_keras saves tiny models both ways",
}


@dataclass
class Block:
    lang: str
    line: int  # 1-based line of the opening fence
    text: str
    not_run: str | None  # the reason of a `<!-- not-run: ... -->` marker before it

    @property
    def id(self):
        return f"{self.lang}@L{self.line}"


def read_blocks(path: Path = README) -> list:
    """The fenced code blocks of a Markdown file, with their language and not-run marker."""
    blocks, lines = [], path.read_text(encoding="utf-8").splitlines()
    i, marker = 0, None
    while i < len(lines):
        line = lines[i]
        m = re.match(r"\s*<!--\s*not-run:\s*(.*?)\s*-->", line)
        if m:
            marker = m.group(1)
        fence = re.match(r"\s*(`{3,}|~{3,})\s*([\w+-]*)", line)
        if fence:
            close, start, body = fence.group(1), i, []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(close):
                body.append(lines[i])
                i += 1
            blocks.append(Block(fence.group(2).lower(), start + 1, "\n".join(body), marker))
            marker = None
        elif line.strip() and not m:
            marker = None  # a marker applies to the block right after it only
        i += 1
    return blocks


@dataclass
class Command:
    text: str  # the command as written (continuations joined, comment dropped)
    expected: list  # output lines README shows after it (console blocks), else []
    block: Block

    @property
    def not_run(self):
        if self.block.not_run:
            return self.block.not_run
        reasons = {**NOT_RUN, **ALWAYS_NOT_RUN}
        return next((why for prefix, why in reasons.items() if self.mlx_text.startswith(prefix)), None)

    @property
    def mlx_text(self):
        """The command from `mlx-gemma` on (after `pip install ... &&` or `echo ... |`)."""
        at = self.text.find("mlx-gemma")
        return self.text[at:] if at >= 0 else self.text


def shell_commands(block: Block) -> list:
    """The commands of a shell block; for console blocks, with the output shown after each."""
    commands, lines = [], block.text.splitlines()
    console = any(line.startswith("$ ") for line in lines)
    i = 0
    while i < len(lines):
        line = lines[i]
        if console and not line.startswith("$ "):
            if commands:
                commands[-1].expected.append(line)
            i += 1
            continue
        line = line[2:] if console else line
        while line.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line.rstrip()[:-1] + " " + lines[i].strip()
        text = _drop_comment(line).strip()
        if text:
            commands.append(Command(text, [], block))
        i += 1
    return commands


def _drop_comment(line: str) -> str:
    """The line without a trailing `# comment` (a # outside quotes, after a space)."""
    quote = None
    for j, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (j == 0 or line[j - 1].isspace()):
            return line[:j]
    return line


def mlx_gemma_argv(command: str) -> list | None:
    """argv after `mlx-gemma` for the mlx-gemma part of a command line (None if there is none).

    `[--flag]` (README's notation for an optional flag) is kept as `--flag`; `...` ("more options")
    is dropped."""
    for part in re.split(r"\s*(?:\|\||&&|\|)\s*", command):
        words = shlex.split(part)
        if words and words[0] == "mlx-gemma":
            return [w.strip("[]") for w in words[1:] if w != "..."]
    return None


ALL = read_blocks()
SHELL = [c for b in ALL if b.lang in SHELL_LANGS for c in shell_commands(b)]
MLX = [c for c in SHELL if mlx_gemma_argv(c.text) is not None]
PYTHON = [b for b in ALL if b.lang in ("python", "py")]


def _cid(c: Command) -> str:
    return f"L{c.block.line}:{c.text[:60]}"


# ---- the README is what we think it is --------------------------------------------------------


def test_the_readme_has_the_blocks_this_file_checks():
    assert len(MLX) >= 25 and PYTHON, "README parsing found too few commands: did the fence syntax change?"
    assert any(c.not_run is None for c in MLX)
    # Every shell line is either an mlx-gemma command or a known other tool (set-up, variables).
    strays = [c.text for c in SHELL if mlx_gemma_argv(c.text) is None and not c.text.startswith(OTHER_TOOLS)]
    assert not strays, f"shell lines this test does not know how to check: {strays}"


def test_not_run_reasons_still_match_a_readme_command():
    """A NOT_RUN entry whose command left README is stale: remove it (keeps the list honest)."""
    stale = [p for p in NOT_RUN if not any(c.mlx_text.startswith(p) for c in MLX)]
    assert not stale, f"NOT_RUN entries no longer in README.md: {stale}"


# ---- every mlx-gemma command parses ------------------------------------------------------------


@pytest.mark.parametrize("command", MLX, ids=_cid)
def test_command_parses_with_the_real_cli(command):
    import click

    from mlx_gemma.cli import main

    argv = mlx_gemma_argv(command.text)
    if argv in (["--help"], ["--version"]):
        return
    ctx = main.make_context("mlx-gemma", list(argv))
    rest = _remaining(ctx)
    name, cmd, args = main.resolve_command(ctx, rest)
    while isinstance(cmd, click.Group):  # `data hc3 ...`
        sub = cmd.make_context(name, list(args), parent=ctx)
        name, cmd, args = cmd.resolve_command(sub, _remaining(sub))
    cmd.make_context(name, list(args), parent=ctx)  # raises click.UsageError on a bad option or value


def _remaining(ctx):
    """A group context's unparsed words (click 8.2 moved the subcommand name out of `args`)."""
    return [*getattr(ctx, "_protected_args", []), *ctx.args]


# ---- commands run as written -------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The reader's folder: the repo's data/ (README's commands use data/...) and baike_zh.jsonl,
    the HC3-shaped raw file README's `data hc3` example reads (the raw parts of zh_baike, joined)."""
    work = tmp_path_factory.mktemp("readme")
    os.symlink(ROOT / "data", work / "data")
    raw = [ROOT / "data" / "raw" / n for n in ("baike_zh_a.jsonl", "baike_zh_b.jsonl")]  # zh_baike's sources
    (work / "baike_zh.jsonl").write_bytes(b"".join(p.read_bytes() for p in raw))
    return work


def _run(argv_or_cmd, cwd, stdin="", timeout=900):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(argv_or_cmd, cwd=cwd, input=stdin, capture_output=True, text=True, env=env,
                          timeout=timeout)


def _matches(expected: str, got: str) -> bool:
    """A README output line against a real one: `...` matches anything, a decimal number any decimal
    number, runs of spaces are one space."""
    pattern = re.escape(" ".join(expected.split())).replace(re.escape("..."), ".*")
    pattern = re.sub(r"\d+\\\.\d+", r"\\d+\\.\\d+", pattern)  # measured values (1.11 GB) vary by machine
    return re.fullmatch(pattern, " ".join(got.split())) is not None


RUN = [c for c in MLX if c.not_run is None]
SKIPPED = [c for c in MLX if c.not_run is not None]
# The slow ones load the 270M; `info`, `models`, `data` and `--help` do not.
FAST = ("info", "models", "data", "--help", "--version")


@pytest.mark.parametrize("command", [
    pytest.param(c, marks=() if mlx_gemma_argv(c.text)[:1] and mlx_gemma_argv(c.text)[0] in FAST
                 else pytest.mark.slow) for c in RUN], ids=_cid)
def test_command_runs_as_written(command, workdir, session_home):
    # README writes `data hc3` output to /tmp/hc3demo: keep it inside the test folder (README's
    # words only: the interpreter's own path may be under /tmp too).
    argv = [sys.executable, "-m", "mlx_gemma.cli",
            *(a.replace("/tmp/", str(workdir) + "/") for a in mlx_gemma_argv(command.text))]
    stdin = ""
    if "|" in command.text and command.text.startswith("echo "):
        stdin = shlex.split(command.text.split("|")[0])[1] + "\n"
    proc = _run(argv, workdir, stdin)
    assert proc.returncode == 0, f"{command.text}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    out = (proc.stdout + proc.stderr).replace(str(workdir) + "/", "/tmp/")
    out = out.replace(str(session_home), "/root/.cache/mlx-gemma")
    got = [line for line in out.splitlines() if line.strip()]
    for expected in command.expected:
        if expected.startswith(("mlx-gemma ", "mlx ", "platform", "blas", "device", "compute dtype")) \
                or re.match(r"\s+gemma-3-270m\s+\d", expected):
            # Machine-specific values (versions, paths, sizes): the key must be there.
            key = expected.split()[0]
            assert any(line.split()[0] == key for line in got), f"no {key!r} line in:\n{out}"
        else:
            assert any(_matches(expected, line) for line in got), f"README shows {expected!r}; got:\n{out}"


def test_skipped_commands_are_listed_with_reasons():
    """The visible list of what is parsed but not run (see NOT_RUN and `<!-- not-run -->` markers)."""
    for c in SKIPPED:
        assert len(c.not_run) > 20, f"give a concrete reason for not running {c.text!r}"
    print("\n".join(f"not run: {c.text[:70]}  -- {c.not_run}" for c in SKIPPED))


# ---- Python blocks ----------------------------------------------------------------------------


def _py_not_run(block: Block):
    if block.not_run:
        return block.not_run
    return next((why for key, why in PY_NOT_RUN.items() if key in block.text), None)


@pytest.fixture(scope="module")
def adapter_270m(workdir):
    """adapters/gemma-3-270m-zh as the API tour loads it: a fresh (B = 0) LoRA on the 270M.
    The tour checks that loading an adapter works; the trained one takes the 13-minute main job."""
    from mlx_gemma.loading import load
    from mlx_gemma.lora import apply_lora, save_adapter

    model, _ = load("gemma-3-270m")
    config = apply_lora(model, targets=["q_proj", "v_proj"], rank=4, alpha=8, base_model="gemma-3-270m")
    out = workdir / "adapters" / "gemma-3-270m-zh"
    save_adapter(model, out, config)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("block", [pytest.param(b, marks=pytest.mark.skip(reason=_py_not_run(b))) if _py_not_run(b)
                                   else b for b in PYTHON], ids=lambda b: b.id)
def test_python_block_runs_on_the_270m(block, workdir, adapter_270m):
    proc = _run([sys.executable, "-c", block.text], workdir)
    assert proc.returncode == 0, f"README {block.id}:\n{proc.stderr[-3000:]}"
    _check_tour_output(block, proc.stdout)


def _check_tour_output(block, stdout):
    """The API tour's printed details line: a list of (text, finish_reason, stop_token) per prompt."""
    if "details=True" not in block.text:
        return
    details = stdout[stdout.rfind("[("):]  # the streamed text before it ends with no newline
    assert details.startswith("[(") and re.search(r"'(stop|length)', (None|\d+)\)\]$", details.strip()), stdout


@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory):
    """A folder where `gemma-3-270m` names a tiny random Gemma 3 dir with the real tokenizer and an
    adapter for it: the API tour runs in seconds (MLX_GEMMA_HOME pointing at this folder)."""
    from mlx_gemma.convert import hf as hf_convert
    from mlx_gemma.loading import build_model, read_config, resolve, save_model
    from mlx_gemma.lora import apply_lora, save_adapter
    from mlx_gemma.tokenizer import GemmaTokenizer

    from tiny import make_hf_model, save_hf_model

    tokenizer = GemmaTokenizer(resolve("gemma-3-270m"))
    src = save_hf_model(make_hf_model("gemma3_text", vocab_size=262144), tmp_path_factory.mktemp("tinyhf"))
    model = build_model(read_config(src), hf_convert.load_safetensors(hf_convert.safetensors_files(src)),
                        str(src), "float32")
    home = tmp_path_factory.mktemp("tinyhome")
    model_dir = save_model(model, tokenizer, home / "models" / "gemma-3-270m")
    # The alias cache accepts a dir whose manifest matches; save_model writes one.
    assert json.loads((model_dir / "manifest.json").read_text())["sizes"]
    config = apply_lora(model, targets=["q_proj", "v_proj"], rank=4, alpha=8, base_model="gemma-3-270m")
    save_adapter(model, home / "adapters" / "gemma-3-270m-zh", config)
    return home


def test_api_tour_runs_on_a_tiny_model(tiny_home):
    """The Python API tour as written, with `gemma-3-270m` resolving to a tiny random model
    (fast; the same block runs on the real 270M in the slow test above)."""
    tour = [b for b in PYTHON if "batch_generate" in b.text and not _py_not_run(b)]
    assert tour, "README lost its Python API tour"
    env = dict(os.environ, MLX_GEMMA_HOME=str(tiny_home))
    proc = subprocess.run([sys.executable, "-c", tour[0].text], cwd=tiny_home, capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_tour_output(tour[0], proc.stdout)
