"""Train-step time and peak memory of our MaskDINO (ConvNeXt-T, the user document's sizes) against HF
transformers' Mask2Former with a ConvNeXt-T backbone (random init, its own defaults), same batch; plus
inference latency at 800×800. Each model runs in its own process so peak memory is its own.

Our encoder levels (``--levels``): ``user`` = the user document's 4 levels res2–res5 (strides 4–32,
~4× the encoder tokens of the peer, whose encoder reads strides 8–32); ``standard`` = MaskDINO's
res3–res5 plus one extra stride-64 level. ``--decoder both`` adds DIMaskDINODecoder rows at the user
document's sizes (FIRST_SELECTED_QUERIES 800, NUM_GUIDING_TOKENS 100, TI_LAYERS 3) when it is registered.
Our inference includes post-processing (top-300 masks at the original size); the peer's is its raw forward.

``--work peer`` sizes our model like the peer instead (100 queries, 9 decoder layers + the initial
prediction = the peer's 10 supervised layers, 12544 points, no denoising, encoder on res3-res5): same
supervised work, so the ratio measures the implementation rather than the configuration. MaskDINO's own
extras (box heads and losses, the encoder's selected-query losses) stay on.

    python benchmarks/train_step.py                       # both level set-ups, MaskDINODecoder, vs the peer
    python benchmarks/train_step.py --levels user --decoder both --iters 1
    python benchmarks/train_step.py --work peer --levels peer   # our model sized like the peer
    python benchmarks/train_step.py --small               # a quick smoke run
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time

import torch


def _batch(b: int, size: int, n: int, classes: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(b):
        masks = torch.zeros(n, size, size, dtype=torch.bool)
        boxes = torch.zeros(n, 4)
        for i in range(n):
            x0, y0 = torch.randint(0, size - 64, (2,), generator=g).tolist()
            w, h = torch.randint(16, 64, (2,), generator=g).tolist()
            masks[i, y0:y0 + h, x0:x0 + w] = True
            boxes[i] = torch.tensor([x0, y0, x0 + w, y0 + h], dtype=torch.float32)
        out.append({"image": torch.randint(0, 255, (3, size, size), dtype=torch.uint8, generator=g),
                    "height": size, "width": size, "image_id": 0, "file_name": "",
                    "instances": {"boxes": boxes, "masks": masks,
                                  "classes": torch.randint(0, classes, (n,), generator=g)}})
    return out


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


LEVELS = {
    "user": ["MODEL.SEM_SEG_HEAD.NUM_FEATURE_LEVELS", "4",
             "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES", "['res2','res3','res4','res5']",
             "MODEL.SEM_SEG_HEAD.TOTAL_NUM_FEATURE_LEVELS", "4"],
    "standard": ["MODEL.SEM_SEG_HEAD.NUM_FEATURE_LEVELS", "3",
                 "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES", "['res3','res4','res5']",
                 "MODEL.SEM_SEG_HEAD.TOTAL_NUM_FEATURE_LEVELS", "4"],
    "peer": ["MODEL.SEM_SEG_HEAD.NUM_FEATURE_LEVELS", "3",
             "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES", "['res3','res4','res5']",
             "MODEL.SEM_SEG_HEAD.TOTAL_NUM_FEATURE_LEVELS", "3"],
}
DI = ["MODEL.MaskDINO.FIRST_SELECTED_QUERIES", "800", "MODEL.MaskDINO.NUM_GUIDING_TOKENS", "100",
      "MODEL.MaskDINO.TI_LAYERS", "3"]


def _ours_opts(args, levels: str, decoder: str) -> list[str]:
    opts = ["MODEL.BACKBONE.NAME", "convnext_tiny", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", str(args.classes),
            "MODEL.MaskDINO.NUM_OBJECT_QUERIES", str(args.queries), "MODEL.MaskDINO.DEC_LAYERS", str(args.layers),
            "MODEL.MaskDINO.TRAIN_NUM_POINTS", str(args.points), "MODEL.MaskDINO.DN_NUM", "150",
            "MODEL.MaskDINO.DN", "no" if args.work == "peer" else "seg",
            "TEST.DETECTIONS_PER_IMAGE", "300", "MODEL.MaskDINO.TRANSFORMER_DECODER_NAME", decoder] + LEVELS[levels]
    if decoder == "DIMaskDINODecoder":
        opts += DI
        if args.small:
            opts += ["MODEL.MaskDINO.FIRST_SELECTED_QUERIES", "100", "MODEL.MaskDINO.NUM_GUIDING_TOKENS", "20"]
    if args.small:
        opts += ["MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1"]
    return opts


def _ours(args, batch, device, levels: str, decoder: str):
    from surgdino.config import load_config
    from surgdino.modeling import build_model

    model = build_model(load_config(None, _ours_opts(args, levels, decoder))).to(device)

    def step():
        losses = model(batch)
        sum(losses.values()).backward()

    def infer(x):
        model.eval()
        with torch.no_grad():
            model(x)
        model.train()

    return model, step, infer


def peer_config(classes: int):
    """HF transformers' Mask2Former with a ConvNeXt-T backbone (its own defaults, random init, no download)."""
    from transformers import ConvNextConfig, Mask2FormerConfig

    bb = ConvNextConfig(depths=[3, 3, 9, 3], hidden_sizes=[96, 192, 384, 768],
                        out_features=["stage1", "stage2", "stage3", "stage4"])
    return Mask2FormerConfig(backbone_config=bb, num_labels=classes, use_pretrained_backbone=False)


def _peer(args, batch, device):
    from transformers import Mask2FormerForUniversalSegmentation

    cfg = peer_config(args.classes)
    if args.small:
        cfg.encoder_layers = 1
    model = Mask2FormerForUniversalSegmentation(cfg).to(device).train()
    mean = torch.tensor([123.675, 116.28, 103.53], device=device).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375], device=device).view(1, 3, 1, 1)
    pix = (torch.stack([x["image"] for x in batch]).to(device).float() - mean) / std
    mask_labels = [x["instances"]["masks"].to(device).float() for x in batch]
    class_labels = [x["instances"]["classes"].to(device) for x in batch]

    def step():
        out = model(pixel_values=pix, mask_labels=mask_labels, class_labels=class_labels)
        out.loss.backward()

    def infer(x):
        model.eval()
        p = (torch.stack([i["image"] for i in x]).to(device).float() - mean) / std
        with torch.no_grad():
            model(pixel_values=p)
        model.train()

    return model, step, infer


def _run(which: str, args, queue) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads) if args.threads else None
    device = torch.device(args.device)
    batch = _batch(args.batch, args.size, args.instances, args.classes)
    if which == "peer":
        model, step, infer = _peer(args, batch, device)
    else:
        levels, decoder = which.split("/")
        model, step, infer = _ours(args, batch, device, levels, decoder)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = _peak_mb(device) if device.type == "cuda" else 0.0
    times = []
    for i in range(args.warmup + args.iters):
        model.zero_grad(set_to_none=True)
        sync()
        t = time.perf_counter()
        step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    peak = _peak_mb(device) - base
    big = _batch(1, args.infer_size, args.instances, args.classes, seed=1)
    lat = []
    for _ in range(max(args.iters, 2)):
        sync()
        t = time.perf_counter()
        infer(big)
        sync()
        lat.append(time.perf_counter() - t)
    queue.put((which, statistics.median(times), peak, statistics.median(lat)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--infer-size", type=int, default=800)
    p.add_argument("--instances", type=int, default=25)
    p.add_argument("--classes", type=int, default=500)
    p.add_argument("--queries", type=int, default=400)
    p.add_argument("--layers", type=int, default=9)
    p.add_argument("--points", type=int, default=16384)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--levels", choices=["user", "standard", "peer", "both"], default="both",
                   help="our encoder levels: user = res2-res5, standard = res3-res5 + 1 extra (MaskDINO), "
                        "peer = res3-res5 like the peer; both = user and standard")
    p.add_argument("--work", choices=["user", "peer"], default="user",
                   help="our sizes: user = the user document's (400 queries, 9 layers, 16384 points, denoising); "
                        "peer = the peer's supervised work (100 queries, 9+1 layers, 12544 points, no denoising)")
    p.add_argument("--decoder", choices=["MaskDINODecoder", "DIMaskDINODecoder", "both"], default="MaskDINODecoder")
    p.add_argument("--no-peer", action="store_true", help="only our rows (no ratios against the peer)")
    p.add_argument("--small", action="store_true", help="tiny sizes for a smoke run")
    args = p.parse_args()
    if args.work == "peer":
        args.queries, args.layers, args.points = 100, 9, 12544
    if args.small:
        args.size, args.infer_size, args.instances, args.iters, args.warmup = 128, 160, 5, 1, 0
        args.queries, args.layers, args.points = 50, 2, 1024
    import surgdino.modeling.maskdino.model  # noqa: F401  (fills the decoder registry)
    from surgdino.registry import DECODER_REGISTRY

    decoders = ["MaskDINODecoder", "DIMaskDINODecoder"] if args.decoder == "both" else [args.decoder]
    if "DIMaskDINODecoder" in decoders and "DIMaskDINODecoder" not in DECODER_REGISTRY:
        print("DIMaskDINODecoder is not registered: its rows are skipped")
        decoders.remove("DIMaskDINODecoder")
    levels = ["user", "standard"] if args.levels == "both" else [args.levels]
    runs = [f"{lv}/{dec}" for lv in levels for dec in decoders] + ([] if args.no_peer else ["peer"])
    print(f"device {args.device}, batch {args.batch}, {args.size}x{args.size}, {args.instances} instances, "
          f"{args.classes} classes; ours: ConvNeXt-T, {args.queries} queries, {args.layers} decoder layers, "
          f"{args.points} points, denoising {'no' if args.work == 'peer' else 'seg (150)'}; levels user = res2-res5, "
          f"standard = res3-res5 + 1 extra, peer = res3-res5", flush=True)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    res = {}
    for which in runs:
        proc = ctx.Process(target=_run, args=(which, args, queue))
        proc.start()
        w, t, m, lat = queue.get()
        proc.join()
        res[w] = (t, m, lat)
        print(f"{w:28s} step {t * 1000:9.1f} ms  peak {m:9.1f} MB  infer@{args.infer_size} {lat * 1000:9.1f} ms",
              flush=True)
    for w, (t, m, lat) in res.items():
        if w != "peer" and "peer" in res:
            tp, mp_, lp = res["peer"]
            print(f"ratio {w} / peer: step time {t / tp:.2f}x  peak memory {m / max(mp_, 1e-9):.2f}x  "
                  f"inference {lat / lp:.2f}x")
    for lv in levels:
        a, b = res.get(f"{lv}/DIMaskDINODecoder"), res.get(f"{lv}/MaskDINODecoder")
        if a and b:
            print(f"ratio {lv}: DIMaskDINODecoder / MaskDINODecoder: step time {a[0] / b[0]:.2f}x  "
                  f"peak memory {a[1] / max(b[1], 1e-9):.2f}x  inference {a[2] / b[2]:.2f}x")


if __name__ == "__main__":
    main()
