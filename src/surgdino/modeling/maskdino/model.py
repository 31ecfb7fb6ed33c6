"""The MaskDINO meta-architecture: per-image dicts in; weighted losses (train) or per-image instances (eval) out.

Three stages, separable: ``preprocessor`` (dicts → normalised padded images, padding mask, targets),
``forward_tensors(images, pad_mask)`` (tensors only, no data-dependent Python control flow: what
tracing and export see) and ``postprocessor`` (raw outputs → per-image instances).

``ignore_padding`` (``MODEL.MaskDINO.ARCHITECTURE official``): as MaskDINO's code, the model sees no padding
mask: padded pixels are image content, boxes are predicted relative to the padded batch and rescaled to each
image here. A single image whose sides divide by ``size_divisibility`` has no padding, so it gives the official
outputs; inside a padded batch its outputs differ from the official single-image ones (and from ours).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from surgdino.config.keys.maskdino import is_official
from surgdino.errors import CheckpointError
from surgdino.modeling.backbone import build_backbone
from surgdino.modeling.maskdino.criterion import SetCriterion
from surgdino.modeling.maskdino.de_imbalance import DIMaskDINODecoder  # noqa: F401  (fills DECODER_REGISTRY)
from surgdino.modeling.maskdino.decoder import MaskDINODecoder  # noqa: F401  (fills DECODER_REGISTRY)
from surgdino.modeling.maskdino.di_official_keys import DIMASKDINO as _OFFICIAL_DI_MAP  # noqa: F401  (registers it)
from surgdino.modeling.maskdino.matcher import HungarianMatcher
from surgdino.modeling.maskdino.official_weights import MASKDINO as _OFFICIAL_MAP  # noqa: F401  (registers the converter)
from surgdino.modeling.maskdino.official_weights import official_keymap
from surgdino.modeling.maskdino.postprocess import InstancePostProcessor
from surgdino.modeling.maskdino.preprocess import Preprocessor
from surgdino.modeling.pixel_decoder import MaskDINOEncoder  # noqa: F401  (fills PIXEL_DECODER_REGISTRY)
from surgdino.registry import DECODER_REGISTRY, META_ARCH_REGISTRY, PIXEL_DECODER_REGISTRY

RAW_OUTPUTS = ("pred_logits", "pred_boxes", "pred_embeds", "mask_features")


@META_ARCH_REGISTRY.register("MaskDINO")
class MaskDINO(nn.Module):
    """Backbone → deformable pixel decoder → MaskDINO decoder → criterion (train) / post-processing (eval)."""

    def __init__(self, *, backbone: nn.Module, pixel_decoder: nn.Module, decoder: nn.Module,
                 criterion: SetCriterion, postprocessor: InstancePostProcessor, pixel_mean: list[float],
                 pixel_std: list[float], size_divisibility: int = 32, loss_weight: float = 1.0,
                 ignore_padding: bool = False):
        super().__init__()
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.decoder = decoder
        self.criterion = criterion
        self.postprocessor = postprocessor
        self.preprocessor = Preprocessor(pixel_mean, pixel_std,
                                         max(size_divisibility, getattr(backbone, "size_divisibility", 0) or 0))
        self.loss_weight = loss_weight
        self.ignore_padding = ignore_padding

    def check_weights_layout(self, state: Mapping[str, Any], path: str) -> None:
        """Refuse an official MaskDINO / DI-MaskDINO state for a model of our architecture: it would load
        without error and compute wrongly (other level orders, no input-projection biases)."""
        if not self.ignore_padding and official_keymap(state) is not None:
            raise CheckpointError(
                f"{path}: an official MaskDINO/DI-MaskDINO checkpoint computes as intended only in the official "
                "architecture; set MODEL.MaskDINO.ARCHITECTURE official (the surgdino architecture orders the "
                "feature levels otherwise and has no input-projection biases)")

    @classmethod
    def from_config(cls, cfg) -> dict:
        backbone = build_backbone(cfg)
        m = cfg.MODEL.MaskDINO
        pd_cls = PIXEL_DECODER_REGISTRY.get(cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME,
                                            "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME")
        pixel_decoder = pd_cls(**pd_cls.from_config(cfg, backbone.output_shape()))
        dec_cls = DECODER_REGISTRY.get(m.TRANSFORMER_DECODER_NAME, "MODEL.MaskDINO.TRANSFORMER_DECODER_NAME")
        decoder = dec_cls(**dec_cls.from_config(cfg))
        matcher = HungarianMatcher(cost_class=m.COST_CLASS_WEIGHT, cost_mask=m.COST_MASK_WEIGHT,
                                   cost_dice=m.COST_DICE_WEIGHT, cost_box=m.COST_BOX_WEIGHT,
                                   cost_giou=m.COST_GIOU_WEIGHT, num_points=m.TRAIN_NUM_POINTS,
                                   focal_alpha=m.FOCAL_ALPHA, focal_gamma=m.FOCAL_GAMMA)
        weights = {"loss_ce": m.CLASS_WEIGHT, "loss_mask": m.MASK_WEIGHT, "loss_dice": m.DICE_WEIGHT,
                   "loss_bbox": m.BOX_WEIGHT, "loss_giou": m.GIOU_WEIGHT}
        crit_args = dict(num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, matcher=matcher, weight_dict=weights,
                         num_points=m.TRAIN_NUM_POINTS, oversample_ratio=m.OVERSAMPLE_RATIO,
                         importance_sample_ratio=m.IMPORTANCE_SAMPLE_RATIO, focal_alpha=m.FOCAL_ALPHA,
                         focal_gamma=m.FOCAL_GAMMA, dn=m.DN, deep_supervision=m.DEEP_SUPERVISION, box_loss=m.BOX_LOSS)
        build_criterion = getattr(dec_cls, "build_criterion", None)  # DI-MaskDINO adds token-interaction losses
        criterion = build_criterion(cfg, **crit_args) if build_criterion else SetCriterion(**crit_args)
        return dict(backbone=backbone, pixel_decoder=pixel_decoder, decoder=decoder, criterion=criterion,
                    postprocessor=InstancePostProcessor(**InstancePostProcessor.from_config(cfg)),
                    pixel_mean=cfg.MODEL.PIXEL_MEAN, pixel_std=cfg.MODEL.PIXEL_STD,
                    size_divisibility=max(m.SIZE_DIVISIBILITY, cfg.INPUT.SIZE_DIVISIBILITY),
                    loss_weight=cfg.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT, ignore_padding=is_official(cfg))

    @property
    def size_divisibility(self) -> int:
        return self.preprocessor.size_divisibility

    def _outputs(self, images: torch.Tensor, pad_mask: torch.Tensor, targets: list[dict] | None) -> dict:
        if self.ignore_padding:
            pad_mask = torch.zeros_like(pad_mask)
        image_sizes = torch.stack([(~pad_mask[:, :, 0]).sum(1), (~pad_mask[:, 0, :]).sum(1)], -1)  # [B, 2] (h, w)
        features = self.backbone(images)
        mask_features, levels, masks = self.pixel_decoder(features, pad_mask)
        return self.decoder(levels, masks, mask_features, image_sizes, tuple(images.shape[-2:]), targets)

    def forward_tensors(self, images: torch.Tensor, pad_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw predictions of normalised padded ``images [B, 3, H, W]`` with ``pad_mask [B, H, W]`` (True =
        padding, bottom/right): ``pred_logits [B, Q, C]``, ``pred_boxes [B, Q, 4]`` (cxcywh normalised to each
        image's unpadded extent), ``pred_embeds [B, Q, Dm]``, ``mask_features [B, Dm, H/4, W/4]``."""
        out = self._outputs(images, pad_mask, None)
        return {k: out[k] for k in RAW_OUTPUTS}

    def forward(self, batched_inputs: list[dict]):
        batch = self.preprocessor(batched_inputs, with_targets=self.training)
        if self.training:
            out = self._outputs(batch.images, batch.pad_mask, batch.targets)
            return {k: v * self.loss_weight for k, v in self.criterion(out, batch.targets).items()}
        out = self.forward_tensors(batch.images, batch.pad_mask)
        padded = tuple(batch.images.shape[-2:])
        if self.ignore_padding:  # boxes relative to the padded batch → relative to each image
            sizes = torch.as_tensor(batch.image_sizes, dtype=torch.float32, device=out["pred_boxes"].device)  # [B, 2]
            hw = torch.tensor(padded, dtype=torch.float32, device=sizes.device) / sizes
            out["pred_boxes"] = out["pred_boxes"] * torch.stack([hw[:, 1], hw[:, 0]] * 2, -1)[:, None]
        return [self.postprocessor(out["pred_logits"][i], out["pred_boxes"][i], out["pred_embeds"][i],
                                   out["mask_features"][i], image_size=size, padded_size=padded, out_size=out_size)
                for i, (size, out_size) in enumerate(zip(batch.image_sizes, batch.out_sizes))]
