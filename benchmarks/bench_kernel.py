"""Time ``tailor_weight`` on one square fp32 layer with default options (cost model: docs/METHOD.md §8-§9).

A script, not a test. Builds a random SPD Hessian from random tokens with mixed feature scales, a base weight
and a low-rank-plus-noise delta, then reports the median of ``--runs`` calls and the per-phase split recorded
in ``TailorStats.seconds`` (factorisation, selection, sweep, guard).

    python benchmarks/bench_kernel.py                   # 4096 x 4096 on CPU, 3 runs
    python benchmarks/bench_kernel.py --device cuda     # on a GPU
    python benchmarks/bench_kernel.py --group 3         # q/k/v-like group: per-module vs tailor_group

``--group N`` times N layers sharing one Hessian both ways, interleaved (A B A B ...) so that load from other
processes hits both alike, and reports the median of each and the largest weight difference.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from model_tailor.kernel.group import GroupMember, tailor_group
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
    parser.add_argument("--group", type=int, default=0, help="N > 1: time N layers sharing H, per-module vs grouped")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.group > 1:
        bench_group(args, device)
        return
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


def _timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def bench_group(args: argparse.Namespace, device: torch.device) -> None:
    """Per-module ``tailor_weight`` calls against one ``tailor_group`` call, interleaved, same inputs."""
    _, _, H = build_inputs(args.size, args.tokens, device, args.seed)
    members = []
    for i in range(args.group):
        base, finetuned, _ = build_inputs(args.size, 8, device, args.seed + 1 + i)
        members.append(GroupMember(base, finetuned, name=f"m{i}"))
    opts = dict(compensation=args.compensation)

    def per_module():
        return [tailor_weight(m.base, m.finetuned, H, name=m.name, **opts) for m in members]

    times: dict[str, list[float]] = {"per-module": [], "grouped": []}
    for _ in range(args.runs):
        t, ref = _timed(per_module, device)
        times["per-module"].append(t)
        t, got = _timed(lambda: tailor_group(members, H, **opts), device)
        times["grouped"].append(t)
    diff = max(float((a.weight - b.weight).abs().max()) for a, b in zip(ref, got, strict=True))
    same_masks = all(bool(torch.equal(a.keep_mask, b.keep_mask)) for a, b in zip(ref, got, strict=True))
    print(f"device={device}, torch threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"group of {args.group} x ({args.size}x{args.size}) fp32 sharing H from {args.tokens} tokens, defaults")
    for key, ts in times.items():
        print(f"  {key:>10}: median {statistics.median(ts):.2f} s  (runs: " + ", ".join(f"{t:.2f}" for t in ts) + ")")
    print(f"  masks identical: {same_masks}; max |weight difference|: {diff:.3g}")


if __name__ == "__main__":
    main()
