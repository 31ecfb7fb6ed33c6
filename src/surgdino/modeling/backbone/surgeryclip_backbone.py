"""SurgeryCLIP as a detection backbone: single stride-p map or a ViTDet simple feature pyramid.

Two interfaces over one module: the toolkit's ``forward(images) → {name: [B, C, h, w]}`` with
``output_shape()``, and GroundingDINO's ``forward(NestedTensor) → {"0": NestedTensor(features, mask)}``
with ``build_surgeryclip_backbone(args) → (backbone, num_channels)``. Images are re-normalised to
CLIP's mean/std inside, padded pixels are zeroed and padded tokens kept out of attention, so an
image's features do not depend on what it was batched with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from surgdino.errors import ConfigError, SurgDinoError
from surgdino.log import get_logger
from surgdino.modeling.backbone.base import Backbone, ShapeSpec
from surgdino.modeling.backbone.surgeryclip_model import SurgeryCLIP, VisionTransformer
from surgdino.structures import NestedTensor

logger = get_logger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # in 0..1
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (123.675, 116.28, 103.53)  # in 0..255, as MODEL.PIXEL_MEAN
IMAGENET_STD = (58.395, 57.12, 57.375)
INPUT_NORMS = ("imagenet", "raw", "unit", "clip")
FEATURES = ("width", "projected")


def _clip_affine(input_norm: str, mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) taking images in ``input_norm`` to CLIP normalisation: ``x·scale + shift``."""
    cm, cs = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    if input_norm == "imagenet":  # x = (pixel - mean) / std with pixel, mean, std in 0..255
        m, s = torch.tensor(mean, dtype=torch.float32) / 255, torch.tensor(std, dtype=torch.float32) / 255
        scale, shift = s / cs, (m - cm) / cs
    elif input_norm == "raw":
        scale, shift = 1 / (255 * cs), -cm / cs
    elif input_norm == "unit":
        scale, shift = 1 / cs, -cm / cs
    elif input_norm == "clip":
        scale, shift = torch.ones(3), torch.zeros(3)
    else:
        raise ConfigError(f"MODEL.SURGERYCLIP.INPUT_NORM = {input_norm!r} is not one of {list(INPUT_NORMS)}")
    return scale.view(1, 3, 1, 1), shift.view(1, 3, 1, 1)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``[B, C, H, W]`` map (ViTDet's "LN")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _conv_ln(cin: int, cout: int) -> nn.Sequential:
    """1×1 conv + LN, then 3×3 conv + LN (ViTDet's lateral and output convs)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), LayerNorm2d(cout),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), LayerNorm2d(cout))


class SimpleFeaturePyramid(nn.Module):
    """Strides p/2, p, 2p, 4p from one stride-p map (ViTDet): deconv, identity, max-pool, then a stride-2 pick."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, 2, stride=2)
        self.convs = nn.ModuleList([_conv_ln(in_channels // 2, out_channels), _conv_ln(in_channels, out_channels),
                                    _conv_ln(in_channels, out_channels)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[B, C, h, w]`` map and its token mask → four (map, mask) pairs, finest first."""
        valid = (~mask)[:, None].float()  # [B, 1, h, w]
        half_mask = ~(F.max_pool2d(valid, 2, 2, ceil_mode=True)[:, 0] > 0)  # cell padded iff all its tokens are
        p3 = self.convs[0](self.up(x))  # [B, out, 2h, 2w]
        p4 = self.convs[1](x)  # [B, out, h, w]
        p5 = self.convs[2](F.max_pool2d(x, 2, 2, ceil_mode=True))  # [B, out, ⌈h/2⌉, ⌈w/2⌉]
        p6 = p5[:, :, ::2, ::2]  # [B, out, ⌈h/4⌉, ⌈w/4⌉] (LastLevelMaxPool with kernel 1)
        up_mask = mask.repeat_interleave(2, 1).repeat_interleave(2, 2)
        return [(p3, up_mask), (p4, mask), (p5, half_mask), (p6, half_mask[:, ::2, ::2])]


class SurgeryCLIPBackbone(Backbone):
    """SurgeryCLIP image tower as a backbone: patch features (CLS dropped) as maps, with padding masks."""

    accepts_nested_tensor = True  # forward(NestedTensor) → {"0": NestedTensor, ...} (GroundingDINO's interface)

    def __init__(self, visual: VisionTransformer, *, features: str = "width", input_norm: str = "imagenet",
                 input_mean: Sequence[float] = IMAGENET_MEAN, input_std: Sequence[float] = IMAGENET_STD,
                 trainable_blocks: int = 0, multi_scale: bool = False, out_channels: int = 256):
        super().__init__()
        if features not in FEATURES:
            raise ConfigError(f"MODEL.SURGERYCLIP.FEATURES = {features!r} is not one of {list(FEATURES)}")
        self.visual = visual
        self.features = features
        self.multi_scale = multi_scale
        scale, shift = _clip_affine(input_norm, input_mean, input_std)
        self.register_buffer("input_scale", scale, persistent=False)  # [1, 3, 1, 1]
        self.register_buffer("input_shift", shift, persistent=False)
        self.feature_dim = visual.width if features == "width" else visual.output_dim
        self.pyramid = SimpleFeaturePyramid(self.feature_dim, out_channels) if multi_scale else None
        p = visual.patch_size
        level = round(math.log2(p))  # nominal level: patch 16 → res4, 32 → res5, 14 → res4
        if multi_scale:
            self._shapes = {f"res{level + i - 1}": ShapeSpec(out_channels, p * 2 ** i // 2) for i in range(4)}
        else:
            self._shapes = {f"res{level}": ShapeSpec(self.feature_dim, p)}
        self.num_channels = [s.channels for s in self._shapes.values()]
        self.set_trainable_blocks(trainable_blocks)

    @classmethod
    def from_config(cls, cfg) -> dict:
        c = cfg.MODEL.SURGERYCLIP
        if not c.CKPT:
            raise ConfigError("MODEL.SURGERYCLIP.CKPT is empty; set it to a CLIP ViT checkpoint "
                              "(OpenAI .pt, open_clip or RemoteCLIP state dict), e.g. MODEL.SURGERYCLIP.CKPT /path/ViT-B-16.pt")
        clip = SurgeryCLIP.from_checkpoint(c.CKPT, surgery_depth=c.SURGERY_DEPTH, act=c.ACT, text=False,
                                           heads=c.HEADS or None, pos_interp=c.POS_INTERP)
        return dict(visual=clip.visual, features=c.FEATURES, input_norm=c.INPUT_NORM, input_mean=cfg.MODEL.PIXEL_MEAN,
                   input_std=cfg.MODEL.PIXEL_STD, trainable_blocks=c.TRAINABLE_BLOCKS, multi_scale=c.MULTI_SCALE,
                   out_channels=c.OUT_CHANNELS)

    def set_trainable_blocks(self, k: int) -> None:
        """0: CLIP frozen; -1: all trainable; K: last K blocks (and ln_post/proj for projected features).

        The pyramid always trains. With surgery, the last block's FFN (ln_2, mlp) only feeds the CLS token,
        which a backbone drops, so it is never run and stays frozen.
        """
        blocks = self.visual.transformer.resblocks
        if not -1 <= k <= len(blocks):
            raise ConfigError(f"MODEL.SURGERYCLIP.TRAINABLE_BLOCKS = {k} is outside -1..{len(blocks)} "
                              "(0 = frozen, -1 = all trainable, K = last K blocks)")
        self.visual.requires_grad_(k == -1)
        if k > 0:
            for block in blocks[len(blocks) - k:]:
                block.requires_grad_(True)
            if self.features == "projected":
                self.visual.ln_post.requires_grad_(True)
                self.visual.proj.requires_grad_(True)
        if self.visual.surgery_depth > 0:
            blocks[-1].ln_2.requires_grad_(False)
            blocks[-1].mlp.requires_grad_(False)
        if self.features == "width":
            self.visual.ln_post.requires_grad_(False)  # unused by width features
            self.visual.proj.requires_grad_(False)
        self.trainable_blocks = k

    def output_shape(self) -> dict[str, ShapeSpec]:
        return dict(self._shapes)

    @property
    def size_divisibility(self) -> int:
        """Any size works (sides are padded inside); multiples of this make every level's mask exact."""
        return self.visual.patch_size * (4 if self.multi_scale else 1)

    def token_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Pixel padding mask ``[B, H, W]`` → token mask ``[B, h, w]``: a token is padding iff all its pixels are."""
        p = self.visual.patch_size
        gh, gw = self.visual.token_grid(*mask.shape[-2:])
        valid = F.pad((~mask).float(), (0, gw * p - mask.shape[-1], 0, gh * p - mask.shape[-2]))  # [B, gh*p, gw*p]
        return ~(F.max_pool2d(valid[:, None], p, p)[:, 0] > 0)  # [B, gh, gw]

    def _maps(self, images: torch.Tensor, mask: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        b, _, h, w = images.shape
        x = images.float() * self.input_scale + self.input_shift  # CLIP-normalised
        if mask is None:
            gh, gw = self.visual.token_grid(h, w)
            token_mask = torch.zeros(b, gh, gw, dtype=torch.bool, device=images.device)
        else:
            x = x.masked_fill(mask[:, None], 0.0)  # padding = 0 after normalisation, as for an image alone
            token_mask = self.token_mask(mask)
            gh, gw = token_mask.shape[-2:]
        tokens = self.visual.patch_tokens(x, token_mask if mask is not None else None)  # [B, N, width]
        if self.features == "projected":
            tokens = self.visual.project(tokens)  # [B, N, output_dim]
        fmap = tokens.transpose(1, 2).reshape(b, -1, gh, gw)  # [B, D, h, w]
        if self.pyramid is None:
            return [(fmap, token_mask)]
        return self.pyramid(fmap, token_mask)

    def forward(self, x: torch.Tensor | NestedTensor,
                mask: torch.Tensor | None = None) -> dict[str, torch.Tensor] | dict[str, NestedTensor]:
        """``images [B,3,H,W]`` (optional pixel ``mask [B,H,W]``, True = padding) → ``{name: [B, C, h, w]}``;
        ``NestedTensor`` → ``{"0": NestedTensor(map, token mask), …}`` (GroundingDINO's interface)."""
        if isinstance(x, NestedTensor):
            images, mask = x.decompose()
            return {str(i): NestedTensor(f, m) for i, (f, m) in enumerate(self._maps(images, mask))}
        if not torch.is_tensor(x) or x.dim() != 4 or x.shape[1] != 3:
            raise SurgDinoError(f"SurgeryCLIPBackbone expects images [B, 3, H, W] or a NestedTensor, got "
                                f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
        return {name: f for name, (f, _) in zip(self._shapes, self._maps(x, mask))}


def _resolve_device(device: str | torch.device | None) -> torch.device:
    from surgdino.device import resolve_device

    return resolve_device(device, "args.device")


def build_surgeryclip_backbone(args) -> tuple[SurgeryCLIPBackbone, list[int]]:
    """GroundingDINO-style builder: ``args.surgeryclip_ckpt``, ``args.device``, ``args.train_surgeryclip_backbone``.

    Optional ``args`` fields (defaults as the config keys): ``surgeryclip_surgery_depth``, ``surgeryclip_act``,
    ``surgeryclip_features``, ``surgeryclip_input_norm``, ``surgeryclip_trainable_blocks`` (overrides the train flag),
    ``surgeryclip_multi_scale``, ``surgeryclip_out_channels``, ``surgeryclip_heads``, ``surgeryclip_pos_interp``. Returns the backbone and its channels per level.
    """
    ckpt = getattr(args, "surgeryclip_ckpt", None)
    if not ckpt:
        raise ConfigError("args.surgeryclip_ckpt is not set; give the path of a CLIP ViT checkpoint "
                          "(surgeryclip_ckpt = '/abs/path/ViT-B-16.pt' in the config)")
    trainable = -1 if getattr(args, "train_surgeryclip_backbone", False) else 0
    trainable = getattr(args, "surgeryclip_trainable_blocks", None) if getattr(
        args, "surgeryclip_trainable_blocks", None) is not None else trainable
    clip = SurgeryCLIP.from_checkpoint(ckpt, surgery_depth=getattr(args, "surgeryclip_surgery_depth", 6),
                                       act=getattr(args, "surgeryclip_act", "auto"), text=False,
                                       heads=getattr(args, "surgeryclip_heads", None),
                                       pos_interp=getattr(args, "surgeryclip_pos_interp", "bilinear"))
    backbone = SurgeryCLIPBackbone(
        clip.visual, features=getattr(args, "surgeryclip_features", "width"),
        input_norm=getattr(args, "surgeryclip_input_norm", "imagenet"), trainable_blocks=trainable,
        multi_scale=bool(getattr(args, "surgeryclip_multi_scale", False)),
        out_channels=getattr(args, "surgeryclip_out_channels", 256))
    backbone.to(_resolve_device(getattr(args, "device", None)))
    return backbone, list(backbone.num_channels)
