"""GroundingDINO's tensor-only core: backbone → per-level input projections (+ extra stride-2 levels)
→ feature enhancer → language-guided query selection → cross-modality decoder → token logits, boxes.

No lists of dicts here: images ``[B, 3, H, W]`` with a padding mask, text features with their masks,
raw outputs out. ``model.py`` wraps it for the engine; ``hf.py`` loads transformers checkpoints.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from surgdino.modeling.grounding.decoder import GroundingDecoder
from surgdino.modeling.grounding.encoder import FeatureEnhancer
from surgdino.modeling.grounding.selection import QuerySelection
from surgdino.modeling.layers import PositionEmbeddingSine
from surgdino.modeling.pixel_decoder import valid_ratios
from surgdino.structures import resize_mask

# BERT ids of [CLS], [SEP], "." and "?": the phrase delimiters of the reference's captions
BERT_SPECIAL_TOKENS = (101, 102, 1012, 1029)


def phrase_masks(input_ids: torch.Tensor, special_ids: tuple[int, ...] = BERT_SPECIAL_TOKENS
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-sentence attention and per-phrase position ids of captions ``[B, T]``: a phrase is the tokens
    after one delimiter up to and including the next; phrase tokens see each other, every other token only
    itself. → (allowed [B, T, T] bool, position_ids [B, T], restarting at 0 per phrase).

    TODO(replace): minimal local version until gtext's ``modeling/grounding/prompts.py`` is on main."""
    b, t = input_ids.shape
    dev = input_ids.device
    special = torch.isin(input_ids, torch.tensor(special_ids, device=dev))
    idx = torch.arange(t, device=dev).expand(b, -1)
    end = torch.where(special, idx, torch.full_like(idx, t)).flip(1).cummin(1)[0].flip(1)  # next delimiter >= i
    prev = torch.where(special, idx, torch.full_like(idx, -1)).cummax(1)[0]
    prev = torch.cat([prev.new_full((b, 1), -1), prev[:, :-1]], 1)  # last delimiter < i
    in_phrase = (end != 0) & (end != t - 1) & (end != t)
    allowed = (end[:, :, None] == end[:, None, :]) & in_phrase[:, None, :] & in_phrase[:, :, None]
    allowed = allowed | torch.eye(t, dtype=torch.bool, device=dev)
    position_ids = torch.where(in_phrase, idx - prev - 1, torch.zeros_like(idx))
    return allowed, position_ids


def _conv_gn(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2), nn.GroupNorm(32, cout))


class GroundingDINODetector(nn.Module):
    """The network of IDEA's GroundingDINO / transformers' ``GroundingDinoForObjectDetection``."""

    def __init__(self, *, backbone: nn.Module, in_features: list[str], text_encoder: nn.Module | None,
                 text_dim: int, num_feature_levels: int = 4, hidden_dim: int = 256, nheads: int = 8,
                 dim_feedforward: int = 2048, enc_layers: int = 6, dec_layers: int = 6, num_queries: int = 900,
                 enc_n_points: int = 4, dec_n_points: int = 4, dropout: float = 0.0, activation: str = "relu",
                 pe_temperature: float = 20, embed_init_tgt: bool = True, two_stage_bbox_embed_share: bool = False,
                 dec_pred_bbox_embed_share: bool = True, max_text_len: int = 256, use_text_enhancer: bool = True,
                 use_fusion_layer: bool = True, use_text_cross_attention: bool = True, text_dropout: float = 0.0,
                 fusion_dropout: float = 0.0, fusion_droppath: float = 0.1, sub_sentence_present: bool = True,
                 encoder_ffn_dim: int | None = None, text_ffn_dim: int | None = None):
        super().__init__()
        shapes = backbone.output_shape()
        missing = [f for f in in_features if f not in shapes]
        if missing:
            raise ValueError(f"backbone has no features {missing} (it has {sorted(shapes)})")
        if num_feature_levels < len(in_features):
            raise ValueError(f"num_feature_levels {num_feature_levels} < {len(in_features)} backbone levels")
        self.backbone = backbone
        self.in_features = list(in_features)
        self.num_feature_levels = num_feature_levels
        self.max_text_len = max_text_len
        self.sub_sentence_present = sub_sentence_present
        self._backbone_takes_mask = "mask" in inspect.signature(backbone.forward).parameters
        chans = [shapes[f].channels for f in in_features]
        proj = [_conv_gn(c, hidden_dim, 1) for c in chans]
        cin = chans[-1]
        for _ in range(num_feature_levels - len(in_features)):
            proj.append(_conv_gn(cin, hidden_dim, 3, stride=2))
            cin = hidden_dim
        self.input_proj = nn.ModuleList(proj)
        for p in self.input_proj:
            nn.init.xavier_uniform_(p[0].weight, gain=1)
            nn.init.zeros_(p[0].bias)
        self.position_embedding = PositionEmbeddingSine(hidden_dim // 2, temperature=pe_temperature, normalize=True)
        self.level_embed = nn.Parameter(torch.randn(num_feature_levels, hidden_dim))
        self.text_encoder = text_encoder
        self.text_projection = nn.Linear(text_dim, hidden_dim)
        nn.init.zeros_(self.text_projection.bias)
        nn.init.xavier_uniform_(self.text_projection.weight)
        self.query_embed = nn.Embedding(num_queries, hidden_dim) if embed_init_tgt else None
        ffn_enc = encoder_ffn_dim or dim_feedforward
        self.encoder = FeatureEnhancer(
            num_layers=enc_layers, dim=hidden_dim, ffn_dim=ffn_enc, n_levels=num_feature_levels, n_heads=nheads,
            n_points=enc_n_points, dropout=dropout, text_dropout=text_dropout, fusion_dropout=fusion_dropout,
            fusion_droppath=fusion_droppath, activation=activation, use_fusion=use_fusion_layer,
            use_text_enhancer=use_text_enhancer)
        self.decoder = GroundingDecoder(
            num_layers=dec_layers, dim=hidden_dim, ffn_dim=dim_feedforward, n_levels=num_feature_levels,
            n_heads=nheads, n_points=dec_n_points, dropout=dropout, activation=activation,
            use_text_cross_attention=use_text_cross_attention, max_text_len=max_text_len,
            share_box_head=dec_pred_bbox_embed_share)
        shared = self.decoder.bbox_embed[0] if two_stage_bbox_embed_share and dec_pred_bbox_embed_share else None
        self.selection = QuerySelection(hidden_dim, num_queries, max_text_len, bbox_embed=shared)

    # --- text ---
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Token ids ``[B, T]`` of captions → ``text [B, T', D]`` (projected), ``text_valid [B, T']``,
        ``text_blocked [B, T', T']``, ``text_position_ids [B, T']`` with ``T' = min(T, max_text_len)``."""
        t = min(input_ids.shape[1], self.max_text_len)
        input_ids, attention_mask = input_ids[:, :t], attention_mask[:, :t].bool()
        token_type_ids = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids[:, :t]
        if self.sub_sentence_present:
            allowed, position_ids = phrase_masks(input_ids)
            feats = self.text_encoder(input_ids, allowed, position_ids=position_ids, token_type_ids=token_type_ids)
        else:
            allowed = attention_mask[:, None, :] & attention_mask[:, :, None]
            position_ids = None
            feats = self.text_encoder(input_ids, attention_mask, token_type_ids=token_type_ids)
        return {"text": self.text_projection(feats), "text_valid": attention_mask, "text_blocked": ~allowed,
                "text_position_ids": position_ids}

    # --- image ---
    def image_levels(self, images: torch.Tensor, pad_mask: torch.Tensor
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """images [B, 3, H, W], pad_mask [B, H, W] (True = padding) → per level maps [B, D, h, w] and masks."""
        feats = self.backbone(images, mask=pad_mask) if self._backbone_takes_mask else self.backbone(images)
        srcs = [feats[f] for f in self.in_features]
        token_mask = getattr(self.backbone, "token_mask", None)
        maps, masks = [], []
        for lvl, x in enumerate(srcs):
            maps.append(self.input_proj[lvl](x))
            m = token_mask(pad_mask) if token_mask is not None and len(srcs) == 1 else None
            masks.append(m if m is not None and m.shape[-2:] == x.shape[-2:] else resize_mask(pad_mask, x.shape[-2:]))
        for lvl in range(len(srcs), self.num_feature_levels):
            x = self.input_proj[lvl](srcs[-1] if lvl == len(srcs) else maps[-1])
            maps.append(x)
            masks.append(resize_mask(pad_mask, x.shape[-2:]))
        return maps, masks

    def forward_tensors(self, images: torch.Tensor, pad_mask: torch.Tensor, text: torch.Tensor,
                        text_valid: torch.Tensor, text_blocked: torch.Tensor | None = None,
                        text_position_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """→ ``pred_logits [N, B, Q, Tmax]`` and ``pred_boxes [N, B, Q, 4]`` (every decoder layer, normalised
        cxcywh), ``enc_pred_logits [B, Q, Tmax]``, ``enc_pred_boxes [B, Q, 4]``, ``text_valid [B, T]``."""
        maps, masks = self.image_levels(images, pad_mask)
        shapes = [tuple(int(s) for s in m.shape[-2:]) for m in maps]
        src = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)  # [B, S, D]
        pad = torch.cat([m.flatten(1) for m in masks], 1)  # [B, S]
        pos = torch.cat([(self.position_embedding(x, m).to(x.dtype).flatten(2).transpose(1, 2)
                          + self.level_embed[lvl]) for lvl, (x, m) in enumerate(zip(maps, masks))], 1)
        ratios = valid_ratios(masks).to(src.dtype)  # [B, L, 2]
        memory, text = self.encoder(src, pos, pad, shapes, ratios, text, ~text_valid, text_blocked,
                                    text_position_ids)
        sel = self.selection(memory, pad, shapes, text, text_valid)
        b = memory.shape[0]
        k = sel["ref_boxes"].shape[1]
        tgt = self.query_embed.weight[:k][None].expand(b, -1, -1) if self.query_embed is not None else sel["queries"]
        out = self.decoder(tgt, sel["ref_boxes"], memory, pad, shapes, ratios, text, text_valid)
        out.update(enc_pred_logits=sel["enc_pred_logits"], enc_pred_boxes=sel["enc_pred_boxes"],
                   text_valid=text_valid)
        return out
