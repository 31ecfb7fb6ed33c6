"""detectron2-layout ResNet: features equal torchvision's ResNet-50 with the same weights, freezing, shapes,
weight formats (torchvision, detectron2 names, MSRA Caffe2 names)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torchvision.models import resnet50

from surgdino.config import load_config
from surgdino.errors import CheckpointError, ConfigError
from surgdino.modeling.backbone import build_backbone
from surgdino.modeling.backbone.resnet import ResNetBackbone, load_resnet_weights, to_surgdino_resnet


def _randomised_torchvision() -> torch.nn.Module:
    """torchvision ResNet-50 with random BatchNorm statistics and affine terms (eval: they are all used)."""
    torch.manual_seed(0)
    tv = resnet50(weights=None).eval()
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return tv


@pytest.fixture(scope="module")
def tv_and_ours():
    tv = _randomised_torchvision()
    ours = ResNetBackbone(depth=50, stride_in_1x1=False).eval()
    missing, unexpected = load_resnet_weights(ours, tv.state_dict())
    assert missing == [] and unexpected == []
    return tv, ours


def _tv_features(tv, x):
    x = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
    out = {}
    for i in range(1, 5):
        x = getattr(tv, f"layer{i}")(x)
        out[f"res{i + 1}"] = x
    return out


def test_features_equal_torchvision(tv_and_ours):
    tv, ours = tv_and_ours
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():  # fp64: BatchNorm and frozen BatchNorm round differently in fp32
        ref, out = _tv_features(tv.double(), x.double()), ours.double()(x.double())
    tv.float(), ours.float()
    assert list(out) == ["res2", "res3", "res4", "res5"]
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-9, atol=1e-9)
    assert {k: (s.channels, s.stride) for k, s in ours.output_shape().items()} == {
        "res2": (256, 4), "res3": (512, 8), "res4": (1024, 16), "res5": (2048, 32)}
    assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == {"res2": (24, 16), "res3": (12, 8), "res4": (6, 4),
                                                                "res5": (3, 2)}


def test_detectron2_names_and_pkl_round_trip(tv_and_ours, tmp_path):
    tv, ours = tv_and_ours
    sd = ours.state_dict()
    for name in ("stem.conv1.weight", "stem.conv1.norm.running_var", "res2.0.conv1.weight", "res2.0.conv1.norm.bias",
                 "res2.0.shortcut.weight", "res2.0.shortcut.norm.weight", "res5.2.conv3.norm.running_mean"):
        assert name in sd
    assert "res2.1.shortcut.weight" not in sd and not any(k.endswith("num_batches_tracked") for k in sd)
    path = tmp_path / "R-50.pkl"  # detectron2's converted-torchvision layout: {"model": {name: numpy}}
    with open(path, "wb") as f:
        pickle.dump({"model": {f"backbone.{k}": v.numpy() for k, v in sd.items()}, "__author__": "test"}, f)
    fresh = ResNetBackbone(depth=50, stride_in_1x1=False).eval()
    assert load_resnet_weights(fresh, str(path)) == ([], [])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x)["res5"], ours(x)["res5"])


def test_caffe2_names_map_onto_ours(tv_and_ours):
    _, ours = tv_and_ours
    sd = ours.state_dict()
    conv = {"conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c", "shortcut": "branch1"}
    c2 = {"conv1_w": sd["stem.conv1.weight"].numpy(), "fc1000_w": np.zeros((1000, 2048), np.float32)}
    for stat, c2stat in (("weight", "s"), ("bias", "b"), ("running_mean", "rm"), ("running_var", "riv")):
        c2[f"res_conv1_bn_{c2stat}"] = sd[f"stem.conv1.norm.{stat}"].numpy()
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "stem":
            continue
        stage, block, name = parts[0], parts[1], parts[2]
        if parts[3] == "weight":
            c2[f"{stage}_{block}_{conv[name]}_w"] = v.numpy()
        else:
            c2stat = {"weight": "s", "bias": "b", "running_mean": "rm", "running_var": "riv"}[parts[4]]
            c2[f"{stage}_{block}_{conv[name]}_bn_{c2stat}"] = v.numpy()
    converted, dropped, fmt = to_surgdino_resnet(c2)
    assert fmt == "caffe2" and dropped == ["fc1000_w"]
    assert set(converted) == set(sd)
    assert all(torch.equal(converted[k], sd[k]) for k in sd)


def test_stride_in_1x1_places_the_stride():
    msra = ResNetBackbone(depth=50, stride_in_1x1=True)
    tv = ResNetBackbone(depth=50, stride_in_1x1=False)
    assert msra.res3[0].conv1.stride == (2, 2) and msra.res3[0].conv2.stride == (1, 1)
    assert tv.res3[0].conv1.stride == (1, 1) and tv.res3[0].conv2.stride == (2, 2)
    x = torch.randn(1, 3, 64, 64)
    assert msra.eval()(x)["res5"].shape == tv.eval()(x)["res5"].shape == (1, 2048, 2, 2)


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 5])
def test_freeze_at(freeze_at):
    m = ResNetBackbone(depth=50, norm="BN", freeze_at=freeze_at, out_features=["res4", "res5"])
    frozen = ["stem", "res2", "res3", "res4", "res5"][:freeze_at]
    for name, p in m.named_parameters():
        assert p.requires_grad == (name.split(".")[0] not in frozen), name
    if freeze_at >= 2:  # BatchNorms of frozen parts are frozen ones
        assert type(m.res2[0].conv1.norm).__name__ == "FrozenBatchNorm2d"
    assert isinstance(m.res4[0].conv1.norm, torch.nn.BatchNorm2d) or freeze_at == 5
    assert {k: s.stride for k, s in m.output_shape().items()} == {"res4": 16, "res5": 32}


def test_from_config_registry_and_errors():
    cfg = load_config(None, ["MODEL.BACKBONE.NAME", "build_resnet_backbone", "MODEL.RESNETS.DEPTH", "101",
                             "MODEL.RESNETS.OUT_FEATURES", "['res3','res4']", "MODEL.RESNETS.RES5_DILATION", "2",
                             "MODEL.BACKBONE.FREEZE_AT", "2"])
    bb = build_backbone(cfg)
    assert isinstance(bb, ResNetBackbone) and len(bb.res4) == 23 and not hasattr(bb, "res5")
    assert {k: (s.channels, s.stride) for k, s in bb.output_shape().items()} == {"res3": (512, 8), "res4": (1024, 16)}
    dilated = ResNetBackbone(depth=50, res5_dilation=2)
    assert dilated.output_shape()["res5"].stride == 16 and dilated.res5[1].conv2.dilation == (2, 2)
    with pytest.raises(ConfigError, match="DEPTH"):
        ResNetBackbone(depth=34)
    with pytest.raises(CheckpointError, match="not a ResNet"):
        load_resnet_weights(ResNetBackbone(depth=50), {"foo.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="shape"):
        load_resnet_weights(ResNetBackbone(depth=50, width_per_group=32), resnet50(weights=None).state_dict())
