"""Time ``tailor_weight`` on one square fp32 layer with default options (cost model: docs/METHOD.md §8-§9).

A script, not a test. Builds a random SPD Hessian from random tokens with mixed feature scales, a base weight
and a low-rank-plus-noise delta, then reports the median of ``--runs`` calls and the per-phase split recorded
in ``TailorStats.seconds`` (factorisation, selection, sweep, guard).

    python benchmarks/bench_kernel.py                   # 4096 x 4096 on CPU, 3 runs
    python benchmarks/bench_kernel.py --device cuda     # on a GPU
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from model_tailor.kernel.tailor import tailor_weight
from model_tailor.options import COMPENSATIONS


def build_inputs(size: int, tokens: int, device: torch.device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    scales = torch.linspace(1.0, 4.0, size)
    mix = torch.randn(size, size, generator=gen) / size**0.5 + 0.3 * torch.eye(size)
    X = mix @ (torch.randn(size, tokens, generator=gen) * scales[:, None])  # (cols, tokens)
    H = 2.0 * (X @ X.T) / tokens
    base = 0.02 * torch.randn(size, size, generator=gen)
    delta = 0.02 * torch.randn(size, 8, generator=gen) @ torch.randn(8, size, generator=gen) / 8**0.5
    finetuned = base + delta + 0.01 * torch.randn(size, size, generator=gen)
    return base.to(device), finetuned.to(device), H.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="rows = cols of the layer")
    parser.add_argument("--tokens", type=int, default=8192, help="calibration tokens for the Hessian")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compensation", default="obs", choices=COMPENSATIONS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device(args.device)
    base, finetuned, H = build_inputs(args.size, args.tokens, device, args.seed)
    totals, phases = [], []
    for _ in range(args.runs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = tailor_weight(base, finetuned, H, compensation=args.compensation, name="bench")
        if device.type == "cuda":
            torch.cuda.synchronize()
        totals.append(time.perf_counter() - t0)
        phases.append(out.stats.seconds)
    print(
        f"device={device} ({platform.processor() or platform.machine()}, torch threads "
        f"{torch.get_num_threads()}), torch {torch.__version__}"
    )
    print(
        f"layer {args.size}x{args.size} fp32, H from {args.tokens} tokens, defaults "
        f"(density 0.1, alpha 0.8, block 128, compensation {args.compensation}, adaptive, guard on)"
    )
    print(
        f"median of {args.runs}: {statistics.median(totals):.2f} s  (runs: "
        + ", ".join(f"{t:.2f}" for t in totals)
        + ")"
    )
    for key in phases[0]:
        print(f"  {key:>7}: {statistics.median(p[key] for p in phases):.2f} s")
    s = out.stats
    print(
        f"kept {s.kept}/{s.numel} ({s.density:.4f}), used={s.used}, "
        f"error masked {s.error_masked:.4g} vs compensated {s.error_compensated:.4g}"
    )


if __name__ == "__main__":
    main()
