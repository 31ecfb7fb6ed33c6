"""GroundingDINO's optional denoising queries (``MODEL.GDINO.DN_NUMBER`` > 0; off by default, as in the
reference): the losses gain ``*_dn`` terms, a training step reaches the denoising projection, the matching
queries never see the denoising ones, and evaluation does not depend on the option."""

from __future__ import annotations

import pytest
import torch

from surgdino.config import load_config
from surgdino.errors import ConfigError
from surgdino.modeling import build_model

TINY = ["MODEL.META_ARCHITECTURE", "GroundingDINO", "MODEL.DEVICE", "cpu", "MODEL.MASK_ON", "False",
        "MODEL.BACKBONE.NAME", "convnext_atto", "MODEL.CONVNEXT.DROP_PATH_RATE", "0.0",
        "MODEL.GDINO.TEXT_ENCODER.NAME", "minilm", "MODEL.GDINO.HIDDEN_DIM", "64", "MODEL.GDINO.NHEADS", "4",
        "MODEL.GDINO.DIM_FEEDFORWARD", "128", "MODEL.GDINO.ENC_LAYERS", "1", "MODEL.GDINO.DEC_LAYERS", "2",
        "MODEL.GDINO.NUM_QUERIES", "20", "MODEL.GDINO.NUM_FEATURE_LEVELS", "2",
        "MODEL.GDINO.RETURN_INTERM_INDICES", "[2, 3]", "MODEL.GDINO.FUSION_DROPPATH", "0.0",
        "MODEL.GDINO.CLASS_NAMES", "['mayo scissors', 'allis forceps', 'scalpel']"]


def _batch() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for h, w, n in ((96, 128, 3), (128, 96, 2), (96, 96, 0)):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w / 2, h / 2])
        boxes = torch.cat([xy, xy + torch.tensor([w / 3, h / 3])], 1)
        out.append({"image": torch.randint(0, 255, (3, h, w), dtype=torch.uint8, generator=g), "height": h,
                    "width": w, "instances": {"boxes": boxes, "classes": torch.arange(n) % 3}})
    return out


def _models(dn_number: int = 12):
    torch.manual_seed(0)
    off = build_model(load_config(None, TINY))
    torch.manual_seed(0)
    on = build_model(load_config(None, TINY + ["MODEL.GDINO.DN_NUMBER", str(dn_number)]))
    missing, unexpected = on.load_state_dict(off.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("dn_label_proj.") for k in missing) and missing
    return off, on


def test_dn_losses_training_step_and_no_leak_into_matching_queries():
    off, on = _models()
    batch = _batch()
    off.train()
    on.train()
    base = off(batch)
    losses = on(batch)
    dn = {k for k in losses if "_dn" in k}
    assert {"loss_ce_dn", "loss_bbox_dn", "loss_giou_dn", "loss_ce_dn_0", "loss_bbox_dn_0"} <= dn
    assert set(losses) - dn == set(base)
    # the attention mask keeps the matching queries blind to the answers: their losses do not change
    for k in base:
        torch.testing.assert_close(losses[k], base[k], rtol=1e-5, atol=1e-6, msg=k)
    sum(losses.values()).backward()
    grads = {n for n, p in on.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"dn_label_proj.weight", "dn_label_proj.bias"} <= grads
    assert all(torch.isfinite(p.grad).all() for p in on.parameters() if p.grad is not None)


def test_dn_is_training_only_eval_unchanged():
    off, on = _models()
    batch = _batch()
    off.eval()
    on.eval()
    with torch.no_grad():
        a, b = off(batch), on(batch)
    for ra, rb in zip(a, b):
        for k in ra:
            assert torch.equal(ra[k], rb[k]), k


def test_dn_off_by_default_and_negative_budget_rejected():
    assert load_config(None, TINY).MODEL.GDINO.DN_NUMBER == 0
    assert build_model(load_config(None, TINY)).dn_label_proj is None
    with pytest.raises(ConfigError, match="DN_NUMBER"):
        build_model(load_config(None, TINY + ["MODEL.GDINO.DN_NUMBER", "-1"]))
