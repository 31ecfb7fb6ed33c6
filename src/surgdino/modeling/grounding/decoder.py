"""GroundingDINO's cross-modality decoder on the shared ``BoxRefinementDecoder``: language-guided query
selection (the encoder tokens most similar to the text), then per layer query self-attention, text
cross-attention, deformable image cross-attention and FFN (the shared ``DeformableDecoderLayer`` with
a text sublayer), iterative box refinement and the contrastive class head on every layer.

As in the reference, the reference boxes refine from the un-normed state while predictions use the
normed one (``reference_delta``), each layer may own its box head, and selection ranks every token.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from surgdino.modeling.grounding.attention import ContrastiveHead
from surgdino.modeling.layers import MLP
from surgdino.modeling.layers.blocks import DeformableDecoderLayer
from surgdino.modeling.layers.box_refine import BoxRefinementDecoder, DecoderInputs, QuerySelection
from surgdino.modeling.maskdino.dn import DNQueries


@dataclass
class TextDecoderInputs(DecoderInputs):
    """``DecoderInputs`` plus the enhanced text ``text [B, T, D]`` and ``text_valid [B, T]`` (True = token)."""

    text: torch.Tensor | None = None
    text_valid: torch.Tensor | None = None


class TextDecoderLayer(DeformableDecoderLayer):
    """Self-attention → text cross-attention (``text_cross_attn``, ``text_norm``) → deformable cross-attention → FFN."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int,
                 activation: str = "relu", text_cross_attention: bool = True):
        super().__init__(d_model, d_ffn, dropout, n_levels, n_heads, n_points, activation)
        self.text_cross_attn = (nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
                                if text_cross_attention else None)
        self.text_norm = nn.LayerNorm(d_model) if text_cross_attention else None

    def forward(self, tgt, query_pos, ref_input, memory, memory_mask, shapes, attn_mask, text, text_pad):
        tgt = self.self_attention(tgt, query_pos, attn_mask)
        if self.text_cross_attn is not None:
            out = self.attend(self.text_cross_attn, tgt + query_pos, text, text, key_padding_mask=text_pad)
            tgt = self.residual(tgt, out, self.text_norm)
        tgt = self.memory_attention(tgt, query_pos, ref_input, memory, memory_mask, shapes)
        return self.ffn(tgt)


def _box_head(dim: int) -> MLP:
    head = MLP(dim, dim, 4, 3)
    nn.init.zeros_(head.layers[-1].weight)
    nn.init.zeros_(head.layers[-1].bias)
    return head


class GroundingDecoder(BoxRefinementDecoder):
    """``forward``: ``select`` → queries; ``refine`` → per layer ``pred_logits [B, Q, T]`` (-inf off the text),
    ``pred_boxes [B, Q, 4]``. Parameters: ``layers``, ``decoder_norm``, ``ref_point_head``, ``bbox_embed.i``
    (one module listed per layer when shared), ``enc_output(_norm)``, ``enc_bbox_embed``."""

    initial_pred = False
    select_invalid = True

    def __init__(self, *, num_layers: int = 6, dim: int = 256, ffn_dim: int = 2048, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4, dropout: float = 0.0, activation: str = "relu",
                 use_text_cross_attention: bool = True, share_box_head: bool = True,
                 two_stage_bbox_embed_share: bool = False):
        super().__init__()
        self.hidden_dim = dim
        self.layers = nn.ModuleList(TextDecoderLayer(dim, ffn_dim, dropout, n_levels, n_heads, n_points, activation,
                                                     use_text_cross_attention) for _ in range(num_layers))
        self.decoder_norm = nn.LayerNorm(dim)
        self.ref_point_head = MLP(2 * dim, dim, dim, 2)
        head = _box_head(dim)
        # shared: one module listed num_layers times (its parameters appear once in the state dict)
        self.bbox_embed = nn.ModuleList([head] * num_layers if share_box_head
                                        else [copy.deepcopy(head) for _ in range(num_layers)])
        self.class_embed = ContrastiveHead()
        self.enc_output = nn.Linear(dim, dim)
        self.enc_output_norm = nn.LayerNorm(dim)
        self.enc_bbox_embed = head if two_stage_bbox_embed_share and share_box_head else _box_head(dim)

    # ---- the hooks of BoxRefinementDecoder ----
    def token_scores(self, out_mem: torch.Tensor, inputs: TextDecoderInputs) -> torch.Tensor:
        return self.class_embed(out_mem, inputs.text, inputs.text_valid).max(-1).values

    def enc_box_head(self, tgt: torch.Tensor) -> torch.Tensor:
        return self.enc_bbox_embed(tgt)

    def box_delta(self, i: int, hs: torch.Tensor) -> torch.Tensor:
        return self.bbox_embed[i](self.decoder_norm(hs))

    def reference_delta(self, i: int, hs: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.bbox_embed[i](hs)

    def run_layer(self, i, layer, hs, query_pos, ref_input, inputs: TextDecoderInputs, attn_mask):
        return layer(hs, query_pos, ref_input, inputs.memory, inputs.memory_mask, inputs.shapes, attn_mask,
                     inputs.text, ~inputs.text_valid)

    def predict(self, hs: torch.Tensor, boxes: torch.Tensor, inputs: TextDecoderInputs) -> dict:
        return {"pred_logits": self.class_embed(self.decoder_norm(hs), inputs.text, inputs.text_valid),
                "pred_boxes": boxes}

    def select(self, inputs: TextDecoderInputs, num_queries: int) -> QuerySelection:
        """Language-guided selection: content (detached), boxes (detached, unsigmoided) and the encoder
        outputs of the selected tokens (``interm``, with gradients)."""
        tgt, ref_unsig, _ = self.top_tokens(inputs, num_queries)
        interm = {"pred_logits": self.class_embed(tgt, inputs.text, inputs.text_valid),
                  "pred_boxes": ref_unsig.sigmoid()}
        return QuerySelection(tgt.detach(), ref_unsig.detach(), interm)

    def forward(self, inputs: TextDecoderInputs, num_queries: int, query_embed: torch.Tensor | None = None,
                denoising: Callable[[int], DNQueries | None] | None = None) -> dict:
        """Selection → (denoising queries first) → refinement. Content queries are ``query_embed [Q, D]``
        when given (the reference's ``embed_init_tgt``), else the selected tokens. Returns the last layer's
        ``pred_logits``/``pred_boxes`` with ``aux_outputs``, ``interm_outputs`` and, with denoising,
        ``dn_outputs`` and ``dn_meta`` (the shared ``SetCriterion``'s layout)."""
        sel = self.select(inputs, num_queries)
        k = sel.num_queries
        tgt = query_embed[:k][None].expand(sel.content.shape[0], -1, -1) if query_embed is not None else sel.content
        ref, attn_mask = sel.boxes_unsig, None
        dnq = denoising(k) if denoising is not None else None
        if dnq is not None:
            tgt = torch.cat([dnq.content, tgt], 1)
            ref = torch.cat([dnq.boxes_unsig, ref], 1)
            attn_mask = dnq.attn_mask
        preds = self.refine(tgt, ref, inputs, attn_mask)
        n_dn = dnq.size if dnq is not None else 0
        main = [{key: v[:, n_dn:] for key, v in p.items()} for p in preds]
        out = dict(main[-1], aux_outputs=main[:-1], interm_outputs=sel.interm)
        if dnq is not None:
            out["dn_outputs"] = [{key: v[:, :n_dn] for key, v in p.items()} for p in preds]
            out["dn_meta"] = {"num_groups": dnq.num_groups, "group_size": dnq.group_size}
        return out
