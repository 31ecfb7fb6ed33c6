"""Swin Transformer backbones on transformers' ``SwinBackbone``.

- ``D2SwinTransformer``: MaskDINO's Swin (sized by ``MODEL.SWIN.*``, as the official Swin-L configs say).
  Official Swin weights load through a name map: MaskDINO / detectron2 names (``backbone.patch_embed.*``,
  ``backbone.layers.N.blocks.M.attn.qkv.*``, ``backbone.norm0..3``), the official ImageNet ``.pth``
  (``{"model": ...}``, ``head.*`` and the final ``norm.*`` dropped) and timm's names (merging at the
  start of a stage). transformers' Swin pads to window multiples before the cyclic shift, as the official
  code does, so outputs equal the official code's on any image size (1e-15 in float64, measured; timm's
  Swin shifts before padding and differs by up to 0.5 on a 100x140 image).
- ``swin_{tiny,small,base,large}``: the same model in GroundingDINO's presets (window = pretrain size / 32).

Returns ``res2..res5`` (strides 4, 8, 16, 32), each after its stage's output LayerNorm.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import SwinConfig
from transformers.models.swin.modeling_swin import SwinBackbone as _HFSwinBackbone

from surgdino.checkpoint_io import register_weight_converter, shape_mismatches, unwrap_state_dict
from surgdino.errors import CheckpointError, ConfigError
from surgdino.log import get_logger
from surgdino.modeling.backbone.base import Backbone, ShapeSpec
from surgdino.registry import BACKBONE_REGISTRY

logger = get_logger(__name__)

# GroundingDINO-T: swin_T_224_1k; GroundingDINO-B: swin_B_384_22k; S and L as in the Swin paper
LAYOUTS = {
    "tiny": dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24]),
    "small": dict(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24]),
    "base": dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32]),
    "large": dict(embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48]),
}
_STAGE_TO_RES = {f"stage{i}": f"res{i + 1}" for i in range(1, 5)}
_RES = ("res2", "res3", "res4", "res5")


class SwinBackbone(Backbone):
    """A transformers ``SwinBackbone`` as ``body``; ``forward(images) → {"res2".."res5": [B, C, h, w]}``.

    ``freeze_at`` counts as detectron2's FREEZE_AT (and MaskDINO's Swin ``frozen_stages`` + 1): 1 = patch
    embedding, 2 = + stage 1 (``layers.0`` with its patch merging), ... 5 = all four stages; frozen parts
    get no gradient and run in eval mode; the output norms always train. ``qk_scale`` overrides the
    attention scale ``head_dim ** -0.5``. ``d2_layout`` drops transformers' final LayerNorm, which the
    backbone's outputs never use (official checkpoints have none)."""

    def __init__(self, config: SwinConfig, *, freeze_at: int = 0, qk_scale: float | None = None,
                 d2_layout: bool = False):
        super().__init__()
        if not config.out_features:
            config.out_features = ["stage1", "stage2", "stage3", "stage4"]
        self.body = _HFSwinBackbone(config)
        self.config = config
        if d2_layout:
            self.body.swin.layernorm = nn.Identity()
        if qk_scale:
            for layer in self.body.swin.encoder.layers:
                for block in layer.blocks:
                    block.attention.scaling = float(qk_scale)
        dims = [int(config.embed_dim * 2 ** i) for i in range(len(config.depths))]
        self._shapes = {_STAGE_TO_RES[s]: ShapeSpec(dims[int(s[5:]) - 1], config.patch_size * 2 ** (int(s[5:]) - 1))
                        for s in self.body.out_features}
        if not 0 <= freeze_at <= 5:
            raise ConfigError(f"MODEL.BACKBONE.FREEZE_AT is {freeze_at}; use 0 (nothing frozen) .. 5 (patch "
                              "embedding and all four Swin stages)")
        self.freeze_at = freeze_at
        for mod in self._frozen_modules():
            for p in mod.parameters():
                p.requires_grad_(False)

    @classmethod
    def from_layout(cls, size: str, *, out_features: list[str] | None = None, drop_path_rate: float = 0.2,
                    pretrain_img_size: int = 224) -> SwinBackbone:
        if size not in LAYOUTS:
            raise ValueError(f"unknown Swin size {size!r}; one of {sorted(LAYOUTS)}")
        cfg = SwinConfig(image_size=pretrain_img_size, patch_size=4, window_size=pretrain_img_size // 32,
                         drop_path_rate=drop_path_rate, out_features=_stages(out_features), **LAYOUTS[size])
        return cls(cfg)

    def _frozen_modules(self) -> list[nn.Module]:
        if self.freeze_at < 1:
            return []
        return [self.body.swin.embeddings, *self.body.swin.encoder.layers[: self.freeze_at - 1]]

    def train(self, mode: bool = True) -> SwinBackbone:
        super().train(mode)
        for mod in self._frozen_modules():
            mod.eval()
        return self

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"Swin expects images [B, 3, H, W], got {tuple(images.shape)}")
        maps = self.body(images).feature_maps
        return {_STAGE_TO_RES[s]: m for s, m in zip(self.body.out_features, maps)}

    def output_shape(self) -> dict[str, ShapeSpec]:
        return dict(self._shapes)

    @property
    def size_divisibility(self) -> int:
        return 32


def _stages(out_features: Sequence[str] | None) -> list[str]:
    feats = list(out_features or _RES)
    bad = [f for f in feats if f not in _RES]
    if bad or not feats:
        raise ConfigError(f"MODEL.SWIN.OUT_FEATURES: {bad or 'empty'} not valid; use a subset of {list(_RES)}")
    res_to_stage = {v: k for k, v in _STAGE_TO_RES.items()}
    return [res_to_stage[f] for f in _RES if f in feats]


def d2_swin(*, pretrain_img_size: int = 224, patch_size: int = 4, embed_dim: int = 96,
            depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7,
            mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: float = 0.0, drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0, drop_path_rate: float = 0.3, ape: bool = False, patch_norm: bool = True,
            out_features: Sequence[str] = _RES, use_checkpoint: bool = False, freeze_at: int = 0) -> SwinBackbone:
    """MaskDINO's ``D2SwinTransformer`` from its arguments (``MODEL.SWIN.*``); weights by ``load_swin_weights``."""
    p = "MODEL.SWIN."
    if len(depths) != 4 or len(num_heads) != 4:
        raise ConfigError(f"{p}DEPTHS {list(depths)} and {p}NUM_HEADS {list(num_heads)} need 4 entries (4 stages)")
    for i, h in enumerate(num_heads):
        if (embed_dim * 2 ** i) % h:
            raise ConfigError(f"{p}NUM_HEADS[{i}] = {h} does not divide the stage width {embed_dim * 2 ** i} "
                              f"({p}EMBED_DIM × 2^{i})")
    if ape:
        raise ConfigError(f"{p}APE = True (absolute position embedding) is not supported: no released Swin or "
                          f"MaskDINO checkpoint uses it; set {p}APE False")
    cfg = SwinConfig(image_size=pretrain_img_size, patch_size=patch_size, embed_dim=embed_dim, depths=list(depths),
                     num_heads=list(num_heads), window_size=window_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                     hidden_dropout_prob=drop_rate, attention_probs_dropout_prob=attn_drop_rate,
                     drop_path_rate=drop_path_rate, out_features=_stages(out_features))
    model = SwinBackbone(cfg, freeze_at=freeze_at, qk_scale=qk_scale or None, d2_layout=True)
    if not patch_norm:
        model.body.swin.embeddings.norm = nn.Identity()
    if use_checkpoint:  # transformers >= 5 names it activation_checkpointing_enable
        enable = getattr(model.body, "activation_checkpointing_enable", None) or model.body.gradient_checkpointing_enable
        enable()
    return model


@BACKBONE_REGISTRY.register("D2SwinTransformer")
def build_d2_swin(cfg) -> SwinBackbone:
    """Swin sized by MODEL.SWIN.* (MaskDINO's name; official Swin weights load by name map)."""
    s = cfg.MODEL.SWIN
    return d2_swin(pretrain_img_size=s.PRETRAIN_IMG_SIZE, patch_size=s.PATCH_SIZE, embed_dim=s.EMBED_DIM,
                   depths=list(s.DEPTHS), num_heads=list(s.NUM_HEADS), window_size=s.WINDOW_SIZE,
                   mlp_ratio=s.MLP_RATIO, qkv_bias=s.QKV_BIAS, qk_scale=s.QK_SCALE, drop_rate=s.DROP_RATE,
                   attn_drop_rate=s.ATTN_DROP_RATE, drop_path_rate=s.DROP_PATH_RATE, ape=s.APE,
                   patch_norm=s.PATCH_NORM, out_features=list(s.OUT_FEATURES), use_checkpoint=s.USE_CHECKPOINT,
                   freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


def _builder(size: str):
    def build(cfg) -> SwinBackbone:
        s = cfg.MODEL.SWIN
        return SwinBackbone.from_layout(size, out_features=list(s.OUT_FEATURES), drop_path_rate=s.DROP_PATH_RATE,
                                        pretrain_img_size=s.PRETRAIN_IMG_SIZE)
    build.__doc__ = f"Registry entry: Swin-{size[0].upper()} (GroundingDINO-{size[0].upper()} layout)."
    return build


for _size in LAYOUTS:
    BACKBONE_REGISTRY.register(f"swin_{_size}")(_builder(_size))


# ---------------------------------------------------------------- official names ↔ ours

_HF = "body.swin."
_BLOCK = (("norm1.", "layernorm_before."), ("norm2.", "layernorm_after."),
          ("attn.relative_position_bias_table", "attention.relative_position_bias.relative_position_bias_table"),
          ("attn.proj.", "attention.o_proj."), ("mlp.fc1.", "mlp.fc1."), ("mlp.fc2.", "mlp.fc2."))
_QKV = ("q_proj", "k_proj", "v_proj")
# classification parts of ImageNet checkpoints and buffers rebuilt from the window size
_CLASSIFIER = re.compile(r"^(head\.|norm\.|layers\.\d+\.blocks\.\d+\.attn_mask$)")


def relative_position_index(window: int) -> torch.Tensor:
    """The [window², window²] index into a relative-position bias table (the official buffer's values)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # [w², w², 2]
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def detect_swin_format(state: Mapping[str, Any]) -> str | None:
    """'official' (merging at the end of a stage: ``layers.0.downsample``), 'timm' (at the start) or None."""
    if not any(k.startswith("patch_embed.proj.") for k in state) or not any(".attn.qkv." in k for k in state):
        return None
    return "official" if any(k.startswith("layers.0.downsample.") for k in state) else "timm"


def official_swin_to_ours(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official (MaskDINO / Swin repo / detectron2 ``.pkl``) or timm Swin names, without ``backbone.`` →
    (our ``SwinBackbone`` state dict, dropped keys: classifier head, final norm, attention-mask buffers).
    A ``relative_position_index`` is checked against the window size its table implies, then dropped."""
    fmt = detect_swin_format(state)
    if fmt is None:
        raise CheckpointError("not a Swin checkpoint: expected 'patch_embed.proj.*' and "
                              f"'layers.N.blocks.M.attn.qkv.*' keys, found e.g. {list(state)[:3]}")
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for k, v in state.items():
        if not hasattr(v, "shape"):
            continue
        t = v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
        if fmt == "timm" and (m := re.match(r"layers\.(\d+)\.downsample\.(.*)", k)):
            k = f"layers.{int(m[1]) - 1}.downsample.{m[2]}"
        if m := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.(.*)", k):
            pre, rest = f"{_HF}encoder.layers.{m[1]}.blocks.{m[2]}.", m[3]
            if rest.startswith("attn.qkv."):
                for name, part in zip(_QKV, t.chunk(3, dim=0)):
                    out[f"{pre}attention.{name}.{rest.rsplit('.', 1)[1]}"] = part.clone()
                continue
            if rest == "attn.relative_position_index":
                table = state.get(k.replace("relative_position_index", "relative_position_bias_table"))
                window = int(round((np.sqrt(table.shape[0]) + 1) / 2)) if table is not None else 0
                if table is None or not torch.equal(t.long(), relative_position_index(window)):
                    raise CheckpointError(f"{k}: not the relative position index of a {window}x{window} window")
                continue
            new = next((pre + b + rest[len(a):] for a, b in _BLOCK if rest.startswith(a)), None)
        elif m := re.match(r"layers\.(\d+)\.downsample\.(reduction|norm)\.(.*)", k):
            new = f"{_HF}encoder.layers.{m[1]}.downsample.{m[2]}.{m[3]}"
        elif m := re.match(r"patch_embed\.(proj|norm)\.(.*)", k):
            new = f"{_HF}embeddings.{'patch_embeddings.projection' if m[1] == 'proj' else 'norm'}.{m[2]}"
        elif m := re.match(r"norm(\d)\.(.*)", k):
            new = f"body.hidden_states_norms.stage{int(m[1]) + 1}.{m[2]}"
        else:
            new = None
        if new is None:
            if not _CLASSIFIER.match(k):
                raise CheckpointError(f"{k}: not a weight of the official Swin layout (a different Swin variant?)")
            dropped.append(k)
        else:
            out[new] = t
    return out, dropped


def ours_to_official_swin(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ``SwinBackbone`` state dict → official MaskDINO names (fused qkv, ``relative_position_index``
    buffers as the official code saves them); the inverse of ``official_swin_to_ours``."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if m := re.match(r"body\.swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.*)", k):
            pre, rest = f"layers.{m[1]}.blocks.{m[2]}.", m[3]
            if mm := re.match(r"attention\.q_proj\.(weight|bias)$", rest):
                parts = [state[k.replace("q_proj", n)] for n in _QKV]
                out[f"{pre}attn.qkv.{mm[1]}"] = torch.cat(parts, 0)
                continue
            if re.match(r"attention\.[kv]_proj\.", rest):
                continue
            new = next((pre + a + rest[len(b):] for a, b in _BLOCK if rest.startswith(b)), None)
            if rest.endswith("relative_position_bias_table"):
                window = int(round((np.sqrt(v.shape[0]) + 1) / 2))
                out[pre + "attn.relative_position_index"] = relative_position_index(window)
        elif m := re.match(r"body\.swin\.encoder\.layers\.(\d+)\.downsample\.(.*)", k):
            new = f"layers.{m[1]}.downsample.{m[2]}"
        elif m := re.match(r"body\.swin\.embeddings\.(patch_embeddings\.projection|norm)\.(.*)", k):
            new = f"patch_embed.{'proj' if m[1].startswith('patch') else 'norm'}.{m[2]}"
        elif m := re.match(r"body\.hidden_states_norms\.stage(\d)\.(.*)", k):
            new = f"norm{int(m[1]) - 1}.{m[2]}"
        else:
            new = None
        if new is None:
            raise CheckpointError(f"{k}: not a weight of our D2SwinTransformer")
        out[new] = v
    return out


def load_swin_weights(backbone: SwinBackbone, path_or_state_dict: str | Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Load official / timm / detectron2-``.pkl`` / MaskDINO (``backbone.*``) Swin weights into ``backbone``;
    returns (missing, unexpected) keys. ImageNet files have no output norms (``norm0..3``): those stay
    initialised (log line). A window or width mismatch is an error naming the config key to change."""
    from surgdino.modeling.backbone.convnext import read_weights_file

    source = path_or_state_dict if isinstance(path_or_state_dict, str) else "state dict"
    state = read_weights_file(path_or_state_dict) if isinstance(path_or_state_dict, str) else path_or_state_dict
    state = unwrap_state_dict(state)
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if any(k.startswith("body.") for k in state):
        converted, dropped = {k: torch.as_tensor(v) for k, v in state.items()}, []
    else:
        try:
            converted, dropped = official_swin_to_ours(state)
        except CheckpointError as e:
            raise CheckpointError(f"{source}: {e}") from None
    if dropped:
        logger.info("%s: dropped %d classification tensors (e.g. %s)", source, len(dropped), dropped[:3])
    for k, theirs, ours in shape_mismatches(converted, backbone.state_dict())[:1]:
        key = ("MODEL.SWIN.WINDOW_SIZE / PRETRAIN_IMG_SIZE" if "relative_position" in k
               else "MODEL.SWIN.EMBED_DIM / DEPTHS / NUM_HEADS")
        raise CheckpointError(f"{source}: {k} has shape {theirs}, the backbone expects {ours}; set {key} "
                              "to the checkpoint's")
    result = backbone.load_state_dict(converted, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if unexpected or [k for k in missing if "hidden_states_norms" not in k]:
        logger.warning("%s: %d missing keys (e.g. %s), %d unexpected keys (e.g. %s)", source, len(missing),
                       missing[:3], len(unexpected), unexpected[:3])
    elif missing:
        logger.info("%s: loaded %d Swin tensors; the output norms (norm0..3) are not in it and start fresh",
                    source, len(converted))
    return missing, unexpected


@register_weight_converter
def swin_as_model_weights(state: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
    """Swin layouts as full-model weights for ``MODEL.WEIGHTS``: a bare official / timm Swin checkpoint
    becomes ``backbone.*``; a model's official ``backbone.patch_embed.* / backbone.layers.*`` names are
    mapped, other tensors kept as they are. None when ``state`` is something else, and for official
    MaskDINO checkpoints (``sem_seg_head.*``): their converter maps the heads and, through
    ``checkpoint_io.convert_weights`` on the ``backbone.*`` tensors, calls this one for the backbone."""
    state = unwrap_state_dict(state)
    if any(isinstance(k, str) and k.startswith("sem_seg_head.") for k in state):
        return None
    if detect_swin_format(state) is not None:
        converted, _ = official_swin_to_ours(state)
        return {f"backbone.{k}": v for k, v in converted.items()}
    sub = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if not sub or detect_swin_format(sub) is None:
        return None
    converted, _ = official_swin_to_ours(sub)
    out = {k: torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v
           for k, v in state.items() if not k.startswith("backbone.") and hasattr(v, "shape")}
    out.update({f"backbone.{k}": v for k, v in converted.items()})
    return out
