"""Criterion cost alone: forward + backward of ``SetCriterion`` on decoder outputs of the configured shapes.

The decoder outputs' structure (layers, interm, denoising groups, DI's token-interaction outputs) comes from one
real forward of the configured model at a small image; every output tensor is then replaced by a random leaf of
the size a ``--size``² batch gives (mask features at ``--size``/4), and the targets' masks are upsampled to
``--size``². Times are process CPU times (fairer on a shared machine), the best of ``--iters``; the stacked
mask losses (``SetCriterion.batched_masks = True``) and the per-layer path (the default) are timed interleaved
in one process, with the same random points (same seed), and their losses compared. ``--step`` times whole
train steps of the model at ``--size`` instead (median of ``--iters``).

    python benchmarks/criterion.py --threads 1                      # the user document's configuration
    python benchmarks/criterion.py --size 256 MODEL.MaskDINO.TRAIN_NUM_POINTS 4096
    python benchmarks/criterion.py --step --config-file src/surgdino/configs/demo/dimaskdino_atto_trays.yaml \
        --size 256 --batch 4 --instances 8 --iters 5               # the demo's train step
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import _batch  # noqa: E402  (synthetic batch of the step benchmark)

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                      "dimaskdino_convnext_tiny_medical_instruments.yaml")


def _scaled(outputs, factor: int, memo: dict):
    """``outputs`` with every float tensor a fresh random leaf (shared tensors stay shared); ``mask_features``
    ``factor`` times larger in each spatial dimension."""
    if isinstance(outputs, dict):
        return {k: (_scaled(v, factor, memo) if k != "mask_features" else _feats(v, factor, memo))
                for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_scaled(v, factor, memo) for v in outputs)
    if isinstance(outputs, torch.Tensor) and outputs.dtype.is_floating_point:
        if id(outputs) not in memo:
            memo[id(outputs)] = outputs.detach().clone().requires_grad_()
        return memo[id(outputs)]
    return outputs


def _feats(t: torch.Tensor, factor: int, memo: dict) -> torch.Tensor:
    if id(t) not in memo:
        b, d, h, w = t.shape
        memo[id(t)] = torch.randn(b, d, h * factor, w * factor).requires_grad_()
    return memo[id(t)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-file", default=CONFIG)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=512, help="train image side the tensors are sized for")
    ap.add_argument("--capture-size", type=int, default=128, help="image side of the one real forward")
    ap.add_argument("--instances", type=int, default=25)
    ap.add_argument("--iters", type=int, default=2, help="timed rounds (each path once per round)")
    ap.add_argument("--step", action="store_true",
                    help="time the whole train step (forward + backward at --size) instead of the criterion alone")
    ap.add_argument("--chunk", type=int, default=0, help="SetCriterion.mask_batch_candidates (0: its default)")
    ap.add_argument("--profile", action="store_true", help="top operators of each path (one extra pass each)")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = ap.parse_args()
    from surgdino.config import load_config
    from surgdino.modeling import build_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(args.config_file, args.opts + ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg).train()
    captured = {}

    class Capture(torch.nn.Module):
        def forward(self, out, targets):
            captured["out"], captured["targets"] = out, targets
            return {"loss": out["pred_logits"].sum() * 0.0}

    if args.step:
        return _time_steps(model, _batch(args.batch, args.size, args.instances, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES),
                           args)
    criterion, model.criterion = model.criterion, Capture()
    with torch.no_grad():
        model(_batch(args.batch, args.capture_size, args.instances, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES))
    if args.chunk:
        criterion.mask_batch_candidates = args.chunk
    factor = args.size // args.capture_size
    outputs = _scaled(captured["out"], factor, {})
    targets = [dict(t, masks=F.interpolate(t["masks"][None].float(), scale_factor=factor)[0] > 0.5)
               for t in captured["targets"]]
    q = outputs["pred_logits"].shape[1]
    print(f"{args.config_file} {' '.join(args.opts)}\nthreads {args.threads}, batch {args.batch} at {args.size}², "
          f"{args.instances} instances/image, {q} queries, mask features "
          f"{tuple(outputs['mask_features'].shape[-2:])}, {criterion.num_points} points, "
          f"{len(outputs.get('aux_outputs', []))} aux + {len(outputs.get('dn_outputs') or [])} dn layers", flush=True)

    def run(batched: bool) -> tuple[float, dict]:
        criterion.batched_masks = batched
        torch.manual_seed(1)
        t = time.process_time()
        losses = criterion(outputs, targets)
        sum(losses.values()).backward()
        return time.process_time() - t, {k: float(v.detach()) for k, v in losses.items()}

    times = {True: [], False: []}
    for _ in range(args.iters):
        for batched in (False, True):
            dt, losses = run(batched)
            times[batched].append(dt)
            if batched:
                new = losses
            else:
                ref = losses
    if args.profile:
        for batched in (False, True):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                run(batched)
            events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
            total = sum(e.self_cpu_time_total for e in events)
            top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]
            print(("batched" if batched else "per-layer") + " top operators (self CPU, calls): " + ", ".join(
                f"{e.key.removeprefix('aten::')} {100 * e.self_cpu_time_total / total:.0f}% ({e.count})" for e in top))
    worst = max(abs(new[k] - ref[k]) / max(abs(ref[k]), 1e-12) for k in ref)
    before, after = min(times[False]), min(times[True])
    print(f"criterion forward + backward, process CPU s (best of {args.iters}): per-layer {before:.2f}, "
          f"batched {after:.2f}, ratio {after / before:.2f}; largest relative loss difference {worst:.1e}")


def _time_steps(model: torch.nn.Module, batch: list[dict], args: argparse.Namespace) -> None:
    """Whole train steps (forward + backward), per-layer and stacked mask losses alternating; one warm-up round."""
    times = {True: [], False: []}
    for r in range(args.iters + 1):
        for batched in (False, True):
            model.criterion.batched_masks = batched
            model.zero_grad(set_to_none=True)
            torch.manual_seed(r)
            t = time.process_time()
            sum(model(batch).values()).backward()
            if r:
                times[batched].append(time.process_time() - t)
    before, after = statistics.median(times[False]), statistics.median(times[True])
    print(f"{args.config_file} {' '.join(args.opts)}\nthreads {args.threads}, batch {args.batch} at {args.size}², "
          f"{args.instances} instances/image: train step, process CPU s (median of {args.iters}): per-layer "
          f"{before:.3f}, stacked {after:.3f}, ratio {after / before:.3f}")


if __name__ == "__main__":
    main()
