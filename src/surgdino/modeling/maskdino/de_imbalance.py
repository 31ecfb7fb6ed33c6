"""DI-MaskDINO's decoder: MaskDINO plus De-Imbalance (DI) and Balance-Aware Tokens Optimization (BATO).

De-Imbalance (``select_queries``): the two-stage scoring keeps ``first_selected_queries`` encoder tokens
(with mask-enhanced boxes as MaskDINO), ``ti_layers`` token-interaction layers (self-attention with
box-derived positions, FFN, box refinement) let them exchange information, each layer's class and box
predictions are supervised through their own Hungarian matching (class and box costs), and a second
selection keeps the ``num_queries`` best tokens of the last layer as the decoder's queries. Their content
and boxes stay in the graph, so the decoder's losses train the token-interaction layers as well.

BATO (``layer_inputs``): after decoder layer 0 the ``num_guiding_tokens``
best matching queries (never denoising queries) guide an update of every encoder token (cross-attention
to the guiding tokens' mask embeddings, residual, norm, FFN); decoder layers >= 1 attend to the updated
tokens, and the highest-resolution updated level is fused into the mask features used from layer 1 on.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from surgdino.config.keys.maskdino import is_official
from surgdino.errors import ConfigError
from surgdino.modeling.layers import MLP, gather_tokens, gen_sineembed_for_position, inverse_sigmoid
from surgdino.modeling.layers.box_refine import DecoderInputs, QuerySelection
from surgdino.modeling.layers.geometry import encoder_proposals
from surgdino.modeling.layers.masked_norm import group_norm
from surgdino.modeling.maskdino import de_imbalance_official as official
from surgdino.modeling.maskdino.criterion import SetCriterion
from surgdino.modeling.maskdino.decoder import MaskDINODecoder
from surgdino.modeling.maskdino.di_layers import (
    GuidedTokenUpdate,
    TokenInteractionLayer,
    feature_valid,
    replicate_padding,
)
from surgdino.registry import DECODER_REGISTRY


@DECODER_REGISTRY.register("DIMaskDINODecoder")
class DIMaskDINODecoder(MaskDINODecoder):
    """MaskDINO's decoder with a different selection (``select_queries``, De-Imbalance: first selection →
    token interaction → second selection) and a per-layer memory update (``layer_inputs``, BATO).

    Choices of our design (``design = "surgdino"``) and where they differ from the reference code:

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

    ``design = "official"`` builds the reference design instead, so that official checkpoints load and give
    the reference outputs (``de_imbalance_official``: its own TI norm and box head, the delta applied twice,
    BATO as the reference writes it); ``"surgdino"`` is the design described above.
    """

    def __init__(self, *, first_selected_queries: int = 600, num_guiding_tokens: int = 50, ti_layers: int = 2,
                 bato_dim_feedforward: int = 1024, design: str = "surgdino", **kwargs):
        if design not in ("surgdino", "official"):
            raise ConfigError(f"MODEL.MaskDINO.DI_DESIGN = {design!r} must be 'surgdino' or 'official'")
        super().__init__(**kwargs)
        self.design = design
        d = self.hidden_dim
        nheads, dropout = kwargs.get("nheads", 8), kwargs.get("dropout", 0.0)
        mask_dim = kwargs.get("mask_dim", 256)
        self.first_selected_queries = max(first_selected_queries, self.num_queries)
        self.num_guiding_tokens = num_guiding_tokens
        if design == "official":
            official.build_parts(self, ti_layers=ti_layers, bato_dim_feedforward=bato_dim_feedforward, nheads=nheads,
                                 dropout=dropout, dim_feedforward=kwargs.get("dim_feedforward", 2048),
                                 mask_dim=mask_dim)
            return
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
            self.bato_mask_norm = group_norm(mask_dim)
            nn.init.zeros_(self.bato_mask_norm.weight)

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
        design = m.DI_DESIGN or ("official" if is_official(cfg) else "surgdino")
        official_design = design == "official"
        if official_design and cfg.MODEL.SEM_SEG_HEAD.MASK_DIM != m.HIDDEN_DIM:
            raise ConfigError(f"{p}DI_DESIGN official needs MODEL.SEM_SEG_HEAD.MASK_DIM = {p}HIDDEN_DIM (its BATO "
                              f"fuses tokens into the mask features unprojected); they are "
                              f"{cfg.MODEL.SEM_SEG_HEAD.MASK_DIM} and {m.HIDDEN_DIM}: make them equal or use "
                              "DI_DESIGN surgdino")
        ffn = m.DIM_FEEDFORWARD if official_design else cfg.MODEL.SEM_SEG_HEAD.DIM_FEEDFORWARD
        return dict(super().from_config(cfg), first_selected_queries=m.FIRST_SELECTED_QUERIES,
                    num_guiding_tokens=m.NUM_GUIDING_TOKENS, ti_layers=m.TI_LAYERS,
                    bato_dim_feedforward=ffn, design=design)

    @classmethod
    def build_criterion(cls, cfg, **kwargs) -> SetCriterion:
        """MaskDINO's criterion plus the token-interaction losses (``MaskDINO.from_config`` calls this)."""
        return DISetCriterion(ti_loss_weight=cfg.MODEL.MaskDINO.TI_LOSS_WEIGHT, **kwargs)

    # ---- De-Imbalance ----
    def select_queries(self, inputs: DecoderInputs) -> QuerySelection:
        """First selection → token interaction → second selection: the second selection's content
        ``[B, Q, D]`` and unsigmoided boxes ``[B, Q, 4]`` (both in the graph when ``ti_layers > 0``), the
        encoder-loss outputs and, in training, ``extras["ti_outputs"]`` (per TI layer logits and boxes)."""
        tgt, ref_unsig, sel_valid = self.top_tokens(inputs, self.first_selected_queries)  # [B, K1, ...], best first
        k = min(self.num_queries, tgt.shape[1])
        first = self.heads(tgt, inputs.mask_features)
        n = tgt.shape[1] if self.design == "official" else k  # the reference supervises the whole first selection
        interm = {"pred_logits": first["pred_logits"][:, :n], "pred_embeds": first["pred_embeds"][:, :n],
                  "mask_features": inputs.mask_features, "pred_boxes": ref_unsig[:, :n].sigmoid()}
        ref = ref_unsig.detach()
        if self.initialize_box_type != "no":
            ref = self.mask_boxes(first["pred_embeds"].detach(), inputs, ref)
        x = tgt.detach()
        if self.design == "official":
            x, ref, ti_outputs = official.token_interaction(self, x, ref, sel_valid, inputs, k)
            extras = {"ti_outputs": ti_outputs} if self.training and ti_outputs else {}
            return QuerySelection(x, ref, interm, extras)
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
            x, ref = gather_tokens(x, idx2), gather_tokens(ref, idx2)
        else:  # the first selection is sorted by score: the second keeps its head
            x, ref = x[:, :k], ref[:, :k]
        extras = {"ti_outputs": ti_outputs} if self.training and ti_outputs else {}
        return QuerySelection(x, ref, interm, extras)

    # ---- BATO ----
    def guiding_tokens(self, hs: torch.Tensor, num_queries: int) -> torch.Tensor:
        """Indices ``[B, G]`` into the last ``num_queries`` (matching) queries of ``hs [B, N_dn + Q, D]`` of the
        ``num_guiding_tokens`` best by class score; denoising queries (the first ``N_dn``) are never chosen."""
        hm = hs[:, hs.shape[1] - num_queries:]
        scores = self.class_embed(self.decoder_norm(hm)).max(-1).values  # [B, Q]
        return scores.topk(min(self.num_guiding_tokens, num_queries), dim=1).indices

    def bato(self, inputs: DecoderInputs, hs: torch.Tensor, selection: QuerySelection) -> DecoderInputs:
        """``inputs`` with the guided token update of the memory and the mask features fused with its
        highest-resolution level; ``hs`` are the queries after decoder layer 0."""
        q, d = selection.num_queries, self.hidden_dim
        hm = hs[:, hs.shape[1] - q:]  # matching queries after layer 0
        gidx = self.guiding_tokens(hs, q)  # [B, G]
        gn = self.decoder_norm(gather_tokens(hm, gidx))
        guide = self.bato_guide_proj(self.mask_embed(gn))  # [B, G, D]
        with torch.no_grad():  # their layer-0 boxes, as the decoder computes them
            ref0 = gather_tokens(selection.boxes_unsig.detach(), gidx)
            gbox = (self.bbox_embed(gn) + inverse_sigmoid(ref0.sigmoid())).sigmoid()
        guide_pos = self.bato_pos_head(gen_sineembed_for_position(gbox, d))
        mask, shapes = inputs.memory_mask, inputs.shapes
        mem_pos = self.bato_pos_head(gen_sineembed_for_position(encoder_proposals(mask, shapes), d))
        updated = self.bato_update(inputs.memory, mem_pos, mask, guide, guide_pos)
        # highest-resolution level → mask features (conv + norm + activation, zero at padding)
        sizes = [h * w for h, w in shapes]
        lvl = max(range(len(shapes)), key=lambda i: sizes[i])
        start = sum(sizes[:lvl])
        h, w = shapes[lvl]
        lv = updated[:, start:start + h * w].transpose(1, 2).reshape(-1, d, h, w)
        lv = replicate_padding(lv, mask[:, start:start + h * w].view(-1, h, w))
        mf = inputs.mask_features
        fh, fw = mf.shape[-2:]
        lv = F.interpolate(lv, size=(fh, fw), mode="bilinear", align_corners=False)
        valid = feature_valid(mf, inputs.feat_sizes)
        add = F.gelu(self.bato_mask_norm(self.bato_mask_conv(lv * valid), valid)) * valid
        return dataclasses.replace(inputs, memory=updated, mask_features=mf + add)

    def layer_inputs(self, i: int, inputs: DecoderInputs, hs: torch.Tensor,
                     selection: QuerySelection | None) -> DecoderInputs:
        """Layer 0 reads the encoder's tokens; BATO updates them (and the mask features) once, before layer 1,
        and layers >= 1 and their heads read the update."""
        if self.num_guiding_tokens > 0 and i == 1 and selection is not None:
            if self.design == "official":
                return official.bato(self, inputs, hs, selection)
            return self.bato(inputs, hs, selection)
        return inputs


class DISetCriterion(SetCriterion):
    """``SetCriterion`` plus, under ``deep_supervision``, class and box losses of every token-interaction
    layer's outputs, each with its own Hungarian matching on class and box costs (no mask costs): keys
    ``loss_ce_ti{i}``, ``loss_bbox_ti{i}``, ``loss_giou_ti{i}``, weighted by the usual weights × ``ti_loss_weight``."""

    def __init__(self, *, ti_loss_weight: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.ti_loss_weight = ti_loss_weight

    def extra_losses(self, outputs: dict, targets: list[dict], num: float) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        ti = outputs.get("ti_outputs") or []
        if not (self.deep_supervision and ti and self.ti_loss_weight > 0):
            return losses
        for i, out in enumerate(ti):
            indices = self.matcher(out, targets)  # no pred_embeds: class and box costs only
            part = self.loss_labels(out, targets, indices, num)
            if self.box_loss:
                part.update(self.loss_boxes(out, targets, indices, num))
            losses.update({f"{k}_ti{i}": v * self.weight_dict.get(k, 1.0) * self.ti_loss_weight
                           for k, v in part.items()})
        return losses
