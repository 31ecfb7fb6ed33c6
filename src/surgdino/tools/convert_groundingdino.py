"""``surgdino convert groundingdino``: a transformers GroundingDINO folder (config.json +
model.safetensors) or IDEA's original checkpoint (``groundingdino_swint_ogc.pth`` layout:
``backbone.0.*``, ``transformer.*``, ``bert.*``, ``feat_map``, ``input_proj``, ``bbox_embed``) →
our GroundingDINO weights (``{"model": state_dict}``, loadable by ``MODEL.WEIGHTS``).

IDEA names are mapped to transformers' names (fused q/k/v projections split), then to ours
(``modeling/grounding/hf.py``). The source is read as tensors only (``weights_only``): no code runs.
"""

from __future__ import annotations

import os
import re

import torch

from surgdino.errors import SurgDinoError
from surgdino.modeling.grounding.hf import hf_state_to_ours, read_hf_folder

_BB = "model.backbone.conv_encoder.model."
_IDEA_BLOCK = (("norm1.", "layernorm_before."), ("norm2.", "layernorm_after."),
               ("attn.relative_position_bias_table", "attention.self.relative_position_bias_table"),
               ("attn.proj.", "attention.output.dense."), ("mlp.fc1.", "intermediate.dense."),
               ("mlp.fc2.", "output.dense."))
_IDEA_DEFORM = (("self_attn.", "self_attn."), ("norm1.", "self_attn_layer_norm."), ("linear1.", "fc1."),
                ("linear2.", "fc2."), ("norm2.", "final_layer_norm."))
_IDEA_TEXT = (("self_attn.out_proj.", "self_attn.out_proj."), ("linear1.", "fc1."), ("linear2.", "fc2."),
              ("norm1.", "layer_norm_before."), ("norm2.", "layer_norm_after."))
_IDEA_FUSION = (("gamma_v", "vision_param"), ("gamma_l", "text_param"), ("layer_norm_v.", "layer_norm_vision."),
                ("layer_norm_l.", "layer_norm_text."), ("attn.v_proj.", "attn.vision_proj."),
                ("attn.l_proj.", "attn.text_proj."), ("attn.values_v_proj.", "attn.values_vision_proj."),
                ("attn.values_l_proj.", "attn.values_text_proj."), ("attn.out_v_proj.", "attn.out_vision_proj."),
                ("attn.out_l_proj.", "attn.out_text_proj."))
_IDEA_DEC = (("cross_attn.", "encoder_attn."), ("norm1.", "encoder_attn_layer_norm."),
             ("ca_text.out_proj.", "encoder_attn_text.out_proj."), ("catext_norm.", "encoder_attn_text_layer_norm."),
             ("self_attn.out_proj.", "self_attn.out_proj."), ("norm2.", "self_attn_layer_norm."),
             ("linear1.", "fc1."), ("linear2.", "fc2."), ("norm3.", "final_layer_norm."))
_IDEA_PREFIX = (("input_proj.", "model.input_proj_vision."), ("feat_map.", "model.text_projection."),
                ("bert.", "model.text_backbone."), ("transformer.level_embed", "model.level_embed"),
                ("transformer.tgt_embed.", "model.query_position_embeddings."),
                ("transformer.decoder.norm.", "model.decoder.layer_norm."),
                ("transformer.decoder.ref_point_head.", "model.decoder.reference_points_head."),
                ("transformer.decoder.bbox_embed.", "model.decoder.bbox_embed."), ("bbox_embed.", "bbox_embed."),
                ("transformer.enc_output_norm.", "model.enc_output_norm."),
                ("transformer.enc_output.", "model.enc_output."),
                ("transformer.enc_out_bbox_embed.", "model.encoder_output_bbox_embed."))
_SKIP = re.compile(r"(relative_position_index|attn_mask|num_batches_tracked|position_ids$|^bert\.pooler\.)")


def _sub(rest: str, table) -> str | None:
    for old, new in table:
        if rest.startswith(old):
            return new + rest[len(old):]
    return None


def _qkv(out: dict, prefix: str, suffix: str, t: torch.Tensor, names=("query", "key", "value")) -> None:
    for name, part in zip(names, t.chunk(3, dim=0)):
        out[f"{prefix}{name}.{suffix}"] = part.clone()


def idea_to_hf(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """IDEA GroundingDINO names → transformers names; returns (renamed, names left unmapped)."""
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for k, v in state.items():
        if _SKIP.search(k):
            continue
        new = None
        if m := re.match(r"backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\.(.*)", k):
            pre = f"{_BB}encoder.layers.{m[1]}.blocks.{m[2]}."
            if m[3].startswith("attn.qkv."):
                _qkv(out, pre + "attention.self.", m[3].split(".")[-1], v)
                continue
            new = (pre + r) if (r := _sub(m[3], _IDEA_BLOCK)) else None
        elif m := re.match(r"backbone\.0\.layers\.(\d+)\.downsample\.(.*)", k):
            new = f"{_BB}encoder.layers.{m[1]}.downsample.{m[2]}"
        elif m := re.match(r"backbone\.0\.patch_embed\.(proj|norm)\.(.*)", k):
            new = f"{_BB}embeddings.{'patch_embeddings.projection' if m[1] == 'proj' else 'norm'}.{m[2]}"
        elif m := re.match(r"backbone\.0\.norm(\d+)\.(.*)", k):
            new = f"{_BB}hidden_states_norms.stage{int(m[1]) + 1}.{m[2]}"
        elif m := re.match(r"transformer\.encoder\.layers\.(\d+)\.(.*)", k):
            new = (f"model.encoder.layers.{m[1]}.deformable_layer." + r) if (r := _sub(m[2], _IDEA_DEFORM)) else None
        elif m := re.match(r"transformer\.encoder\.text_layers\.(\d+)\.(.*)", k):
            pre = f"model.encoder.layers.{m[1]}.text_enhancer_layer."
            if m[2].startswith("self_attn.in_proj_"):
                _qkv(out, pre + "self_attn.", m[2].rsplit("_", 1)[-1], v)
                continue
            new = (pre + r) if (r := _sub(m[2], _IDEA_TEXT)) else None
        elif m := re.match(r"transformer\.encoder\.fusion_layers\.(\d+)\.(.*)", k):
            new = (f"model.encoder.layers.{m[1]}.fusion_layer." + r) if (r := _sub(m[2], _IDEA_FUSION)) else None
        elif m := re.match(r"transformer\.decoder\.layers\.(\d+)\.(.*)", k):
            pre = f"model.decoder.layers.{m[1]}."
            if mm := re.match(r"(self_attn|ca_text)\.in_proj_(weight|bias)", m[2]):
                _qkv(out, pre + ("self_attn." if mm[1] == "self_attn" else "encoder_attn_text."), mm[2], v)
                continue
            new = (pre + r) if (r := _sub(m[2], _IDEA_DEC)) else None
        else:
            new = _sub(k, _IDEA_PREFIX)
        if new is None:
            unmapped.append(k)
        else:
            out[new] = v
    return out, unmapped


def _read_pth(path: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any unreadable file is the user's input error)
        raise SurgDinoError(f"{path}: cannot be read as a tensor checkpoint ({str(e).splitlines()[0][:200]}); "
                            "give IDEA's groundingdino_*.pth or a transformers folder") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise SurgDinoError(f"{path}: no state dict inside (expected IDEA's {{'model': ...}} checkpoint)")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items() if torch.is_tensor(v)}


def convert_groundingdino(source: str, output: str) -> dict:
    """Write our weights for ``source`` to ``output``; returns a summary (layout, tensors, unmapped)."""
    if os.path.isdir(source):
        _, hf = read_hf_folder(source)
        layout, unmapped = "transformers", []
    elif os.path.isfile(source):
        raw = _read_pth(source)
        if not any(k.startswith(("transformer.", "backbone.0.")) for k in raw):
            raise SurgDinoError(f"{source}: not IDEA's GroundingDINO layout (no transformer.* / backbone.0.* "
                                "weights); give groundingdino_swint_ogc.pth or a transformers folder")
        hf, unmapped = idea_to_hf(raw)
        layout = "IDEA"
    else:
        raise SurgDinoError(f"--source {source}: no such file or folder")
    converted, more = hf_state_to_ours(hf)
    unmapped += more
    ours = {k: v.contiguous() for k, v in converted.items()}
    if not ours:
        raise SurgDinoError(f"{source}: none of its weights are GroundingDINO weights")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = output + ".tmp"
    torch.save({"model": ours, "source": os.path.abspath(source), "layout": layout}, tmp)
    os.replace(tmp, output)
    return {"output": output, "layout": layout, "tensors": len(ours), "unmapped": unmapped}
