"""``surgdino config import-gdino``: the document's python config → YAML, read with ast, never executed."""

from __future__ import annotations

import textwrap

import yaml

from surgdino.cli import main
from surgdino.config import load_config
from surgdino.config.import_gdino import import_gdino, read_python_config

# The user document's GroundingDINO_SurgeryCLIP_cfg.py: Open-GroundingDino's GroundingDINO_SwinT_OGC.py
# and cfg_odvg.py fields with the SurgeryCLIP backbone swapped in.
DOCUMENT_CFG = '''
"""GroundingDINO with a SurgeryCLIP backbone (single scale)."""
batch_size = 2
modelname = "groundingdino"
backbone = "surgeryclip"
surgeryclip_ckpt = "/abs/path/surgeryclip/checkpoint.pt"
train_surgeryclip_backbone = False
device = "cuda"
position_embedding = "sine"
pe_temperatureH = 20
pe_temperatureW = 20
return_interm_indices = [3]
backbone_freeze_keywords = None
enc_layers = 6
dec_layers = 6
pre_norm = False
dim_feedforward = 2048
hidden_dim = 256
dropout = 0.0
nheads = 8
num_queries = 900
query_dim = 4
num_patterns = 0
num_feature_levels = 1
enc_n_points = 4
dec_n_points = 4
two_stage_type = "standard"
two_stage_bbox_embed_share = False
two_stage_class_embed_share = False
transformer_activation = "relu"
dec_pred_bbox_embed_share = True
dn_box_noise_scale = 1.0
dn_label_noise_ratio = 0.5
embed_init_tgt = True
dn_labelbook_size = 2000
max_text_len = 256
text_encoder_type = "bert-base-uncased"
use_text_enhancer = True
use_fusion_layer = True
use_checkpoint = True
use_transformer_ckpt = True
use_text_cross_attention = True
text_dropout = 0.0
fusion_dropout = 0.0
fusion_droppath = 0.1
sub_sentence_present = True
lr = 0.0001
lr_backbone = lr * 0.1
lr_backbone_names = ['backbone.0', 'bert']
freeze_keywords = ['bert']
weight_decay = 0.0001
clip_max_norm = 0.1
epochs = 15
lr_drop = 4
data_aug_scales = [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]
data_aug_max_size = 1333
set_cost_class = 1.0
set_cost_bbox = 5.0
set_cost_giou = 2.0
cls_loss_coef = 2.0
bbox_loss_coef = 5.0
giou_loss_coef = 2.0
focal_alpha = 0.25
num_select = 300
use_ema = False
matcher_type = "HungarianMatcher"
'''


def test_document_config_maps_every_key(tmp_path, capsys):
    src = tmp_path / "GroundingDINO_SurgeryCLIP_cfg.py"
    src.write_text(DOCUMENT_CFG)
    out = tmp_path / "imported.yaml"
    assert main(["config", "import-gdino", str(src), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    cfg = load_config(str(out))  # the YAML is valid for our schema
    assert cfg.MODEL.META_ARCHITECTURE == "GroundingDINO"
    assert cfg.MODEL.BACKBONE.NAME == "surgeryclip"
    assert cfg.MODEL.SURGERYCLIP.CKPT == "/abs/path/surgeryclip/checkpoint.pt"
    assert cfg.MODEL.SURGERYCLIP.TRAINABLE_BLOCKS == 0
    assert cfg.MODEL.GDINO.RETURN_INTERM_INDICES == [3] and cfg.MODEL.GDINO.NUM_FEATURE_LEVELS == 1
    assert cfg.MODEL.GDINO.NUM_QUERIES == 900 and cfg.MODEL.GDINO.FUSION_DROPPATH == 0.1
    assert cfg.MODEL.GDINO.PE_TEMPERATURE == 20 and cfg.MODEL.GDINO.DN_LABELBOOK_SIZE == 2000
    assert cfg.MODEL.GDINO.TEXT_ENCODER.NAME == "bert" and cfg.MODEL.GDINO.TEXT_ENCODER.FREEZE
    assert abs(cfg.MODEL.GDINO.TEXT_ENCODER.LR_MULT - 0.1) < 1e-9 and abs(cfg.SOLVER.BACKBONE_MULTIPLIER - 0.1) < 1e-9
    assert cfg.SOLVER.BASE_LR == 1e-4 and cfg.SOLVER.WEIGHT_DECAY == 1e-4 and cfg.SOLVER.IMS_PER_BATCH == 2
    assert cfg.SOLVER.CLIP_GRADIENTS.ENABLED and cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE == 0.1
    assert cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model"
    assert cfg.INPUT.MIN_SIZE_TRAIN[0] == 480 and cfg.INPUT.MAX_SIZE_TRAIN == 1333 and cfg.MODEL.DEVICE == "cuda"
    text = out.read_text()
    for name in ("epochs", "lr_drop", "use_checkpoint", "use_transformer_ckpt"):  # named with the reason
        assert f"#   {name} = " in text and f"not imported: {name} = " in err
    assert "SOLVER.MAX_ITER" in text  # the fix for the epoch schedule
    assert "TEXT_ENCODER.PATH" in err  # bert-base-uncased names a download: say what to set
    assert "0 keys" not in err and "already SurgDINO's behaviour" in err


def test_reference_swint_config_and_base_chain(tmp_path):
    (tmp_path / "base.py").write_text("lr = 2e-4\nnum_queries = 900\nbackbone = 'swin_T_224_1k'\n")
    (tmp_path / "child.py").write_text("_base_ = ['base.py']\nnum_queries = 300\nreturn_interm_indices = [1, 2, 3]\n"
                                       "two_stage_type = 'no'\npe_temperatureH = 20\npe_temperatureW = 10\n")
    text, reading, imported = import_gdino(str(tmp_path / "child.py"))
    tree = yaml.safe_load(text)
    assert tree["MODEL"]["BACKBONE"]["NAME"] == "swin_tiny" and tree["SOLVER"]["BASE_LR"] == 2e-4
    assert tree["MODEL"]["GDINO"]["NUM_QUERIES"] == 300  # the child overrides its base
    unmapped = "\n".join(imported.unmapped)
    assert "two_stage_type = 'no'" in unmapped and "standard" in unmapped  # rejected value, with the valid one
    assert "pe_temperatureH/W" in unmapped


def test_malicious_expressions_are_not_executed(tmp_path, capsys):
    marker = tmp_path / "pwned"
    src = tmp_path / "evil.py"
    src.write_text(textwrap.dedent(f"""
        import os
        os.system("touch {marker}")
        backbone = __import__("os").system("touch {marker}")
        lr = open("{marker}", "w").write("x")
        num_queries = [i for i in range(10 ** 8)]
        hidden_dim = 10 ** 10 ** 10
        nheads = (lambda: 8)()
        enc_layers = 6
        dec_layers = enc_layers + 1
        def build(): return 1
    """))
    assert main(["config", "import-gdino", str(src)]) == 0
    captured = capsys.readouterr()
    assert not marker.exists()
    reading = read_python_config(str(src))
    assert set(reading.values) == {"enc_layers", "dec_layers"} and reading.values["dec_layers"] == 7
    msgs = "\n".join(reading.unreadable)
    for what in ("Import", "backbone: a Call", "lr: a Call", "num_queries: a ListComp", "hidden_dim: a power",
                 "nheads: a Call", "FunctionDef"):
        assert what in msgs, what
    tree = yaml.safe_load(captured.out)
    assert tree["MODEL"]["GDINO"]["DEC_LAYERS"] == 7 and "BACKBONE" not in tree["MODEL"]
    assert "not imported" in captured.err


def test_unreadable_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("lr = (\n")
    assert main(["config", "import-gdino", str(bad)]) == 2
    assert "not a readable Python file" in capsys.readouterr().err
    assert main(["config", "import-gdino", str(tmp_path / "missing.py")]) == 2
