"""Model specs: HF repo ids through huggingface_hub (offline cache), aliases, errors; the CLI's error contract."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma import loading
from mlx_gemma.errors import UserError
from mlx_gemma.cpu import BLAS_STATUS

from tiny import make_hf_model, random_ids, save_hf_model


def test_openblas_is_loaded_on_linux():
    if not sys.platform.startswith("linux"):
        pytest.skip("OpenBLAS preloading is Linux-only")
    assert BLAS_STATUS["library"] and "openblas" in BLAS_STATUS["library"].lower(), BLAS_STATUS


_BLAS_PROBE = """
import sys, warnings
warnings.simplefilter("always")
{first}
{second}
with open("/proc/self/maps") as f:
    maps = f.read()
print("openblas mapped:", "libopenblas" in maps)
"""


@pytest.mark.parametrize("mlx_first", [False, True])
def test_mlx_imported_first_keeps_the_reference_blas_and_says_so(mlx_first):
    """The order decides which BLAS the process maps (read from /proc/self/maps), and the wrong
    order is one warning that names the fix; the right order warns nothing."""
    if not sys.platform.startswith("linux"):
        pytest.skip("OpenBLAS preloading is Linux-only")
    order = ["import mlx.core", "import mlx_gemma"]
    code = _BLAS_PROBE.format(first=order[not mlx_first], second=order[mlx_first])
    env = {k: v for k, v in os.environ.items() if k not in ("MLX_GEMMA_NO_OPENBLAS", "MLX_GEMMA_OPENBLAS")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    if mlx_first:
        assert "openblas mapped: False" in proc.stdout
        assert "ReferenceBLASWarning" in proc.stderr and "put `import mlx_gemma` before" in proc.stderr, proc.stderr
    else:
        assert "openblas mapped: True" in proc.stdout
        assert "Warning" not in proc.stderr, proc.stderr


def _fake_hub_cache(root, repo_id, files_dir):
    """Lay out a snapshot the way huggingface_hub's cache does (models--org--name/snapshots/<rev>)."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    for f in files_dir.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    return snap


def test_repo_id_resolves_through_the_offline_hub_cache(tmp_path, monkeypatch):
    hf = make_hf_model("gemma")
    save_hf_model(hf, tmp_path / "src")
    cache = tmp_path / "hub"
    snap = _fake_hub_cache(cache, "google/tiny-gemma", tmp_path / "src")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    path = loading.resolve("google/tiny-gemma")
    assert path.resolve() == snap.resolve()
    config = loading.read_config(path)
    from mlx_gemma.convert import hf as hf_convert

    model = loading.build_model(config, hf_convert.load_safetensors(hf_convert.safetensors_files(path)), str(path), "float32")
    import torch

    ids = random_ids(512, (1, 9))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(np.array(model(mx.array(ids))) - ref).max() <= 1e-4


def test_unreachable_hub_is_one_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match=r"cannot fetch 'google/gemma-2b'.*local model dir"):
        loading.resolve("google/gemma-2b")


def test_unknown_spec_and_missing_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        loading.resolve("no-such-model")
    (tmp_path / "m").mkdir()
    with pytest.raises(UserError, match=r"config.json not found"):
        loading.load(str(tmp_path / "m"))
    save_hf_model(make_hf_model("gemma"), tmp_path / "t")
    with pytest.raises(UserError, match=r"has no tokenizer.model or tokenizer.json"):
        loading.load(str(tmp_path / "t"))
    os.remove(tmp_path / "t" / "model.safetensors")
    with pytest.raises(UserError, match=r"no \*.safetensors weights"):
        loading.load(str(tmp_path / "t"))


def test_alias_without_its_package_names_the_pip_extra(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_GEMMA_HOME", str(tmp_path))
    monkeypatch.setitem(loading.ALIASES, "gemma-test", {"package": "no_such_pkg_xyz", "extra": "mlx-gemma[model]",
                                                          "description": "test"})
    with pytest.raises(UserError, match=r"pip install 'mlx-gemma\[model\]'"):
        loading.resolve("gemma-test")


def test_cli_user_error_is_one_line_exit_1(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mlx_gemma.cli", "convert", str(tmp_path / "nope"), str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error: ")
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "o").exists()
