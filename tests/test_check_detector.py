"""``surgdino check-detector``: eval shapes, one training step and gradient flow on a dummy padded batch."""

from __future__ import annotations

import io
import os

from torch import nn

from surgdino.cli import main
from surgdino.config import load_config
from surgdino.engine.check_detector import check_detector, dummy_batch

DEMO = os.path.join(os.path.dirname(__file__), "..", "src", "surgdino", "configs", "demo", "dimaskdino_atto_trays.yaml")
SIZES = [(96, 128), (64, 96)]


def test_dummy_batch_is_padded_and_annotated():
    batch = dummy_batch(SIZES, 4, masks=True)
    assert [tuple(x["image"].shape[-2:]) for x in batch] == SIZES
    inst = batch[0]["instances"]
    assert inst["boxes"].shape == (3, 4) and inst["masks"].shape == (3, 96, 128)
    assert (inst["boxes"][:, 2] <= 128).all() and inst["masks"].any((1, 2)).all()


def test_maskdino_check_reports_shapes_steps_and_gradients():
    cfg = load_config(DEMO, ["MODEL.DEVICE", "cpu"])
    out = io.StringIO()
    ok = check_detector(cfg, sizes=SIZES, out=out)
    text = out.getvalue()
    assert "eval: padded batch 96x128 + 64x96" in text and "peak" in text
    assert "backbone → {res2: 2x40x24x32" in text  # the padded batch: 96x128 at stride 4
    assert "image 1: boxes" in text and "train step:" in text
    assert "gradients backbone: 132/132 trainable tensors" in text
    assert ok == ("none for" not in text)  # the verdict follows the per-part gradient report
    assert text.strip().endswith("OK" if ok else "FAILED")


def test_an_unused_parameter_fails_the_check(monkeypatch):
    from surgdino.engine.defaults import Trainer

    real = Trainer.build_model.__func__

    def with_unused(cls, cfg):
        model = real(cls, cfg)
        model.unused_head = nn.Linear(4, 4)  # trainable, never called: no gradient
        return model

    monkeypatch.setattr(Trainer, "build_model", classmethod(with_unused))
    cfg = load_config(DEMO, ["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.FREEZE_AT", "5"])
    out = io.StringIO()
    assert not check_detector(cfg, sizes=SIZES, out=out)
    text = out.getvalue()
    assert "gradients unused_head: 0/2 trainable tensors; none for ['unused_head.weight', 'unused_head.bias']" in text
    assert text.strip().endswith("FAILED")


def test_cli_needs_two_sizes_and_a_config(capsys):
    assert main(["check-detector", "--config-file", DEMO, "--sizes", "64x64"]) == 2
    assert "two sizes" in capsys.readouterr().err


GDINO_TINY = ["MODEL.META_ARCHITECTURE", "GroundingDINO", "MODEL.DEVICE", "cpu", "MODEL.MASK_ON", "False",
              "MODEL.BACKBONE.NAME", "convnext_atto", "MODEL.CONVNEXT.DROP_PATH_RATE", "0.0",
              "MODEL.GDINO.TEXT_ENCODER.NAME", "minilm", "MODEL.GDINO.HIDDEN_DIM", "64", "MODEL.GDINO.NHEADS", "4",
              "MODEL.GDINO.DIM_FEEDFORWARD", "128", "MODEL.GDINO.ENC_LAYERS", "1", "MODEL.GDINO.DEC_LAYERS", "2",
              "MODEL.GDINO.NUM_QUERIES", "30", "MODEL.GDINO.RETURN_INTERM_INDICES", "[0, 1, 2, 3]",
              "MODEL.GDINO.NUM_FEATURE_LEVELS", "4", "MODEL.GDINO.FUSION_DROPPATH", "0.0"]


def test_groundingdino_check_with_prompt(capsys):
    code = main(["check-detector", "--config-file", DEMO, "--prompt", "mayo scissors . 14.5 cm ruler . allis forceps",
                 "--sizes", "96x128", "64x96", *GDINO_TINY, "MODEL.GDINO.PROMPT_MODE", "pooled"])
    text = capsys.readouterr().out
    assert "prompt (pooled): 3 classes, 3 text tokens" in text
    assert "text_encoder → 3x" in text and "decoder → {pred_logits: 2x30x" in text  # batch 2, 30 queries
    assert "image 1: boxes" in text and "train step:" in text and "loss_giou" in text
    assert "frozen (no gradients by design): text_encoder" in text
    assert ("none for" in text) == (code == 1) and text.strip().endswith("OK" if code == 0 else "FAILED")
