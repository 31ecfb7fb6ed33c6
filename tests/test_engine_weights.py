"""``MODEL.WEIGHTS`` formats (detectron2 ``.pkl`` of numpy arrays, bare official ConvNeXt, timm) into a tiny
MaskDINO, and ``MODEL.CONVNEXT.GRAD_CHECKPOINTING`` (same gradients, training only)."""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch
from test_engine_helpers import tiny_maskdino_model_cfg

from surgdino.config import load_config
from surgdino.engine.checkpointer import load_weights
from surgdino.errors import CheckpointError
from surgdino.modeling import build_model
from surgdino.modeling.backbone.convnext import CONVNEXT_SIZES
from surgdino.tools.convert_convnext import convert_convnext


def _cfg(**over):
    model = tiny_maskdino_model_cfg()
    flat = []
    for section, values in model.items():
        if isinstance(values, dict):
            for k, v in values.items():
                flat += [f"MODEL.{section}.{k}", str(v)]
        else:
            flat += [f"MODEL.{section}", str(values)]
    for k, v in over.items():
        flat += [k, str(v)]
    return load_config(None, flat)


def _model(seed: int, **over):
    torch.manual_seed(seed)
    return build_model(_cfg(**over))


def official_convnext_state(seed: int) -> dict[str, torch.Tensor]:
    """A random ConvNeXt-atto state dict in the official (facebookresearch/ConvNeXt) layout, with its
    classification head and final norm, wrapped as the official files are (``{"model": ...}``)."""
    g = torch.Generator().manual_seed(seed)
    depths, dims = CONVNEXT_SIZES["atto"]

    def r(*shape):
        return torch.randn(*shape, generator=g)

    sd = {"downsample_layers.0.0.weight": r(dims[0], 3, 4, 4), "downsample_layers.0.0.bias": r(dims[0]),
          "downsample_layers.0.1.weight": r(dims[0]), "downsample_layers.0.1.bias": r(dims[0])}
    for i in range(1, 4):
        sd[f"downsample_layers.{i}.0.weight"] = r(dims[i - 1])
        sd[f"downsample_layers.{i}.0.bias"] = r(dims[i - 1])
        sd[f"downsample_layers.{i}.1.weight"] = r(dims[i], dims[i - 1], 2, 2)
        sd[f"downsample_layers.{i}.1.bias"] = r(dims[i])
    for i, (n, c) in enumerate(zip(depths, dims)):
        for j in range(n):
            p = f"stages.{i}.{j}."
            sd.update({p + "gamma": r(c), p + "dwconv.weight": r(c, 1, 7, 7), p + "dwconv.bias": r(c),
                       p + "norm.weight": r(c), p + "norm.bias": r(c), p + "pwconv1.weight": r(4 * c, c),
                       p + "pwconv1.bias": r(4 * c), p + "pwconv2.weight": r(c, 4 * c), p + "pwconv2.bias": r(c)})
    sd.update({"norm.weight": r(dims[3]), "norm.bias": r(dims[3]), "head.weight": r(1000, dims[3]),
               "head.bias": r(1000)})
    return {"model": sd}


def _official_to_ours(name: str) -> str:
    """Official key → our backbone key (written out independently of the converter)."""
    if name.startswith("downsample_layers.0."):
        return "stem." + name[len("downsample_layers.0."):]
    m = re.match(r"downsample_layers\.(\d)\.(.*)", name)
    if m:
        return f"stages.{m.group(1)}.downsample.{m.group(2)}"
    m = re.match(r"stages\.(\d)\.(\d+)\.(.*)", name)
    rest = m.group(3).replace("dwconv", "conv_dw").replace("pwconv1", "mlp.fc1").replace("pwconv2", "mlp.fc2")
    return f"stages.{m.group(1)}.blocks.{m.group(2)}.{rest}"


def _assert_backbone_equals(model, official):
    own = model.state_dict()
    checked = 0
    for k, v in official["model"].items():
        if k.startswith(("head.", "norm.")):
            continue
        assert torch.equal(own["backbone." + _official_to_ours(k)], v), k
        checked += 1
    assert checked == len(official["model"]) - 4


def test_d2_pkl_from_official_convnext_loads_into_maskdino(tmp_path):
    official = official_convnext_state(1)
    torch.save(official, tmp_path / "convnext_atto_official.pth")
    info = convert_convnext(str(tmp_path / "convnext_atto_official.pth"), str(tmp_path / "atto.pkl"), format="d2")
    assert info["size"] == "atto"
    with open(tmp_path / "atto.pkl", "rb") as f:
        payload = pickle.load(f)
    assert all(isinstance(v, np.ndarray) for v in payload["model"].values())

    model = _model(0)
    head_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    load_weights(model, str(tmp_path / "atto.pkl"))
    _assert_backbone_equals(model, official)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in head_before.items())  # the rest keeps its init


def test_bare_official_and_timm_convnext_load_as_backbone(tmp_path):
    official = official_convnext_state(2)
    torch.save(official, tmp_path / "official.pth")
    model = _model(0)
    load_weights(model, str(tmp_path / "official.pth"))
    _assert_backbone_equals(model, official)

    # timm layout: our names plus a classifier head; a .pth holding numpy arrays also loads
    ours = {k[len("backbone."):]: v for k, v in _model(3).state_dict().items()
            if k.startswith("backbone.") and not k.startswith("backbone.norm")}
    timm_sd = {**{k: v.numpy() for k, v in ours.items()}, "head.fc.weight": np.zeros((10, 320), np.float32)}
    torch.save(timm_sd, tmp_path / "timm.pth")
    model = _model(0)
    load_weights(model, str(tmp_path / "timm.pth"))
    own = model.state_dict()
    assert all(torch.equal(own["backbone." + k], v) for k, v in ours.items())


def test_d2_pkl_truncated_is_a_clear_error(tmp_path):
    torch.save(official_convnext_state(1), tmp_path / "o.pth")
    convert_convnext(str(tmp_path / "o.pth"), str(tmp_path / "atto.pkl"), format="d2")
    data = (tmp_path / "atto.pkl").read_bytes()
    (tmp_path / "cut.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pkl.*corrupt or truncated"):
        load_weights(_model(0), str(tmp_path / "cut.pkl"))


@pytest.mark.parametrize("frozen", [0, 2])
def test_grad_checkpointing_key_same_gradients_training_only(frozen, monkeypatch):
    """Through the config key: identical losses and gradients (with drop path on, so the recomputation
    must replay the RNG), recomputation only in training."""
    import surgdino.modeling.backbone.convnext as convnext

    calls = []
    real = convnext.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(1)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(convnext, "checkpoint", counting)
    over = {"MODEL.CONVNEXT.DROP_PATH_RATE": 0.3, "MODEL.BACKBONE.FREEZE_AT": frozen}
    plain = _model(0, **over).backbone.train()
    ckpt = _model(0, **over, **{"MODEL.CONVNEXT.GRAD_CHECKPOINTING": True}).backbone.train()
    assert ckpt.grad_checkpointing and not plain.grad_checkpointing
    x = torch.randn(2, 3, 64, 64)
    losses = []
    for m in (plain, ckpt):
        torch.manual_seed(5)
        loss = sum(v.square().mean() for v in m(x).values())
        loss.backward()
        losses.append(loss.detach())
    assert len(calls) == 4 - max(0, frozen - 1)  # frozen stages (no gradient) are not recomputed
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for (n, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, msg=n)
        else:
            assert a.grad is None and b.grad is None
    calls.clear()
    ckpt.eval()
    with torch.no_grad():
        ckpt(x)
    ckpt.train()
    with torch.no_grad():
        ckpt(x)
    assert not calls
