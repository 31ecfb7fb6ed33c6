"""ConvNeXt backbone: shapes, official/timm/d2 weight loading with identical features, freezing, drop path, errors."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from timm.models.convnext import ConvNeXt

from surgdino.cli import main as cli_main
from surgdino.config import load_config
from surgdino.errors import CheckpointError, ConfigError
from surgdino.modeling.backbone import build_backbone
from surgdino.modeling.backbone.convnext import (
    ConvNeXtBackbone,
    convnext_as_model_weights,
    load_convnext_weights,
)
from surgdino.tools.convert_convnext import convert_convnext

DEPTHS, DIMS = [1, 1, 2, 1], [8, 16, 24, 32]


def _ln_cf(x, w, b, eps=1e-6):
    """Official channels-first LayerNorm: normalise over C of [B, C, H, W]."""
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    return w[:, None, None] * (x - u) / torch.sqrt(s + eps) + b[:, None, None]


def _official_state_dict(depths, dims, seed=0):
    """Random weights in the official ConvNeXt layout, with the detection norms and a classification head."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    sd = {"downsample_layers.0.0.weight": r(dims[0], 3, 4, 4), "downsample_layers.0.0.bias": r(dims[0]),
          "downsample_layers.0.1.weight": 1 + r(dims[0]), "downsample_layers.0.1.bias": r(dims[0])}
    for i in range(1, 4):
        sd |= {f"downsample_layers.{i}.0.weight": 1 + r(dims[i - 1]), f"downsample_layers.{i}.0.bias": r(dims[i - 1]),
               f"downsample_layers.{i}.1.weight": r(dims[i], dims[i - 1], 2, 2), f"downsample_layers.{i}.1.bias": r(dims[i])}
    for i, (d, c) in enumerate(zip(depths, dims)):
        for j in range(d):
            p = f"stages.{i}.{j}."
            sd |= {p + "dwconv.weight": r(c, 1, 7, 7), p + "dwconv.bias": r(c), p + "norm.weight": 1 + r(c),
                   p + "norm.bias": r(c), p + "pwconv1.weight": r(4 * c, c), p + "pwconv1.bias": r(4 * c),
                   p + "pwconv2.weight": r(c, 4 * c), p + "pwconv2.bias": r(c), p + "gamma": r(c, scale=0.5)}
        sd |= {f"norm{i}.weight": 1 + r(c), f"norm{i}.bias": r(c)}  # detection variant's output norms
    sd |= {"norm.weight": r(dims[3]), "norm.bias": r(dims[3]), "head.weight": r(10, dims[3]), "head.bias": r(10)}
    return sd


def _official_forward(sd, depths, x):
    """The official ConvNeXt detection backbone written out from its definition."""
    outs = []
    for i in range(4):
        p = f"downsample_layers.{i}."
        if i == 0:
            x = F.conv2d(x, sd[p + "0.weight"], sd[p + "0.bias"], stride=4)
            x = _ln_cf(x, sd[p + "1.weight"], sd[p + "1.bias"])
        else:
            x = _ln_cf(x, sd[p + "0.weight"], sd[p + "0.bias"])
            x = F.conv2d(x, sd[p + "1.weight"], sd[p + "1.bias"], stride=2)
        for j in range(depths[i]):
            p = f"stages.{i}.{j}."
            y = F.conv2d(x, sd[p + "dwconv.weight"], sd[p + "dwconv.bias"], padding=3, groups=x.shape[1])
            y = y.permute(0, 2, 3, 1)  # channels last
            y = F.layer_norm(y, y.shape[-1:], sd[p + "norm.weight"], sd[p + "norm.bias"], eps=1e-6)
            y = F.linear(F.gelu(F.linear(y, sd[p + "pwconv1.weight"], sd[p + "pwconv1.bias"])),
                         sd[p + "pwconv2.weight"], sd[p + "pwconv2.bias"])
            x = x + (sd[p + "gamma"] * y).permute(0, 3, 1, 2)
        outs.append(_ln_cf(x, sd[f"norm{i}.weight"], sd[f"norm{i}.bias"]))
    return outs


def _check_features(backbone, ref, x):
    backbone.eval()
    with torch.no_grad():
        out = backbone(x)
    for i, name in enumerate(["res2", "res3", "res4", "res5"]):
        torch.testing.assert_close(out[name], ref[i], rtol=1e-4, atol=1e-4)


def test_atto_shapes_strides_channels():
    cfg = load_config(None, ["MODEL.BACKBONE.NAME", "convnext_atto", "MODEL.BACKBONE.FREEZE_AT", "0"])
    bb = build_backbone(cfg)
    out = bb(torch.randn(2, 3, 64, 96))
    dims = [40, 80, 160, 320]
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        f"res{i + 2}": (2, dims[i], 64 // s, 96 // s) for i, s in enumerate([4, 8, 16, 32])}
    assert {k: (s.channels, s.stride) for k, s in bb.output_shape().items()} == {
        f"res{i + 2}": (dims[i], s) for i, s in enumerate([4, 8, 16, 32])}
    assert bb.size_divisibility == 32
    sub = ConvNeXtBackbone(depths=DEPTHS, dims=DIMS, out_features=["res3", "res4"])
    assert list(sub(torch.randn(1, 3, 64, 64))) == ["res3", "res4"] and len(sub.stages) == 3


def test_official_checkpoint_gives_identical_features(tmp_path):
    sd = _official_state_dict(DEPTHS, DIMS)
    x = torch.randn(2, 3, 64, 96)
    ref = _official_forward(sd, DEPTHS, x)
    bb = ConvNeXtBackbone(depths=DEPTHS, dims=DIMS)
    missing, unexpected = load_convnext_weights(bb, {"model": sd})
    assert missing == [] and unexpected == []
    _check_features(bb, ref, x)
    # file → converter (.pth, our format) → loader
    src = tmp_path / "convnext_official.pth"
    torch.save({"model": sd}, src)
    info = convert_convnext(str(src), str(tmp_path / "ours.pth"))
    assert info["format"] == "surgdino" and info["depths"] == DEPTHS and info["dims"] == DIMS
    assert sorted(info["dropped"]) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    bb2 = ConvNeXtBackbone(depths=DEPTHS, dims=DIMS)
    load_convnext_weights(bb2, str(tmp_path / "ours.pth"))
    _check_features(bb2, ref, x)


def test_d2_pkl_round_trip(tmp_path):
    sd = _official_state_dict(DEPTHS, DIMS, seed=1)
    torch.save(sd, tmp_path / "official.pth")
    assert cli_main(["convert", "convnext", "--source", str(tmp_path / "official.pth"),
                     "--output", str(tmp_path / "w.pkl")]) == 0
    with open(tmp_path / "w.pkl", "rb") as f:
        data = pickle.load(f)
    assert data["__author__"] == "surgdino" and data["matching_heuristics"] is False
    assert all(k.startswith("backbone.") for k in data["model"])
    assert type(data["model"]["backbone.stem.0.weight"]).__name__ == "ndarray"
    x = torch.randn(1, 3, 64, 64)
    bb = ConvNeXtBackbone(depths=DEPTHS, dims=DIMS)
    load_convnext_weights(bb, str(tmp_path / "w.pkl"))
    _check_features(bb, _official_forward(sd, DEPTHS, x), x)
    full = convnext_as_model_weights(torch.load(tmp_path / "official.pth"))
    assert full is not None and set(full) == {f"backbone.{k}" for k in bb.state_dict()}
    assert convnext_as_model_weights({"backbone.stem.0.weight": torch.zeros(1)}) is None


def test_timm_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    net = ConvNeXt(depths=DEPTHS, dims=DIMS, conv_mlp=True, ls_init_value=0.5).eval()  # 1x1-conv MLP like timm atto
    bb = ConvNeXtBackbone(depths=DEPTHS, dims=DIMS)
    missing, unexpected = load_convnext_weights(bb, {"state_dict": net.state_dict()})
    assert all(k.startswith("norm") for k in missing) and unexpected == []
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y, ref = net.stem(x), []
        for stage in net.stages:
            y = stage(y)
            ref.append(F.layer_norm(y.permute(0, 2, 3, 1), y.shape[1:2], eps=1e-6).permute(0, 3, 1, 2))
    _check_features(bb, ref, x)
    # ours → file → ours
    torch.save(bb.state_dict(), tmp_path / "ours.pth")
    bb2 = ConvNeXtBackbone(depths=DEPTHS, dims=DIMS)
    assert load_convnext_weights(bb2, str(tmp_path / "ours.pth")) == ([], [])
    _check_features(bb2, ref, x)


@pytest.mark.parametrize("freeze_at", [0, 1, 3, 5])
def test_freeze_at(freeze_at):
    bb = ConvNeXtBackbone(depths=DEPTHS, dims=DIMS, drop_path_rate=0.5, freeze_at=freeze_at).train()
    assert all(p.requires_grad is (freeze_at < 1) for p in bb.stem.parameters())
    for i, stage in enumerate(bb.stages):
        frozen = freeze_at >= i + 2
        assert all(p.requires_grad is not frozen for p in stage.parameters())
        assert stage.training is not frozen
    assert all(p.requires_grad for n, p in bb.named_parameters() if n.startswith("norm"))
    with pytest.raises(ConfigError, match="FREEZE_AT"):
        ConvNeXtBackbone(depths=DEPTHS, dims=DIMS, freeze_at=6)
    cfg = load_config(None, ["MODEL.BACKBONE.NAME", "convnext", "MODEL.CONVNEXT.DEPTHS", "[1,1,2,1]",
                             "MODEL.CONVNEXT.DIMS", "[8,16,24,32]", "MODEL.BACKBONE.FREEZE_AT", str(freeze_at)])
    assert build_backbone(cfg).freeze_at == freeze_at


def test_drop_path_only_in_train():
    torch.manual_seed(0)
    bb = ConvNeXtBackbone(depths=DEPTHS, dims=DIMS, drop_path_rate=0.5, layer_scale_init_value=1.0)
    x = torch.randn(2, 3, 32, 32)
    bb.train()
    a, b = bb(x)["res5"], bb(x)["res5"]
    assert not torch.allclose(a, b)
    bb.eval()
    torch.testing.assert_close(bb(x)["res5"], bb(x)["res5"])
    frozen = ConvNeXtBackbone(depths=DEPTHS, dims=DIMS, drop_path_rate=0.5, layer_scale_init_value=1.0, freeze_at=5).train()
    torch.testing.assert_close(frozen(x)["res5"], frozen(x)["res5"])


def test_errors(tmp_path):
    cfg = load_config(None, ["MODEL.BACKBONE.NAME", "convnext_small", "MODEL.CONVNEXT.DEPTHS", "[2,2,6,2]"])
    with pytest.raises(ConfigError, match="MODEL.CONVNEXT.DEPTHS"):
        build_backbone(cfg)
    build_backbone(load_config(None, ["MODEL.BACKBONE.NAME", "convnext_atto", "MODEL.CONVNEXT.DEPTHS", "[2,2,6,2]"]))
    sd = _official_state_dict(DEPTHS, DIMS)
    with pytest.raises(CheckpointError, match=r"DEPTHS \[1, 1, 2, 1\]"):
        load_convnext_weights(ConvNeXtBackbone(depths=DEPTHS, dims=[16, 32, 48, 64]), sd)
    with pytest.raises(CheckpointError, match="not a ConvNeXt checkpoint"):
        load_convnext_weights(ConvNeXtBackbone(depths=DEPTHS, dims=DIMS), {"fc.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="no such file"):
        convert_convnext(str(tmp_path / "missing.pth"), str(tmp_path / "o.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert cli_main(["convert", "convnext", "--source", str(tmp_path / "junk.pth"), "--output", str(tmp_path / "o.pth")]) == 2
    assert not (tmp_path / "o.pth").exists()


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    plain = ConvNeXtBackbone(depths=DEPTHS, dims=DIMS, layer_scale_init_value=1.0).train()
    ckpt = ConvNeXtBackbone(depths=DEPTHS, dims=DIMS, layer_scale_init_value=1.0, grad_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 32, 32)
    for m in (plain, ckpt):
        sum(v.square().mean() for v in m(x).values()).backward()
    for (n, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=n)
