"""Refactoring guard: fixed weights and seeds give the same losses, gradients and eval outputs.

The seeded construction is checked too (same initial weights: modules are created in the same order
under the same names). The tiny models are the demo's DI-MaskDINO (``configs/demo/dimaskdino_atto_trays.yaml``, shrunk), a
MaskDINODecoder variant and a DI variant with mask-derived boxes and box-only denoising. Weights are
generated per parameter name (seeded by the name, independent of the order modules are created), so
the expected values in ``tests/fixtures/maskdino_bitwise.json`` (SHA-256 of each tensor's bytes, with
three fingerprints: sum, sum of absolute values and a projection on a fixed random vector) were
written once by the code before the modeling refactor of issue 10 and must not move (one thread,
fp32 CPU). A tensor passes when its bytes are identical, or else when its shape is and every
fingerprint is within ``RTOL`` of the tensor's L1 size: CPUs with other vector units (AVX-512 vs
AVX2, Intel vs AMD) round some fp32 sums differently (measured: relative differences up to 2e-6
of the L1 size on an AMD EPYC against a fixture written on another machine), while a changed
formula, a permuted tensor or a different selection moves the fingerprints by orders more.

A deliberate numerical change (a new deformable-attention kernel, say) regenerates the file:
``PYTHONPATH=src python tests/test_maskdino_bitwise.py --regenerate`` and says why in the commit.
"""

from __future__ import annotations

import hashlib
import json
import sys
import zlib
from pathlib import Path

import pytest
import torch

from surgdino.config import load_config
from surgdino.modeling import build_model

FIXTURE = Path(__file__).parent / "fixtures" / "maskdino_bitwise.json"
DEMO = str(Path(__file__).parents[1] / "src" / "surgdino" / "configs" / "demo" / "dimaskdino_atto_trays.yaml")
SHRINK = ["MODEL.MaskDINO.TRAIN_NUM_POINTS", "256", "TEST.DETECTIONS_PER_IMAGE", "10", "MODEL.DEVICE", "cpu"]
VARIANTS = {
    "demo_di": [],
    "maskdino": ["MODEL.MaskDINO.TRANSFORMER_DECODER_NAME", "MaskDINODecoder",
                 "MODEL.MaskDINO.INITIALIZE_BOX_TYPE", "mask2box"],
    "di_mask2box_standard_dn": ["MODEL.MaskDINO.INITIALIZE_BOX_TYPE", "mask2box", "MODEL.MaskDINO.DN", "standard",
                                "MODEL.MaskDINO.TI_LAYERS", "2"],
}


def _name_seeded_weights(model: torch.nn.Module) -> None:
    """Overwrite every float tensor of the state dict from a generator seeded by its name: constant
    tensors (norm scales, zero biases, the class prior) keep their value plus noise, others get
    fan-in-scaled normal values."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.dtype.is_floating_point:
                continue
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            base = float(t.flatten()[0]) if t.numel() and bool((t == t.flatten()[0]).all()) else 0.0
            fan_in = t[0].numel() if t.dim() >= 2 else 1
            std = 0.02 if t.dim() < 2 else 1.0 / fan_in ** 0.5
            t.copy_(base + std * torch.randn(t.shape, generator=g))


def _input(h: int, w: int, n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    boxes = torch.zeros(n, 4)
    for i in range(n):
        y0, x0 = 4 + 13 * i, 6 + 17 * i
        y1, x1 = min(h, y0 + 20 + 5 * i), min(w, x0 + 30 - 4 * i)
        masks[i, y0:y1, x0:x1] = True
        boxes[i] = torch.tensor([x0, y0, x1, y1], dtype=torch.float32)
    return {"image": torch.randint(0, 255, (3, h, w), dtype=torch.uint8, generator=g), "height": h + h // 2,
            "width": w, "image_id": seed, "file_name": "x.png",
            "instances": {"boxes": boxes, "masks": masks, "classes": torch.arange(n) % 5}}


RTOL = 1e-4


def _digest(t: torch.Tensor) -> dict:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    flat = t.double().flatten()
    direction = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return {"sha": hashlib.sha256(t.numpy().tobytes()).hexdigest()[:24], "shape": list(t.shape),
            "sum": float(flat.sum()), "l1": float(flat.abs().sum()), "proj": float(flat @ direction)}


def _mismatch(got: dict, expected: dict) -> str | None:
    """None when ``got`` matches ``expected`` (bytes, or shape and fingerprints within RTOL)."""
    if got["sha"] == expected["sha"] and got["shape"] == expected["shape"]:
        return None
    if "l1" not in expected:  # names and shapes of the seeded construction: no tolerance
        return "bytes differ"
    if got["shape"] != expected["shape"]:
        return f"shape {got['shape']} != {expected['shape']}"
    scale = max(expected["l1"], 1e-12)
    far = [f"{f} {got[f]!r} != {expected[f]!r}" for f in ("sum", "l1", "proj")
           if abs(got[f] - expected[f]) > RTOL * scale]
    return "; ".join(far) or None


def _run(variant: str) -> dict[str, dict]:
    torch.manual_seed(0)
    model = build_model(load_config(DEMO, SHRINK + VARIANTS[variant]))
    # seeded construction: the same modules created in the same order draw the same initial weights
    # (names and shapes exactly; values through the fingerprints of all of them in name order)
    state = sorted(model.state_dict().items())
    layout = hashlib.sha256(repr([(k, list(t.shape), str(t.dtype)) for k, t in state]).encode())
    out: dict[str, dict] = {"init/layout": {"sha": layout.hexdigest()[:24], "shape": [], "sum": 0.0},
                            "init/values": _digest(torch.cat([t.double().flatten() for _, t in state]))}
    _name_seeded_weights(model)
    train = [_input(96, 128, 3, 1), _input(64, 96, 1, 2), _input(64, 64, 0, 3)]
    model.train()
    torch.manual_seed(123)
    losses = model(train)
    for k in sorted(losses):
        out[f"loss/{k}"] = _digest(losses[k])
    sum(losses[k] for k in sorted(losses)).backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            out[f"grad/{name}"] = _digest(p.grad)
    model.eval()
    with torch.no_grad():
        results = model(train)
    for i, r in enumerate(results):
        for k in sorted(r):
            out[f"eval/{i}/{k}"] = _digest(r[k])
    return out


def _run_one_thread(variant: str) -> dict[str, dict]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(variant)
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_bit_identical_to_pre_refactor(variant):
    expected = json.loads(FIXTURE.read_text())[variant]
    got = _run_one_thread(variant)
    assert sorted(got) == sorted(expected), "different losses, parameters or outputs"
    bad = [f"{k}: {why}" for k in sorted(expected) if (why := _mismatch(got[k], expected[k]))]
    assert not bad, f"{len(bad)} of {len(expected)} tensors changed:\n" + "\n".join(bad[:20])


def _dumps(data: dict[str, dict[str, dict]]) -> str:
    """One line per tensor, so a regenerated file diffs by tensor."""
    parts = []
    for v in sorted(data):
        rows = ",\n".join(f"  {json.dumps(k)}: {json.dumps(data[v][k], sort_keys=True)}" for k in sorted(data[v]))
        parts.append(f"{json.dumps(v)}: {{\n{rows}\n}}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


if __name__ == "__main__" and "--regenerate" in sys.argv:
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(_dumps({v: _run_one_thread(v) for v in sorted(VARIANTS)}))
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes)")
