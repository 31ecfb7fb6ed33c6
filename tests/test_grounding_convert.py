"""`surgdino convert groundingdino`: a transformers folder and IDEA's original key layout give weights
whose outputs equal transformers'; fine-tuning with another backbone skips the mismatched parts."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from safetensors.torch import load_file
from test_grounding_hf_parity import _compare, _hf_model, _text

from surgdino.cli import main
from surgdino.config import load_config
from surgdino.engine.checkpointer import load_weights
from surgdino.errors import SurgDinoError
from surgdino.modeling import build_model
from surgdino.modeling.grounding.hf import detector_kwargs
from surgdino.modeling.grounding.model import GroundingDINO
from surgdino.tools.convert_groundingdino import convert_groundingdino

BB = "model.backbone.conv_encoder.model."
# transformers (saved, legacy Swin names) → IDEA's GroundingDINO names, written from IDEA's modules:
# SwinTransformer (backbone.0: patch_embed, layers.i.blocks.j.{norm1,attn.qkv,attn.proj,norm2,mlp}, norm{i}),
# DeformableTransformer (transformer.encoder.{layers,text_layers,fusion_layers}, decoder.layers with
# ca_text/catext_norm, tgt_embed, enc_output, enc_out_bbox_embed), bert, feat_map, input_proj, bbox_embed.
TO_IDEA = [
    (BB + r"embeddings\.patch_embeddings\.projection\.", "backbone.0.patch_embed.proj."),
    (BB + r"embeddings\.norm\.", "backbone.0.patch_embed.norm."),
    (BB + r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.layernorm_before\.", r"backbone.0.layers.\1.blocks.\2.norm1."),
    (BB + r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.layernorm_after\.", r"backbone.0.layers.\1.blocks.\2.norm2."),
    (BB + r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.self\.relative_position_bias_table",
     r"backbone.0.layers.\1.blocks.\2.attn.relative_position_bias_table"),
    (BB + r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.output\.dense\.", r"backbone.0.layers.\1.blocks.\2.attn.proj."),
    (BB + r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.intermediate\.dense\.", r"backbone.0.layers.\1.blocks.\2.mlp.fc1."),
    (BB + r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.output\.dense\.", r"backbone.0.layers.\1.blocks.\2.mlp.fc2."),
    (BB + r"encoder\.layers\.(\d+)\.downsample\.", r"backbone.0.layers.\1.downsample."),
    (r"model\.encoder\.layers\.(\d+)\.deformable_layer\.self_attn\.", r"transformer.encoder.layers.\1.self_attn."),
    (r"model\.encoder\.layers\.(\d+)\.deformable_layer\.self_attn_layer_norm\.", r"transformer.encoder.layers.\1.norm1."),
    (r"model\.encoder\.layers\.(\d+)\.deformable_layer\.fc1\.", r"transformer.encoder.layers.\1.linear1."),
    (r"model\.encoder\.layers\.(\d+)\.deformable_layer\.fc2\.", r"transformer.encoder.layers.\1.linear2."),
    (r"model\.encoder\.layers\.(\d+)\.deformable_layer\.final_layer_norm\.", r"transformer.encoder.layers.\1.norm2."),
    (r"model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.self_attn\.out_proj\.", r"transformer.encoder.text_layers.\1.self_attn.out_proj."),
    (r"model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.fc1\.", r"transformer.encoder.text_layers.\1.linear1."),
    (r"model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.fc2\.", r"transformer.encoder.text_layers.\1.linear2."),
    (r"model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.layer_norm_before\.", r"transformer.encoder.text_layers.\1.norm1."),
    (r"model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.layer_norm_after\.", r"transformer.encoder.text_layers.\1.norm2."),
    (r"model\.encoder\.layers\.(\d+)\.fusion_layer\.vision_param", r"transformer.encoder.fusion_layers.\1.gamma_v"),
    (r"model\.encoder\.layers\.(\d+)\.fusion_layer\.text_param", r"transformer.encoder.fusion_layers.\1.gamma_l"),
    (r"model\.encoder\.layers\.(\d+)\.fusion_layer\.layer_norm_vision\.", r"transformer.encoder.fusion_layers.\1.layer_norm_v."),
    (r"model\.encoder\.layers\.(\d+)\.fusion_layer\.layer_norm_text\.", r"transformer.encoder.fusion_layers.\1.layer_norm_l."),
    (r"model\.encoder\.layers\.(\d+)\.fusion_layer\.attn\.vision_proj\.", r"transformer.encoder.fusion_layers.\1.attn.v_proj."),
    (r"model\.encoder\.layers\.(\d+)\.fusion_layer\.attn\.text_proj\.", r"transformer.encoder.fusion_layers.\1.attn.l_proj."),
    (r"model\.encoder\.layers\.(\d+)\.fusion_layer\.attn\.values_vision_proj\.", r"transformer.encoder.fusion_layers.\1.attn.values_v_proj."),
    (r"model\.encoder\.layers\.(\d+)\.fusion_layer\.attn\.values_text_proj\.", r"transformer.encoder.fusion_layers.\1.attn.values_l_proj."),
    (r"model\.encoder\.layers\.(\d+)\.fusion_layer\.attn\.out_vision_proj\.", r"transformer.encoder.fusion_layers.\1.attn.out_v_proj."),
    (r"model\.encoder\.layers\.(\d+)\.fusion_layer\.attn\.out_text_proj\.", r"transformer.encoder.fusion_layers.\1.attn.out_l_proj."),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn\.", r"transformer.decoder.layers.\1.cross_attn."),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm1."),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn_text\.out_proj\.", r"transformer.decoder.layers.\1.ca_text.out_proj."),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn_text_layer_norm\.", r"transformer.decoder.layers.\1.catext_norm."),
    (r"model\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"transformer.decoder.layers.\1.self_attn.out_proj."),
    (r"model\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm2."),
    (r"model\.decoder\.layers\.(\d+)\.fc1\.", r"transformer.decoder.layers.\1.linear1."),
    (r"model\.decoder\.layers\.(\d+)\.fc2\.", r"transformer.decoder.layers.\1.linear2."),
    (r"model\.decoder\.layers\.(\d+)\.final_layer_norm\.", r"transformer.decoder.layers.\1.norm3."),
    (r"model\.text_backbone\.", "bert."), (r"model\.input_proj_vision\.", "input_proj."),
    (r"model\.text_projection\.", "feat_map."), (r"model\.decoder\.reference_points_head\.", "transformer.decoder.ref_point_head."),
    (r"model\.decoder\.bbox_embed\.", "transformer.decoder.bbox_embed."), (r"model\.enc_output\.", "transformer.enc_output."),
    (r"model\.enc_output_norm\.", "transformer.enc_output_norm."),
    (r"model\.encoder_output_bbox_embed\.", "transformer.enc_out_bbox_embed."), (r"model\.level_embed", "transformer.level_embed"),
    (r"model\.decoder\.layer_norm\.", "transformer.decoder.norm."),
    (r"model\.query_position_embeddings\.", "transformer.tgt_embed."), (r"bbox_embed\.", "bbox_embed."),
]
FUSED = [  # q/k/v of IDEA's fused projections (qkv of Swin, in_proj of nn.MultiheadAttention)
    (BB + r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)",
     r"backbone.0.layers.\1.blocks.\2.attn.qkv.\4"),
    (r"model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.self_attn\.(query|key|value)\.(weight|bias)",
     r"transformer.encoder.text_layers.\1.self_attn.in_proj_\3"),
    (r"model\.decoder\.layers\.(\d+)\.self_attn\.(query|key|value)\.(weight|bias)", r"transformer.decoder.layers.\1.self_attn.in_proj_\3"),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn_text\.(query|key|value)\.(weight|bias)",
     r"transformer.decoder.layers.\1.ca_text.in_proj_\3"),
]


def idea_state_dict(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, parts = {}, {}
    for k, v in hf_state.items():
        if ".swin.layernorm." in k:  # transformers' unused final Swin norm: IDEA has none
            continue
        m = re.match(BB + r"hidden_states_norms\.stage(\d)\.(.*)", k)
        if m:
            out[f"backbone.0.norm{int(m[1]) - 1}.{m[2]}"] = v
            continue
        for pat, rep in FUSED:
            if re.match(pat, k):
                which = "qkv".index(re.search(r"\.(query|key|value)\.", k)[1][0])
                parts.setdefault(re.sub(pat, rep, k), {})[which] = v
                break
        else:
            for pat, rep in TO_IDEA:
                if re.match(pat, k):
                    out[re.sub(pat, rep, k, count=1)] = v
                    break
            else:
                raise AssertionError(f"test mapping misses {k}")
    for k, p in parts.items():
        out[k] = torch.cat([p[0], p[1], p[2]])
    out["backbone.0.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(4, dtype=torch.long)  # buffers
    return out


def _fresh(folder) -> GroundingDINO:
    from transformers import GroundingDinoConfig

    torch.manual_seed(5)  # different from the checkpoint's weights
    return GroundingDINO(**detector_kwargs(GroundingDinoConfig.from_pretrained(folder))).eval()


def _inputs():
    torch.manual_seed(1)
    ids, am = _text(2)
    mask = torch.zeros(2, 128, 160, dtype=torch.long)
    mask[0, :96] = 1
    mask[1, :, :72] = 1
    return dict(pixel_values=torch.randn(2, 3, 128, 160) * mask[:, None], input_ids=ids, attention_mask=am,
                pixel_mask=mask)


@pytest.mark.parametrize("layout", ["transformers", "IDEA"])
def test_converted_weights_give_transformers_outputs(tmp_path, layout):
    hf = _hf_model(tmp_path / "hf")
    source = str(tmp_path / "hf")
    if layout == "IDEA":
        source = str(tmp_path / "groundingdino_swint_ogc.pth")
        torch.save({"model": {"module." + k: v for k, v in
                              idea_state_dict(load_file(tmp_path / "hf" / "model.safetensors")).items()}}, source)
    out = str(tmp_path / "ours.pth")
    assert main(["convert", "groundingdino", "--source", source, "--output", out]) == 0
    info = convert_groundingdino(source, out)
    assert info["layout"] == layout and not info["unmapped"]
    model = _fresh(str(tmp_path / "hf"))
    load_weights(model, out)
    _compare(model, hf, _inputs())


def test_fine_tuning_with_another_backbone_skips_mismatched_parts(tmp_path):
    _hf_model(tmp_path / "hf")
    out = str(tmp_path / "ours.pth")
    convert_groundingdino(str(tmp_path / "hf"), out)
    cfg = load_config(None, [
        "MODEL.META_ARCHITECTURE", "GroundingDINO", "MODEL.BACKBONE.NAME", "convnext_atto",
        "MODEL.GDINO.RETURN_INTERM_INDICES", "[3]", "MODEL.GDINO.NUM_FEATURE_LEVELS", "1",
        "MODEL.GDINO.HIDDEN_DIM", "32", "MODEL.GDINO.NHEADS", "4", "MODEL.GDINO.DIM_FEEDFORWARD", "64",
        "MODEL.GDINO.ENC_LAYERS", "2", "MODEL.GDINO.DEC_LAYERS", "2", "MODEL.GDINO.NUM_QUERIES", "12",
        "MODEL.GDINO.MAX_TEXT_LEN", "24", "MODEL.GDINO.CLASS_NAMES", "['a', 'b']"])
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("surgdino")  # does not propagate to the root logger
    logger.addHandler(handler)
    try:
        load_weights(model, out)
    finally:
        logger.removeHandler(handler)
    sd, ckpt = model.state_dict(), torch.load(out, weights_only=True)["model"]
    assert torch.equal(sd["decoder.layers.1.linear1.weight"], ckpt["decoder.layers.1.linear1.weight"])  # level-free: loaded
    assert torch.equal(sd["encoder.fusion_layers.0.vision_param"], ckpt["encoder.fusion_layers.0.vision_param"])
    for k in ("decoder.layers.0.cross_attn.sampling_offsets.weight", "input_proj.0.0.weight", "encoder.level_embed",
              "text_projection.weight", "backbone.stages.3.blocks.0.conv_dw.weight"):
        assert torch.equal(sd[k], before[k]), k  # 4 levels vs 1, Swin vs ConvNeXt, BERT-32 vs MiniLM: kept
    text = "\n".join(lines)
    skipped = next(line for line in lines if "skipped (shape mismatch" in line)
    assert "decoder.layers.0.cross_attn.sampling_offsets.weight: checkpoint" in skipped
    assert "in checkpoint but not in the model (ignored): backbone.body" in text


def test_convert_rejects_what_is_not_groundingdino(tmp_path):
    bad = tmp_path / "other.pth"
    torch.save({"model": {"stages.0.weight": torch.zeros(2)}}, bad)
    with pytest.raises(SurgDinoError, match="IDEA"):
        convert_groundingdino(str(bad), str(tmp_path / "o.pth"))
    with pytest.raises(SurgDinoError, match="no such file"):
        convert_groundingdino(str(tmp_path / "missing"), str(tmp_path / "o.pth"))
