"""``surgdino check-detector``: build the configured detector and exercise it on a dummy padded batch.

The user document's ``run_gdino_sanity.py``: the whole detector (GroundingDINO with its prompt, or
any other meta-architecture) on two images of different sizes (so the batch is padded), once in
eval (output shapes of every part and of the results) and for one training step (losses,
backward, optimizer step). Prints time and peak memory of both, and whether gradients reach every
trainable part. Exit code 0 when all checks pass, 1 otherwise.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import torch
from torch import nn

DEFAULT_PROMPT = "mayo scissors . allis forceps . kelly clamp . no. 10 scalpel"
def _shapes(value: Any) -> str:
    """Shapes of a module output: tensors, tuples/lists and dicts of them."""
    if torch.is_tensor(value):
        return "x".join(str(s) for s in value.shape) or "scalar"
    if hasattr(value, "decompose"):
        f, m = value.decompose()
        return f"NestedTensor({_shapes(f)}, mask {_shapes(m) if m is not None else None})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_shapes(v)}" for k, v in value.items() if _shapes(v)) + "}"
    if isinstance(value, (list, tuple)):
        inner = [s for s in (_shapes(v) for v in value) if s]
        return "[" + ", ".join(inner[:6]) + (", ..." if len(inner) > 6 else "") + "]" if inner else ""
    return ""


def dummy_batch(sizes: list[tuple[int, int]], num_classes: int, *, masks: bool, seed: int = 0) -> list[dict]:
    """Images of the given sizes (uint8 noise) with three boxes each (and box-shaped masks when asked)."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for h, w in sizes:
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        x0 = torch.rand(3, generator=g) * w * 0.6
        y0 = torch.rand(3, generator=g) * h * 0.6
        boxes = torch.stack([x0, y0, x0 + w * 0.3, y0 + h * 0.3], 1)  # [3, 4] xyxy pixels
        inst: dict[str, torch.Tensor] = {"boxes": boxes, "classes": torch.arange(3) % max(num_classes, 1)}
        if masks:
            m = torch.zeros(3, h, w, dtype=torch.bool)
            for k, (a, b, c, d) in enumerate(boxes.round().long().tolist()):
                m[k, b:d, a:c] = True
            inst["masks"] = m
        batch.append({"image": image, "height": h, "width": w, "image_id": len(batch), "instances": inst})
    return batch


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _parts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_children() if any(True for _ in m.parameters())]


def _prompt_names(cfg, prompt: str | None) -> list[str]:
    from surgdino.modeling.grounding.prompts import split_prompt

    if prompt:
        return split_prompt(prompt)
    try:
        from surgdino.engine.defaults import register_datasets, thing_classes

        register_datasets(cfg)
        names = thing_classes(cfg)
    except Exception:  # no dataset registered: a default prompt
        names = []
    return list(names) or split_prompt(DEFAULT_PROMPT)


def check_detector(cfg, *, sizes: list[tuple[int, int]], prompt: str | None = None, device: str = "auto",
                   out: TextIO | None = None) -> bool:
    """Build ``cfg``'s detector and check eval outputs, a training step and gradient flow; True when all pass."""
    from surgdino.device import peak_memory_mb, resolve_device
    from surgdino.engine.defaults import Trainer
    from surgdino.engine.optimizer import build_optimizer

    out = out or sys.stdout
    dev = resolve_device(device if device != "auto" else cfg.MODEL.DEVICE, "--device")
    t0 = time.perf_counter()
    model = Trainer.build_model(cfg).to(dev)
    print(f"detector {cfg.MODEL.META_ARCHITECTURE} (backbone {cfg.MODEL.BACKBONE.NAME}): built in "
          f"{time.perf_counter() - t0:.1f}s on {dev}", file=out)
    for name, part in _parts(model):
        n = sum(p.numel() for p in part.parameters())
        t = sum(p.numel() for p in part.parameters() if p.requires_grad)
        print(f"  {name}: {n / 1e6:.2f}M parameters, {t / 1e6:.2f}M trainable", file=out)
    names = _prompt_names(cfg, prompt)
    if hasattr(model, "set_class_names"):
        model.set_class_names(names)
        p = model.prompt()
        print(f"prompt ({p.mode}): {len(names)} classes, {p.num_tokens} text tokens"
              + (f", {p.num_dropped} cut off" if p.num_dropped else "") + f": {p.caption[:100]!r}", file=out)
    batch = dummy_batch(sizes, len(names), masks=bool(cfg.MODEL.MASK_ON) and cfg.MODEL.META_ARCHITECTURE != "GroundingDINO")
    ok = True

    # eval: output shapes of each part and of the results
    seen: dict[str, str] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            seen.setdefault(name, _shapes(output))
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in _parts(model)]
    model.eval()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with torch.no_grad():
        _sync(dev)
        t0 = time.perf_counter()
        results = model(batch)
        _sync(dev)
        dt = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    mem, what = peak_memory_mb(dev)
    print(f"eval: padded batch {' + '.join(f'{h}x{w}' for h, w in sizes)} in {dt * 1000:.0f} ms, {what} {mem:.0f} MiB",
          file=out)
    for name, shapes in seen.items():
        print(f"  {name} → {shapes}", file=out)
    for i, r in enumerate(results):
        print(f"  image {i}: " + ", ".join(f"{k} {_shapes(v)}" for k, v in r.items() if torch.is_tensor(v)), file=out)
        bad = [k for k, v in r.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            print(f"  NON-FINITE values in image {i}: {bad}", file=out)
            ok = False

    # one training step
    model.train()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, model)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    _sync(dev)
    t0 = time.perf_counter()
    losses = model(batch)
    total = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    _sync(dev)
    dt = time.perf_counter() - t0
    mem, what = peak_memory_mb(dev)
    terms = [f"{k} {v.detach().item():.3f}" for k, v in losses.items()]
    print(f"train step: {dt * 1000:.0f} ms, {what} {mem:.0f} MiB; total loss {total.detach().item():.4f} = sum of "
          f"{len(terms)} terms: " + ", ".join(terms[:6]) + (", ..." if len(terms) > 6 else ""), file=out)
    if not torch.isfinite(total):
        print("  NON-FINITE loss", file=out)
        ok = False
    by_part: dict[str, list[str]] = {}  # no gradient (not connected to the loss) or a non-finite one
    zero: dict[str, list[str]] = {}  # connected, but exactly 0 at this step (e.g. behind a zero-initialised layer)
    counts: dict[str, list[int]] = {}
    for name, p in trainable:
        part = name.split(".")[0]
        c = counts.setdefault(part, [0, 0])
        c[1] += 1
        if p.grad is None or not torch.isfinite(p.grad).all():
            by_part.setdefault(part, []).append(name)
            continue
        c[0] += 1
        if not p.grad.any():
            zero.setdefault(part, []).append(name)
    for part, (got, n) in counts.items():
        missed, zeros = by_part.get(part, []), zero.get(part, [])
        print(f"  gradients {part}: {got}/{n} trainable tensors" + (f"; none for {missed[:4]}" if missed else "")
              + (f"; all-zero this step for {zeros[:2]}" + (" ..." if len(zeros) > 2 else "") if zeros else ""),
              file=out)
    frozen = [n for n, m in _parts(model) if not any(p.requires_grad for p in m.parameters())]
    if frozen:
        print(f"  frozen (no gradients by design): {', '.join(frozen)}", file=out)
    if not trainable:
        print("  no trainable parameters", file=out)
        ok = False
    ok = ok and not by_part
    print("check-detector: " + ("OK" if ok else "FAILED"), file=out)
    return ok
