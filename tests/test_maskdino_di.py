"""DI-MaskDINO decoder: degenerate mode = MaskDINO, token-interaction losses and gradients, BATO memory and
guiding tokens, eval with batched sizes, empty images, configs."""

import pytest
import torch

from surgdino.config import load_config
from surgdino.errors import ConfigError
from surgdino.modeling import build_model
from surgdino.modeling.maskdino.criterion import SetCriterion
from surgdino.modeling.maskdino.de_imbalance import DIMaskDINODecoder, DISetCriterion
from surgdino.modeling.maskdino.decoder import MaskDINODecoder
from surgdino.registry import DECODER_REGISTRY

TINY = ["MODEL.BACKBONE.NAME", "convnext_atto", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32",
        "MODEL.SEM_SEG_HEAD.MASK_DIM", "32", "MODEL.MaskDINO.HIDDEN_DIM", "32", "MODEL.MaskDINO.NHEADS", "4",
        "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS", "4", "MODEL.MaskDINO.DEC_LAYERS", "3",
        "MODEL.MaskDINO.NUM_OBJECT_QUERIES", "20", "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1",
        "MODEL.MaskDINO.TRAIN_NUM_POINTS", "128", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "4",
        "MODEL.MaskDINO.DIM_FEEDFORWARD", "64", "MODEL.SEM_SEG_HEAD.DIM_FEEDFORWARD", "64",
        "MODEL.SEM_SEG_HEAD.TOTAL_NUM_FEATURE_LEVELS", "3", "MODEL.MaskDINO.DN_NUM", "8"]


def _di(ti=2, guides=6, first=40, *extra):
    return TINY + ["MODEL.MaskDINO.TRANSFORMER_DECODER_NAME", "DIMaskDINODecoder",
                   "MODEL.MaskDINO.FIRST_SELECTED_QUERIES", str(first), "MODEL.MaskDINO.NUM_GUIDING_TOKENS",
                   str(guides), "MODEL.MaskDINO.TI_LAYERS", str(ti), *extra]


def _input(h, w, n=2):
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    boxes = torch.zeros(n, 4)
    for i in range(n):
        masks[i, 10 + 20 * i:40 + 20 * i, 10 + 10 * i:60 + 10 * i] = True
        boxes[i] = torch.tensor([10 + 10 * i, 10 + 20 * i, 60 + 10 * i, 40 + 20 * i], dtype=torch.float32)
    g = torch.Generator().manual_seed(h * 1000 + w + n)
    return {"image": torch.randint(0, 255, (3, h, w), dtype=torch.uint8, generator=g), "height": h, "width": w,
            "image_id": 0, "file_name": "x.png",
            "instances": {"boxes": boxes, "masks": masks, "classes": torch.arange(n) % 4}}


def _build(opts, seed=0):
    torch.manual_seed(seed)
    return build_model(load_config(None, opts))


def test_di_off_is_maskdino_and_degenerate_di_equals_maskdino():
    assert DECODER_REGISTRY.get("DIMaskDINODecoder") is DIMaskDINODecoder
    base = _build(TINY)
    assert type(base.decoder) is MaskDINODecoder and type(base.criterion) is SetCriterion
    di = _build(_di(ti=0, guides=0, first=35))
    assert isinstance(di.decoder, DIMaskDINODecoder) and isinstance(di.criterion, DISetCriterion)
    di.load_state_dict(base.state_dict(), strict=True)  # the degenerate DI decoder has no extra parameters
    batch = [_input(128, 128), _input(96, 128, n=1)]
    for model in (base, di):
        model.train()
    torch.manual_seed(1)
    lb = base(batch)
    torch.manual_seed(1)
    ld = di(batch)
    assert set(lb) == set(ld)
    for k in lb:
        assert torch.allclose(lb[k], ld[k], rtol=1e-5, atol=1e-6), k
    base.eval()
    di.eval()
    with torch.no_grad():
        rb, rd = base(batch), di(batch)
    for a, b in zip(rb, rd):
        assert torch.allclose(a["scores"], b["scores"], rtol=1e-5, atol=1e-7)
        assert torch.allclose(a["boxes"], b["boxes"], atol=1e-4)
        assert torch.equal(a["masks"], b["masks"]) and torch.equal(a["labels"], b["labels"])


def test_ti_losses_weights_and_gradients_from_decoder_losses():
    model = _build(_di(ti=2, guides=6))
    batch = [_input(128, 128), _input(96, 128, n=3)]
    torch.manual_seed(0)
    losses = model(batch)
    ti_keys = {f"loss_{k}_ti{i}" for k in ("ce", "bbox", "giou") for i in range(2)}
    assert ti_keys <= set(losses) and not any(k.startswith("loss_mask_ti") for k in losses)
    assert all(torch.isfinite(v) for v in losses.values())
    # decoder's final-layer losses alone reach the token-interaction layers (second selection not detached)
    final = sum(losses[k] for k in ("loss_ce", "loss_bbox", "loss_giou", "loss_mask", "loss_dice"))
    final.backward()
    for name, p in model.decoder.named_parameters():
        if name.startswith(("ti_layers.", "ti_ref_point_head.")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    # TI_LOSS_WEIGHT scales them; off without DEEP_SUPERVISION or with weight 0
    model.criterion.ti_loss_weight = 2.5
    torch.manual_seed(0)
    scaled = model(batch)
    for k in ti_keys:
        assert torch.allclose(scaled[k], 2.5 * losses[k], rtol=1e-4), k
    model.criterion.deep_supervision = False
    assert not any("_ti" in k for k in model(batch))
    model.criterion.deep_supervision = True
    model.criterion.ti_loss_weight = 0.0
    assert not any("_ti" in k for k in model(batch))


def _decoder_inputs(seed=0, d=32, sizes=((128, 128), (64, 96)), strides=(32, 16, 8)):
    """Encoder levels, masks and mask features of a padded batch (image i unpadded ``sizes[i]``)."""
    g = torch.Generator().manual_seed(seed)
    hp, wp = max(h for h, _ in sizes), max(w for _, w in sizes)
    levels = [torch.randn(len(sizes), d, hp // s, wp // s, generator=g) for s in strides]
    masks = []
    for s in strides:
        m = torch.ones(len(sizes), hp // s, wp // s, dtype=torch.bool)
        for i, (h, w) in enumerate(sizes):
            m[i, :h // s, :w // s] = False
        masks.append(m)
    mf = torch.randn(len(sizes), d, hp // 4, wp // 4, generator=g)
    for i, (h, w) in enumerate(sizes):
        mf[i, :, h // 4:] = 0.0
        mf[i, :, :, w // 4:] = 0.0
    return levels, masks, mf, torch.tensor(sizes), (hp, wp)


def _di_decoder(guides, seed=0, **kw):
    torch.manual_seed(seed)
    return DIMaskDINODecoder(num_classes=4, hidden_dim=32, num_queries=10, nheads=4, dim_feedforward=64,
                             dec_layers=3, mask_dim=32, num_feature_levels=3, first_selected_queries=30,
                             num_guiding_tokens=guides, ti_layers=1, bato_dim_feedforward=64, dn_num=12, **kw)


def test_bato_acts_from_layer_one_on_and_its_mask_branch_starts_at_zero():
    on, off = _di_decoder(guides=5), _di_decoder(guides=0)
    missing, unexpected = off.load_state_dict(on.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("bato_") for k in unexpected)
    args = _decoder_inputs()
    on.eval()
    off.eval()
    with torch.no_grad():
        a, b = on(*args), off(*args)
    layers_a, layers_b = a["aux_outputs"] + [a], b["aux_outputs"] + [b]  # initial prediction, layers 0, 1, 2
    for i in (0, 1):  # before BATO: the same outputs
        for k in ("pred_logits", "pred_boxes", "pred_embeds", "mask_features"):
            assert torch.equal(layers_a[i][k], layers_b[i][k]), (i, k)
    for i in (2, 3):  # layers 1 and 2 attend to the updated tokens
        assert (layers_a[i]["pred_logits"] - layers_b[i]["pred_logits"]).abs().max() > 1e-3, i
    # an untrained mask-feature branch (norm scale 0) adds nothing; switched on, it adds inside the images only
    assert torch.equal(a["mask_features"], args[2])
    torch.nn.init.ones_(on.bato_mask_norm.weight)
    with torch.no_grad():
        c = on(*args)
    diff = (c["mask_features"] - args[2]).abs().sum(1)  # [B, h, w]
    assert diff[1, :64 // 4, :96 // 4].min() > 0 and diff[1, 64 // 4:].max() == 0 and diff[1, :, 96 // 4:].max() == 0
    assert torch.equal(c["aux_outputs"][1]["mask_features"], args[2])  # layer 0 still uses the pixel decoder's


def test_bato_token_update_leaves_padding_and_is_trained():
    dec = _di_decoder(guides=5)
    g = torch.Generator().manual_seed(1)
    memory, pos = torch.randn(2, 40, 32, generator=g), torch.randn(2, 40, 32, generator=g)
    guide, gpos = torch.randn(2, 5, 32, generator=g), torch.randn(2, 5, 32, generator=g)
    pad = torch.zeros(2, 40, dtype=torch.bool)
    pad[1, 25:] = True
    upd = dec.bato_update(memory, pos, pad, guide, gpos)
    assert torch.equal(upd[pad], memory[pad])
    assert ((upd - memory).abs().sum(-1)[~pad] > 1e-4).all()
    # in a training step the decoder's mask losses reach the update and the mask-feature branch
    model = _build(_di(ti=1, guides=5))
    out = model([_input(128, 128), _input(64, 96, n=1)])
    (out["loss_mask"] + out["loss_dice"]).backward()
    assert model.decoder.bato_mask_norm.weight.grad.abs().sum() > 0
    assert model.decoder.bato_update.cross_attn.in_proj_weight.grad.abs().sum() > 0


def test_dn_queries_never_guide():
    dec = _di_decoder(guides=4)
    d, q, n_dn = 32, 10, 6
    torch.manual_seed(0)
    cand = torch.randn(200, d)
    score = dec.class_embed(dec.decoder_norm(cand)).max(-1).values
    order = score.argsort(descending=True)
    hs = torch.cat([cand[order[:n_dn]], cand[order[-q:]]])[None]  # DN rows are the best-scoring ones
    idx = dec.guiding_tokens(hs, q)
    assert idx.shape == (1, 4) and (idx < q).all()
    expect = score[order[-q:]].topk(4).indices
    assert idx[0].tolist() == expect.tolist()
    # in a training step: matching queries never see denoising queries, so with BATO choosing its guides
    # among the matching queries only, their outputs are those of the same step without denoising
    args = _decoder_inputs(sizes=((128, 128), (128, 96)))
    targets = [{"labels": torch.tensor([0, 1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.2],
                                                                          [0.5, 0.8, 0.2, 0.1]]),
                "masks": torch.zeros(3, 128, 128, dtype=torch.bool)},
               {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]]),
                "masks": torch.zeros(1, 128, 128, dtype=torch.bool)}]
    with torch.no_grad():
        with_dn = dec(*args, targets=targets)
        without = dec(*args)
    assert with_dn["dn_meta"]["num_groups"] * with_dn["dn_meta"]["group_size"] > 0 and "dn_outputs" not in without
    for a, b in zip(with_dn["aux_outputs"] + [with_dn], without["aux_outputs"] + [without]):
        assert torch.allclose(a["pred_logits"], b["pred_logits"], atol=1e-5)
        assert torch.allclose(a["pred_boxes"], b["pred_boxes"], atol=1e-5)


def test_eval_batched_sizes_and_empty_images():
    model = _build(_di(ti=2, guides=6))
    losses = model([_input(96, 128, n=0)])
    total = sum(losses.values())
    assert torch.isfinite(total) and any("_ti" in k for k in losses)
    total.backward()
    model.eval()
    batch = [_input(128, 160), _input(96, 128, n=0), _input(64, 64)]
    with torch.no_grad():
        out = model(batch)
    for x, r in zip(batch, out):
        assert r["masks"].shape[1:] == (x["height"], x["width"]) and r["boxes"].shape[1] == 4
        assert torch.isfinite(r["scores"]).all() and len(r["scores"]) == len(r["labels"]) > 0


def test_padding_is_harmless_in_di_parts():
    """An image gives the same decoder outputs alone and padded in a batch, with garbage in its padded
    tokens. The base decoder has two padding-dependent parts taken from the reference (deformable offsets
    normalised by the padded level size; query positions from boxes scaled by level-0 valid ratios); they
    are neutralised here so that the test checks what DI adds: selections, token interaction, BATO's
    token update and its mask-feature branch (switched on)."""
    torch.manual_seed(0)
    d = 32
    dec = DIMaskDINODecoder(num_classes=4, hidden_dim=d, num_queries=10, nheads=4, dim_feedforward=64,
                            dec_layers=3, mask_dim=d, num_feature_levels=3, first_selected_queries=30,
                            num_guiding_tokens=4, ti_layers=2, bato_dim_feedforward=64).eval()
    torch.nn.init.ones_(dec.bato_mask_norm.weight)
    torch.nn.init.zeros_(dec.ref_point_head.layers[-1].weight)
    torch.nn.init.zeros_(dec.ref_point_head.layers[-1].bias)
    for layer in dec.layers:
        torch.nn.init.zeros_(layer.cross_attn.sampling_offsets.weight)
        torch.nn.init.zeros_(layer.cross_attn.sampling_offsets.bias)
    (ha, wa), (hb, wb), strides = (64, 96), (128, 160), [32, 16, 8]
    lv_a = [torch.randn(1, d, ha // s, wa // s) for s in strides]
    lv_b = [torch.randn(2, d, hb // s, wb // s) * 3 for s in strides]  # garbage around image 0
    masks_b = []
    for s, a, b in zip(strides, lv_a, lv_b):
        b[0, :, :ha // s, :wa // s] = a[0]
        m = torch.zeros(2, hb // s, wb // s, dtype=torch.bool)
        m[0] = True
        m[0, :ha // s, :wa // s] = False
        masks_b.append(m)
    mf_a = torch.randn(1, d, ha // 4, wa // 4)
    mf_b = torch.randn(2, d, hb // 4, wb // 4)
    mf_b[0] = 0.0  # the pixel decoder zeroes padded mask features
    mf_b[0, :, :ha // 4, :wa // 4] = mf_a[0]
    no_pad = [torch.zeros(1, ha // s, wa // s, dtype=torch.bool) for s in strides]
    with torch.no_grad():
        oa = dec(lv_a, no_pad, mf_a, torch.tensor([[ha, wa]]), (ha, wa))
        ob = dec(lv_b, masks_b, mf_b, torch.tensor([[ha, wa], [hb, wb]]), (hb, wb))
    assert not torch.equal(oa["mask_features"], mf_a)  # BATO's mask-feature branch is on
    for a, b in zip(oa["aux_outputs"] + [oa], ob["aux_outputs"] + [ob]):
        assert torch.allclose(a["pred_logits"][0], b["pred_logits"][0], atol=1e-5)
        assert torch.allclose(a["pred_boxes"][0], b["pred_boxes"][0], atol=1e-5)
        ma = torch.einsum("qd,dhw->qhw", a["pred_embeds"][0], a["mask_features"][0])
        mb = torch.einsum("qd,dhw->qhw", b["pred_embeds"][0], b["mask_features"][0])[:, :ha // 4, :wa // 4]
        assert torch.allclose(ma, mb, atol=1e-4)


def test_configs_and_errors():
    med = load_config("configs/dimaskdino_convnext_tiny_medical_instruments.yaml", [])
    m = med.MODEL.MaskDINO
    assert (m.TRANSFORMER_DECODER_NAME, m.FIRST_SELECTED_QUERIES, m.NUM_GUIDING_TOKENS, m.TI_LAYERS, m.DEC_LAYERS,
            m.NUM_OBJECT_QUERIES, m.DN_NUM, m.TRAIN_NUM_POINTS) == ("DIMaskDINODecoder", 800, 100, 3, 9, 400, 150, 16384)
    base = load_config("configs/Base-DIMaskDINO-ConvNeXt.yaml", []).MODEL.MaskDINO
    assert (base.FIRST_SELECTED_QUERIES, base.NUM_GUIDING_TOKENS, base.TI_LAYERS, base.DEC_LAYERS,
            base.NUM_OBJECT_QUERIES) == (600, 50, 2, 6, 300)
    model = build_model(med)  # the document's full model (a few seconds)
    dec = model.decoder
    assert isinstance(dec, DIMaskDINODecoder) and isinstance(model.criterion, DISetCriterion)
    assert (dec.first_selected_queries, dec.num_guiding_tokens, len(dec.ti_layers), len(dec.layers),
            dec.num_queries) == (800, 100, 3, 9, 400)
    with pytest.raises(ConfigError, match="FIRST_SELECTED_QUERIES"):
        build_model(load_config(None, _di(first=10)))
    with pytest.raises(ConfigError, match="NUM_GUIDING_TOKENS"):
        build_model(load_config(None, _di(guides=21)))
    with pytest.raises(ConfigError, match="DEC_LAYERS"):
        build_model(load_config(None, _di(guides=2) + ["MODEL.MaskDINO.DEC_LAYERS", "1"]))
