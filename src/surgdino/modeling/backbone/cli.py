"""``surgdino check-backbone``: build the configured backbone alone and exercise it on dummy batches.

The user document's standalone backbone test: for several input sizes (square, non-square, not a
multiple of the stride) it prints output names, shapes, channels and strides, time per batch and
peak memory, then runs one backward pass and says whether gradients reach the trainable parameters.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from typing import TYPE_CHECKING

from surgdino.errors import ConfigError

if TYPE_CHECKING:
    import torch

DEFAULT_SIZES = ("224x224", "320x480", "385x513")
DESCRIPTION = """Build the configured backbone (MODEL.BACKBONE.NAME) alone and exercise it on dummy batches:
for each size (square, non-square, not a multiple of the stride) print output names, shapes, channels,
strides, time per batch and peak memory; then run one backward pass and report whether gradients reach
every trainable parameter. Exit code 0 when all checks pass, 1 otherwise.

example: surgdino check-backbone --sizes 224x224 480x640 MODEL.BACKBONE.NAME surgeryclip \\
             MODEL.SURGERYCLIP.CKPT /models/ViT-B-16.pt MODEL.SURGERYCLIP.TRAINABLE_BLOCKS 2"""


_SIZE = re.compile(r"^\d+[xX]\d+$")


def split_sizes(tokens: list[str]) -> tuple[list[str], list[str]]:
    """``--sizes 224x224 480x640 MODEL.X v``: argparse's ``nargs="+"`` takes every token; the sizes are
    the leading ``HxW`` ones and the first other token starts the ``KEY VALUE`` overrides."""
    n = 0
    while n < len(tokens) and _SIZE.match(tokens[n]):
        n += 1
    if n == 0 and tokens:
        _parse_size(tokens[0])  # the error for a malformed first size
    return list(tokens[:n]), list(tokens[n:])


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--sizes: {text!r} is not HxW (e.g. 224x224 or 480x640)") from None
    if h <= 0 or w <= 0:
        raise ConfigError(f"--sizes: {text!r} must have positive sides")
    return h, w


def _device(name: str) -> torch.device:
    from surgdino.device import resolve_device

    return resolve_device(name, "--device")



def _shape_text(out: dict) -> str:
    parts = []
    for name, value in out.items():
        if hasattr(value, "decompose"):
            f, m = value.decompose()
            parts.append(f"{name}: {tuple(f.shape)} mask {tuple(m.shape) if m is not None else None}")
        else:
            parts.append(f"{name}: {tuple(value.shape)}")
    return ", ".join(parts)


def check_backbone(cfg, sizes: list[tuple[int, int]], batch_size: int = 2, device: str = "auto",
                   repeats: int = 2, out=None) -> bool:
    """Build ``cfg``'s backbone and check shapes, speed, memory and gradient flow; True when all checks pass."""
    out = out or sys.stdout
    import torch

    from surgdino.device import peak_memory_mb
    from surgdino.modeling.backbone import build_backbone
    from surgdino.structures import batch_images

    dev = _device(device if device != "auto" else cfg.MODEL.DEVICE)
    t0 = time.perf_counter()
    backbone = build_backbone(cfg).to(dev)
    print(f"backbone {cfg.MODEL.BACKBONE.NAME}: built in {time.perf_counter() - t0:.1f}s on {dev}", file=out)
    shapes = backbone.output_shape()
    n_all = sum(p.numel() for p in backbone.parameters())
    trainable = [(n, p) for n, p in backbone.named_parameters() if p.requires_grad]
    n_train = sum(p.numel() for _, p in trainable)
    print(f"parameters: {n_all / 1e6:.2f}M, trainable {n_train / 1e6:.2f}M in {len(trainable)} tensors; "
          f"size_divisibility {backbone.size_divisibility}", file=out)
    print("outputs: " + ", ".join(f"{k} (channels {s.channels}, stride {s.stride})" for k, s in shapes.items()), file=out)
    ok = True
    backbone.eval()
    for h, w in sizes:
        images = torch.randn(batch_size, 3, h, w, device=dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        with torch.no_grad():
            feats = backbone(images)  # warm-up (and position-table cache)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            for _ in range(repeats):
                feats = backbone(images)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            dt = (time.perf_counter() - t0) / repeats
        mem, what = peak_memory_mb(dev)
        print(f"[{h}x{w}] x{batch_size}: {_shape_text(feats)}; {dt * 1000:.0f} ms/batch "
              f"({batch_size / dt:.1f} img/s), {what} {mem:.0f} MiB", file=out)
        for name, f in feats.items():
            spec = shapes.get(name)
            if spec is None or f.shape[1] != spec.channels:
                print(f"  MISMATCH: output {name} has {f.shape[1]} channels, output_shape() says {spec}", file=out)
                ok = False
            elif not torch.isfinite(f).all():
                print(f"  NON-FINITE values in output {name}", file=out)
                ok = False
    # A padded batch of two sizes through the NestedTensor interface (GroundingDINO's), where offered.
    (h0, w0), (h1, w1) = sizes[0], sizes[-1]
    nested = batch_images([torch.randn(3, h0, w0, device=dev), torch.randn(3, h1, w1, device=dev)])
    if getattr(backbone, "accepts_nested_tensor", False):
        with torch.no_grad():
            print(f"NestedTensor {tuple(nested.tensors.shape)} → {_shape_text(backbone(nested))}", file=out)
    # Gradient flow: one backward pass, in eval mode so that stochastic depth / dropout skip nothing.
    h, w = sizes[0]
    with torch.enable_grad():
        feats = backbone(torch.randn(batch_size, 3, h, w, device=dev))
    loss = sum(f.float().pow(2).mean() for f in feats.values())
    if not trainable:
        print("gradients: backbone fully frozen (0 trainable parameters); nothing to check", file=out)
    else:
        loss.backward()
        reached = [n for n, p in trainable if p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0]
        missed = [n for n, _ in trainable if n not in set(reached)]
        print(f"gradients: reach {len(reached)}/{len(trainable)} trainable tensors"
              + (f"; none for {missed[:5]}" if missed else ""), file=out)
        ok = ok and not missed
    print("check-backbone: " + ("OK" if ok else "FAILED"), file=out)
    return ok


def _run(args: argparse.Namespace) -> int:
    from surgdino.config import load_config

    sizes, extra = split_sizes(list(args.sizes or DEFAULT_SIZES))
    cfg = load_config(args.config_file, extra + list(args.opts or []))
    sizes = [_parse_size(s) for s in sizes]
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    return 0 if check_backbone(cfg, sizes, batch_size=args.batch_size, device=args.device, repeats=args.repeats) else 1


def register(sub) -> None:
    from surgdino.cliutil import add_config_arguments

    p = sub.add_parser("check-backbone", help="build the configured backbone alone; print shapes, time, memory, gradient flow",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", metavar="HxW", help=f"input sizes to try (default {' '.join(DEFAULT_SIZES)})")
    p.add_argument("--batch-size", type=int, default=2, help="images per dummy batch (default 2)")
    p.add_argument("--repeats", type=int, default=2, help="timed forward passes per size (default 2)")
    p.add_argument("--device", default="auto", help="auto (MODEL.DEVICE), cpu, cuda, cuda:N")
    add_config_arguments(p)
    p.set_defaults(func=_run)
