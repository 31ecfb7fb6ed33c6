"""transformers checkpoints of GroundingDINO (``GroundingDinoForObjectDetection``): architecture from
``config.json``, weights from ``model.safetensors`` renamed to ours, tied box heads resolved.

Only the names are mapped (``hf_to_ours``); the module structure is ours. Nothing downloads: the
folder is local (e.g. a copy of ``IDEA-Research/grounding-dino-tiny``).
"""

from __future__ import annotations

import json
import logging
import os
import re

import torch
from torch import nn

from surgdino.errors import SurgDinoError

log = logging.getLogger(__name__)

_RENAMES = (  # transformers prefix → ours, first match wins
    ("model.backbone.conv_encoder.model.", "backbone.body."),
    ("model.input_proj_vision.", "input_proj."),
    ("model.text_backbone.", "text_encoder.model."),
    ("model.text_projection.", "text_projection."),
    ("model.query_position_embeddings.", "query_embed."),
    ("model.level_embed", "encoder.level_embed"),
    ("model.decoder.layers.", "decoder.layers."),
    ("model.decoder.layer_norm.", "decoder.decoder_norm."),
    ("model.decoder.reference_points_head.", "decoder.ref_point_head."),
    ("model.decoder.bbox_embed.", "decoder.bbox_embed."),
    ("bbox_embed.", "decoder.bbox_embed."),
    ("model.enc_output_norm.", "decoder.enc_output_norm."),
    ("model.enc_output.", "decoder.enc_output."),
    ("model.encoder_output_bbox_embed.", "decoder.enc_bbox_embed."),
)
# inside a layer: transformers' sublayer names → the shared layers' (``layers/blocks.py``), first match wins
_ENCODER_LAYER = re.compile(r"^model\.encoder\.layers\.(\d+)\.(fusion_layer|text_enhancer_layer|deformable_layer)\.(.*)$")
_ENCODER_PARTS = {"fusion_layer": "fusion_layers", "text_enhancer_layer": "text_layers", "deformable_layer": "layers"}
_TEXT_LAYER = (("layer_norm_before.", "norm1."), ("layer_norm_after.", "norm2."), ("fc1.", "linear1."),
               ("fc2.", "linear2."))
_DEFORMABLE_LAYER = (("self_attn_layer_norm.", "norm1."), ("final_layer_norm.", "norm2."), ("fc1.", "linear1."),
                     ("fc2.", "linear2."))
_DECODER_LAYER = (("self_attn_layer_norm.", "norm1."), ("encoder_attn_text_layer_norm.", "text_norm."),
                  ("encoder_attn_text.", "text_cross_attn."), ("encoder_attn_layer_norm.", "norm2."),
                  ("encoder_attn.", "cross_attn."), ("final_layer_norm.", "norm3."), ("fc1.", "linear1."),
                  ("fc2.", "linear2."))
# separate q/k/v projections of transformers → the packed ``in_proj_*`` of nn.MultiheadAttention
_QKV = re.compile(r"^((?:encoder\.text_layers|decoder\.layers)\.\d+\.(?:self_attn|text_cross_attn))\."
                  r"(query|key|value)\.(weight|bias)$")
_IGNORED = re.compile(r"(relative_position_index|num_batches_tracked|position_ids$|\.embeddings\.token_type_ids$)")


class HFTextEncoder(nn.Module):
    """A transformers text model called as ``(input_ids, attention_mask, position_ids, token_type_ids)``;
    a ``[B, T, T]`` mask (sub-sentence attention) is passed as ``[B, 1, T, T]``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids=None, token_type_ids=None) -> torch.Tensor:
        if attention_mask.dim() == 3:
            attention_mask = attention_mask[:, None]
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                          position_ids=position_ids).last_hidden_state


# saved Swin checkpoints keep transformers' legacy names (converted by transformers on load)
_SWIN_LEGACY = (("attention.self.query", "attention.q_proj"), ("attention.self.key", "attention.k_proj"),
                ("attention.self.value", "attention.v_proj"),
                ("attention.self.relative_position_bias_table",
                 "attention.relative_position_bias.relative_position_bias_table"),
                ("attention.output.dense", "attention.o_proj"), ("intermediate.dense", "mlp.fc1"),
                ("output.dense", "mlp.fc2"))


def _swin_current(name: str) -> str:
    for old, new in _SWIN_LEGACY:
        if old in name:
            name = name.replace(old, new)
            break
    return "swin." + name if name.startswith(("encoder.", "embeddings.")) else name


def _sub(rest: str, table) -> str:
    for old, new in table:
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def hf_to_ours(name: str) -> str | None:
    """A transformers ``GroundingDinoForObjectDetection`` weight name → ours (None: not a weight of ours).
    q/k/v projections of attentions that are ``nn.MultiheadAttention`` in ours map to ``….query.weight``
    etc. under our module's name; ``hf_state_to_ours`` packs them."""
    if m := _ENCODER_LAYER.match(name):
        rest = m[3]
        if m[2] == "text_enhancer_layer":
            rest = _sub(rest, _TEXT_LAYER)
        elif m[2] == "deformable_layer":
            rest = _sub(rest, _DEFORMABLE_LAYER)
        return f"encoder.{_ENCODER_PARTS[m[2]]}.{m[1]}.{rest}"
    for old, new in _RENAMES:
        if name.startswith(old):
            out = new + name[len(old):]
            if out.startswith("backbone.body."):
                out = "backbone.body." + _swin_current(out[len("backbone.body."):])
            elif out.startswith("decoder.layers."):
                idx, _, rest = out[len("decoder.layers."):].partition(".")
                out = f"decoder.layers.{idx}.{_sub(rest, _DECODER_LAYER)}"
            return out
    return None


def hf_state_to_ours(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """transformers weights → ours: renamed, q/k/v packed into ``in_proj_weight``/``in_proj_bias`` (q, k, v
    order), the top-level ``bbox_embed`` copy winning over the decoder's tied one. Returns (ours, unmapped)."""
    out: dict[str, torch.Tensor] = {}
    packs: dict[str, dict[str, torch.Tensor]] = {}
    unmapped: list[str] = []
    for k, v in state.items():
        new = hf_to_ours(k)
        if new is None:
            unmapped.append(k)
            continue
        if m := _QKV.match(new):
            packs.setdefault(f"{m[1]}.in_proj_{m[3]}", {})[m[2]] = v
            continue
        if new.startswith("decoder.bbox_embed.") and k.startswith("model.") and new in out:
            continue  # the top-level bbox_embed copy wins over the decoder's tied copy
        out[new] = v
    for name, parts in packs.items():
        if set(parts) != {"query", "key", "value"}:
            unmapped.extend(f"{name} ({p})" for p in parts)
            continue
        out[name] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
    return out, unmapped


def detector_kwargs(config) -> dict:
    """Our detector's architecture arguments from a ``GroundingDinoConfig``."""
    from transformers import AutoModel

    from surgdino.modeling.backbone.swin import _STAGE_TO_RES, SwinBackbone

    bcfg = config.backbone_config
    if bcfg is None or bcfg.model_type != "swin":
        raise SurgDinoError(f"config.json: backbone_config.model_type = "
                            f"{getattr(bcfg, 'model_type', None)!r}; only Swin backbones are supported "
                            "(fix: a GroundingDINO-T/B checkpoint)")
    if not config.two_stage:
        raise SurgDinoError("config.json: two_stage = false is not supported (fix: two_stage true, the released models)")
    if config.position_embedding_type != "sine":
        raise SurgDinoError(f"config.json: position_embedding_type {config.position_embedding_type!r}; only sine")
    backbone = SwinBackbone(bcfg)
    text = HFTextEncoder(AutoModel.from_config(config.text_config, add_pooling_layer=False))
    return dict(
        backbone=backbone, in_features=[_STAGE_TO_RES[s] for s in backbone.body.out_features], text_encoder=text,
        text_dim=config.text_config.hidden_size, num_feature_levels=config.num_feature_levels,
        hidden_dim=config.d_model, nheads=config.decoder_attention_heads, dim_feedforward=config.decoder_ffn_dim,
        encoder_ffn_dim=config.encoder_ffn_dim, enc_layers=config.encoder_layers, dec_layers=config.decoder_layers,
        num_queries=config.num_queries, enc_n_points=config.encoder_n_points, dec_n_points=config.decoder_n_points,
        dropout=config.dropout, activation=config.activation_function,
        pe_temperature=config.positional_embedding_temperature, embed_init_tgt=config.embedding_init_target,
        two_stage_bbox_embed_share=False,  # transformers never ties it (its decoder heads do not exist yet then)
        dec_pred_bbox_embed_share=config.decoder_bbox_embed_share, max_text_len=config.max_text_len,
        text_dropout=config.text_enhancer_dropout, fusion_dropout=config.fusion_dropout,
        fusion_droppath=config.fusion_droppath)


def read_hf_folder(folder: str):
    """→ (GroundingDinoConfig, state dict) of a local transformers checkpoint folder."""
    from safetensors.torch import load_file
    from transformers import GroundingDinoConfig

    cfg_path = os.path.join(folder, "config.json")
    weights = os.path.join(folder, "model.safetensors")
    for p in (cfg_path, weights):
        if not os.path.isfile(p):
            raise SurgDinoError(f"{p}: not found (fix: a transformers GroundingDINO folder with config.json "
                                "and model.safetensors, e.g. a local copy of IDEA-Research/grounding-dino-tiny)")
    with open(cfg_path, encoding="utf-8") as f:
        raw = json.load(f)
    if raw.get("model_type") != "grounding-dino":
        raise SurgDinoError(f"{cfg_path}: model_type = {raw.get('model_type')!r}, expected 'grounding-dino'")
    return GroundingDinoConfig.from_dict(raw), load_file(weights)


def load_hf_state_dict(model: nn.Module, hf_state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy renamed transformers weights into ``model``; names tied in ours (shared box heads) take any
    loaded alias. Raises when a weight of ours is left without a value or a checkpoint weight is unused."""
    ours = model.state_dict(keep_vars=True)
    converted, unmapped = hf_state_to_ours(hf_state)
    mapped = {k: v for k, v in converted.items() if k in ours}
    unused = [k for k in unmapped if not _IGNORED.search(k)]
    unused += [k for k in converted if k not in ours and not _IGNORED.search(k)]
    by_ptr: dict[int, list[str]] = {}
    for k, t in ours.items():
        by_ptr.setdefault(t.data_ptr(), []).append(k)
    full, missing = {}, []
    for names in by_ptr.values():
        src = next((n for n in names if n in mapped), None)
        for n in names:
            if src is not None:
                full[n] = mapped[src]
            elif not _IGNORED.search(n):
                missing.append(n)
    if missing or unused:
        raise SurgDinoError(f"{source}: {len(missing)} weights of the model missing (e.g. {missing[:3]}), "
                            f"{len(unused)} checkpoint weights unused (e.g. {unused[:3]}) "
                            "(fix: a GroundingDinoForObjectDetection checkpoint whose config.json matches its weights)")
    model.load_state_dict(full, strict=False)
