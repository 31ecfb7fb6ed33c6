"""Roofline of a train step and of inference: counted matmul/conv FLOPs, wall time, achieved GFLOP/s against the
machine's fp32 matmul peak measured in the same run, peak memory and the top operators of ``torch.profiler``.

Model: ``--config-file`` (default: the user document's DI-MaskDINO + ConvNeXt-T configuration) plus trailing
``KEY VALUE`` overrides. Levels (``--levels``): ``user`` = the config as it is (res2–res5 in the encoder),
``standard`` = MaskDINO's res3–res5 + one extra stride-64 level. Each (levels, work) pair runs in its own
process: one pass under ``FlopCounterMode`` (also the warm-up), then ``--iters`` timed passes under the
profiler. Inputs: synthetic images with ``--instances`` box-shaped instances (train, batch ``--batch`` at
``--size``²) and one image at ``--infer-size``² (inference, with post-processing).

    python benchmarks/roofline.py                               # the document's sizes: minutes per row
    python benchmarks/roofline.py --size 256 --infer-size 320 --threads 2 MODEL.MaskDINO.DEC_LAYERS 3
    python benchmarks/roofline.py --work infer --levels standard
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import LEVELS, _batch  # noqa: E402  (synthetic batch and level overrides of the step benchmark)

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                      "dimaskdino_convnext_tiny_medical_instruments.yaml")


def matmul_peak_gflops(device: torch.device, n: int = 2048, reps: int = 5) -> float:
    """Best-of-``reps`` fp32 ``n × n`` matrix product rate: the ceiling the counted FLOPs are compared with."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(reps + 1):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new high-water mark: CUDA's allocator statistics, or the process's peak RSS (Linux clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux: the peak then includes what came before
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak since ``reset_peak_memory``: CUDA max allocated, or peak RSS (VmHWM; ru_maxrss elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _flops_by_part(counter: FlopCounterMode) -> dict[str, int]:
    """FLOPs of the model's direct children (backbone, pixel decoder, decoder, criterion...)."""
    out = {}
    for name, ops in counter.get_flop_counts().items():
        parts = name.split(".")
        if len(parts) == 2:
            out[parts[1]] = sum(ops.values())
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _run(levels: str, work: str, args: argparse.Namespace, queue: mp.Queue) -> None:
    from surgdino.config import load_config
    from surgdino.modeling import build_model

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    opts = (LEVELS["standard"] if levels == "standard" else []) + args.opts
    cfg = load_config(args.config_file, opts)
    model = build_model(cfg).to(device)
    if work == "train":
        model.train()
        batch = _batch(args.batch, args.size, args.instances, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)

        def step():
            model.zero_grad(set_to_none=True)
            sum(model(batch).values()).backward()
    else:
        model.eval()
        batch = _batch(1, args.infer_size, args.instances, 2, seed=1)

        def step():
            with torch.no_grad():
                model(batch)

    peak_before = matmul_peak_gflops(device)
    reset_peak_memory(device)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    parts = _flops_by_part(counter)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                     if device.type == "cuda" else [])
    times = []
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.iters):
            _sync(device)
            t = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - t)
    mem = peak_memory_mb(device)
    peak = max(peak_before, matmul_peak_gflops(device))
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)
    ops = [(e.key, e.self_cpu_time_total / max(total, 1), e.count // args.iters) for e in top[:args.top]]
    copy = next(((e.self_cpu_time_total / max(total, 1), e.count // args.iters) for e in events
                 if e.key == "aten::copy_"), (0.0, 0))
    queue.put({"levels": levels, "work": work, "flops": flops, "parts": parts, "time": min(times),
               "peak_gflops": peak, "mem_mb": mem, "ops": ops, "copy": copy})


def _report(r: dict, args: argparse.Namespace) -> None:
    gflop = r["flops"] / 1e9
    rate = gflop / r["time"]
    size = f"batch {args.batch} at {args.size}²" if r["work"] == "train" else f"1 image at {args.infer_size}²"
    print(f"\n{r['work']} ({size}), levels {r['levels']}: {gflop:.1f} GFLOP "
          f"({', '.join(f'{k} {v / 1e9:.1f}' for k, v in r['parts'].items())})")
    print(f"  time {r['time']:.2f} s, {rate:.1f} GFLOP/s = {100 * rate / r['peak_gflops']:.0f}% of the fp32 matmul "
          f"peak {r['peak_gflops']:.0f} GFLOP/s (limit at peak {gflop / r['peak_gflops']:.2f} s); "
          f"peak memory {r['mem_mb'] / 1024:.2f} GB")
    print("  top operators (self CPU time, calls per pass): " + ", ".join(
        f"{k.removeprefix('aten::')} {100 * s:.0f}% ({n})" for k, s, n in r["ops"]))
    print(f"  copy_: {100 * r['copy'][0]:.1f}% ({r['copy'][1]} calls per pass)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-file", default=CONFIG)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=512, help="train image side")
    ap.add_argument("--infer-size", type=int, default=800, help="inference image side")
    ap.add_argument("--instances", type=int, default=25)
    ap.add_argument("--iters", type=int, default=1, help="timed passes after the counting pass")
    ap.add_argument("--top", type=int, default=8, help="operators listed")
    ap.add_argument("--levels", choices=["user", "standard", "both"], default="both")
    ap.add_argument("--work", choices=["train", "infer", "both"], default="both")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = ap.parse_args()
    levels = ["user", "standard"] if args.levels == "both" else [args.levels]
    works = ["train", "infer"] if args.work == "both" else [args.work]
    print(f"{args.config_file} {' '.join(args.opts)}\ndevice {args.device}, threads "
          f"{args.threads or torch.get_num_threads()}, levels user = the config's, standard = res3-res5 + 1 extra")
    ctx = mp.get_context("spawn")
    for lv in levels:
        for work in works:
            queue = ctx.Queue()
            proc = ctx.Process(target=_run, args=(lv, work, args, queue))
            proc.start()
            result = queue.get()
            proc.join()
            _report(result, args)


if __name__ == "__main__":
    main()
