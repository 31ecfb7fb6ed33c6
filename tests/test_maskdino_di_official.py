"""DI-MaskDINO's official design (``MODEL.MaskDINO.DI_DESIGN official``) against the reference implementation.

Fixtures (made once from the official CQU-ADHRI-Lab/DI-MaskDINO decoder on CPU, with a throwaway detectron2
shim; the reference hard-codes 256-wide sine embeddings, which the harness made ``hidden_dim``-wide):

* ``official_dimaskdino_{r50,convnext_medical}_names.json``: name → shape of every tensor of the official model
  (pixel decoder, predictor; the Hello2015 ConvNeXt-T backbone) for DI-MaskDINO R50
  (``dimaskdino_r50_4scale_bs16_50ep``) and the Hello2015 ConvNeXt-T medical config (20 classes).
* ``official_di_decoder_tiny.pt``: a tiny seeded official decoder (32 wide, 2 TI and 2 decoder layers) in the
  official layout, its inputs (the pixel decoder's levels and mask features), its De-Imbalance and BATO tensors
  and its outputs on one unpadded 64x64 image.
"""

import json
import re
from pathlib import Path

import pytest
import torch

from surgdino.config import load_config
from surgdino.errors import CheckpointError, ConfigError
from surgdino.modeling.maskdino import de_imbalance_official as official
from surgdino.modeling.maskdino.de_imbalance import DIMaskDINODecoder
from surgdino.modeling.maskdino.di_official_keys import DIMASKDINO, DIMASKDINO_CONVNEXT
from surgdino.modeling.maskdino.official_weights import PR, official_keymap

FIX = Path(__file__).parent / "fixtures"

R50 = ["MODEL.MaskDINO.TRANSFORMER_DECODER_NAME", "DIMaskDINODecoder", "MODEL.MaskDINO.ARCHITECTURE", "official",
       "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "80", "MODEL.MaskDINO.DEC_LAYERS", "6", "MODEL.MaskDINO.TI_LAYERS", "2",
       "MODEL.MaskDINO.NUM_OBJECT_QUERIES", "300", "MODEL.MaskDINO.FIRST_SELECTED_QUERIES", "600",
       "MODEL.MaskDINO.NUM_GUIDING_TOKENS", "50", "MODEL.MaskDINO.DIM_FEEDFORWARD", "2048",
       "MODEL.SEM_SEG_HEAD.TOTAL_NUM_FEATURE_LEVELS", "4"]
# the Hello2015 medical YAML's model: our packaged config with its levels (res3-res5 in the encoder), its FFN
# widths, 20 classes and dropout 0.1
MEDICAL = ["MODEL.MaskDINO.ARCHITECTURE", "official", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "20",
           "MODEL.SEM_SEG_HEAD.NUM_FEATURE_LEVELS", "3",
           "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES", "['res3', 'res4', 'res5']",
           "MODEL.SEM_SEG_HEAD.DIM_FEEDFORWARD", "2048", "MODEL.MaskDINO.DROPOUT", "0.1"]


def _official_state(name: str) -> dict[str, torch.Tensor]:
    """Random tensors with the official names and shapes of the whole model; tied copies share one tensor, as
    in the checkpoint. (The R50's backbone names are added by the test: detectron2's layout is ours.)"""
    shapes = json.loads((FIX / f"official_dimaskdino_{name}_names.json").read_text())
    g = torch.Generator().manual_seed(0)
    by_group: dict[str, torch.Tensor] = {}
    state = {}
    for k, shape in shapes.items():
        tied = _tied_group(k)
        if tied not in by_group:
            by_group[tied] = torch.randn(shape, generator=g)
        state[k] = by_group[tied]
    return state


def _tied_group(k: str) -> str:
    """The canonical name of ``k`` among the official tied copies (read from the reference code)."""
    k = k[len(PR):] if k.startswith(PR) else k
    for a, b in [("decoder.query_guide_feature_update.", "query_guide_feature_update."),
                 ("decoder.class_embed.", "class_embed."), ("oldm.class_embed.", "class_embed."),
                 ("decoder.mask_embed.", "mask_embed."), ("decoder.norm.", "decoder_norm."), ("oldm.norm.", "oldm_norm.")]:
        if k.startswith(a):
            return b + k[len(a):]
    for head, canon in [("decoder.bbox_embed.", "_bbox_embed."), ("bbox_embed.", "_bbox_embed."),
                        ("oldm.bbox_embed.", "_oldm_bbox_embed."), ("oldm_bbox_embed.", "_oldm_bbox_embed.")]:
        if k.startswith(head):
            return canon + k[len(head):].split(".", 1)[1]
    return k


def _decoder(opts, config=None) -> DIMaskDINODecoder:
    cfg = load_config(config, opts)
    return DIMaskDINODecoder(**DIMaskDINODecoder.from_config(cfg))


@pytest.mark.parametrize("name,config,opts", [
    ("r50", None, R50 + ["MODEL.BACKBONE.NAME", "build_resnet_backbone", "MODEL.RESNETS.DEPTH", "50",
                         "MODEL.SEM_SEG_HEAD.DIM_FEEDFORWARD", "2048"]),
    ("convnext_medical", "surgdino://dimaskdino_convnext_tiny_medical_instruments.yaml", MEDICAL)])
def test_official_checkpoint_loads_every_tensor_and_round_trips(name, config, opts):
    """The whole model: backbone, pixel decoder (offarch's map) and the DI-MaskDINO predictor (ours)."""
    from surgdino.modeling import build_model

    torch.manual_seed(0)
    model = build_model(load_config(config, opts))
    assert model.decoder.design == "official" and model.decoder.official  # ARCHITECTURE official selects both
    model_state = {k: v for k, v in model.state_dict().items() if not k.startswith("criterion.")}
    state = _official_state(name)
    if name == "r50":
        state.update({k: torch.randn(v.shape) for k, v in model_state.items() if k.startswith("backbone.")})
    keymap = official_keymap(state)
    assert keymap is (DIMASKDINO if name == "r50" else DIMASKDINO_CONVNEXT)
    ours, report = keymap.to_ours(state, "x.pth")
    assert report.unused == [] and report.unfilled(model_state) == []
    model.load_state_dict(ours, strict=False)
    back = keymap.to_official(model_state, feature_order="low2high")  # both DI-MaskDINO configs' order
    assert sorted(back) == sorted(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_tied_copy_that_differs_is_an_error():
    state = _official_state("r50")
    for name in (PR + "oldm.bbox_embed.1.layers.0.weight", PR + "decoder.query_guide_feature_update.norm1.bias"):
        edited = dict(state, **{name: state[name] + 1})
        with pytest.raises(CheckpointError, match=re.escape(name) + " should be a tied copy of"):
            DIMASKDINO.to_ours(edited, "x.pth")


def _tiny(fx, official: bool = False) -> tuple[DIMaskDINODecoder, object]:
    dec = DIMaskDINODecoder(num_classes=4, hidden_dim=32, num_queries=10, nheads=4, dim_feedforward=32, dec_layers=2,
                            mask_dim=32, num_feature_levels=3, first_selected_queries=20, num_guiding_tokens=4,
                            ti_layers=2, bato_dim_feedforward=32, design="official", official=official).eval()
    ours, report = DIMASKDINO.to_ours({PR + k: v for k, v in fx["weights"].items()}, "fixture")
    assert report.unused == [] and report.unfilled({"decoder." + k: v for k, v in dec.state_dict().items()}) == []
    dec.load_state_dict({k[len("decoder."):]: v for k, v in ours.items()}, strict=True)
    levels = fx["levels"][::-1]  # the reference decoder reads the pixel decoder's levels in reverse
    masks = [torch.zeros(1, *lv.shape[-2:], dtype=torch.bool) for lv in levels]
    return dec, dec.decoder_inputs(levels, masks, fx["mask_features"], torch.tensor([[64, 64]]), (64, 64))


def _close(a, b, tol=1e-4):
    assert a.shape == b.shape and (a - b).abs().max().item() < tol, (a - b).abs().max().item()


def test_de_imbalance_and_bato_equal_the_reference():
    fx = torch.load(FIX / "official_di_decoder_tiny.pt", weights_only=True)
    dec, inputs = _tiny(fx)
    with torch.no_grad():
        # first selection (MaskDINO's two-stage scoring) and the encoder outputs of all 20 selected tokens
        tgt, _, valid = dec.top_tokens(inputs, 20)
        _close(tgt, fx["ti_in"], 1e-6)
        _close(dec.heads(tgt, inputs.mask_features)["pred_logits"], fx["interm_logits"])
        # token interaction and second selection on the reference's inputs
        x, ref, outs = official.token_interaction(dec, fx["ti_in"], fx["ti_ref_in"], valid, inputs, 10)
        _close(x, fx["sel_content"])
        _close(ref.sigmoid(), fx["sel_boxes"])
        _close(torch.stack([o["pred_logits"] for o in outs]), fx["ti_logits"])
        _close(torch.stack([o["pred_boxes"] for o in outs]), fx["ti_boxes"])
        # BATO on the reference's layer-0 queries and layer-1 query positions
        new = official.bato_update(dec, inputs, fx["hs0"], fx["qpos1"])
        _close(new.memory, fx["bato_memory"])
        _close(new.mask_features, fx["bato_mask_features"])


def test_whole_official_decoder_equals_the_reference():
    """MaskDINO's official decoder parts (``official=True``) with the official DI parts: every layer's class
    logits, boxes and masks (layers >= 1 on BATO's updated mask features) and the encoder outputs."""
    fx = torch.load(FIX / "official_di_decoder_tiny.pt", weights_only=True)
    dec, _ = _tiny(fx, official=True)
    masks = [torch.zeros(1, *lv.shape[-2:], dtype=torch.bool) for lv in fx["levels"]]
    with torch.no_grad():
        out = dec(fx["levels"], masks, fx["mask_features"], torch.tensor([[64, 64]]), (64, 64))
    _close(out["interm_outputs"]["pred_logits"], fx["interm_logits"])
    _close(out["interm_outputs"]["pred_boxes"], fx["interm_boxes"])
    _close(torch.stack([a["pred_logits"] for a in out["aux_outputs"]]), fx["aux_logits"])
    _close(torch.stack([a["pred_boxes"] for a in out["aux_outputs"]]), fx["aux_boxes"])
    _close(out["pred_logits"], fx["pred_logits"])
    _close(out["pred_boxes"], fx["pred_boxes"])
    _close(torch.einsum("bqd,bdhw->bqhw", out["pred_embeds"], out["mask_features"]), fx["pred_masks"])


def test_swapped_norms_are_caught_by_the_outputs():
    """A plain rename of the TI layer norms (norm1 ↔ norm2) loads without complaint; the outputs tell."""
    fx = torch.load(FIX / "official_di_decoder_tiny.pt", weights_only=True)
    w = dict(fx["weights"])
    for i in range(2):
        a, b = f"oldm.layers.{i}.norm1.weight", f"oldm.layers.{i}.norm2.weight"
        w[a], w[b] = w[b], w[a]
    dec, inputs = _tiny(dict(fx, weights=w))
    with torch.no_grad():
        _, _, outs = official.token_interaction(dec, fx["ti_in"], fx["ti_ref_in"],
                                                torch.ones(1, 20, dtype=torch.bool), inputs, 10)
    assert (torch.stack([o["pred_logits"] for o in outs]) - fx["ti_logits"]).abs().max() > 1e-2


TINY = ["MODEL.BACKBONE.NAME", "convnext_atto", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32",
        "MODEL.SEM_SEG_HEAD.MASK_DIM", "32", "MODEL.MaskDINO.HIDDEN_DIM", "32", "MODEL.MaskDINO.NHEADS", "4",
        "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS", "4", "MODEL.MaskDINO.DEC_LAYERS", "2",
        "MODEL.MaskDINO.NUM_OBJECT_QUERIES", "10", "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1",
        "MODEL.MaskDINO.TRAIN_NUM_POINTS", "64", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "4",
        "MODEL.MaskDINO.DIM_FEEDFORWARD", "32", "MODEL.SEM_SEG_HEAD.DIM_FEEDFORWARD", "48",
        "MODEL.SEM_SEG_HEAD.TOTAL_NUM_FEATURE_LEVELS", "3", "MODEL.MaskDINO.DN_NUM", "4",
        "MODEL.MaskDINO.TRANSFORMER_DECODER_NAME", "DIMaskDINODecoder", "MODEL.MaskDINO.FIRST_SELECTED_QUERIES", "20",
        "MODEL.MaskDINO.NUM_GUIDING_TOKENS", "4", "MODEL.MaskDINO.TI_LAYERS", "2", "MODEL.MaskDINO.DI_DESIGN", "official"]
# (DI_DESIGN official with ARCHITECTURE surgdino: the reference's DI parts on our MaskDINO decoder, with padding masks)


def test_official_design_trains_every_part():
    from surgdino.modeling import build_model

    torch.manual_seed(0)
    model = build_model(load_config(None, TINY)).train()
    dec = model.decoder
    assert dec.bato_update.linear1.out_features == 32  # MaskDINO.DIM_FEEDFORWARD, not SEM_SEG_HEAD's 48
    masks = torch.zeros(2, 96, 96, dtype=torch.bool)
    masks[0, 10:40, 10:60] = True
    masks[1, 50:90, 30:70] = True
    g = torch.Generator().manual_seed(0)
    batch = [{"image": torch.randint(0, 255, (3, 96, 96), dtype=torch.uint8, generator=g), "height": 96,
              "width": 96, "image_id": 0, "file_name": "x.png",
              "instances": {"boxes": torch.tensor([[10.0, 10, 60, 40], [30, 50, 70, 90]]), "masks": masks,
                            "classes": torch.tensor([1, 2])}}]
    losses = model(batch)
    assert {"loss_ce_ti0", "loss_bbox_ti1", "loss_giou_ti1"} <= set(losses)
    sum(losses.values()).backward()
    for name in ("ti_norm.weight", "ti_bbox_embed.layers.2.weight", "ti_layers.0.linear1.weight",
                 "bato_update.cross_attn.in_proj_weight", "bato_update.linear2.weight", "bato_mask_conv.weight",
                 "bato_mask_norm.weight"):
        grad = dict(dec.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_default_design_follows_the_architecture():
    assert _decoder(R50[:2]).design == "surgdino"
    assert _decoder(R50[:2] + ["MODEL.MaskDINO.DI_DESIGN", "official"]).design == "official"
    assert _decoder(R50 + ["MODEL.MaskDINO.DI_DESIGN", "surgdino"]).design == "surgdino"


def test_official_design_config_errors():
    with pytest.raises(ConfigError, match="DI_DESIGN official needs MODEL.SEM_SEG_HEAD.MASK_DIM"):
        _decoder(R50 + ["MODEL.SEM_SEG_HEAD.MASK_DIM", "128"])
    with pytest.raises(ConfigError, match="DI_DESIGN"):
        load_config(None, ["MODEL.MaskDINO.DI_DESIGN", "reference"])
