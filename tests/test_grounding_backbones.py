"""GroundingDINO on each backbone: SurgeryCLIP single level (padding mask passed in, language-guided
two-stage selection on one level), RETURN_INTERM_INDICES [3] + stride-2 levels, ConvNeXt, Swin;
one training step reaches every trainable part."""

from __future__ import annotations

import pytest
import torch
from test_surgeryclip_model import make_open_clip, save_checkpoint

from surgdino.config import load_config
from surgdino.errors import ConfigError
from surgdino.modeling import build_model
from surgdino.modeling.grounding.build import in_features_for

SMALL = ["MODEL.META_ARCHITECTURE", "GroundingDINO", "MODEL.GDINO.HIDDEN_DIM", "64", "MODEL.GDINO.NHEADS", "4",
         "MODEL.GDINO.DIM_FEEDFORWARD", "128", "MODEL.GDINO.ENC_LAYERS", "1", "MODEL.GDINO.DEC_LAYERS", "2",
         "MODEL.GDINO.NUM_QUERIES", "10", "MODEL.GDINO.CLASS_NAMES", "['allis forceps', 'mayo scissors']"]


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory) -> str:
    return save_checkpoint(make_open_clip(), tmp_path_factory.mktemp("gd_bb") / "clip.pt")


def _model(opts):
    torch.manual_seed(0)
    return build_model(load_config(None, SMALL + opts)).eval()


def _batch(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 255, (3, h, w), generator=g, dtype=torch.uint8), "height": h, "width": w,
             "instances": {"boxes": torch.tensor([[2.0, 3.0, w / 2, h / 2]]), "classes": torch.tensor([1])}}
            for h, w in sizes]


def _backbone_outputs(model, inputs):
    seen = []
    hook = model.backbone.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        results = model(inputs)
    hook.remove()
    return seen[0], results


def test_surgeryclip_single_level_padding_and_selection(clip_ckpt):
    model = _model(["MODEL.BACKBONE.NAME", "surgeryclip", "MODEL.SURGERYCLIP.CKPT", clip_ckpt,
                    "MODEL.SURGERYCLIP.SURGERY_DEPTH", "2", "MODEL.GDINO.RETURN_INTERM_INDICES", "[3]",
                    "MODEL.GDINO.NUM_FEATURE_LEVELS", "1", "MODEL.GDINO.NUM_QUERIES", "30"])
    assert model.in_features == ["res3"] and len(model.input_proj) == 1
    inputs = _batch([(64, 48), (40, 27)])
    feats, results = _backbone_outputs(model, inputs)
    alone, _ = _backbone_outputs(model, inputs[1:])
    # the padded batch gives the small image the features it has alone (the mask reaches the ViT)
    h, w = alone["res3"].shape[-2:]
    torch.testing.assert_close(feats["res3"][1, :, :h, :w], alone["res3"][0], rtol=1e-4, atol=1e-5)
    # one level, 8x6 = 48 tokens: language-guided selection still picks 30 queries
    for r, x in zip(results, inputs):
        assert r["boxes"].shape[1] == 4 and len(r["scores"]) == len(r["labels"]) > 0
        assert (r["boxes"][:, 2] <= x["width"]).all() and (r["labels"] < 2).all()


def test_single_stage_plus_stride2_levels_and_training_step():
    model = _model(["MODEL.BACKBONE.NAME", "convnext_atto", "MODEL.GDINO.RETURN_INTERM_INDICES", "[3]",
                    "MODEL.GDINO.NUM_FEATURE_LEVELS", "4"])
    assert model.in_features == ["res5"] and len(model.input_proj) == 4
    inputs = _batch([(128, 96), (96, 128)])
    model.train()
    losses = model(inputs)
    assert {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_interm"} <= set(losses)
    sum(losses.values()).backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    for part in ("backbone.stages.3.", "input_proj.0.", "input_proj.3.", "text_projection.", "query_embed.",
                 "encoder.fusion_layers.0.", "encoder.text_layers.0.", "encoder.layers.0.", "decoder.enc_output.",
                 "decoder.enc_bbox_embed.", "decoder.layers.1.", "decoder.bbox_embed."):
        assert any(n.startswith(part) for n in got), f"no gradient reaches {part}"
    # every stride-2 level's projection trains
    assert all(n in got for n, _ in model.input_proj.named_parameters(prefix="input_proj"))
    assert not any(p.requires_grad for p in model.text_encoder.parameters())


def test_swin_backbone_builds_and_maps_indices():
    model = _model(["MODEL.BACKBONE.NAME", "swin_tiny", "MODEL.GDINO.RETURN_INTERM_INDICES", "[1, 2, 3]",
                    "MODEL.GDINO.NUM_FEATURE_LEVELS", "4", "MODEL.SWIN.DROP_PATH_RATE", "0.0"])
    assert model.in_features == ["res3", "res4", "res5"]
    assert [model.backbone.output_shape()[f].channels for f in model.in_features] == [192, 384, 768]
    with torch.no_grad():
        out = model(_batch([(64, 96)]))
    assert out[0]["boxes"].shape[-1] == 4


def test_bad_return_interm_indices_is_one_clear_error():
    shapes = _model(["MODEL.BACKBONE.NAME", "convnext_atto"]).backbone.output_shape()
    with pytest.raises(ConfigError, match="RETURN_INTERM_INDICES"):
        in_features_for([4], shapes)
    with pytest.raises(ConfigError, match="RETURN_INTERM_INDICES"):
        in_features_for([3, 1], shapes)
