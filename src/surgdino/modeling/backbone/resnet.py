"""ResNet-50/101 in detectron2's layout (``build_resnet_backbone``): ``stem.conv1`` + ``res2``..``res5`` of
bottleneck blocks, each convolution carrying its ``norm`` (``res2.0.conv1.weight``, ``res2.0.conv1.norm.*``,
``res2.0.shortcut.*``), so official MaskDINO / DI-MaskDINO R50 checkpoints and detectron2 ``.pkl`` files map
name for name. Frozen BatchNorm is torchvision's ``FrozenBatchNorm2d``.

``STRIDE_IN_1X1`` places the stride-2 of a stage's first block: True is MSRA's original Caffe layout (stride
in the first 1×1 convolution; detectron2's default, for MSRA ``R-50.pkl``), False is torchvision's (stride in
the 3×3; MaskDINO's R50 configs with the torchvision ImageNet weights). Weights load from a torchvision
state dict (``conv1``, ``bn1``, ``layer1.0.downsample.*`` mapped), a detectron2-layout file (``.pkl`` or
``.pth``, with or without ``backbone.``) or MSRA's Caffe2 names (``res2_0_branch2a_w``...).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from surgdino.checkpoint_io import register_weight_converter, shape_mismatches
from surgdino.errors import CheckpointError, ConfigError
from surgdino.log import get_logger
from surgdino.modeling.backbone.base import Backbone, ShapeSpec
from surgdino.modeling.backbone.convnext import _unwrap, read_weights_file
from surgdino.registry import BACKBONE_REGISTRY

logger = get_logger(__name__)

STAGE_NAMES = ("res2", "res3", "res4", "res5")
BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
NORMS = ("FrozenBN", "BN", "SyncBN", "GN", "")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "FrozenBN":
        return FrozenBatchNorm2d(channels)
    if kind == "BN":
        return nn.BatchNorm2d(channels)
    if kind == "SyncBN":
        return nn.SyncBatchNorm(channels)
    if kind == "GN":
        return nn.GroupNorm(32, channels)
    return nn.Identity()


class ConvNorm(nn.Conv2d):
    """A bias-free convolution followed by its ``norm`` (detectron2's ``Conv2d(..., norm=...)`` names)."""

    def __init__(self, cin: int, cout: int, kernel: int, *, stride: int = 1, dilation: int = 1, groups: int = 1,
                 norm: str = "FrozenBN"):
        super().__init__(cin, cout, kernel, stride=stride, padding=dilation * (kernel // 2), dilation=dilation,
                         groups=groups, bias=not norm)
        self.norm = _norm(norm, cout)
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


class Bottleneck(nn.Module):
    """1×1 → 3×3 (groups, dilation) → 1×1 with a projection ``shortcut`` when the shape changes."""

    def __init__(self, cin: int, cout: int, width: int, *, stride: int, groups: int, dilation: int,
                 stride_in_1x1: bool, norm: str):
        super().__init__()
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.shortcut = ConvNorm(cin, cout, 1, stride=stride, norm=norm) if stride != 1 or cin != cout else None
        self.conv1 = ConvNorm(cin, width, 1, stride=s1, norm=norm)
        self.conv2 = ConvNorm(width, width, 3, stride=s3, dilation=dilation, groups=groups, norm=norm)
        self.conv3 = ConvNorm(width, cout, 1, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu_(self.conv1(x))
        y = F.relu_(self.conv2(y))
        y = self.conv3(y)
        return F.relu_(y + (x if self.shortcut is None else self.shortcut(x)))


class BasicStem(nn.Module):
    """7×7 stride-2 convolution, ReLU, 3×3 stride-2 max pool: stride 4."""

    def __init__(self, cout: int = 64, norm: str = "FrozenBN"):
        super().__init__()
        self.conv1 = ConvNorm(3, cout, 7, stride=2, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu_(self.conv1(x)), kernel_size=3, stride=2, padding=1)


class ResNetBackbone(Backbone):
    """detectron2-layout ResNet returning ``out_features`` of res2..res5 (strides 4/8/16/32; res5 stride 16
    with ``res5_dilation`` 2). ``freeze_at`` as in detectron2: 0 = nothing, 1 = stem, 2 = stem + res2, ...
    Frozen parts get ``requires_grad=False``; with ``norm="BN"`` their BatchNorms become frozen ones."""

    def __init__(
        self,
        *,
        depth: int = 50,
        out_features: Sequence[str] = STAGE_NAMES,
        norm: str = "FrozenBN",
        stride_in_1x1: bool = True,
        num_groups: int = 1,
        width_per_group: int = 64,
        stem_out_channels: int = 64,
        res2_out_channels: int = 256,
        res5_dilation: int = 1,
        res5_multi_grid: Sequence[int] = (1, 1, 1),
        freeze_at: int = 0,
    ):
        super().__init__()
        if depth not in BLOCKS:
            raise ConfigError(f"MODEL.RESNETS.DEPTH is {depth}; use one of {sorted(BLOCKS)} (bottleneck ResNets)")
        if norm not in NORMS:
            raise ConfigError(f"MODEL.RESNETS.NORM is {norm!r}; use one of {list(NORMS)}")
        bad = [f for f in out_features if f not in STAGE_NAMES]
        if bad or not out_features:
            raise ConfigError(f"MODEL.RESNETS.OUT_FEATURES: {bad or 'empty'} not valid; use a subset of {list(STAGE_NAMES)}")
        if res5_dilation not in (1, 2):
            raise ConfigError(f"MODEL.RESNETS.RES5_DILATION is {res5_dilation}; use 1 or 2")
        if not 0 <= freeze_at <= 5:
            raise ConfigError(f"MODEL.BACKBONE.FREEZE_AT is {freeze_at}; use 0 (nothing frozen) .. 5 (stem and all 4 stages)")
        if len(res5_multi_grid) != BLOCKS[depth][3]:
            raise ConfigError(f"MODEL.RESNETS.RES5_MULTI_GRID has {len(res5_multi_grid)} entries; res5 has "
                              f"{BLOCKS[depth][3]} blocks")
        self._out_features = [f for f in STAGE_NAMES if f in out_features]
        last = STAGE_NAMES.index(self._out_features[-1])
        self.stem = BasicStem(stem_out_channels, norm)
        cin, cout, width = stem_out_channels, res2_out_channels, num_groups * width_per_group
        self._shapes: dict[str, ShapeSpec] = {}
        stride = 4
        for i, name in enumerate(STAGE_NAMES[: last + 1]):  # stages after the last output are not built
            first_stride = 1 if i == 0 or (i == 3 and res5_dilation == 2) else 2
            stride *= first_stride
            blocks = []
            for j in range(BLOCKS[depth][i]):
                dilation = res5_dilation * int(res5_multi_grid[j]) if i == 3 else 1
                blocks.append(Bottleneck(cin, cout, width, stride=first_stride if j == 0 else 1, groups=num_groups,
                                         dilation=dilation, stride_in_1x1=stride_in_1x1, norm=norm))
                cin = cout
            self.add_module(name, nn.Sequential(*blocks))
            self._shapes[name] = ShapeSpec(channels=cout, stride=stride)
            cout, width = cout * 2, width * 2
        self.depth = depth
        self.freeze_at = freeze_at
        self._freeze()

    def _frozen_modules(self) -> list[nn.Module]:
        names = ["stem", *STAGE_NAMES][: self.freeze_at]
        return [getattr(self, n) for n in names if hasattr(self, n)]

    def _freeze(self) -> None:
        for mod in self._frozen_modules():
            for p in mod.parameters():
                p.requires_grad_(False)
            _freeze_batchnorm(mod)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images [B, 3, H, W] (normalised) → {"res2": [B, 256, H/4, W/4], ..., "res5": [B, 2048, H/32, W/32]}."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"ResNet expects images [B, 3, H, W], got {tuple(images.shape)}")
        x = self.stem(images)  # [B, 64, H/4, W/4]
        out = {}
        for name in self._shapes:
            x = getattr(self, name)(x)  # [B, C, H/s, W/s]
            if name in self._out_features:
                out[name] = x
        return out

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {n: self._shapes[n] for n in self._out_features}

    @property
    def size_divisibility(self) -> int:
        return 32

    @classmethod
    def from_config(cls, cfg) -> dict:
        r = cfg.MODEL.RESNETS
        if r.STEM_TYPE != "basic":
            raise ConfigError(f"MODEL.RESNETS.STEM_TYPE is {r.STEM_TYPE!r}; only 'basic' (7x7 conv + max pool) is built")
        return dict(depth=r.DEPTH, out_features=list(r.OUT_FEATURES), norm=r.NORM, stride_in_1x1=r.STRIDE_IN_1X1,
                   num_groups=r.NUM_GROUPS, width_per_group=r.WIDTH_PER_GROUP, stem_out_channels=r.STEM_OUT_CHANNELS,
                   res2_out_channels=r.RES2_OUT_CHANNELS, res5_dilation=r.RES5_DILATION,
                   res5_multi_grid=list(r.RES5_MULTI_GRID), freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


def _freeze_batchnorm(module: nn.Module) -> None:
    """Replace trainable BatchNorms inside ``module`` by frozen ones holding the same statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):  # also SyncBatchNorm
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(frozen, key).copy_(getattr(child, key))
            setattr(module, name, frozen)
        else:
            _freeze_batchnorm(child)


@BACKBONE_REGISTRY.register("build_resnet_backbone")
def build_resnet_backbone(cfg) -> ResNetBackbone:
    """ResNet sized by MODEL.RESNETS.* (detectron2's builder name, as in MaskDINO's R50 configs)."""
    return ResNetBackbone(**ResNetBackbone.from_config(cfg))


BACKBONE_REGISTRY.register("resnet")(build_resnet_backbone)


# ---------------------------------------------------------------- weights

_TV_CONV = {"conv1": "conv1", "conv2": "conv2", "conv3": "conv3", "bn1": "conv1.norm", "bn2": "conv2.norm",
            "bn3": "conv3.norm", "downsample.0": "shortcut", "downsample.1": "shortcut.norm"}
_C2_CONV = {"branch2a": "conv1", "branch2b": "conv2", "branch2c": "conv3", "branch1": "shortcut"}
_C2_PARAM = {"w": "weight", "b": "bias", "s": "weight", "bn_s": "weight", "bn_b": "bias",
             "bn_rm": "running_mean", "bn_riv": "running_var"}


def _from_torchvision(key: str) -> str | None:
    if key.startswith("fc."):
        return None
    if key.startswith(("conv1.", "bn1.")):
        return ("stem.conv1." if key.startswith("conv1.") else "stem.conv1.norm.") + key.split(".", 1)[1]
    m = re.match(r"layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.[01])\.(.+)$", key)
    if not m:
        return None
    return f"res{int(m.group(1)) + 1}.{m.group(2)}.{_TV_CONV[m.group(3)]}.{m.group(4)}"


def _from_caffe2(key: str) -> str | None:
    """MSRA names: conv1_w, res_conv1_bn_{s,b,rm,riv}, res2_0_branch2a_w, res2_0_branch2a_bn_s, ... fc1000_*."""
    if key.startswith("fc1000"):
        return None
    if key == "conv1_w":
        return "stem.conv1.weight"
    m = re.match(r"res_conv1_bn_(s|b|rm|riv)$", key)
    if m:
        return "stem.conv1.norm." + _C2_PARAM["bn_" + m.group(1)]
    m = re.match(r"res(\d)_(\d+)_(branch2[abc]|branch1)_(w|b|bn_s|bn_b|bn_rm|bn_riv)$", key)
    if not m:
        return None
    conv = f"res{m.group(1)}.{m.group(2)}.{_C2_CONV[m.group(3)]}"
    param = m.group(4)
    return f"{conv}.{_C2_PARAM[param]}" if param in ("w", "b") else f"{conv}.norm.{_C2_PARAM[param]}"


def to_surgdino_resnet(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], list[str], str]:
    """A torchvision, detectron2 (``.pkl``/``.pth``, ``backbone.`` or not) or MSRA Caffe2 ResNet state dict →
    (our backbone state dict, dropped keys, the format's name). Caffe2's ``bn_riv`` is a variance already."""
    state = _unwrap(state)
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    keys = list(state)
    if any(k.startswith("layer1.") for k in keys):
        fmt, rename = "torchvision", _from_torchvision
    elif any(k.startswith("res2_") for k in keys):
        fmt, rename = "caffe2", _from_caffe2
    elif any(k.startswith("res2.") for k in keys):
        fmt, rename = "detectron2", (lambda k: k if k.startswith(("stem.", "res")) else None)
    else:
        raise CheckpointError("not a ResNet checkpoint: expected 'layer1.*' (torchvision), 'res2.*' (detectron2) or "
                              f"'res2_0_*' (MSRA Caffe2) keys, found e.g. {keys[:3]}")
    out, dropped = {}, []
    for k, v in state.items():
        new = rename(k)
        if new is None or new.endswith("num_batches_tracked"):
            dropped.append(k)
            continue
        out[new] = torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v
    return out, dropped, fmt


def load_resnet_weights(backbone: ResNetBackbone, path_or_state_dict: str | Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Load torchvision / detectron2 / MSRA weights into ``backbone``; returns (missing, unexpected) keys.
    Shape mismatches are errors (wrong depth or width); the classifier is dropped with a log line."""
    source = path_or_state_dict if isinstance(path_or_state_dict, str) else "state dict"
    state = read_weights_file(path_or_state_dict) if isinstance(path_or_state_dict, str) else path_or_state_dict
    try:
        converted, dropped, fmt = to_surgdino_resnet(state)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    if dropped:
        logger.info("%s: dropped %d keys not used by the backbone (e.g. %s)", source, len(dropped), dropped[:3])
    for k, theirs, ours in shape_mismatches(converted, backbone.state_dict())[:1]:
        raise CheckpointError(f"{source}: {k} has shape {theirs}, the backbone expects {ours}; set "
                              "MODEL.RESNETS.DEPTH / NUM_GROUPS / WIDTH_PER_GROUP to the checkpoint's")
    result = backbone.load_state_dict(converted, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    built = tuple(f"{n}." for n in ("stem", *backbone.output_shape(), *backbone._shapes))
    unexpected_built = [k for k in unexpected if k.startswith(built)]
    if missing or unexpected_built:
        logger.warning("%s (%s layout): %d missing keys (e.g. %s), %d unexpected keys (e.g. %s)", source, fmt,
                       len(missing), missing[:3], len(unexpected_built), unexpected_built[:3])
    else:
        logger.info("%s: loaded ResNet-%d weights (%s layout, %d tensors)", source, backbone.depth, fmt, len(converted))
    return missing, unexpected


@register_weight_converter
def resnet_as_model_weights(state: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
    """A bare ResNet checkpoint (torchvision ``resnet50``, detectron2 ``R-50.pkl``, MSRA Caffe2 names) as
    full-model weights ``backbone.*`` (classifier dropped); None for anything else (full models included).
    Registered in ``checkpoint_io`` so ``MODEL.WEIGHTS`` can point at such files."""
    state = _unwrap(state)
    if any(isinstance(k, str) and "." in k and k.split(".", 1)[0] in ("backbone", "sem_seg_head", "pixel_decoder",
                                                                     "decoder") for k in state):
        return None
    if not ({"conv1.weight", "layer1.0.conv1.weight"} <= set(state) or "res2_0_branch2a_w" in state
            or ("stem.conv1.weight" in state and "res2.0.conv1.weight" in state)):
        return None
    converted, dropped, fmt = to_surgdino_resnet(state)
    logger.info("ResNet weights in the %s layout: %d tensors as backbone.*, %d dropped (e.g. %s)", fmt,
                len(converted), len(dropped), dropped[:3])
    return {f"backbone.{k}": v for k, v in converted.items()}
