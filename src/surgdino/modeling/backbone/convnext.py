"""ConvNeXt backbone (timm's blocks) returning res2..res5 at strides 4/8/16/32, and its weight loading.

Like the official ConvNeXt detection backbone, every returned level goes through its own channels-first
LayerNorm (``norm0``..``norm3``, for res2..res5); ImageNet checkpoints do not have them, so they start as
identity-like (weight 1, bias 0) and are always trained. Weights load from the official checkpoint
(``convnext_tiny_1k_224_ema.pth``: ``downsample_layers.*``, ``stages.i.j.*``), timm, a detectron2-style
``.pkl`` (names prefixed ``backbone.``) or our own state dict; see ``load_convnext_weights``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from timm.layers import LayerNorm2d
from timm.models.convnext import ConvNeXt
from torch import nn
from torch.utils.checkpoint import checkpoint

from surgdino.checkpoint_io import load_file, register_weight_converter, shape_mismatches, unwrap_state_dict
from surgdino.errors import CheckpointError, ConfigError
from surgdino.log import get_logger
from surgdino.modeling.backbone.base import Backbone, ShapeSpec
from surgdino.registry import BACKBONE_REGISTRY

logger = get_logger(__name__)

STAGE_NAMES = ("res2", "res3", "res4", "res5")
STAGE_STRIDES = (4, 8, 16, 32)

# (depths, dims) of the named sizes, as in timm and the ConvNeXt paper.
CONVNEXT_SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
}


class ConvNeXtBackbone(Backbone):
    """ConvNeXt stem + 4 stages (timm modules, ``stem.*``/``stages.*`` names) with per-output LayerNorms.

    ``freeze_at`` counts as in detectron2: 0 = nothing frozen, 1 = stem, 2 = stem + res2, ..., 5 = stem and all
    four stages. Frozen parts get ``requires_grad=False`` and always run in eval mode (no drop path).
    ``grad_checkpointing`` trades compute for activation memory (same results and gradients).
    """

    def __init__(
        self,
        *,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        out_features: Sequence[str] = STAGE_NAMES,
        freeze_at: int = 0,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise ConfigError(f"MODEL.CONVNEXT.DEPTHS and DIMS need 4 entries each, got {list(depths)} and {list(dims)}")
        bad = [f for f in out_features if f not in STAGE_NAMES]
        if bad or not out_features:
            raise ConfigError(f"MODEL.CONVNEXT.OUT_FEATURES: {bad or 'empty'} not valid; use a subset of {list(STAGE_NAMES)}")
        if not 0 <= freeze_at <= 5:
            raise ConfigError(f"MODEL.BACKBONE.FREEZE_AT is {freeze_at}; use 0 (nothing frozen) .. 5 (stem and all 4 stages)")
        net = ConvNeXt(depths=tuple(depths), dims=tuple(dims), drop_path_rate=drop_path_rate,
                       ls_init_value=layer_scale_init_value if layer_scale_init_value > 0 else None, num_classes=0)
        self.depths = tuple(int(d) for d in depths)
        self.dims = tuple(int(d) for d in dims)
        self._out_features = [f for f in STAGE_NAMES if f in out_features]
        self._out_idx = [STAGE_NAMES.index(f) for f in self._out_features]
        self.stem = net.stem  # conv 4x4 stride 4 + LayerNorm2d
        # stage i: [downsample (LayerNorm2d + conv 2x2 stride 2) for i > 0] + blocks; stages after the last
        # returned one are not built (no unused parameters under DDP)
        self.stages = net.stages[: self._out_idx[-1] + 1]
        # recompute each stage's activations in backward (training only): less memory at high resolution
        self.grad_checkpointing = bool(grad_checkpointing)
        for i in self._out_idx:
            self.add_module(f"norm{i}", LayerNorm2d(self.dims[i], eps=1e-6))
        self.freeze_at = freeze_at
        self._freeze()

    def _frozen_modules(self) -> list[nn.Module]:
        mods: list[nn.Module] = [self.stem] if self.freeze_at >= 1 else []
        return mods + [self.stages[i] for i in range(min(len(self.stages), max(0, self.freeze_at - 1)))]

    def _freeze(self) -> None:
        for mod in self._frozen_modules():
            for p in mod.parameters():
                p.requires_grad_(False)
            mod.eval()

    def train(self, mode: bool = True) -> ConvNeXtBackbone:
        super().train(mode)
        for mod in self._frozen_modules():
            mod.eval()
        return self

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images [B, 3, H, W] (normalised) → {"res2": [B, C0, H/4, W/4], ..., "res5": [B, C3, H/32, W/32]}."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"ConvNeXt expects images [B, 3, H, W], got {tuple(images.shape)}")
        x = self.stem(images)  # [B, C0, H/4, W/4]
        out = {}
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i, stage in enumerate(self.stages):
            if recompute and (x.requires_grad or any(p.requires_grad for p in stage.parameters())):
                # keeps only the stage input; drop path's RNG state is replayed, so gradients are the same
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)  # [B, Ci, H/2^(i+2), W/2^(i+2)]
            if i in self._out_idx:
                out[STAGE_NAMES[i]] = getattr(self, f"norm{i}")(x)
        return out

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {STAGE_NAMES[i]: ShapeSpec(channels=self.dims[i], stride=STAGE_STRIDES[i]) for i in self._out_idx}

    @property
    def size_divisibility(self) -> int:
        return 32

    @classmethod
    def from_config(cls, cfg, depths: Sequence[int] | None = None, dims: Sequence[int] | None = None) -> dict:
        c = cfg.MODEL.CONVNEXT
        return dict(
            depths=list(depths if depths is not None else c.DEPTHS),
            dims=list(dims if dims is not None else c.DIMS),
            drop_path_rate=c.DROP_PATH_RATE,
            layer_scale_init_value=c.LAYER_SCALE_INIT_VALUE,
            out_features=list(c.OUT_FEATURES),
            freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
            grad_checkpointing=c.GRAD_CHECKPOINTING,
        )


@BACKBONE_REGISTRY.register("convnext")
def build_convnext_backbone(cfg) -> ConvNeXtBackbone:
    """ConvNeXt sized by MODEL.CONVNEXT.DEPTHS / DIMS."""
    return ConvNeXtBackbone(**ConvNeXtBackbone.from_config(cfg))


BACKBONE_REGISTRY.register("D2ConvNeXt")(build_convnext_backbone)


def _sized_builder(size: str):
    depths, dims = CONVNEXT_SIZES[size]

    def build(cfg) -> ConvNeXtBackbone:
        from surgdino.config import schema

        keys = schema()
        for key, want in (("DEPTHS", depths), ("DIMS", dims)):
            value = list(getattr(cfg.MODEL.CONVNEXT, key))
            default = list(keys[f"MODEL.CONVNEXT.{key}"].default)
            if value != default and value != list(want):
                raise ConfigError(
                    f"MODEL.BACKBONE.NAME convnext_{size} has {key.lower()} {list(want)} but MODEL.CONVNEXT.{key} is {value}; "
                    f"remove the MODEL.CONVNEXT.{key} override, or set MODEL.BACKBONE.NAME convnext to size the model by it")
        return ConvNeXtBackbone(**ConvNeXtBackbone.from_config(cfg, depths=depths, dims=dims))

    build.__name__ = f"build_convnext_{size}_backbone"
    build.__doc__ = f"ConvNeXt-{size.capitalize()}: depths {list(depths)}, dims {list(dims)}."
    return build


for _size in CONVNEXT_SIZES:
    BACKBONE_REGISTRY.register(f"convnext_{_size}")(_sized_builder(_size))


# ---------------------------------------------------------------- weights

def read_weights_file(path: str) -> dict[str, Any]:
    """Read a ``.pth``/``.pt`` or a detectron2 ``.pkl`` into a dict, weights only (``checkpoint_io.load_file``:
    a file that would run code or build other Python objects is refused, naming the object)."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory; give the ConvNeXt checkpoint file (.pth, .pt or .pkl)")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file; give the path of a ConvNeXt checkpoint (.pth, .pt or .pkl)")
    try:
        data = load_file(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path}: holds a {type(data).__name__}, not a dict of weights")
    return dict(data)


def _unwrap(state: Mapping[str, Any]) -> dict[str, Any]:
    """Take the weights out of {"model_ema"|"model"|"state_dict": ...} wrappers (EMA first) and DDP's ``module.``."""
    return unwrap_state_dict(state, ("model_ema", "model", "state_dict"))


def detect_convnext_format(state: Mapping[str, Any]) -> str:
    """'official', 'timm' or 'surgdino' (also for d2 ``.pkl`` contents) from the key names."""
    keys = list(state)
    if any(k.startswith("downsample_layers.") for k in keys):
        return "official"
    if any(k.startswith("stem.") for k in keys):
        if any(k.startswith(("head.", "norm_pre.")) for k in keys):
            return "timm"
        return "surgdino"
    raise CheckpointError(
        "not a ConvNeXt checkpoint: expected keys 'downsample_layers.*' (official), 'stem.*'/'stages.*' (timm, ours) "
        f"or 'backbone.stem.*' (.pkl), found e.g. {keys[:3]}")


def to_surgdino_convnext(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Any supported layout (unwrapped or not, numpy or tensors) → (our backbone state dict, dropped keys)."""
    state = _unwrap(state)
    if any(k.startswith("backbone.") for k in state):  # full model / d2 .pkl / official detection checkpoint
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    fmt = detect_convnext_format(state)
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in state.items():
        k = key
        if fmt == "official":
            if k.startswith(("head.", "norm.")):  # classification head
                dropped.append(key)
                continue
            k = k.replace("downsample_layers.0.", "stem.")
            k = re.sub(r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample.", k)
            k = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", k)
            k = k.replace(".dwconv.", ".conv_dw.").replace(".pwconv1.", ".mlp.fc1.").replace(".pwconv2.", ".mlp.fc2.")
        elif not k.startswith(("stem.", "stages.")) and not re.match(r"^norm[0-3]\.", k):
            dropped.append(key)  # timm head / norm_pre, anything else
            continue
        if "grn" in k:
            raise CheckpointError(f"key {key!r}: ConvNeXt V2 (GRN) checkpoints are not supported; use a ConvNeXt V1 checkpoint")
        t = torch.as_tensor(value)
        if re.search(r"\.mlp\.fc[12]\.weight$", k) and t.dim() == 4:  # timm conv_mlp (1x1 conv) → Linear
            t = t.flatten(1)
        out[k] = t
    return out, dropped


def infer_convnext_arch(state: Mapping[str, torch.Tensor]) -> tuple[list[int], list[int]]:
    """(depths, dims) of a state dict in our naming."""
    depths = [0, 0, 0, 0]
    dims = [0, 0, 0, 0]
    for k, v in state.items():
        m = re.match(r"^stages\.(\d)\.blocks\.(\d+)\.conv_dw\.weight$", k)
        if m:
            i = int(m.group(1))
            depths[i] = max(depths[i], int(m.group(2)) + 1)
            dims[i] = int(v.shape[0])
    return depths, dims


def size_name(depths: Sequence[int], dims: Sequence[int]) -> str | None:
    """'tiny', 'atto', ... for a known size, else None."""
    for name, (dp, dm) in CONVNEXT_SIZES.items():
        if list(dp) == list(depths) and list(dm) == list(dims):
            return name
    return None


def load_convnext_weights(backbone: ConvNeXtBackbone,
                          path_or_state_dict: str | Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Load official / timm / d2-``.pkl`` / our weights into ``backbone``; returns (missing, unexpected) keys.

    Shape mismatches are errors (wrong model size); the classification head is dropped with a log line; the
    output norms ``norm0..3`` missing from ImageNet checkpoints are reported as missing and keep their init.
    """
    source = path_or_state_dict if isinstance(path_or_state_dict, str) else "state dict"
    state = read_weights_file(path_or_state_dict) if isinstance(path_or_state_dict, str) else path_or_state_dict
    try:
        converted, dropped = to_surgdino_convnext(state)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    if dropped:
        logger.info("%s: dropped %d keys not used by the backbone (e.g. %s)", source, len(dropped), dropped[:3])
    if not any(k.startswith("stem.") for k in converted):
        raise CheckpointError(f"{source}: has no ConvNeXt stem weights; is it a ConvNeXt checkpoint?")
    for k, theirs, ours in shape_mismatches(converted, backbone.state_dict())[:1]:
        depths, dims = infer_convnext_arch(converted)
        name = size_name(depths, dims)
        hint = f"convnext_{name}" if name else f"convnext with MODEL.CONVNEXT.DEPTHS {depths} DIMS {dims}"
        raise CheckpointError(f"{source}: {k} has shape {theirs}, the backbone expects {ours}; the checkpoint "
                              f"is ConvNeXt depths {depths} dims {dims}: set MODEL.BACKBONE.NAME {hint}")
    result = backbone.load_state_dict(converted, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    unbuilt = tuple(f"stages.{i}." for i in range(len(backbone.stages), 4))  # stages after the last output
    if [k for k in missing if not re.match(r"^norm[0-3]\.", k)] or [k for k in unexpected if not k.startswith(unbuilt)]:
        logger.warning("%s: %d missing keys (e.g. %s), %d unexpected keys (e.g. %s)", source, len(missing),
                       missing[:3], len(unexpected), unexpected[:3])
    else:
        logger.info("%s: loaded ConvNeXt weights (%d tensors)", source, len(converted))
    return missing, unexpected


@register_weight_converter
def convnext_as_model_weights(state: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
    """ConvNeXt layouts as full-model weights: a bare ConvNeXt checkpoint (official, timm or ours) becomes
    ``backbone.*``, and a full model's official-layout ``backbone.downsample_layers.*`` names are converted;
    None when ``state`` is something else (e.g. one of our full-model checkpoints). Registered in
    ``checkpoint_io`` so ``MODEL.WEIGHTS`` can point at such files."""
    state = _unwrap(state)
    if not state:
        return None
    if any(k.startswith("backbone.downsample_layers.") for k in state):  # official ConvNeXt detection names
        converted, _ = to_surgdino_convnext({k: v for k, v in state.items() if k.startswith("backbone.")})
        out = {k: torch.as_tensor(v) for k, v in state.items()
               if not k.startswith("backbone.") and hasattr(v, "shape")}
        out.update({f"backbone.{k}": v for k, v in converted.items()})
        return out
    if any(k.startswith("backbone.") for k in state):
        return None
    try:
        detect_convnext_format(state)
    except CheckpointError:
        return None
    converted, _ = to_surgdino_convnext(state)
    return {f"backbone.{k}": v for k, v in converted.items()}
