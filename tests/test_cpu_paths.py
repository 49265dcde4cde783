"""The CPU seam (mlx_gemma/cpu): what importing does and does not do, what `enable()` and the CLI
switch on, the calibration cache's key, and that every forced choice computes the same thing.

The calibration tests fake the timer (`measure=`) and the machine key's parts: they time nothing.
The equality tests force each path on alone and compare greedy ids and every step's logits with
all paths off (MLX's own kernels), on tiny Gemma 2 and 3 models.
"""

import ctypes
import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma import backend, cpu
from mlx_gemma.convert import hf as hf_convert
from mlx_gemma.cpu import calibrate
from mlx_gemma.generation import generate_step
from mlx_gemma.loading import build_model, read_config

from tiny import make_hf_model, random_ids, save_hf_model

LINUX_GLIBC = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallinfo2")


def run_python(code: str, env: dict, timeout: int = 300) -> list:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


# ---- what import does --------------------------------------------------------------------------


@pytest.mark.skipif(not LINUX_GLIBC, reason="glibc's mallinfo2 reads the mmap threshold's effect")
def test_import_builds_nothing_and_leaves_malloc_alone(tmp_path):
    """A fresh interpreter that imports mlx_gemma and the generation and loading modules: OpenBLAS
    is loaded, nothing is built or calibrated in MLX_GEMMA_HOME, every CPU path is off, and a
    64 MB malloc is still served by mmap (glibc's default threshold). After `cpu.enable()` the
    same malloc comes from the heap (threshold raised), and only then."""
    code = """
import ctypes, os
import mlx_gemma, mlx_gemma.loading, mlx_gemma.generation
from mlx_gemma import backend, cpu
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def mmapped_while_held():
    before = libc.mallinfo2().hblkhd
    p = libc.malloc(64 << 20)
    grew = libc.mallinfo2().hblkhd - before
    libc.free(p)
    return grew >= 64 << 20
print(cpu.BLAS_STATUS["library"] is not None)
p = backend.policy()
print([p.fast_math, p.explicit_attention, p.host_loss, p.host_gemv, p.host_decode, p.native_kernel])
print(sorted(os.listdir(os.environ["MLX_GEMMA_HOME"])) if os.path.isdir(os.environ["MLX_GEMMA_HOME"]) else [])
print(mmapped_while_held(), cpu.malloc_tuned())
cpu.enable()
print(mmapped_while_held(), cpu.malloc_tuned())
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_GEMMA")}
    env["MLX_GEMMA_HOME"] = str(tmp_path / "home")
    lines = run_python(code, env)
    assert lines[0] == "True"
    assert lines[1] == "[False, False, False, False, False, False]"
    assert "native" not in lines[2] and "calibration" not in lines[2]  # only the BLAS helper ("blas") may be there
    assert lines[3] == "True False"
    assert lines[4] == "False True"


# ---- the environment variable ------------------------------------------------------------------


def test_forced_choices_are_read_and_a_typo_is_an_error(monkeypatch):
    monkeypatch.setenv(cpu.ENV, "all=off, row_decode=on")
    assert cpu.forced() == {**{p: False for p in cpu.PATHS}, "row_decode": True}
    fields = backend.cpu_path_fields(cpu.forced())
    assert fields["host_decode"] and fields["host_gemv"] and not fields["fast_math"] and not fields["native_kernel"]
    monkeypatch.setenv(cpu.ENV, "")
    assert cpu.forced() == {}
    for bad in ("fastmath=on", "fast_math=yes", "all"):
        monkeypatch.setenv(cpu.ENV, bad)
        with pytest.raises(ValueError, match=cpu.ENV):
            cpu.forced()


# ---- the calibration cache ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    def load(kind):
        path = save_hf_model(make_hf_model(kind, seed=5), tmp_path_factory.mktemp(kind))
        return build_model(read_config(path), hf_convert.load_safetensors(hf_convert.safetensors_files(path)),
                           str(path), "float32")
    return {"gemma3": load("gemma3_text"), "gemma2": load("gemma2")}


class FakeTimer:
    """measure(ours, theirs) -> a fixed ratio per call, counting the calls; runs neither."""

    def __init__(self, ratios):
        self.ratios, self.calls = list(ratios), 0

    def __call__(self, ours, theirs):
        self.calls += 1
        return self.ratios[(self.calls - 1) % len(self.ratios)]


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A faked machine key (CPU features, library versions) and an empty MLX_GEMMA_HOME."""
    monkeypatch.setenv("MLX_GEMMA_HOME", str(tmp_path))
    monkeypatch.delenv(cpu.ENV, raising=False)
    state = {"isa": ("avx2", "fma"), "versions": {"mlx": "0.32.4", "numpy": "2.0.0"}}
    monkeypatch.setattr(calibrate, "isa_features", lambda: state["isa"])
    monkeypatch.setattr(calibrate, "library_versions", lambda: dict(state["versions"]))
    monkeypatch.setattr(calibrate, "machine_is_quiet", lambda: state["quiet"])
    state["quiet"] = True
    return state


def test_calibration_is_cached_reused_and_invalidated_by_cpu_features_and_mlx(machine, tiny_models, tmp_path):
    model = tiny_models["gemma3"]
    timer = FakeTimer([2.0, 0.5, 1.16, 1.14])  # fast_math, attention, host_loss, row_decode (native: n/a)
    first = calibrate.calibrate(model, measure=timer)
    assert timer.calls == 4
    assert {n: c.on for n, c in first.items()} == {"fast_math": True, "attention": False, "host_loss": True,
                                                   "native": False, "row_decode": False}
    assert first["native"].how == "n/a" and first["row_decode"].ratio == 1.14  # under the 1.15 margin: off
    files = list((tmp_path / "calibration").glob("*.json"))
    assert len(files) == 1
    stored = json.loads(files[0].read_text())
    assert stored["machine"]["isa"] == ["avx2", "fma"] and stored["machine"]["mlx"] == "0.32.4"
    assert stored["models"][calibrate.shape_signature(model)]["host_loss"]["ratio"] == 1.16

    again = calibrate.calibrate(model, measure=timer)
    assert timer.calls == 4  # reused: nothing timed
    assert {n: (c.on, c.ratio) for n, c in again.items()} == {n: (c.on, c.ratio) for n, c in first.items()}
    assert {c.how for n, c in again.items()} == {"cached"}

    machine["isa"] = ("avx2", "avx512f", "fma")  # another CPU kind
    calibrate.calibrate(model, measure=timer)
    assert timer.calls == 8
    machine["versions"]["mlx"] = "0.33.0"  # a new MLX
    calibrate.calibrate(model, measure=timer)
    assert timer.calls == 12
    assert len(list((tmp_path / "calibration").glob("*.json"))) == 3
    machine["isa"], machine["versions"]["mlx"] = ("avx2", "fma"), "0.32.4"  # back: the first file is read again
    calibrate.calibrate(model, measure=timer)
    assert timer.calls == 12


def test_a_choice_measured_under_load_is_reused_until_the_machine_is_quiet(machine, tiny_models):
    """Measured while the load exceeds half the cores: stored marked busy and reused while busy (no
    second costly measurement), measured again by the first quiet process, which replaces it."""
    model = tiny_models["gemma3"]
    machine["quiet"] = False
    busy = FakeTimer([2.0])
    assert calibrate.calibrate(model, measure=busy)["fast_math"].on and busy.calls == 4
    assert calibrate.calibrate(model, measure=busy)["fast_math"].how.startswith("cached, measured at load")
    assert busy.calls == 4
    machine["quiet"] = True
    quiet = FakeTimer([0.5])
    again = calibrate.calibrate(model, measure=quiet)
    assert quiet.calls == 4 and not again["fast_math"].on and again["fast_math"].how == "measured"
    assert calibrate.calibrate(model, measure=quiet)["fast_math"].how == "cached" and quiet.calls == 4


def test_time_pair_alternates_at_least_the_minimum_rounds_then_until_its_time_is_spent(monkeypatch):
    """On a fake clock each call advances: the ratio is MLX's fastest / the path's fastest, the
    pair runs at least `rounds` alternating rounds, then more until `spend` has gone, never more
    than `max_rounds`."""
    clock = {"t": 0.0}
    monkeypatch.setattr(calibrate.time, "perf_counter", lambda: clock["t"])
    calls = []

    def fn(name, cost):
        def call():
            calls.append(name)
            clock["t"] += cost(len(calls))
        return call
    ours = fn("ours", lambda n: 1.0 if n > 2 else 50.0)  # a slow first (warm-up) call is not counted
    theirs = fn("theirs", lambda n: 2.0 + (n % 4))
    assert calibrate.time_pair(ours, theirs, rounds=5, spend=10.0, max_rounds=40) == 2.0 / 1.0
    assert calls[:4] == ["ours", "theirs", "ours", "theirs"] and len(calls) == 2 + 2 * 5
    calls.clear()
    calibrate.time_pair(ours, theirs, rounds=5, spend=60.0, max_rounds=40)
    assert len(calls) == 2 + 2 * 16  # rounds cost 1 + 2 and 1 + 4 alternately: 60 s are spent after 16
    calls.clear()
    calibrate.time_pair(ours, theirs, rounds=5, spend=1e9, max_rounds=8)
    assert len(calls) == 2 + 2 * 8


def test_the_machine_is_quiet_up_to_half_its_cores(monkeypatch):
    monkeypatch.setattr(calibrate.os, "cpu_count", lambda: 2)
    for load, quiet in ((0.4, True), (1.0, True), (1.3, False), (2.0, False)):
        monkeypatch.setattr(calibrate.os, "getloadavg", lambda: (load, 0.0, 0.0))
        assert calibrate.machine_is_quiet() is quiet, load
    monkeypatch.setattr(calibrate.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(calibrate.os, "getloadavg", lambda: (3.5, 0.0, 0.0))
    assert calibrate.machine_is_quiet()


def test_a_cache_file_from_another_key_is_not_read(machine, tiny_models):
    """A file at this key's name whose recorded machine differs (copied from elsewhere) is ignored."""
    model = tiny_models["gemma3"]
    path = calibrate.cache_file(calibrate.machine_key())
    path.parent.mkdir(parents=True)
    other = {**calibrate.machine_key(), "cpu": "another CPU"}
    sig = calibrate.shape_signature(model)
    path.write_text(json.dumps({"machine": other, "models": {sig: {"fast_math": {"on": True, "ratio": 9.0}}}}))
    timer = FakeTimer([0.5])
    choices = calibrate.calibrate(model, measure=timer)
    assert choices["fast_math"].how == "measured" and not choices["fast_math"].on and timer.calls == 4


def test_forced_paths_are_not_timed(machine, tiny_models, monkeypatch):
    monkeypatch.setenv(cpu.ENV, "all=on,attention=off")
    timer = FakeTimer([1.0])
    choices = calibrate.calibrate(tiny_models["gemma3"], measure=timer)
    assert timer.calls == 0
    assert {n: (c.on, c.how) for n, c in choices.items()} == {
        "fast_math": (True, "forced"), "attention": (False, "forced"), "host_loss": (True, "forced"),
        "native": (True, "forced"), "row_decode": (True, "forced")}


def test_gemma2_has_no_attention_choice(machine, tiny_models):
    """Soft-capped scores always take the explicit path: the calibration does not time it."""
    choices = calibrate.calibrate(tiny_models["gemma2"], measure=FakeTimer([2.0]))
    assert choices["attention"].how == "n/a"


def test_info_prints_the_cached_choices_and_what_the_cli_enabled(tiny_models, tmp_path, monkeypatch):
    """`mlx-gemma info` (the CLI enables the CPU paths) prints the choices measured earlier on this
    machine with their ratios (a cache written here under this machine's real key), the paths the
    environment forces into the policy, and the malloc tuning it did."""
    monkeypatch.setenv("MLX_GEMMA_HOME", str(tmp_path))
    monkeypatch.delenv(cpu.ENV, raising=False)
    monkeypatch.setattr(calibrate, "machine_is_quiet", lambda: True)
    calibrate.calibrate(tiny_models["gemma3"], measure=FakeTimer([2.5, 0.8, 1.3, 1.7]))
    env = {**os.environ, cpu.ENV: "all=off,row_decode=on"}
    exe = os.path.join(os.path.dirname(sys.executable), "mlx-gemma")
    out = subprocess.run([exe, "info"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    sig = calibrate.shape_signature(tiny_models["gemma3"])
    at = lines.index(f"cpu paths     {sig} (measured earlier on this machine):")
    assert lines[at + 1:at + 6] == [
        "  fast_math   on  (cached, MLX time / path time 2.50 (on from 1.15))",
        "  attention   off (cached, MLX time / path time 0.80 (on from 1.15))",
        "  host_loss   on  (cached, MLX time / path time 1.30 (on from 1.15))",
        "  native      off (cached)",
        "  row_decode  on  (cached, MLX time / path time 1.70 (on from 1.15))"]
    assert "backend       cpu, compute dtype float32, CPU paths: host gemv head, host one-row decode" in lines
    assert "malloc        large freed blocks kept (enabled by the CLI)" in lines


# ---- every choice computes the same thing ------------------------------------------------------

OFF = {p: False for p in cpu.PATHS}


def greedy_with_logits(model, prompt, steps, choices: dict):
    """Greedy ids and each step's logits (prefill in chunks of 5, so cached prefill attention runs)
    with exactly these CPU paths on."""
    seen = []

    def record(history, logits):
        seen.append(np.array(logits[0]))
        return logits

    with backend.override(**backend.cpu_path_fields(choices)):
        ids = [t.item() for t in generate_step(model, mx.array(prompt), max_tokens=steps,
                                               logits_processors=[record], prefill_step=5)]
    return ids, seen


@pytest.mark.parametrize("kind", ["gemma3", "gemma2"])
@pytest.mark.parametrize("path", ["fast_math", "attention", "row_decode", "all"])
def test_each_forced_path_gives_the_same_tokens_and_logits(tiny_models, kind, path):
    """Greedy decoding with one path forced on (or all of them) against all paths off: the same
    ids and every step's logits within float32 rounding."""
    model = tiny_models[kind]
    prompt = random_ids(512, (1, 13), seed=21)
    ref_ids, ref_logits = greedy_with_logits(model, prompt, 16, OFF)
    on = {p: True for p in cpu.PATHS} if path == "all" else {**OFF, path: True}
    ids, logits = greedy_with_logits(model, prompt, 16, on)
    assert ids == ref_ids
    for i, (a, b) in enumerate(zip(logits, ref_logits)):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-5, err_msg=f"step {i}")


@pytest.mark.parametrize("bits", [8, 4])
def test_native_kernel_choice_gives_the_same_tokens_and_logits(tiny_models, bits):
    """A quantized model decoding on the host with the native kernel, against all paths off
    (MLX's quantized_matmul in its compiled step)."""
    import copy

    from mlx_gemma.cpu.native import STATUS, qgemv
    from mlx_gemma.quant import quantize_model

    if qgemv() is None:
        pytest.skip(f"no native kernel here: {STATUS['note']}")
    base = tiny_models["gemma3"]
    model = type(base)(copy.deepcopy(base.config))
    model.update(base.parameters())
    quantize_model(model, bits=bits, group_size=32)
    prompt = random_ids(512, (1, 13), seed=22)
    ref_ids, ref_logits = greedy_with_logits(model, prompt, 16, OFF)
    ids, logits = greedy_with_logits(model, prompt, 16, {**OFF, "row_decode": True, "native": True})
    assert ids == ref_ids
    for i, (a, b) in enumerate(zip(logits, ref_logits)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4, err_msg=f"step {i}")


@pytest.mark.parametrize("kind", ["gemma3", "gemma2"])
def test_host_loss_choice_gives_the_same_losses_and_gradients(tiny_models, kind):
    """The training loss and its gradients with the host loss (and fast math) on and off."""
    from mlx.utils import tree_flatten

    from mlx_gemma.training.loss import loss_and_grad, loss_positions

    model = tiny_models[kind]
    rng = np.random.default_rng(4)
    inputs = mx.array(rng.integers(0, 512, (2, 12)), mx.int32)
    targets = mx.array(rng.integers(0, 512, (2, 12)), mx.int32)
    idx, w = (mx.array(a) for a in loss_positions(np.ones((2, 12), np.float32)))
    results = []
    for on in (False, True):
        with backend.override(**backend.cpu_path_fields({**OFF, "host_loss": on, "fast_math": on})):
            (loss, count), grads = loss_and_grad(model, chunk=128)(inputs, targets, idx, w)
            mx.eval(loss, count, grads)
        results.append((float(loss), dict(tree_flatten(grads))))
    (l0, g0), (l1, g1) = results
    assert l1 == pytest.approx(l0, rel=1e-5)
    assert g0.keys() == g1.keys() and g0
    for name in g0:
        np.testing.assert_allclose(np.array(g1[name]), np.array(g0[name]), atol=1e-5, rtol=1e-4, err_msg=name)
