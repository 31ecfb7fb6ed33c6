"""MaskDINO's decoder: two-stage query selection, mask-enhanced box init, denoising queries,
deformable decoder layers with look-forward-twice box refinement (``layers.box_refine``), shared
class/mask/box heads.

DI-MaskDINO overrides ``select_queries`` (De-Imbalance) and ``layer_inputs`` (BATO).

``official=True`` (``MODEL.MaskDINO.ARCHITECTURE official``) computes as IDEA-Research/MaskDINO's decoder: it
reads the encoder's levels in reverse order, updates reference boxes from the un-normed queries (output boxes
from the normed ones), applies the class and mask heads of decoder layers to twice-normed queries (its decoder
returns normed queries and its heads norm them again; the initial prediction is normed once), lets out-of-image tokens compete in the selection, sizes proposals by level position, and
``mask2box`` is its DETR box (right/bottom inclusive, an empty mask gives an inverted box).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from surgdino.config.keys.maskdino import is_official
from surgdino.modeling.layers import MLP, inverse_sigmoid
from surgdino.modeling.layers.blocks import DeformableDecoderLayer
from surgdino.modeling.layers.box_refine import BoxRefinementDecoder, DecoderInputs, QuerySelection
from surgdino.modeling.layers.geometry import (
    box_xyxy_to_cxcywh,
    detr_masks_to_boxes,
    masks_to_boxes,
    valid_ratios,
)
from surgdino.modeling.layers.misc import shape_tensor
from surgdino.modeling.maskdino.dn import DNQueries, prepare_for_dn
from surgdino.registry import DECODER_REGISTRY


@DECODER_REGISTRY.register("MaskDINODecoder")
class MaskDINODecoder(BoxRefinementDecoder):
    """Queries from encoder tokens → ``dec_layers`` refinements; outputs per layer class logits,
    boxes (normalised cxcywh) and mask embeddings (masks = embedding · mask features)."""

    def __init__(self, *, num_classes: int, hidden_dim: int = 256, num_queries: int = 300, nheads: int = 8,
                 dim_feedforward: int = 2048, dropout: float = 0.0, dec_layers: int = 9, n_points: int = 4,
                 mask_dim: int = 256, num_feature_levels: int = 4, initial_pred: bool = True,
                 initialize_box_type: str = "mask2box", dn: str = "seg", dn_num: int = 100,
                 dn_noise_scale: float = 0.4, dn_label_noise_ratio: float = 0.2, class_prior_prob: float = 0.01,
                 official: bool = False):
        super().__init__()
        self.official = official
        self.select_invalid = self.proposals_by_position = official
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.initial_pred = initial_pred
        self.initialize_box_type = initialize_box_type
        self.dn, self.dn_num = dn, dn_num
        self.dn_noise_scale, self.dn_label_noise_ratio = dn_noise_scale, dn_label_noise_ratio
        self.hidden_dim = hidden_dim
        self.enc_output = nn.Linear(hidden_dim, hidden_dim)
        self.enc_output_norm = nn.LayerNorm(hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes)
        nn.init.constant_(self.class_embed.bias, -math.log((1 - class_prior_prob) / class_prior_prob))
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.label_enc = nn.Embedding(num_classes, hidden_dim)
        self.ref_point_head = MLP(2 * hidden_dim, hidden_dim, hidden_dim, 2)
        self.layers = nn.ModuleList(DeformableDecoderLayer(hidden_dim, dim_feedforward, dropout, num_feature_levels,
                                                           nheads, n_points) for _ in range(dec_layers))

    @classmethod
    def from_config(cls, cfg) -> dict:
        m = cfg.MODEL.MaskDINO
        return dict(num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, hidden_dim=m.HIDDEN_DIM,
                    num_queries=m.NUM_OBJECT_QUERIES, nheads=m.NHEADS, dim_feedforward=m.DIM_FEEDFORWARD,
                    dropout=m.DROPOUT, dec_layers=m.DEC_LAYERS, n_points=m.DEC_N_POINTS,
                    mask_dim=cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
                    num_feature_levels=cfg.MODEL.SEM_SEG_HEAD.TOTAL_NUM_FEATURE_LEVELS,
                    initial_pred=m.INITIAL_PRED, initialize_box_type=m.INITIALIZE_BOX_TYPE, dn=m.DN,
                    dn_num=m.DN_NUM, dn_noise_scale=m.DN_NOISE_SCALE,
                    dn_label_noise_ratio=m.DN_LABEL_NOISE_RATIO, class_prior_prob=m.CLASS_PRIOR_PROB,
                    official=is_official(cfg))

    # ---- heads ----
    def heads(self, hs: torch.Tensor, mask_features: torch.Tensor) -> dict:
        """Shared heads on queries ``hs [B, Q, D]`` → class logits and mask embeddings."""
        x = self.decoder_norm(hs)
        return {"pred_logits": self.class_embed(x), "pred_embeds": self.mask_embed(x), "mask_features": mask_features}

    def predict(self, hs: torch.Tensor, boxes: torch.Tensor, inputs: DecoderInputs) -> dict:
        return dict(self.heads(hs, inputs.mask_features), pred_boxes=boxes)

    def reference_delta(self, i: int, hs: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.bbox_embed(hs) if self.official else delta

    def layer_output(self, hs: torch.Tensor) -> torch.Tensor:
        return self.decoder_norm(hs) if self.official else hs

    # ---- query selection ----
    @torch.no_grad()
    def mask_boxes(self, embeds: torch.Tensor, inputs: DecoderInputs, fallback: torch.Tensor,
                   chunk: int = 128) -> torch.Tensor:
        """Unsigmoided boxes ``[B, K, 4]`` of the masks ``embeds [B, K, Dm]`` · mask features predict,
        normalised by the unpadded image, ``chunk`` queries at a time (bounded memory). A query whose mask
        is empty keeps its ``fallback`` box (``[B, K, 4]`` unsigmoided, the encoder's): an empty mask has no
        box, and its (0, 0, 0, 0) would put the query at the image's corner with no size."""
        fs = inputs.feat_sizes
        scale = torch.stack([fs[:, 1], fs[:, 0]] * 2, -1)[:, None]  # [B, 1, 4]
        out, nonempty = [], []
        detr_box = self.official and self.initialize_box_type == "mask2box"
        for i in range(0, embeds.shape[1], chunk):  # slices, not split(): its ONNX export rounds up the last chunk
            e = embeds[:, i:i + chunk]
            masks = torch.einsum("bqd,bdhw->bqhw", e, inputs.mask_features) > 0  # [B, q, h, w]
            boxes = detr_masks_to_boxes(masks) if detr_box else masks_to_boxes(masks)
            out.append(box_xyxy_to_cxcywh(boxes) / scale)
            nonempty.append(masks.flatten(2).any(-1))  # [B, q]
        boxes = inverse_sigmoid(torch.cat(out, 1).clamp(0, 1))
        if self.official:  # the official code's boxes, empty masks included (checkpoint parity)
            return boxes
        return torch.where(torch.cat(nonempty, 1)[..., None], boxes, fallback.to(boxes.dtype))

    def select_queries(self, inputs: DecoderInputs) -> QuerySelection:
        """Two-stage selection: the ``num_queries`` best tokens; content and boxes detached."""
        tgt, ref_unsig, _ = self.top_tokens(inputs, self.num_queries)
        interm = dict(self.heads(tgt, inputs.mask_features), pred_boxes=ref_unsig.sigmoid())
        ref = ref_unsig.detach()
        if self.initialize_box_type != "no":
            ref = self.mask_boxes(interm["pred_embeds"], inputs, ref)
        return QuerySelection(tgt.detach(), ref, interm)

    # ---- forward ----
    def decoder_inputs(self, multi_scale_features: list[torch.Tensor], masks: list[torch.Tensor],
                       mask_features: torch.Tensor, image_sizes: torch.Tensor,
                       padded_size: tuple[int, int]) -> DecoderInputs:
        if self.official:  # MaskDINO's decoder reads the encoder's levels in reverse order
            multi_scale_features, masks = multi_scale_features[::-1], masks[::-1]
        memory = torch.cat([f.flatten(2).transpose(1, 2) for f in multi_scale_features], 1)  # [B, S, D]
        fh, fw = mask_features.shape[-2:]
        scale = shape_tensor([[fh / padded_size[0], fw / padded_size[1]]], dtype=torch.float32, device=memory.device)[0]
        return DecoderInputs(memory=memory, memory_mask=torch.cat([m.flatten(1) for m in masks], 1),  # [B, S]
                             shapes=[tuple(f.shape[-2:]) for f in multi_scale_features],
                             ratios=valid_ratios(masks),  # [B, L, 2]
                             mask_features=mask_features,
                             feat_sizes=image_sizes.to(memory.device).float() * scale)  # [B, 2] (h, w)

    def denoising(self, targets: list[dict] | None, num_queries: int) -> DNQueries | None:
        if not (self.training and self.dn != "no" and targets is not None):
            return None
        return prepare_for_dn(targets, dn_num=self.dn_num, noise_scale=self.dn_noise_scale,
                              label_noise_ratio=self.dn_label_noise_ratio, num_classes=self.num_classes,
                              label_enc=self.label_enc, num_queries=num_queries)

    def forward(self, multi_scale_features: list[torch.Tensor], masks: list[torch.Tensor],
                mask_features: torch.Tensor, image_sizes: torch.Tensor, padded_size: tuple[int, int],
                targets: list[dict] | None = None) -> dict:
        """Encoder levels ``[B, D, Hl, Wl]`` with padding masks, ``mask_features [B, D, h, w]``,
        ``image_sizes [B, 2]`` unpadded (h, w) of the inputs padded to ``padded_size``; ``targets`` in training
        (denoising). Returns the last layer's outputs with ``aux_outputs``, ``interm_outputs``, the
        selection's ``extras`` and, with denoising, ``dn_outputs`` and ``dn_meta``."""
        inputs = self.decoder_inputs(multi_scale_features, masks, mask_features, image_sizes, padded_size)
        sel = self.select_queries(inputs)
        dnq = self.denoising(targets, sel.num_queries)
        tgt, ref, attn_mask = sel.content, sel.boxes_unsig, None
        if dnq is not None:
            tgt = torch.cat([dnq.content, tgt], 1)
            ref = torch.cat([dnq.boxes_unsig, ref], 1)
            attn_mask = dnq.attn_mask
        preds = self.refine(tgt, ref, inputs, attn_mask, sel)
        n_dn = dnq.size if dnq is not None else 0
        main = [{k: (v[:, n_dn:] if k != "mask_features" else v) for k, v in p.items()} for p in preds]
        out = dict(main[-1], aux_outputs=main[:-1], interm_outputs=sel.interm, **sel.extras)
        if dnq is not None:
            out["dn_outputs"] = [{k: (v[:, :n_dn] if k != "mask_features" else v) for k, v in p.items()} for p in preds]
            out["dn_meta"] = {"num_groups": dnq.num_groups, "group_size": dnq.group_size}
        return out
