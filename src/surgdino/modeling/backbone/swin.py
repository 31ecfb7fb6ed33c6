"""Swin Transformer backbones on transformers' ``SwinBackbone`` (so transformers / GroundingDINO
checkpoints map one to one): ``swin_tiny`` and ``swin_base`` in GroundingDINO-T / -B layouts.

Returns ``res2..res5`` (strides 4, 8, 16, 32), each after its stage's output LayerNorm.
"""

from __future__ import annotations

import torch
from transformers import SwinConfig
from transformers.models.swin.modeling_swin import SwinBackbone as _HFSwinBackbone

from surgdino.modeling.backbone.base import Backbone, ShapeSpec
from surgdino.registry import BACKBONE_REGISTRY

# GroundingDINO-T: swin_T_224_1k; GroundingDINO-B: swin_B_384_22k
LAYOUTS = {
    "tiny": dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24]),
    "base": dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32]),
}
_STAGE_TO_RES = {f"stage{i}": f"res{i + 1}" for i in range(1, 5)}


class SwinBackbone(Backbone):
    """A transformers ``SwinBackbone`` as ``body``; ``forward(images) → {"res2".."res5": [B, C, h, w]}``."""

    def __init__(self, config: SwinConfig):
        super().__init__()
        if not config.out_features:
            config.out_features = ["stage1", "stage2", "stage3", "stage4"]
        self.body = _HFSwinBackbone(config)
        self.config = config
        dims = [int(config.embed_dim * 2 ** i) for i in range(len(config.depths))]
        self._shapes = {_STAGE_TO_RES[s]: ShapeSpec(dims[int(s[5:]) - 1], config.patch_size * 2 ** (int(s[5:]) - 1))
                        for s in self.body.out_features}

    @classmethod
    def from_layout(cls, size: str, *, out_features: list[str] | None = None, drop_path_rate: float = 0.2,
                    pretrain_img_size: int = 224) -> SwinBackbone:
        if size not in LAYOUTS:
            raise ValueError(f"unknown Swin size {size!r}; one of {sorted(LAYOUTS)}")
        res_to_stage = {v: k for k, v in _STAGE_TO_RES.items()}
        outs = [res_to_stage[f] for f in (out_features or ["res2", "res3", "res4", "res5"])]
        cfg = SwinConfig(image_size=pretrain_img_size, patch_size=4, window_size=pretrain_img_size // 32,
                         drop_path_rate=drop_path_rate, out_features=outs, **LAYOUTS[size])
        return cls(cfg)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        maps = self.body(images).feature_maps
        return {_STAGE_TO_RES[s]: m for s, m in zip(self.body.out_features, maps)}

    def output_shape(self) -> dict[str, ShapeSpec]:
        return dict(self._shapes)

    @property
    def size_divisibility(self) -> int:
        return 32


def _builder(size: str):
    def build(cfg) -> SwinBackbone:
        s = cfg.MODEL.SWIN
        return SwinBackbone.from_layout(size, out_features=list(s.OUT_FEATURES), drop_path_rate=s.DROP_PATH_RATE,
                                        pretrain_img_size=s.PRETRAIN_IMG_SIZE)
    build.__doc__ = f"Registry entry: Swin-{size[0].upper()} (GroundingDINO-{size[0].upper()} layout)."
    return build


for _size in LAYOUTS:
    BACKBONE_REGISTRY.register(f"swin_{_size}")(_builder(_size))
