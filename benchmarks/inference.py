"""CPU inference speed: PyTorch eager, PyTorch channels-last, onnxruntime, and the HF Mask2Former
ConvNeXt-T peer, at one size, in one run (images/s, ratios to the peer, peak memory of the process).

    PYTHONPATH=src python benchmarks/inference.py --config-file CONFIG [--size 800] [--iters 5] [--threads 2]

Weights are random (speed does not depend on them); the peer is built from its config (no download).
The model goes through ``ExportModule`` (normalisation + ``forward_tensors``), post-processing is
timed separately (``post`` column, PyTorch path). ONNX: a fixed-size export at ``--size`` (the
TorchScript exporter; the export itself is not timed). Timings on a shared machine are noisy: compare
the ratios of one run.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

import torch


def _time(fn, iters: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config-file", required=True)
    ap.add_argument("--size", type=int, default=800)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--skip", nargs="*", default=[], choices=["channels_last", "onnx", "peer"])
    ap.add_argument("opts", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    from surgdino.config import load_config
    from surgdino.deploy.export import _export, _sample, settings
    from surgdino.deploy.graph import ExportModule
    from surgdino.deploy.postprocess import postprocess
    from surgdino.modeling import build_model

    cfg = load_config(a.config_file, a.opts + ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    module = ExportModule(model).eval()
    div = model.size_divisibility
    side = -(-a.size // div) * div
    images, pad = _sample(side, side, 1, seed=0)
    pad[:] = False
    rows: dict[str, float] = {}
    with torch.no_grad():
        rows["pytorch eager"] = _time(lambda: module(images, pad), a.iters)
        raw = dict(zip(("pred_logits", "pred_boxes", "pred_embeds", "mask_features"), module(images, pad)))
        _, post = settings(cfg, model)
        rows["post-processing"] = _time(lambda: postprocess(raw, [(side, side)], [(side, side)], post), a.iters)
        if "channels_last" not in a.skip:
            cl = module.to(memory_format=torch.channels_last)
            rows["pytorch channels-last"] = _time(lambda: cl(images.contiguous(memory_format=torch.channels_last), pad),
                                                  a.iters)
            module.to(memory_format=torch.contiguous_format)
    print(f"after PyTorch: peak RSS {_peak_mb():.0f} MB", file=sys.stderr)
    if "onnx" not in a.skip:
        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "m.onnx")
            _export(module, (images, pad), path)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = a.threads
            sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            feed = {"images": images.numpy(), "pad_mask": pad.numpy()}
            rows["onnxruntime"] = _time(lambda: sess.run(None, feed), a.iters)
        print(f"after onnxruntime: peak RSS {_peak_mb():.0f} MB", file=sys.stderr)
    if "peer" not in a.skip:
        from transformers import ConvNextConfig, Mask2FormerConfig, Mask2FormerForUniversalSegmentation

        backbone = ConvNextConfig(depths=[3, 3, 9, 3], hidden_sizes=[96, 192, 384, 768],
                                  out_features=["stage1", "stage2", "stage3", "stage4"])
        peer = Mask2FormerForUniversalSegmentation(Mask2FormerConfig(backbone_config=backbone, num_labels=5)).eval()
        x = torch.randn(1, 3, side, side)
        with torch.no_grad():
            rows["peer: HF Mask2Former ConvNeXt-T"] = _time(lambda: peer(pixel_values=x), a.iters)
        print(f"after peer: peak RSS {_peak_mb():.0f} MB", file=sys.stderr)
    ref = rows.get("peer: HF Mask2Former ConvNeXt-T")
    print(f"{side}x{side}, {a.threads} threads, {a.iters} iterations, {cfg.MODEL.BACKBONE.NAME}")
    print(f"{'path':36s} {'s/img':>8s} {'img/s':>8s} {'x peer latency':>15s}")
    for name, s in rows.items():
        print(f"{name:36s} {s:8.3f} {1 / s:8.2f} {s / ref if ref else float('nan'):15.2f}")
    print(f"peak RSS of the process {_peak_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
