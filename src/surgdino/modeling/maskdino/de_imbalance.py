"""DI-MaskDINO's decoder: MaskDINO plus De-Imbalance (DI) and Balance-Aware Tokens Optimization (BATO).

De-Imbalance (``select_queries``): the two-stage scoring keeps ``first_selected_queries`` encoder tokens
(with mask-enhanced boxes as MaskDINO), ``ti_layers`` token-interaction layers (self-attention with
box-derived positions, FFN, box refinement) let them exchange information, each layer's class and box
predictions are supervised through their own Hungarian matching (class and box costs), and a second
selection keeps the ``num_queries`` best tokens of the last layer as the decoder's queries. Their content
and boxes stay in the graph, so the decoder's losses train the token-interaction layers as well.

BATO (``layer_memory`` / ``layer_mask_features``): after decoder layer 0 the ``num_guiding_tokens``
best matching queries (never denoising queries) guide an update of every encoder token (cross-attention
to the guiding tokens' mask embeddings, residual, norm, FFN); decoder layers >= 1 attend to the updated
tokens, and the highest-resolution updated level is fused into the mask features used from layer 1 on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from surgdino import comm
from surgdino.errors import ConfigError
from surgdino.modeling.layers import MLP, gen_sineembed_for_position, inverse_sigmoid
from surgdino.modeling.maskdino.box_ops import box_xyxy_to_cxcywh, masks_to_boxes
from surgdino.modeling.maskdino.criterion import SetCriterion
from surgdino.modeling.maskdino.decoder import MaskDINODecoder, token_boxes
from surgdino.modeling.pixel_decoder import MaskedGroupNorm
from surgdino.registry import DECODER_REGISTRY


class TokenInteractionLayer(nn.Module):
    """Post-norm self-attention among the first-selected tokens (positions from their boxes) and FFN."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_heads: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x, pos [B, K, D]``; ``key_padding_mask [B, K]`` True = token not to attend to."""
        q = k = x + pos
        att = self.self_attn(q, k, x, key_padding_mask=key_padding_mask, need_weights=False)[0]
        x = self.norm1(x + self.dropout(att))
        return self.norm2(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class GuidedTokenUpdate(nn.Module):
    """BATO's token update: every encoder token cross-attends to the guiding tokens, then residual, norm, FFN.

    Queries are ``memory + memory_pos``, keys ``guide + guide_pos``, values ``guide`` (the guiding tokens'
    mask embeddings). Padding tokens come back unchanged.
    """

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_heads: int):
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, memory: torch.Tensor, memory_pos: torch.Tensor, memory_mask: torch.Tensor,
                guide: torch.Tensor, guide_pos: torch.Tensor) -> torch.Tensor:
        """``memory, memory_pos [B, S, D]``, ``memory_mask [B, S]`` (True = padding), ``guide, guide_pos [B, G, D]``."""
        att = self.cross_attn(memory + memory_pos, guide + guide_pos, guide, need_weights=False)[0]
        x = self.norm1(memory + self.dropout(att))
        x = self.norm2(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))
        return torch.where(memory_mask[..., None], memory, x)


def _replicate_padding(x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """``x [B, C, H, W]`` with padded rows/columns (``pad [B, H, W]``, True = padding, bottom/right) replaced by
    the last valid ones, so bilinear upsampling gives at valid pixels what it gives for the image alone."""
    b, _, h, w = x.shape
    vh = (~pad[:, :, 0]).sum(1).clamp(min=1)  # [B]
    vw = (~pad[:, 0, :]).sum(1).clamp(min=1)
    rows = torch.minimum(torch.arange(h, device=x.device)[None], vh[:, None] - 1)  # [B, H]
    cols = torch.minimum(torch.arange(w, device=x.device)[None], vw[:, None] - 1)  # [B, W]
    x = torch.gather(x, 2, rows[:, None, :, None].expand(-1, x.shape[1], -1, w))
    return torch.gather(x, 3, cols[:, None, None, :].expand(-1, x.shape[1], h, -1))


@DECODER_REGISTRY.register("DIMaskDINODecoder")
class DIMaskDINODecoder(MaskDINODecoder):
    """MaskDINO's decoder with De-Imbalance (first selection → token interaction → second selection) and BATO.

    Choices (and where they differ from the reference code):

    * Box refinement of the token-interaction (TI) outputs applies each layer's predicted delta ONCE:
      ``box_l = sigmoid(delta_l + inverse_sigmoid(box_{l-1}))``. The reference adds the delta a second time
      to the already-refined box when forming the supervised output, so its loss and its second
      selection see a box that the next stage never uses.
    * TI layers share the decoder's ``decoder_norm``, ``class_embed`` and ``bbox_embed`` (as MaskDINO shares
      them between encoder and decoder layers); their positions come from their own sine-embedding MLP.
    * The encoder (``interm``) losses are taken on the top ``num_queries`` tokens of the first selection,
      exactly what MaskDINO supervises; the whole first selection is supervised by the TI losses.
    * The first selection is detached (as MaskDINO's selected queries); the second selection is not.
    * BATO values are the guiding tokens' mask embeddings (projected when ``mask_dim != hidden_dim``), keys
      add their layer-0 box position embeddings; encoder tokens use the same embedding of their
      proposal boxes. The mask-feature branch (conv + GroupNorm + GELU) starts at zero (its norm's scale
      is 0), so an untrained BATO leaves the mask features as they are and learns how much to add.
      BATO's FFN has the encoder's width (``SEM_SEG_HEAD.DIM_FEEDFORWARD``): it transforms encoder tokens.
    * ``ti_layers = 0`` and ``num_guiding_tokens = 0`` reduce this decoder to MaskDINO's (same outputs for
      the same weights).
    """

    def __init__(self, *, first_selected_queries: int = 600, num_guiding_tokens: int = 50, ti_layers: int = 2,
                 bato_dim_feedforward: int = 1024, **kwargs):
        super().__init__(**kwargs)
        d = self.hidden_dim
        nheads, dropout = kwargs.get("nheads", 8), kwargs.get("dropout", 0.0)
        mask_dim = kwargs.get("mask_dim", 256)
        self.first_selected_queries = max(first_selected_queries, self.num_queries)
        self.num_guiding_tokens = num_guiding_tokens
        self.ti_layers = nn.ModuleList(TokenInteractionLayer(d, kwargs.get("dim_feedforward", 2048), dropout, nheads)
                                       for _ in range(ti_layers))
        if ti_layers:
            self.ti_ref_point_head = MLP(2 * d, d, d, 2)
        if num_guiding_tokens > 0:
            self.bato_pos_head = MLP(2 * d, d, d, 2)
            self.bato_guide_proj = nn.Linear(mask_dim, d) if mask_dim != d else nn.Identity()
            self.bato_update = GuidedTokenUpdate(d, bato_dim_feedforward, dropout, nheads)
            self.bato_mask_conv = nn.Conv2d(d, mask_dim, 3, padding=1, bias=False)
            nn.init.xavier_uniform_(self.bato_mask_conv.weight)
            self.bato_mask_norm = MaskedGroupNorm(32 if mask_dim % 32 == 0 else 1, mask_dim)
            nn.init.zeros_(self.bato_mask_norm.weight)
        self._ctx: dict | None = None

    @classmethod
    def from_config(cls, cfg) -> dict:
        m = cfg.MODEL.MaskDINO
        p = "MODEL.MaskDINO."
        if m.FIRST_SELECTED_QUERIES < m.NUM_OBJECT_QUERIES:
            raise ConfigError(f"{p}FIRST_SELECTED_QUERIES = {m.FIRST_SELECTED_QUERIES} must be >= "
                              f"{p}NUM_OBJECT_QUERIES = {m.NUM_OBJECT_QUERIES} (the second selection keeps "
                              "NUM_OBJECT_QUERIES of the first); raise it or lower NUM_OBJECT_QUERIES")
        if not 0 <= m.NUM_GUIDING_TOKENS <= m.NUM_OBJECT_QUERIES:
            raise ConfigError(f"{p}NUM_GUIDING_TOKENS = {m.NUM_GUIDING_TOKENS} must be in 0..NUM_OBJECT_QUERIES "
                              f"= {m.NUM_OBJECT_QUERIES} (guiding tokens are taken among the queries; 0 = BATO off)")
        if m.NUM_GUIDING_TOKENS > 0 and m.DEC_LAYERS < 2:
            raise ConfigError(f"{p}NUM_GUIDING_TOKENS = {m.NUM_GUIDING_TOKENS} needs {p}DEC_LAYERS >= 2 (BATO acts "
                              f"from decoder layer 1 on; DEC_LAYERS = {m.DEC_LAYERS}); raise DEC_LAYERS or set "
                              "NUM_GUIDING_TOKENS 0")
        if m.TI_LAYERS < 0:
            raise ConfigError(f"{p}TI_LAYERS = {m.TI_LAYERS} must be >= 0")
        return dict(super().from_config(cfg), first_selected_queries=m.FIRST_SELECTED_QUERIES,
                    num_guiding_tokens=m.NUM_GUIDING_TOKENS, ti_layers=m.TI_LAYERS,
                    bato_dim_feedforward=cfg.MODEL.SEM_SEG_HEAD.DIM_FEEDFORWARD)

    @classmethod
    def build_criterion(cls, cfg, **kwargs) -> SetCriterion:
        """MaskDINO's criterion plus the token-interaction losses (``MaskDINO.from_config`` calls this)."""
        return DISetCriterion(ti_loss_weight=cfg.MODEL.MaskDINO.TI_LOSS_WEIGHT, **kwargs)

    # ---- De-Imbalance ----
    @torch.no_grad()
    def _mask_boxes(self, embeds: torch.Tensor, mask_features: torch.Tensor, image_sizes_feat: torch.Tensor,
                    chunk: int = 128) -> torch.Tensor:
        """Unsigmoided boxes of the queries' predicted masks, ``chunk`` queries at a time (bounded memory)."""
        scale = torch.stack([image_sizes_feat[:, 1], image_sizes_feat[:, 0]] * 2, -1)[:, None]  # [B, 1, 4]
        out = []
        for e in embeds.split(chunk, 1):
            masks = torch.einsum("bqd,bdhw->bqhw", e, mask_features) > 0
            out.append(box_xyxy_to_cxcywh(masks_to_boxes(masks)) / scale)
        return inverse_sigmoid(torch.cat(out, 1).clamp(0, 1))

    def select_queries(self, memory, memory_mask, shapes, mask_features, image_sizes_feat):
        """First selection → token interaction → second selection. Returns the second selection's content
        ``[B, Q, D]`` and unsigmoided boxes ``[B, Q, 4]`` (both in the graph when ``ti_layers > 0``) and the
        encoder-loss outputs; TI outputs go to the context for ``forward``."""
        out_mem, props, valid = self.proposals(memory, memory_mask, shapes)
        with torch.no_grad():  # scores only rank the tokens
            scores = self.class_embed(out_mem).max(-1).values.masked_fill(~valid, float("-inf"))  # [B, S]
        k1 = min(self.first_selected_queries, scores.shape[1])
        k = min(self.num_queries, k1)
        idx = scores.topk(k1, dim=1).indices  # [B, K1], best first
        d = out_mem.shape[-1]
        tgt = torch.gather(out_mem, 1, idx[..., None].expand(-1, -1, d))  # [B, K1, D]
        ref_unsig = self.bbox_embed(tgt) + torch.gather(props, 1, idx[..., None].expand(-1, -1, 4))  # unsigmoided
        sel_valid = torch.gather(valid, 1, idx)  # [B, K1]
        first = self.heads(tgt, mask_features)
        interm = {"pred_logits": first["pred_logits"][:, :k], "pred_embeds": first["pred_embeds"][:, :k],
                  "mask_features": mask_features, "pred_boxes": ref_unsig[:, :k].sigmoid()}
        ref = ref_unsig.detach()
        if self.initialize_box_type != "no":
            ref = self._mask_boxes(first["pred_embeds"].detach(), mask_features, image_sizes_feat)
        x = tgt.detach()
        ti_outputs = []
        for layer in self.ti_layers:
            pos = self.ti_ref_point_head(gen_sineembed_for_position(ref.sigmoid().detach(), self.hidden_dim))
            x = layer(x, pos, key_padding_mask=~sel_valid)
            xn = self.decoder_norm(x)
            ref = self.bbox_embed(xn) + ref  # the delta is applied once (see the class docstring)
            ti_outputs.append({"pred_logits": self.class_embed(xn), "pred_boxes": ref.sigmoid()})
        if ti_outputs:
            score2 = ti_outputs[-1]["pred_logits"].max(-1).values.masked_fill(~sel_valid, float("-inf"))
            idx2 = score2.topk(k, dim=1).indices  # [B, Q]
            x = torch.gather(x, 1, idx2[..., None].expand(-1, -1, d))
            ref = torch.gather(ref, 1, idx2[..., None].expand(-1, -1, 4))
        else:  # the first selection is sorted by score: the second keeps its head
            x, ref = x[:, :k], ref[:, :k]
        if self._ctx is not None:
            self._ctx.update(ti_outputs=ti_outputs, num_queries=k, ref=ref.detach(), memory_mask=memory_mask,
                             shapes=shapes, mask_features=mask_features, image_sizes_feat=image_sizes_feat)
        return x, ref, interm

    # ---- BATO ----
    def guiding_tokens(self, hs: torch.Tensor, num_queries: int) -> torch.Tensor:
        """Indices ``[B, G]`` into the last ``num_queries`` (matching) queries of ``hs [B, N_dn + Q, D]`` of the
        ``num_guiding_tokens`` best by class score; denoising queries (the first ``N_dn``) are never chosen."""
        hm = hs[:, hs.shape[1] - num_queries:]
        scores = self.class_embed(self.decoder_norm(hm)).max(-1).values  # [B, Q]
        return scores.topk(min(self.num_guiding_tokens, num_queries), dim=1).indices

    def _bato(self, memory: torch.Tensor, hs: torch.Tensor) -> None:
        ctx = self._ctx
        q, d = ctx["num_queries"], self.hidden_dim
        hm = hs[:, hs.shape[1] - q:]  # matching queries after layer 0
        gidx = self.guiding_tokens(hs, q)  # [B, G]
        g = torch.gather(hm, 1, gidx[..., None].expand(-1, -1, d))
        gn = self.decoder_norm(g)
        guide = self.bato_guide_proj(self.mask_embed(gn))  # [B, G, D]
        with torch.no_grad():  # their layer-0 boxes, as the decoder computes them
            ref0 = torch.gather(ctx["ref"], 1, gidx[..., None].expand(-1, -1, 4))
            gbox = (self.bbox_embed(gn) + inverse_sigmoid(ref0.sigmoid())).sigmoid()
        guide_pos = self.bato_pos_head(gen_sineembed_for_position(gbox, d))
        mask, shapes = ctx["memory_mask"], ctx["shapes"]
        mem_pos = self.bato_pos_head(gen_sineembed_for_position(token_boxes(mask, shapes), d))
        updated = self.bato_update(memory, mem_pos, mask, guide, guide_pos)
        ctx["memory"] = updated
        ctx["guiding_indices"] = gidx
        # highest-resolution level → mask features (conv + norm + activation, zero at padding)
        sizes = [h * w for h, w in shapes]
        lvl = max(range(len(shapes)), key=lambda i: sizes[i])
        start = sum(sizes[:lvl])
        h, w = shapes[lvl]
        lv = updated[:, start:start + h * w].transpose(1, 2).reshape(-1, d, h, w)
        lv = _replicate_padding(lv, mask[:, start:start + h * w].view(-1, h, w))
        mf = ctx["mask_features"]
        fh, fw = mf.shape[-2:]
        lv = F.interpolate(lv, size=(fh, fw), mode="bilinear", align_corners=False)
        fs = ctx["image_sizes_feat"]
        dev = mf.device
        valid = ((torch.arange(fh, device=dev)[None, :, None] < fs[:, 0, None, None])
                 & (torch.arange(fw, device=dev)[None, None, :] < fs[:, 1, None, None]))[:, None].to(mf.dtype)
        add = F.gelu(self.bato_mask_norm(self.bato_mask_conv(lv * valid), valid)) * valid
        ctx["mask_features_out"] = mf + add

    def layer_memory(self, layer: int, memory: torch.Tensor, hs: torch.Tensor) -> torch.Tensor:
        if self.num_guiding_tokens <= 0 or layer == 0 or self._ctx is None:
            return memory
        if "memory" not in self._ctx:
            self._bato(memory, hs)
        return self._ctx["memory"]

    def layer_mask_features(self, layer: int, mask_features: torch.Tensor, hs: torch.Tensor) -> torch.Tensor:
        if self.num_guiding_tokens <= 0 or layer == 0 or self._ctx is None or "mask_features_out" not in self._ctx:
            return mask_features
        return self._ctx["mask_features_out"]

    def forward(self, multi_scale_features, masks, mask_features, image_sizes, padded_size, targets=None) -> dict:
        """As ``MaskDINODecoder.forward``; in training the output also has ``ti_outputs`` (per TI layer
        ``pred_logits``, ``pred_boxes`` of the first-selected tokens)."""
        self._ctx = {}
        try:
            out = super().forward(multi_scale_features, masks, mask_features, image_sizes, padded_size, targets)
            ctx = self._ctx
        finally:
            self._ctx = None
        if self.training and ctx["ti_outputs"]:
            out["ti_outputs"] = ctx["ti_outputs"]
        return out


class DISetCriterion(SetCriterion):
    """``SetCriterion`` plus, under ``deep_supervision``, class and box losses of every token-interaction
    layer's outputs, each with its own Hungarian matching on class and box costs (no mask costs): keys
    ``loss_ce_ti{i}``, ``loss_bbox_ti{i}``, ``loss_giou_ti{i}``, weighted by the usual weights × ``ti_loss_weight``."""

    def __init__(self, *, ti_loss_weight: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.ti_loss_weight = ti_loss_weight

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        losses = super().forward(outputs, targets)
        ti = outputs.get("ti_outputs") or []
        if not (self.deep_supervision and ti and self.ti_loss_weight > 0):
            return losses
        device = ti[0]["pred_logits"].device
        num = torch.as_tensor(float(sum(int(t["labels"].numel()) for t in targets)), device=device)
        num = max(float(comm.all_reduce_mean(num).item()), 1.0)
        for i, out in enumerate(ti):
            indices = self.matcher(out, targets)  # no pred_embeds: class and box costs only
            part = self.loss_labels(out, targets, indices, num)
            if self.box_loss:
                part.update(self.loss_boxes(out, targets, indices, num))
            losses.update({f"{k}_ti{i}": v * self.weight_dict.get(k, 1.0) * self.ti_loss_weight
                           for k, v in part.items()})
        return losses
