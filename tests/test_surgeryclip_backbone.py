"""SurgeryCLIP backbone: NestedTensor and dict interfaces, padding masks, normalisation, freezing, pyramid, builders, CLI."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch
from test_surgeryclip_model import LAYERS, PATCH, WIDTH, make_open_clip, save_checkpoint

from surgdino.cli import main
from surgdino.config import load_config
from surgdino.errors import ConfigError
from surgdino.modeling.backbone import build_backbone
from surgdino.modeling.backbone.cli import check_backbone
from surgdino.modeling.backbone.surgeryclip import (
    SurgeryCLIP,
    SurgeryCLIPBackbone,
    build_surgeryclip_backbone,
)
from surgdino.structures import NestedTensor, batch_images

IMAGENET_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return save_checkpoint(make_open_clip(), tmp_path_factory.mktemp("bb") / "clip.pt")


def backbone(ckpt: str, **kwargs) -> SurgeryCLIPBackbone:
    clip = SurgeryCLIP.from_checkpoint(ckpt, surgery_depth=kwargs.pop("surgery_depth", 2), text=False)
    return SurgeryCLIPBackbone(clip.visual, **kwargs).eval()


def test_nested_tensor_masks_and_batch_independence(ckpt):
    bb = backbone(ckpt)
    torch.manual_seed(0)
    big, small = torch.randn(3, 48, 40), torch.randn(3, 27, 20)  # small: sides not multiples of the patch
    out = bb(batch_images([big, small]))
    assert list(out) == ["0"]
    feats, mask = out["0"].decompose()
    assert feats.shape == (2, WIDTH, 6, 5) and mask.shape == (2, 6, 5)
    assert not mask[0].any()
    expected_mask = torch.ones(6, 5, dtype=torch.bool)
    expected_mask[:4, :3] = False  # 27×20 pixels cover 4×3 tokens of 8 (the last ones partly)
    assert torch.equal(mask[1], expected_mask)
    with torch.no_grad():
        alone = bb(NestedTensor(small[None], torch.zeros(1, 27, 20, dtype=torch.bool)))["0"].tensors
        big_alone = bb(big[None])["res3"]
        small_by_mask = bb(batch_images([big, small]).tensors, mask=batch_images([big, small]).mask)["res3"]
    torch.testing.assert_close(small_by_mask, feats)
    torch.testing.assert_close(feats[1][:, :4, :3], alone[0], rtol=1e-4, atol=1e-5)  # padding does not leak in
    torch.testing.assert_close(feats[0], big_alone[0], rtol=1e-4, atol=1e-5)


def test_input_normalisation_modes(ckpt):
    pixels = torch.rand(1, 3, 32, 24) * 255
    outs = {}
    for mode, images in (("clip", (pixels / 255 - CLIP_MEAN) / CLIP_STD), ("raw", pixels), ("unit", pixels / 255),
                         ("imagenet", (pixels - IMAGENET_MEAN) / IMAGENET_STD)):
        with torch.no_grad():
            outs[mode] = backbone(ckpt, input_norm=mode)(images)["res3"]
    for mode in ("raw", "unit", "imagenet"):
        torch.testing.assert_close(outs[mode], outs["clip"], rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="INPUT_NORM"):
        backbone(ckpt, input_norm="bgr")


@pytest.mark.parametrize("k", [0, 1, -1])
def test_freezing_and_gradients(ckpt, k):
    bb = backbone(ckpt, trainable_blocks=k, features="projected").train()
    trainable = {n for n, p in bb.named_parameters() if p.requires_grad}
    # the last block's FFN only feeds CLS, which a backbone drops: never run, kept frozen
    dead_ffn = {f"visual.transformer.resblocks.{LAYERS - 1}.{n}" for n in (
        "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")}
    if k == 0:
        assert not trainable
        return
    if k == 1:
        last = f"visual.transformer.resblocks.{LAYERS - 1}."
        assert trainable == {n for n, _ in bb.named_parameters() if n.startswith(last)} - dead_ffn | {
            "visual.ln_post.weight", "visual.ln_post.bias", "visual.proj"}
    else:
        assert trainable == {n for n, _ in bb.named_parameters()} - dead_ffn
    bb(torch.randn(2, 3, 40, 32))["res3"].square().mean().backward()
    for name, p in bb.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    with pytest.raises(ConfigError, match="TRAINABLE_BLOCKS"):
        bb.set_trainable_blocks(LAYERS + 1)


def test_projected_features_and_output_shape(ckpt):
    bb = backbone(ckpt, features="projected")
    assert bb.output_shape() == {"res3": type(bb.output_shape()["res3"])(32, PATCH)}
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, 24, 40))["res3"]
    assert feats.shape == (1, 32, 3, 5)


def test_simple_feature_pyramid(ckpt):
    bb = backbone(ckpt, multi_scale=True, out_channels=16, trainable_blocks=0).train()
    shapes = bb.output_shape()
    assert [(s.channels, s.stride) for s in shapes.values()] == [(16, 4), (16, 8), (16, 16), (16, 32)]
    assert bb.size_divisibility == 4 * PATCH
    out = bb(torch.randn(1, 3, 40, 56))  # 5×7 tokens
    assert [tuple(out[n].shape[-2:]) for n in shapes] == [(10, 14), (5, 7), (3, 4), (2, 2)]
    nested = bb(batch_images([torch.randn(3, 40, 56), torch.randn(3, 16, 16)]))
    assert list(nested) == ["0", "1", "2", "3"]
    for level in nested.values():
        f, m = level.decompose()
        assert f.shape[-2:] == m.shape[-2:] and f.shape[1] == 16
        assert not m[0].any() and m[1].any()
    assert nested["2"].mask[1].tolist() == [[False, True, True, True], [True] * 4, [True] * 4]
    sum(f.sum() for f in out.values()).backward()
    assert all(p.grad is not None for p in bb.pyramid.parameters())  # the pyramid trains even with CLIP frozen


def test_build_from_args_and_config(ckpt, tmp_path):
    args = SimpleNamespace(surgeryclip_ckpt=ckpt, device="cpu", train_surgeryclip_backbone=True, surgeryclip_surgery_depth=2)
    bb, channels = build_surgeryclip_backbone(args)
    assert channels == [WIDTH] and bb.visual.surgery_depth == 2 and bb.trainable_blocks == -1
    assert bb.visual.conv1.weight.requires_grad and all(p.requires_grad for p in bb.visual.transformer.resblocks[0].parameters())
    with pytest.raises(ConfigError, match="surgeryclip_ckpt"):
        build_surgeryclip_backbone(SimpleNamespace(device="cpu"))
    cfg = load_config(None, ["MODEL.BACKBONE.NAME", "surgeryclip", "MODEL.SURGERYCLIP.CKPT", ckpt,
                             "MODEL.SURGERYCLIP.SURGERY_DEPTH", "3", "MODEL.SURGERYCLIP.TRAINABLE_BLOCKS", "2"])
    bb = build_backbone(cfg)
    assert isinstance(bb, SurgeryCLIPBackbone) and bb.visual.surgery_depth == 3 and bb.trainable_blocks == 2
    with pytest.raises(ConfigError, match="MODEL.SURGERYCLIP.CKPT"):
        build_backbone(load_config(None, ["MODEL.BACKBONE.NAME", "surgeryclip"]))


def test_backbone_weights_reload_as_clip(ckpt, tmp_path):
    """A detector checkpoint (backbone under a prefix, beside other modules) loads back as SurgeryCLIP."""
    bb = backbone(ckpt, multi_scale=True, out_channels=8)
    sd = {"backbone.0." + k: v for k, v in bb.state_dict().items()} | {"class_embed.weight": torch.zeros(3, 8)}
    torch.save({"model": sd, "epoch": 1}, tmp_path / "detector.pth")
    clip = SurgeryCLIP.from_checkpoint(tmp_path / "detector.pth", surgery_depth=2)
    assert not clip.has_text
    from safetensors.torch import save_file

    save_file(bb.visual.state_dict(), str(tmp_path / "visual.safetensors"))  # a bare visual tower
    again = SurgeryCLIP.from_checkpoint(tmp_path / "visual.safetensors", surgery_depth=2)
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(images), bb.visual.project(bb.visual.forward_tokens(images)))
        torch.testing.assert_close(again.encode_image(images), clip.encode_image(images))


def test_check_backbone_command(ckpt, capsys):
    cfg = load_config(None, ["MODEL.BACKBONE.NAME", "surgeryclip", "MODEL.SURGERYCLIP.CKPT", ckpt,
                             "MODEL.SURGERYCLIP.SURGERY_DEPTH", "2", "MODEL.SURGERYCLIP.TRAINABLE_BLOCKS", "1"])
    buf = io.StringIO()
    assert check_backbone(cfg, [(32, 32), (24, 40), (27, 19)], batch_size=1, device="cpu", repeats=1, out=buf)
    text = buf.getvalue()
    assert "[24x40] x1: res3: (1, 128, 3, 5)" in text and "NestedTensor" in text
    assert "gradients: reach 6/6 trainable tensors" in text and text.rstrip().endswith("OK")
    code = main(["check-backbone", "--sizes", "16x24", "--batch-size", "1", "--repeats", "1",
                 "MODEL.BACKBONE.NAME", "surgeryclip", "MODEL.SURGERYCLIP.CKPT", ckpt, "MODEL.SURGERYCLIP.SURGERY_DEPTH", "2"])
    assert code == 0 and "fully frozen" in capsys.readouterr().out
    assert main(["check-backbone", "MODEL.BACKBONE.NAME", "surgeryclip"]) == 2  # no checkpoint: one-line error
    assert "MODEL.SURGERYCLIP.CKPT is empty" in capsys.readouterr().err
