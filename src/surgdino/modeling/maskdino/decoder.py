"""MaskDINO's decoder: two-stage query selection, mask-enhanced box init, denoising queries,
deformable decoder layers with look-forward-twice box refinement, shared class/mask/box heads.

DI-MaskDINO overrides ``select_queries`` (De-Imbalance) and ``layer_memory`` / ``layer_mask_features`` (BATO).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from surgdino.modeling.layers import MLP, MSDeformAttn, gen_sineembed_for_position, inverse_sigmoid
from surgdino.modeling.maskdino.box_ops import box_xyxy_to_cxcywh, masks_to_boxes
from surgdino.modeling.maskdino.dn import prepare_for_dn
from surgdino.modeling.pixel_decoder import valid_ratios
from surgdino.registry import DECODER_REGISTRY


def token_boxes(memory_mask: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
    """Per encoder token a box ``[B, S, 4]`` (cx, cy, w, h): its cell centre normalised by the image's
    unpadded extent on its level and a size growing 2x per coarser level (MaskDINO's proposal geometry)."""
    order = sorted(range(len(shapes)), key=lambda i: -shapes[i][0] * shapes[i][1])
    rank = {lvl: r for r, lvl in enumerate(order)}
    out, start = [], 0
    bsz, dev = memory_mask.shape[0], memory_mask.device
    for lvl, (h, w) in enumerate(shapes):
        m = memory_mask[:, start:start + h * w].view(bsz, h, w)
        vh = (~m[:, :, 0]).sum(1).float().clamp(min=1)
        vw = (~m[:, 0, :]).sum(1).float().clamp(min=1)
        gy, gx = torch.meshgrid(torch.arange(h, device=dev, dtype=torch.float32),
                                torch.arange(w, device=dev, dtype=torch.float32), indexing="ij")
        xy = torch.stack([(gx + 0.5)[None] / vw[:, None, None], (gy + 0.5)[None] / vh[:, None, None]], -1)
        wh = torch.full_like(xy, 0.05 * 2.0 ** rank[lvl])
        out.append(torch.cat([xy, wh], -1).view(bsz, h * w, 4))
        start += h * w
    return torch.cat(out, 1).clamp(0.0, 1.0)


class DecoderLayer(nn.Module):
    """Post-norm layer: self-attention (with the denoising mask), deformable cross-attention, FFN."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt, query_pos, ref_input, memory, memory_mask, shapes, attn_mask=None):
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout(self.self_attn(q, k, tgt, attn_mask=attn_mask, need_weights=False)[0]))
        out = self.cross_attn(tgt + query_pos, ref_input, memory, shapes, None, memory_mask)
        tgt = self.norm2(tgt + self.dropout(out))
        return self.norm3(tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))


@DECODER_REGISTRY.register("MaskDINODecoder")
class MaskDINODecoder(nn.Module):
    """Queries from encoder tokens → ``dec_layers`` refinements; outputs per layer class logits,
    boxes (normalised cxcywh) and mask embeddings (masks = embedding · mask features)."""

    def __init__(self, *, num_classes: int, hidden_dim: int = 256, num_queries: int = 300, nheads: int = 8,
                 dim_feedforward: int = 2048, dropout: float = 0.0, dec_layers: int = 9, n_points: int = 4,
                 mask_dim: int = 256, num_feature_levels: int = 4, initial_pred: bool = True,
                 initialize_box_type: str = "mask2box", dn: str = "seg", dn_num: int = 100,
                 dn_noise_scale: float = 0.4, dn_label_noise_ratio: float = 0.2, class_prior_prob: float = 0.01):
        super().__init__()
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
        self.layers = nn.ModuleList(DecoderLayer(hidden_dim, dim_feedforward, dropout, num_feature_levels, nheads,
                                                 n_points) for _ in range(dec_layers))

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
                    dn_label_noise_ratio=m.DN_LABEL_NOISE_RATIO, class_prior_prob=m.CLASS_PRIOR_PROB)

    def heads(self, hs: torch.Tensor, mask_features: torch.Tensor) -> dict:
        """Shared heads on queries ``hs [B, Q, D]`` → class logits and mask embeddings."""
        x = self.decoder_norm(hs)
        return {"pred_logits": self.class_embed(x), "pred_embeds": self.mask_embed(x), "mask_features": mask_features}

    def proposals(self, memory, memory_mask, shapes):
        """Per token a box prior (its cell, size by resolution) and the transformed memory; invalid → masked."""
        props = token_boxes(memory_mask, shapes)  # [B, S, 4] float32
        valid = ((props > 0.01) & (props < 0.99)).all(-1) & ~memory_mask
        props = inverse_sigmoid(props).masked_fill(~valid[..., None], 0.0)
        out = self.enc_output_norm(self.enc_output(memory.masked_fill(~valid[..., None], 0.0)))
        return out, props, valid

    def select_queries(self, memory, memory_mask, shapes, mask_features, image_sizes_feat):
        """Two-stage selection → (content ``[B, Q, D]`` detached, reference boxes unsigmoided ``[B, Q, 4]``
        detached, encoder-loss outputs)."""
        out_mem, props, valid = self.proposals(memory, memory_mask, shapes)
        with torch.no_grad():  # scores only rank the tokens; the selected ones' outputs are recomputed below
            scores = self.class_embed(out_mem).max(-1).values.masked_fill(~valid, float("-inf"))  # [B, S]
        k = min(self.num_queries, scores.shape[1])
        idx = scores.topk(k, dim=1).indices  # [B, Q]
        tgt = torch.gather(out_mem, 1, idx[..., None].expand(-1, -1, out_mem.shape[-1]))  # [B, Q, D]
        # box head on the selected tokens only (same values as on all S tokens, then gathered)
        ref_unsig = self.bbox_embed(tgt) + torch.gather(props, 1, idx[..., None].expand(-1, -1, 4))  # [B, Q, 4]
        interm = self.heads(tgt, mask_features)
        interm["pred_boxes"] = ref_unsig.sigmoid()
        ref = ref_unsig.detach()
        if self.initialize_box_type != "no":
            with torch.no_grad():
                masks = torch.einsum("bqd,bdhw->bqhw", interm["pred_embeds"], mask_features) > 0  # [B, Q, h, w]
                xyxy = masks_to_boxes(masks)
                scale = torch.stack([image_sizes_feat[:, 1], image_sizes_feat[:, 0]] * 2, -1)[:, None]  # [B, 1, 4]
                ref = inverse_sigmoid((box_xyxy_to_cxcywh(xyxy) / scale).clamp(0, 1))
        return tgt.detach(), ref, interm

    def layer_memory(self, layer: int, memory: torch.Tensor, hs: torch.Tensor) -> torch.Tensor:
        """Memory that decoder ``layer`` attends to (BATO updates it)."""
        return memory

    def layer_mask_features(self, layer: int, mask_features: torch.Tensor, hs: torch.Tensor) -> torch.Tensor:
        """Mask features the outputs of ``layer`` use (BATO adds to them)."""
        return mask_features

    def forward(self, multi_scale_features: list[torch.Tensor], masks: list[torch.Tensor],
                mask_features: torch.Tensor, image_sizes: torch.Tensor, padded_size: tuple[int, int],
                targets: list[dict] | None = None) -> dict:
        """Encoder levels ``[B, D, Hl, Wl]`` with padding masks, ``mask_features [B, D, h, w]``,
        ``image_sizes [B, 2]`` unpadded (h, w) of the inputs padded to ``padded_size``; ``targets`` in training."""
        shapes = [tuple(f.shape[-2:]) for f in multi_scale_features]
        memory = torch.cat([f.flatten(2).transpose(1, 2) for f in multi_scale_features], 1)  # [B, S, D]
        memory_mask = torch.cat([m.flatten(1) for m in masks], 1)  # [B, S]
        ratios = valid_ratios(masks)  # [B, L, 2]
        fh, fw = mask_features.shape[-2:]
        scale = torch.tensor([fh / padded_size[0], fw / padded_size[1]], device=memory.device)
        feat_sizes = image_sizes.to(memory.device).float() * scale  # [B, 2] unpadded (h, w) in mask-feature pixels
        tgt, ref, interm = self.select_queries(memory, memory_mask, shapes, mask_features, feat_sizes)
        dnq = None
        if self.training and self.dn != "no" and targets is not None:
            dnq = prepare_for_dn(targets, dn_num=self.dn_num, noise_scale=self.dn_noise_scale,
                                 label_noise_ratio=self.dn_label_noise_ratio, num_classes=self.num_classes,
                                 label_enc=self.label_enc, num_queries=tgt.shape[1])
        attn_mask = None
        if dnq is not None:
            tgt = torch.cat([dnq.content, tgt], 1)
            ref = torch.cat([dnq.boxes_unsig, ref], 1)
            attn_mask = dnq.attn_mask
        ref_sig = ref.sigmoid()
        preds = []
        if self.initial_pred:
            p = self.heads(tgt, mask_features)
            p["pred_boxes"] = ref_sig
            preds.append(p)
        hs, prev = tgt, ref_sig
        for i, layer in enumerate(self.layers):
            ref_in = ref_sig.detach()[:, :, None] * torch.cat([ratios, ratios], -1)[:, None]  # [B, Q, L, 4]
            query_pos = self.ref_point_head(gen_sineembed_for_position(ref_in[:, :, 0], self.hidden_dim))
            hs = layer(hs, query_pos, ref_in, self.layer_memory(i, memory, hs), memory_mask, shapes, attn_mask)
            delta = self.bbox_embed(self.decoder_norm(hs))
            box = (delta + inverse_sigmoid(prev)).sigmoid()  # look forward twice: grads reach the previous layer
            local = (delta + inverse_sigmoid(ref_sig.detach())).sigmoid()
            p = self.heads(hs, self.layer_mask_features(i, mask_features, hs))
            p["pred_boxes"] = box
            preds.append(p)
            prev, ref_sig = local, local.detach()
        n_dn = dnq.size if dnq is not None else 0
        main = [{k: (v[:, n_dn:] if k != "mask_features" else v) for k, v in p.items()} for p in preds]
        out = dict(main[-1], aux_outputs=main[:-1], interm_outputs=interm)
        if dnq is not None:
            out["dn_outputs"] = [{k: (v[:, :n_dn] if k != "mask_features" else v) for k, v in p.items()} for p in preds]
            out["dn_meta"] = {"num_groups": dnq.num_groups, "group_size": dnq.group_size}
        return out
