"""MaskDINO end to end on a tiny config: losses (with and without instances), eval outputs, batch = alone."""

import torch

from surgdino.config import load_config
from surgdino.modeling import build_model

TINY = ["MODEL.BACKBONE.NAME", "convnext_atto", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "64",
        "MODEL.SEM_SEG_HEAD.MASK_DIM", "64", "MODEL.MaskDINO.HIDDEN_DIM", "64", "MODEL.MaskDINO.DEC_LAYERS", "2",
        "MODEL.MaskDINO.NUM_OBJECT_QUERIES", "30", "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1",
        "MODEL.MaskDINO.TRAIN_NUM_POINTS", "256", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "4",
        "MODEL.MaskDINO.DIM_FEEDFORWARD", "128", "MODEL.SEM_SEG_HEAD.DIM_FEEDFORWARD", "128"]


def _input(h, w, n=2):
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    boxes = torch.zeros(n, 4)
    for i in range(n):
        masks[i, 10 + 20 * i:40 + 20 * i, 10 + 10 * i:60 + 10 * i] = True
        boxes[i] = torch.tensor([10 + 10 * i, 10 + 20 * i, 60 + 10 * i, 40 + 20 * i], dtype=torch.float32)
    return {"image": torch.randint(0, 255, (3, h, w), dtype=torch.uint8), "height": 2 * h, "width": 2 * w,
            "image_id": 0, "file_name": "x.png",
            "instances": {"boxes": boxes, "masks": masks, "classes": torch.arange(n) % 4}}


def test_losses_eval_and_batch_equals_alone():
    torch.manual_seed(0)
    model = build_model(load_config(None, TINY))
    batch = [_input(128, 128), _input(96, 128, n=0)]
    losses = model(batch)
    assert all(k.startswith("loss_") for k in losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    model.eval()
    with torch.no_grad():
        both = model(batch)
        alone = model([batch[1]])[0]
    r = both[1]
    assert r["masks"].shape[1:] == (192, 256) and r["masks"].dtype == torch.bool
    assert r["boxes"].shape[1] == 4 and r["labels"].dtype == torch.int64
    top = min(10, len(alone["scores"]))
    assert torch.allclose(r["scores"][:top], alone["scores"][:top], rtol=1e-3, atol=1e-5)
    assert torch.allclose(r["boxes"][:top], alone["boxes"][:top], atol=1e-2)
    assert r["labels"][:top].tolist() == alone["labels"][:top].tolist()
