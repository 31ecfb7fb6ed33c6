"""Multi-scale deformable attention: the sparse-matrix kernel against the previous grid_sample kernel
(``ms_deform_attn_core_grid``), same inputs, same run: forward, forward + backward, peak memory.

Sizes of the user document's configuration: 4 levels res2–res5 of a ``--size``² image (strides 4–32), batch
``--batch``, d = 256, 8 heads, 4 points; "encoder" = every token a query (reference point at its own centre),
"decoder" = ``--queries`` queries at random reference points. Offsets ~ the init ring + N(0, 1.5) pixels.
Each kernel and case runs in its own process so that its peak memory (max RSS above the inputs', or CUDA
max allocated) is its own.

    python benchmarks/msda.py                      # 512², batch 2, 1 thread
    python benchmarks/msda.py --size 256 --threads 2
    python benchmarks/msda.py --compile            # also torch.compile(ms_deform_attn_core)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from roofline import peak_memory_mb, reset_peak_memory  # noqa: E402


def inputs(size: int, batch: int, queries: int | None, device: str, seed: int = 0, heads: int = 8,
           channels: int = 32, points: int = 4) -> tuple:
    """value [B, S, nH, C], shapes, locations [B, Q, nH, L, P, 2], weights [B, Q, nH, L, P] (softmax-like)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(size // s, size // s) for s in (4, 8, 16, 32)]
    L, S = len(shapes), sum(h * w for h, w in shapes)
    if queries is None:  # encoder: each token's centre on every level
        ref = torch.cat([torch.stack(torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w,
                                                    indexing="ij")[::-1], -1).view(-1, 2) for h, w in shapes])
        ref = ref[None, :, None].expand(batch, S, L, 2)  # [B, S, L, 2]
        queries = S
    else:
        ref = torch.rand(batch, queries, 1, 2, generator=g).expand(batch, queries, L, 2)
    wh = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)  # [L, 2]
    off = torch.randn(batch, queries, heads, L, points, 2, generator=g) * 1.5 + torch.randn(heads, 1, points, 2,
                                                                                            generator=g) * 2
    loc = ref[:, :, None, :, None] + off / wh[:, None]  # [B, Q, nH, L, P, 2]
    value = torch.randn(batch, S, heads, channels, generator=g)
    attn = torch.rand(batch, queries, heads, L * points, generator=g).softmax(-1).view(batch, queries, heads, L, points)
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in (value, shapes, loc, attn))


_clock = time.perf_counter


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _kernels(compile_: bool) -> dict:
    from surgdino.modeling.layers.ms_deform_attn import ms_deform_attn_core
    from surgdino.modeling.layers.ms_deform_attn_grid import (
        ms_deform_attn_core_grid as ms_deform_attn_core_reference,
    )
    out = {"reference": ms_deform_attn_core_reference, "sparse": ms_deform_attn_core}
    if compile_:
        out["compiled"] = torch.compile(ms_deform_attn_core, dynamic=False)
    return out


def _step(fn, value, shapes, loc, attn, grad, backward: bool) -> None:
    if not backward:
        with torch.no_grad():
            fn(value, shapes, loc, attn)
        return
    v, lc, a = (x.detach().requires_grad_() for x in (value, loc, attn))
    torch.autograd.grad(fn(v, shapes, lc, a), [v, lc, a], grad)


def _case(case: str, args: argparse.Namespace) -> tuple:
    value, shapes, loc, attn = inputs(args.size, args.batch, None if case == "encoder" else args.queries, args.device)
    grad = torch.randn(loc.shape[0], loc.shape[1], value.shape[2] * value.shape[3], device=args.device)
    return value, shapes, loc, attn, grad


def _memory_worker(kernel: str, case: str, args: argparse.Namespace, q: mp.Queue) -> None:
    """Peak memory of one forward + backward above the inputs', in a fresh process."""
    torch.set_num_threads(args.threads)
    fn = _kernels(kernel == "compiled")[kernel]
    data = _case(case, args)
    device = torch.device(args.device)
    reset_peak_memory(device)
    base = peak_memory_mb(device)
    _step(fn, *data, backward=True)
    q.put(peak_memory_mb(device) - base)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--queries", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the sparse kernel")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with the process's CPU time (less skewed on a shared, overloaded machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global _clock
    if args.cpu_time:
        _clock = time.process_time
    kernels = _kernels(args.compile)
    ctx = mp.get_context("spawn")
    print(f"size {args.size}², batch {args.batch}, res2-res5, 8 heads x 32 channels, 4 points, "
          f"{args.threads} thread(s), {args.device}; time = best of {args.iters}, kernels interleaved"
          + (", CPU time" if args.cpu_time else ", wall time"))
    for case in ("encoder", "decoder"):
        data = _case(case, args)
        times: dict[str, dict[str, list[float]]] = {k: {"forward": [], "fwd+bwd": []} for k in kernels}
        first = {}
        for it in range(args.iters + 1):  # round 0 warms up (and compiles)
            for name, fn in kernels.items():
                for kind in ("forward", "fwd+bwd"):
                    _sync(args.device)
                    t = _clock()
                    _step(fn, *data, backward=kind == "fwd+bwd")
                    _sync(args.device)
                    if it:
                        times[name][kind].append(_clock() - t)
                    else:
                        first.setdefault(name, _clock() - t)
        for name in kernels:
            q = ctx.Queue()
            p = ctx.Process(target=_memory_worker, args=(name, case, args, q))
            p.start()
            peak = q.get()
            p.join()
            r = {k: min(v) for k, v in times[name].items()}
            ref = {k: min(v) for k, v in times["reference"].items()}
            print(f"{case:8s} {name:10s} forward {r['forward'] * 1e3:8.1f} ms ({ref['forward'] / r['forward']:4.1f}x)"
                  f"  fwd+bwd {r['fwd+bwd'] * 1e3:8.1f} ms ({ref['fwd+bwd'] / r['fwd+bwd']:4.1f}x)"
                  f"  peak fwd+bwd +{peak:6.0f} MB  first call {first[name]:.1f} s", flush=True)


if __name__ == "__main__":
    main()
