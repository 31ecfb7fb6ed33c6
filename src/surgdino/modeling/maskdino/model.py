"""The MaskDINO meta-architecture: per-image dicts in; weighted losses (train) or per-image instances (eval) out."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from surgdino.modeling.backbone import build_backbone
from surgdino.modeling.maskdino.box_ops import box_xyxy_to_cxcywh
from surgdino.modeling.maskdino.criterion import SetCriterion
from surgdino.modeling.maskdino.de_imbalance import DIMaskDINODecoder  # noqa: F401  (fills DECODER_REGISTRY)
from surgdino.modeling.maskdino.decoder import MaskDINODecoder  # noqa: F401  (fills DECODER_REGISTRY)
from surgdino.modeling.maskdino.matcher import HungarianMatcher
from surgdino.modeling.maskdino.postprocess import InstancePostProcessor
from surgdino.modeling.pixel_decoder import MaskDINOEncoder
from surgdino.registry import DECODER_REGISTRY, META_ARCH_REGISTRY
from surgdino.structures import batch_images


@META_ARCH_REGISTRY.register("MaskDINO")
class MaskDINO(nn.Module):
    """Backbone → deformable pixel decoder → MaskDINO decoder → criterion (train) / post-processing (eval)."""

    def __init__(self, *, backbone: nn.Module, pixel_decoder: nn.Module, decoder: nn.Module,
                 criterion: SetCriterion, postprocessor: InstancePostProcessor, pixel_mean: list[float],
                 pixel_std: list[float], size_divisibility: int = 32, loss_weight: float = 1.0):
        super().__init__()
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.decoder = decoder
        self.criterion = criterion
        self.postprocessor = postprocessor
        self.size_divisibility = max(size_divisibility, getattr(backbone, "size_divisibility", 0) or 0)
        self.loss_weight = loss_weight
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)

    @classmethod
    def from_config(cls, cfg) -> MaskDINO:
        backbone = build_backbone(cfg)
        m = cfg.MODEL.MaskDINO
        pixel_decoder = MaskDINOEncoder(**MaskDINOEncoder.from_config(cfg, backbone.output_shape()))
        dec_cls = DECODER_REGISTRY.get(m.TRANSFORMER_DECODER_NAME)
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
        return cls(backbone=backbone, pixel_decoder=pixel_decoder, decoder=decoder, criterion=criterion,
                   postprocessor=InstancePostProcessor.from_config(cfg), pixel_mean=cfg.MODEL.PIXEL_MEAN,
                   pixel_std=cfg.MODEL.PIXEL_STD,
                   size_divisibility=max(m.SIZE_DIVISIBILITY, cfg.INPUT.SIZE_DIVISIBILITY),
                   loss_weight=cfg.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT)

    def _targets(self, batched_inputs: list[dict], padded: tuple[int, int]) -> list[dict]:
        out = []
        dev = self.pixel_mean.device
        for x in batched_inputs:
            inst = x["instances"]
            h, w = x["image"].shape[-2:]
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=dev)
            masks = inst["masks"].to(dev).bool()
            masks = F.pad(masks, (0, padded[1] - w, 0, padded[0] - h))  # [N, Hp, Wp]
            out.append({"labels": inst["classes"].to(dev).long(),
                        "boxes": box_xyxy_to_cxcywh(inst["boxes"].to(dev).float() / scale), "masks": masks})
        return out

    def forward(self, batched_inputs: list[dict]):
        dev = self.pixel_mean.device
        images = [(x["image"].to(dev).float() - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        batch = batch_images(images, self.size_divisibility)
        padded = tuple(batch.tensors.shape[-2:])
        sizes = torch.tensor([list(im.shape[-2:]) for im in images], device=dev)
        features = self.backbone(batch.tensors)
        mask_features, levels, masks = self.pixel_decoder(features, batch.mask)
        targets = self._targets(batched_inputs, padded) if self.training else None
        out = self.decoder(levels, masks, mask_features, sizes, padded, targets)
        if self.training:
            return {k: v * self.loss_weight for k, v in self.criterion(out, targets).items()}
        results = []
        for i, x in enumerate(batched_inputs):
            h, w = images[i].shape[-2:]
            results.append(self.postprocessor(
                out["pred_logits"][i], out["pred_boxes"][i], out["pred_embeds"][i], out["mask_features"][i],
                image_size=(h, w), padded_size=padded, out_size=(int(x.get("height", h)), int(x.get("width", w)))))
        return results
