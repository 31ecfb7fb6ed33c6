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


def test_forward_tensors_is_list_free_and_traces():
    """Eval = preprocessor → ``forward_tensors`` → post-processor; ``forward_tensors`` takes and returns
    tensors only and traces: the traced graph gives the eager outputs for another padding mask."""
    import warnings

    from surgdino.modeling.maskdino.model import RAW_OUTPUTS

    torch.manual_seed(0)
    model = build_model(load_config(None, TINY)).eval()
    batch = [_input(64, 96, n=1), _input(48, 64, n=1)]
    b = model.preprocessor(batch)
    assert b.images.shape == (2, 3, 64, 96) and b.targets is None
    assert b.pad_mask[1, 48:].all() and b.pad_mask[1, :, 64:].all() and not b.pad_mask[0].any()
    assert b.image_sizes == [(64, 96), (48, 64)] and b.out_sizes == [(128, 192), (96, 128)]
    with torch.no_grad():
        raw = model.forward_tensors(b.images, b.pad_mask)
        assert tuple(raw) == RAW_OUTPUTS and all(isinstance(v, torch.Tensor) for v in raw.values())
        results = model(batch)
        r = model.postprocessor(raw["pred_logits"][1], raw["pred_boxes"][1], raw["pred_embeds"][1],
                                raw["mask_features"][1], (48, 64), (64, 96), (96, 128))
        assert all(torch.equal(r[k], results[1][k]) for k in r)

    class Export(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, images, pad_mask):
            return tuple(self.m.forward_tensors(images, pad_mask).values())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # shape-derived Python ints are constants of the trace, as they should be
        traced = torch.jit.trace(Export(model), (b.images, b.pad_mask), check_trace=False)
    other = torch.zeros_like(b.pad_mask)
    other[0, 40:] = True
    other[0, :, 80:] = True
    with torch.no_grad():
        for got, want in zip(traced(b.images, other), Export(model)(b.images, other)):
            # the trace runs the grid_sample deformable-attention kernel, eager CPU the sparse one (same to 1e-5)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
