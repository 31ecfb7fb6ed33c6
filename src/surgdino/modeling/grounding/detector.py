"""GroundingDINO's tensor-only core: backbone → per-level input projections (+ extra stride-2 levels)
→ feature enhancer → language-guided query selection → cross-modality decoder → token logits, boxes.

No lists of dicts here: images ``[B, 3, H, W]`` with a padding mask, text features with their masks,
raw outputs out. ``model.py`` wraps it for the engine; ``hf.py`` loads transformers checkpoints.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from surgdino.modeling.grounding.decoder import GroundingDecoder, TextDecoderInputs
from surgdino.modeling.grounding.encoder import FeatureEnhancer
from surgdino.modeling.grounding.prompts import delimiter_mask, sub_sentence_mask
from surgdino.modeling.maskdino.dn import DNQueries, prepare_for_dn
from surgdino.structures import resize_mask

# BERT ids of [CLS], [SEP], "." and "?": the phrase delimiters of the reference's captions
BERT_SPECIAL_TOKENS = (101, 102, 1012, 1029)


def phrase_masks(input_ids: torch.Tensor, special_ids: tuple[int, ...] = BERT_SPECIAL_TOKENS
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-sentence attention (allowed ``[B, T, T]``) and per-phrase position ids ``[B, T]`` of captions
    ``[B, T]`` whose delimiters are ``special_ids`` (transformers' inputs: every "." delimits)."""
    return sub_sentence_mask(delimiter_mask(input_ids, special_ids))


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
                 encoder_ffn_dim: int | None = None, text_ffn_dim: int | None = None, dn_number: int = 0,
                 dn_box_noise_scale: float = 1.0, dn_label_noise_ratio: float = 0.5):
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
        self.text_encoder = text_encoder
        self.text_projection = nn.Linear(text_dim, hidden_dim)
        nn.init.zeros_(self.text_projection.bias)
        nn.init.xavier_uniform_(self.text_projection.weight)
        self.num_queries = num_queries
        self.query_embed = nn.Embedding(num_queries, hidden_dim) if embed_init_tgt else None
        self.encoder = FeatureEnhancer(
            num_layers=enc_layers, dim=hidden_dim, ffn_dim=encoder_ffn_dim or dim_feedforward,
            n_levels=num_feature_levels, n_heads=nheads, n_points=enc_n_points, dropout=dropout,
            text_dropout=text_dropout, fusion_dropout=fusion_dropout, fusion_droppath=fusion_droppath,
            activation=activation, use_fusion=use_fusion_layer, use_text_enhancer=use_text_enhancer,
            pe_temperature=pe_temperature)
        self.decoder = GroundingDecoder(
            num_layers=dec_layers, dim=hidden_dim, ffn_dim=dim_feedforward, n_levels=num_feature_levels,
            n_heads=nheads, n_points=dec_n_points, dropout=dropout, activation=activation,
            use_text_cross_attention=use_text_cross_attention, share_box_head=dec_pred_bbox_embed_share,
            two_stage_bbox_embed_share=two_stage_bbox_embed_share)
        self.dn_number, self.dn_box_noise_scale, self.dn_label_noise_ratio = dn_number, dn_box_noise_scale, dn_label_noise_ratio
        # denoising content: a projection of the class's phrase feature (mean of its text tokens)
        self.dn_label_proj = nn.Linear(hidden_dim, hidden_dim) if dn_number > 0 else None

    # --- text ---
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Token ids ``[B, T]`` of captions → ``text [B, T', D]`` (projected), ``text_valid [B, T']``,
        ``text_blocked [B, T', T']``, ``text_position_ids [B, T']`` with ``T' = min(T, max_text_len)``."""
        b, t = input_ids.shape[0], min(input_ids.shape[1], self.max_text_len)
        input_ids, attention_mask = input_ids[:, :t], attention_mask[:, :t].bool()
        token_type_ids = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids[:, :t]
        # one caption for the whole batch (the usual case): encode it once and expand
        same = b > 1 and all(bool((x == x[:1]).all()) for x in (input_ids, attention_mask, token_type_ids))
        if same:
            input_ids, attention_mask, token_type_ids = input_ids[:1], attention_mask[:1], token_type_ids[:1]
        if self.sub_sentence_present:
            allowed, position_ids = phrase_masks(input_ids)
            feats = self.text_encoder(input_ids, allowed, position_ids=position_ids, token_type_ids=token_type_ids)
        else:
            allowed = attention_mask[:, None, :] & attention_mask[:, :, None]
            position_ids = None
            feats = self.text_encoder(input_ids, attention_mask, token_type_ids=token_type_ids)
        out = {"text": self.text_projection(feats), "text_valid": attention_mask, "text_blocked": ~allowed,
               "text_position_ids": position_ids}
        return {k: v.expand(b, *v.shape[1:]) if same and v is not None else v for k, v in out.items()}

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

    def denoising(self, targets: list[dict] | None, class_maps: torch.Tensor | None, text: torch.Tensor,
                  num_queries: int) -> DNQueries | None:
        """DINO's denoising queries (``prepare_for_dn``, MaskDINO's): noised ground-truth boxes; the content
        of a query is the projected phrase feature of its (possibly flipped) class, ``class_maps [C, T]``."""
        if not (self.training and self.dn_number > 0 and targets is not None and class_maps is not None):
            return None
        weights = class_maps.to(text.dtype)
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=1e-6)
        class_feats = torch.einsum("ct,btd->bcd", weights, text)  # [B, C, D]

        def label_enc(labels: torch.Tensor) -> torch.Tensor:  # [B, N] class indices → [B, N, D]
            return self.dn_label_proj(torch.gather(class_feats, 1, labels[..., None].expand(-1, -1, text.shape[-1])))

        return prepare_for_dn(targets, dn_num=self.dn_number, noise_scale=self.dn_box_noise_scale,
                              label_noise_ratio=self.dn_label_noise_ratio, num_classes=class_maps.shape[0],
                              label_enc=label_enc, num_queries=num_queries, device=text.device)

    def forward_tensors(self, images: torch.Tensor, pad_mask: torch.Tensor, text: torch.Tensor,
                        text_valid: torch.Tensor, text_blocked: torch.Tensor | None = None,
                        text_position_ids: torch.Tensor | None = None, targets: list[dict] | None = None,
                        class_maps: torch.Tensor | None = None) -> dict:
        """→ the last decoder layer's ``pred_logits [B, Q, T]`` (-inf off the text) and ``pred_boxes [B, Q, 4]``
        (normalised cxcywh), ``aux_outputs`` (earlier layers), ``interm_outputs`` (selected encoder tokens),
        ``text_valid [B, T]``; in training with ``targets`` and ``class_maps`` and denoising on, ``dn_outputs``
        and ``dn_meta`` (the shared ``SetCriterion``'s layout)."""
        maps, masks = self.image_levels(images, pad_mask)
        memory, levels, text = self.encoder(maps, masks, text, ~text_valid, text_blocked, text_position_ids)
        inputs = TextDecoderInputs(memory=memory, memory_mask=levels.mask, shapes=levels.shapes,
                                   ratios=levels.ratios, text=text, text_valid=text_valid)
        out = self.decoder(inputs, self.num_queries, None if self.query_embed is None else self.query_embed.weight,
                           lambda k: self.denoising(targets, class_maps, text, k))
        out["text_valid"] = text_valid
        return out
