"""DI-MaskDINO's reference design (``MODEL.MaskDINO.DI_DESIGN official``), so that official checkpoints
load with every tensor in its place and give the reference outputs for the same weights and image.

Where it differs from our design (``DIMaskDINODecoder``'s docstring), and why we keep ours as the default:

* **TI norm and TI box head of their own** (``ti_norm``, ``ti_bbox_embed``; official ``oldm.norm`` and
  ``_oldm_bbox_embed``). Ours shares the decoder's: one head for every stage, as MaskDINO shares its heads.
* **The TI box delta applied twice**: a layer refines its reference with the delta of its un-normed output,
  and its supervised box adds the delta of its normed output to that refined box. Ours applies one delta,
  so the loss and the second selection see the box the next stage uses.
* **TI positions** are the sine embedding of the reference box scaled by the first level's valid ratio (ours
  leaves it unscaled: the ratio is 1 for unpadded images).
* **Second selection** by ``class_embed(ti_norm(x))``; TI logits are ``class_embed(decoder_norm(ti_norm(x)))``.
* **BATO**: the guiding tokens are chosen by ``class_embed`` of the un-normed layer-0 queries, their values
  are ``mask_embed`` of those (unprojected, so MASK_DIM = HIDDEN_DIM), their keys add the decoder's layer-1
  query positions; encoder tokens add the sine position of their pixel in their level (DETR's map, no
  padding mask); the FFN has ``MaskDINO.DIM_FEEDFORWARD`` width. Ours uses normed queries, box-derived
  positions for both sides and the encoder's FFN width (it transforms encoder tokens).
* **Mask-feature update** ``ReLU(GN(conv3x3(mask_features + up(level))))`` replaces the mask features; ours
  adds ``GELU(GN(conv3x3(up(level))))`` with the norm's scale at zero, so an untrained BATO changes nothing.

Both designs mask padding (key padding in TI, padding tokens kept in BATO, masked GroupNorm); the reference
has no padding mask, so the two agree exactly on unpadded images only.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from surgdino.modeling.layers import MLP, gather_tokens, gen_sineembed_for_position, inverse_sigmoid
from surgdino.modeling.layers.box_refine import DecoderInputs, QuerySelection
from surgdino.modeling.layers.masked_norm import group_norm
from surgdino.modeling.layers.position_encoding import PositionEmbeddingSine
from surgdino.modeling.maskdino.di_layers import (
    GuidedTokenUpdate,
    TokenInteractionLayer,
    feature_valid,
    replicate_padding,
)


def build_parts(dec: nn.Module, *, ti_layers: int, bato_dim_feedforward: int, nheads: int, dropout: float,
                dim_feedforward: int, mask_dim: int) -> None:
    """Create the reference design's DI parts on ``dec`` (a ``DIMaskDINODecoder`` whose MaskDINO parts exist).
    As in the reference, they exist even when ``ti_layers`` or ``num_guiding_tokens`` is 0 (then unused), so
    that every official tensor has its place."""
    d = dec.hidden_dim
    dec.ti_layers = nn.ModuleList(TokenInteractionLayer(d, dim_feedforward, dropout, nheads) for _ in range(ti_layers))
    dec.ti_ref_point_head = MLP(2 * d, d, d, 2)
    dec.ti_norm = nn.LayerNorm(d)
    dec.ti_bbox_embed = MLP(d, d, 4, 3)
    nn.init.zeros_(dec.ti_bbox_embed.layers[-1].weight)
    nn.init.zeros_(dec.ti_bbox_embed.layers[-1].bias)
    dec.bato_update = GuidedTokenUpdate(d, bato_dim_feedforward, dropout, nheads)
    for p in dec.bato_update.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
    dec.bato_mask_conv = nn.Conv2d(d, mask_dim, 3, padding=1, bias=False)
    nn.init.kaiming_uniform_(dec.bato_mask_conv.weight, a=1)
    dec.bato_mask_norm = group_norm(mask_dim)
    dec.bato_level_pos = PositionEmbeddingSine(d // 2, normalize=True)


def token_interaction(dec, x: torch.Tensor, ref: torch.Tensor, valid: torch.Tensor, inputs: DecoderInputs,
                      k: int) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """The reference TI layers and second selection on the first selection ``x [B, K1, D]`` with unsigmoided
    boxes ``ref [B, K1, 4]`` (validity ``valid [B, K1]``): the ``k`` selected tokens, their unsigmoided boxes
    (in the graph) and per layer the supervised ``pred_logits`` / ``pred_boxes``."""
    ref_sig = ref.sigmoid()
    r = inputs.ratios[:, None, 0]  # [B, 1, 2] the first level's valid ratio, as the reference
    scale = torch.cat([r, r], -1)
    outs, new = [], ref_sig
    for layer in dec.ti_layers:
        pos = dec.ti_ref_point_head(gen_sineembed_for_position(ref_sig * scale, dec.hidden_dim))
        x = layer(x, pos, key_padding_mask=~valid)
        new = (dec.ti_bbox_embed(x) + inverse_sigmoid(ref_sig)).sigmoid()  # [B, K1, 4] the refined reference
        xn = dec.ti_norm(x)
        outs.append({"pred_logits": dec.class_embed(dec.decoder_norm(xn)),
                     "pred_boxes": (dec.ti_bbox_embed(xn) + inverse_sigmoid(new)).sigmoid()})  # second delta
        ref_sig = new.detach()
    if not outs:  # the first selection is sorted by score: the second keeps its head
        return x[:, :k], ref[:, :k], outs
    score = dec.class_embed(dec.ti_norm(x)).max(-1).values.masked_fill(~valid, float("-inf"))
    idx = score.topk(k, dim=1).indices  # [B, Q]
    return gather_tokens(x, idx), inverse_sigmoid(gather_tokens(new, idx)), outs


def level_positions(dec, inputs: DecoderInputs) -> torch.Tensor:
    """``[B, S, D]`` DETR sine positions of every encoder token in its level (no padding mask, as the reference)."""
    b, dev = inputs.memory.shape[0], inputs.memory.device
    return torch.cat([dec.bato_level_pos(torch.zeros(b, 1, h, w, device=dev)).flatten(2).transpose(1, 2)
                      for h, w in inputs.shapes], 1)


def layer1_query_pos(dec, hm: torch.Tensor, selection: QuerySelection, inputs: DecoderInputs) -> torch.Tensor:
    """The decoder's layer-1 query positions ``[B, Q, D]`` of the matching queries ``hm`` after layer 0, computed
    as ``BoxRefinementDecoder.refine`` computes them."""
    ref0 = selection.boxes_unsig.sigmoid().detach()
    ref1 = (dec.reference_delta(0, hm, dec.box_delta(0, hm)) + inverse_sigmoid(ref0)).sigmoid().detach()
    ref_in = ref1[:, :, None] * torch.cat([inputs.ratios, inputs.ratios], -1)[:, None]  # [B, Q, L, 4]
    return dec.ref_point_head(gen_sineembed_for_position(ref_in[:, :, 0], dec.hidden_dim))


def bato_update(dec, inputs: DecoderInputs, hm: torch.Tensor, query_pos: torch.Tensor) -> DecoderInputs:
    """``inputs`` with the reference BATO applied: ``hm [B, Q, D]`` matching queries after layer 0 (un-normed),
    ``query_pos [B, Q, D]`` their layer-1 query positions."""
    gidx = dec.class_embed(hm).max(-1).values.topk(min(dec.num_guiding_tokens, hm.shape[1]), dim=1).indices
    guide = gather_tokens(dec.mask_embed(hm), gidx)  # [B, G, D]
    updated = dec.bato_update(inputs.memory, level_positions(dec, inputs), inputs.memory_mask, guide,
                              gather_tokens(query_pos, gidx))
    shapes, d = inputs.shapes, dec.hidden_dim
    sizes = [h * w for h, w in shapes]
    lvl = max(range(len(shapes)), key=lambda i: sizes[i])  # the reference's last level: the finest
    start = sum(sizes[:lvl])
    h, w = shapes[lvl]
    lv = updated[:, start:start + h * w].transpose(1, 2).reshape(-1, d, h, w)
    lv = replicate_padding(lv, inputs.memory_mask[:, start:start + h * w].view(-1, h, w))
    mf = inputs.mask_features
    valid = feature_valid(mf, inputs.feat_sizes)
    fused = mf + F.interpolate(lv, size=mf.shape[-2:], mode="bilinear", align_corners=False)
    new_mf = F.relu(dec.bato_mask_norm(dec.bato_mask_conv(fused * valid), valid)) * valid
    return dataclasses.replace(inputs, memory=updated, mask_features=new_mf)


def bato(dec, inputs: DecoderInputs, hs: torch.Tensor, selection: QuerySelection) -> DecoderInputs:
    """``DIMaskDINODecoder.layer_inputs`` of layer 1 in the reference design; ``hs`` are all queries after layer 0."""
    hm = hs[:, hs.shape[1] - selection.num_queries:]  # denoising queries never guide
    return bato_update(dec, inputs, hm, layer1_query_pos(dec, hm, selection, inputs))
