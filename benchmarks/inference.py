"""CPU inference speed against the HF Mask2Former ConvNeXt-T peer, in one run: images/s and peak memory of
PyTorch eager, PyTorch at the best CPU settings and onnxruntime, at 800² and the demo size, for the user
document's encoder levels (res2–res5) and the standard ones (res3–res5 + 1 extra, ``train_step.py --levels``);
printed as ratios to the peer and as a markdown table (the README's Deployment table).

    PYTHONPATH=src python benchmarks/inference.py                                  # the README table
    PYTHONPATH=src python benchmarks/inference.py --sizes 256 --iters 1 --levels user --no-compile  # smoke run

Paths (batch 1, a square uint8 input at the size, no padding; random weights: speed does not depend on them):
- ``pytorch eager``: ``ExportModule`` (normalisation + ``forward_tensors``) at torch's default settings; its
  ``post`` column is our post-processing (top-k masks at the input size), timed apart (no path includes it);
- ``pytorch best``: the fastest of channels-last on/off and ``torch.compile`` on/off (``--no-compile``
  skips it; its compile time is printed, not timed) at ``--threads``;
- ``onnxruntime``: a fixed-size export at the size (exported in its own process, not timed), all graph
  optimisations, ``--threads`` intra-op threads;
- ``peer``: ``Mask2FormerForUniversalSegmentation(pixel_values=...)`` from its config (ConvNeXt-T, same
  class count), its raw forward.

Each measurement runs in its own process (spawn), so its peak RSS is its own (the process's maximum
resident set: libraries, weights and activations). Latency is the median of ``--iters`` runs after
one warm-up. Timings on a shared machine are noisy: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from train_step import LEVELS, peer_config

ROOT = Path(__file__).resolve().parents[1]
USER_CONFIG = str(ROOT / "configs" / "dimaskdino_convnext_tiny_medical_instruments.yaml")
DEMO_CONFIG = str(ROOT / "src" / "surgdino" / "configs" / "demo" / "dimaskdino_atto_trays.yaml")
PATHS = ("pytorch eager", "pytorch best", "onnxruntime", "peer")


def _time(fn, iters: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _module(args, levels: str):
    from surgdino.config import load_config
    from surgdino.deploy.graph import ExportModule
    from surgdino.modeling import build_model

    cfg = load_config(args.config_file, LEVELS[levels] + ["MODEL.DEVICE", "cpu"] + args.opts)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    return cfg, model, ExportModule(model).eval()


def _inputs(side: int) -> tuple[torch.Tensor, torch.Tensor]:
    from surgdino.deploy.export import _sample

    images, pad = _sample(side, side, 1, seed=0)
    pad[:] = False
    return images, pad


def _job(kind: str, levels: str, side: int, args, onnx_path: str, queue) -> None:
    """One measurement in a fresh process: ``(seconds per image, peak RSS MB, note)`` on ``queue``."""
    note, extra = "", {}
    if kind != "pytorch eager":
        torch.set_num_threads(args.threads)
    with torch.no_grad():
        if kind == "peer":
            from transformers import Mask2FormerForUniversalSegmentation

            from surgdino.config import load_config

            classes = load_config(args.config_file, args.opts).MODEL.SEM_SEG_HEAD.NUM_CLASSES
            torch.manual_seed(0)
            peer = Mask2FormerForUniversalSegmentation(peer_config(classes)).eval()
            x = torch.randn(1, 3, side, side)
            s = _time(lambda: peer(pixel_values=x), args.iters)
        elif kind == "export":
            from surgdino.deploy.export import _export

            _, _, module = _module(args, levels)
            t = time.perf_counter()
            _export(module, _inputs(side), onnx_path)
            s, note = time.perf_counter() - t, "export time"
        elif kind == "onnxruntime":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.threads
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
            images, pad = _inputs(side)
            feed = {"images": images.numpy(), "pad_mask": pad.numpy()}
            s = _time(lambda: sess.run(None, feed), args.iters)
        else:
            cfg, model, module = _module(args, levels)
            images, pad = _inputs(side)
            if kind == "pytorch eager":
                from surgdino.deploy.export import settings
                from surgdino.deploy.postprocess import postprocess
                from surgdino.modeling.maskdino.model import RAW_OUTPUTS

                s = _time(lambda: module(images, pad), args.iters)
                raw = dict(zip(RAW_OUTPUTS, module(images, pad)))
                post = settings(cfg, model)[1]
                extra["post"] = _time(lambda: postprocess(raw, [(side, side)], [(side, side)], post), args.iters)
            else:  # pytorch best: the fastest setting
                tried = {}

                def run(m, fmt):
                    x = images.contiguous(memory_format=fmt)
                    return _time(lambda: m(x, pad), args.iters)

                fmts = {"contiguous": torch.contiguous_format, "channels-last": torch.channels_last}
                for name, fmt in fmts.items():
                    tried[name] = run(module.to(memory_format=fmt), fmt)
                if args.compile:
                    name = min(tried, key=tried.get)
                    fmt = fmts[name]
                    try:
                        compiled = torch.compile(module.to(memory_format=fmt))
                        t = time.perf_counter()
                        compiled(images.contiguous(memory_format=fmt), pad)
                        extra["compile_s"] = time.perf_counter() - t
                        tried["compile+" + name] = run(compiled, fmt)
                    except Exception as e:  # e.g. no C++ compiler for inductor: say why it was left out
                        extra["compile_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120]}"
                note = min(tried, key=tried.get)
                s = tried[note]
                extra["tried"] = {k: round(v, 3) for k, v in tried.items()}
    queue.put((s, _peak_mb(), note, extra))


def _job_safe(kind: str, levels: str, side: int, args, onnx_path: str, queue) -> None:
    try:
        _job(kind, levels, side, args, onnx_path, queue)
    except BaseException as e:  # the parent waits on the queue: always answer
        queue.put((float("nan"), _peak_mb(), f"failed: {type(e).__name__}: {str(e).strip()[:200]}", {}))
        raise


def _run(ctx, kind: str, levels: str, side: int, args, onnx_path: str = ""):
    queue = ctx.Queue()
    proc = ctx.Process(target=_job_safe, args=(kind, levels, side, args, onnx_path, queue))
    proc.start()
    try:
        out = queue.get()
    finally:
        proc.join()
    return out


def main(argv: list[str] | None = None) -> int:
    from surgdino.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--config-file", default=USER_CONFIG, help="our model (default: the user document's config)")
    demo_side = int(load_config(DEMO_CONFIG, []).INPUT.MIN_SIZE_TEST)
    ap.add_argument("--sizes", type=int, nargs="+", default=[800, demo_side],
                    help=f"input sides (default: 800 and the demo's test size {demo_side})")
    ap.add_argument("--levels", nargs="+", choices=["user", "standard"], default=["user", "standard"],
                    help="encoder levels: user = res2-res5 (the config's), standard = res3-res5 + 1 extra")
    ap.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    ap.add_argument("--iters", type=int, default=3, help="timed runs per path after one warm-up (median)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of the best and onnxruntime paths")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile in pytorch best")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides of our config")
    args = ap.parse_args(argv)

    ctx = mp.get_context("spawn")
    rows = []  # (levels, side, path, s, peak MB, note)
    print(f"config {os.path.relpath(args.config_file)}; {torch.get_num_threads()} default torch threads, "
          f"--threads {args.threads}; {os.cpu_count()} cores; {args.iters} timed runs after one warm-up", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for side in args.sizes:
            peer = _run(ctx, "peer", "", side, args) if "peer" in args.paths else None
            if peer:
                print(f"{side}x{side} peer: {peer[0]:.3f} s, peak RSS {peer[1]:.0f} MB", flush=True)
            for levels in args.levels:
                for path in [p for p in PATHS[:3] if p in args.paths]:
                    onnx_path = os.path.join(tmp, f"{levels}_{side}.onnx")
                    if path == "onnxruntime":
                        exp = _run(ctx, "export", levels, side, args, onnx_path)
                        print(f"{side}x{side} {levels}: exported in {exp[0]:.0f} s (peak RSS {exp[1]:.0f} MB)",
                              flush=True)
                    s, mb, note, extra = _run(ctx, path, levels, side, args, onnx_path)
                    detail = " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in extra.items())
                    print(f"{side}x{side} {levels} {path}: {s:.3f} s, peak RSS {mb:.0f} MB {note} {detail}",
                          flush=True)
                    rows.append((levels, side, path + (f" ({note})" if note else ""), s, mb))
                    if path == "onnxruntime":
                        os.remove(onnx_path)
                if peer:
                    rows.append((levels, side, "peer: HF Mask2Former ConvNeXt-T", peer[0], peer[1]))
    peers = {side: s for lv, side, p, s, _ in rows if p.startswith("peer")}
    peer_mb = {side: mb for lv, side, p, _, mb in rows if p.startswith("peer")}
    print()
    print(f"{'levels':9s} {'input':>9s} {'path':42s} {'s/img':>8s} {'img/s':>7s} {'x peer lat':>10s} "
          f"{'peak MB':>8s} {'x peer mem':>10s}")
    for lv, side, p, s, mb in rows:
        ref, ref_mb = peers.get(side), peer_mb.get(side)
        print(f"{lv:9s} {side:>4d}x{side:<4d} {p:42s} {s:8.3f} {1 / s:7.2f} {s / ref if ref else float('nan'):10.2f} "
              f"{mb:8.0f} {mb / ref_mb if ref_mb else float('nan'):10.2f}")
    for lv in args.levels:
        for side in args.sizes:
            ours = [(s, p) for l_, sd, p, s, _ in rows if l_ == lv and sd == side and not p.startswith("peer")]
            if ours and side in peers:
                s, p = min(ours)
                print(f"fastest {lv} {side}x{side}: {p} at {s / peers[side]:.2f}x the peer's latency")
    print("\nmarkdown (README, Deployment):\n")
    print("| encoder levels | input | path | s / image | images / s | × peer latency | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|")
    for lv, side, p, s, mb in rows:
        ref = peers.get(side)
        levels_name = "res2–res5 (user)" if lv == "user" else "res3–res5 (standard)"
        print(f"| {levels_name} | {side}² | {p} | {s:.3f} | {1 / s:.2f} | {s / ref if ref else float('nan'):.2f} | "
              f"{mb:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
