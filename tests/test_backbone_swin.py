"""D2SwinTransformer (MaskDINO's Swin) on transformers' Swin: official names load with nothing unused or
missing, features equal the official code's and timm's, weights of every published layout load."""

from __future__ import annotations

import os

import pytest
import torch

from surgdino.config.core import load_config
from surgdino.engine.checkpointer import load_weights
from surgdino.errors import CheckpointError, ConfigError
from surgdino.modeling import build_model
from surgdino.modeling.backbone import build_backbone
from surgdino.modeling.backbone.swin import (
    d2_swin,
    load_swin_weights,
    official_swin_to_ours,
    ours_to_official_swin,
    relative_position_index,
    swin_as_model_weights,
)

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "swin_official_outputs.pt")
TINY = dict(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=7)


def official_state(embed_dim, depths, num_heads, window_size, mlp_ratio=4, seed=0, classifier=0):
    """A random state dict with the names and shapes MaskDINO's ``SwinTransformer`` saves (as its
    ``state_dict()`` orders them); ``classifier`` > 0 adds an ImageNet head and final norm."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, base=0.0):
        return base + 0.2 * torch.randn(*shape, generator=g, dtype=torch.float64)

    s = {"patch_embed.proj.weight": rnd(embed_dim, 3, 4, 4), "patch_embed.proj.bias": rnd(embed_dim),
         "patch_embed.norm.weight": rnd(embed_dim, base=1.0), "patch_embed.norm.bias": rnd(embed_dim)}
    for i, (depth, heads) in enumerate(zip(depths, num_heads)):
        c = embed_dim * 2 ** i
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            s.update({p + "norm1.weight": rnd(c, base=1.0), p + "norm1.bias": rnd(c),
                      p + "attn.relative_position_bias_table": rnd((2 * window_size - 1) ** 2, heads),
                      p + "attn.relative_position_index": relative_position_index(window_size),
                      p + "attn.qkv.weight": rnd(3 * c, c), p + "attn.qkv.bias": rnd(3 * c),
                      p + "attn.proj.weight": rnd(c, c), p + "attn.proj.bias": rnd(c),
                      p + "norm2.weight": rnd(c, base=1.0), p + "norm2.bias": rnd(c),
                      p + "mlp.fc1.weight": rnd(mlp_ratio * c, c), p + "mlp.fc1.bias": rnd(mlp_ratio * c),
                      p + "mlp.fc2.weight": rnd(c, mlp_ratio * c), p + "mlp.fc2.bias": rnd(c)})
        if i < len(depths) - 1:
            s.update({f"layers.{i}.downsample.reduction.weight": rnd(2 * c, 4 * c),
                      f"layers.{i}.downsample.norm.weight": rnd(4 * c, base=1.0),
                      f"layers.{i}.downsample.norm.bias": rnd(4 * c)})
    for i in range(len(depths)):
        c = embed_dim * 2 ** i
        s.update({f"norm{i}.weight": rnd(c, base=1.0), f"norm{i}.bias": rnd(c)})
    if classifier:
        c = embed_dim * 2 ** (len(depths) - 1)
        s = {k: v for k, v in s.items() if not k.startswith(tuple(f"norm{i}." for i in range(4)))}
        s.update({"norm.weight": rnd(c, base=1.0), "norm.bias": rnd(c), "head.weight": rnd(classifier, c),
                  "head.bias": rnd(classifier)})
    return s


def _tiny(**kw):
    return d2_swin(**TINY, drop_path_rate=0.0, **kw).double().eval()


def test_official_names_load_with_nothing_unused_or_missing_and_round_trip():
    state = official_state(**TINY)
    model = _tiny()
    converted, dropped = official_swin_to_ours(state)
    assert dropped == []
    assert set(converted) == set(model.state_dict())  # every official tensor has a place, every place a tensor
    missing, unexpected = load_swin_weights(model, {"model": {f"backbone.{k}": v for k, v in state.items()}})
    assert missing == [] and unexpected == []
    back = ours_to_official_swin(model.state_dict())
    assert set(back) == set(state)
    assert all(torch.equal(back[k].to(state[k].dtype), state[k]) for k in state)


def test_features_equal_the_official_code_on_a_non_window_multiple_size():
    """The fixture holds the outputs (float64) of MaskDINO's own ``SwinTransformer`` (its
    ``maskdino/modeling/backbone/swin.py``, run outside the project) loaded strictly with
    ``official_state(**TINY)``, for a 45x61 image (patches 12x16: padded to windows of 7 at every stage,
    odd sizes at patch merging)."""
    ref = torch.load(FIXTURE, weights_only=True)
    image = torch.randn(1, 3, 45, 61, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = _tiny()
    load_swin_weights(model, official_state(**TINY))
    with torch.no_grad():
        out = model(image)
    for name in ("res2", "res3", "res4", "res5"):
        assert out[name].shape == ref[name].shape
        torch.testing.assert_close(out[name], ref[name], rtol=0, atol=1e-9)
    with torch.no_grad():  # float32, as models run
        out32 = model.float()(image.float())
    for name in ("res2", "res3", "res4", "res5"):
        torch.testing.assert_close(out32[name], ref[name].float(), rtol=0, atol=1e-5)
    assert {k: (v.channels, v.stride) for k, v in model.output_shape().items()} == {
        "res2": (16, 4), "res3": (32, 8), "res4": (64, 16), "res5": (128, 32)}


def test_timm_names_and_features_equal_timm():
    """timm's Swin (merging at the start of a stage) with the same weights: equal features where timm's
    padding agrees with the official one (a window-multiple size; timm shifts before padding otherwise)."""
    from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn

    state = official_state(**TINY)
    timm_model = SwinTransformer(img_size=224, patch_size=4, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                                 window_size=7, num_classes=0, always_partition=True, strict_img_size=False)
    timm_model = timm_model.double().eval()
    timm_state = {k: v for k, v in checkpoint_filter_fn(state, timm_model).items() if not k.startswith("norm")}
    timm_model.load_state_dict(timm_state, strict=False)
    ours = _tiny()
    missing, unexpected = load_swin_weights(ours, timm_model.state_dict())
    assert unexpected == [] and sorted(missing) == sorted(
        f"body.hidden_states_norms.stage{i}.{p}" for i in range(1, 5) for p in ("weight", "bias"))
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        feats = ours(x)
        y = timm_model.patch_embed(x)
        for i, stage in enumerate(timm_model.layers):
            y = stage(y)  # [B, h, w, C]
            norm = ours.body.hidden_states_norms[f"stage{i + 1}"]
            torch.testing.assert_close(feats[f"res{i + 2}"], norm(y).permute(0, 3, 1, 2), rtol=0, atol=1e-9)


def test_imagenet_pth_loads_without_head_and_as_model_weights(tmp_path):
    state = official_state(**TINY, classifier=10)
    state["layers.0.blocks.1.attn_mask"] = torch.zeros(4, 49, 49)
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save({"model": state}, path)
    model = _tiny()
    missing, unexpected = load_swin_weights(model, str(path))
    assert unexpected == [] and all("hidden_states_norms" in k for k in missing) and len(missing) == 8
    full = swin_as_model_weights({"model": state})
    assert full is not None and all(k.startswith("backbone.body.") for k in full)
    mixed = swin_as_model_weights({**{f"backbone.{k}": v for k, v in official_state(**TINY).items()},
                                   "pixel_decoder.x": torch.ones(2)})
    assert torch.equal(mixed["pixel_decoder.x"], torch.ones(2)) and "backbone.body.swin.embeddings.norm.weight" in mixed
    assert swin_as_model_weights({"sem_seg_head.predictor.x": torch.ones(1), **full}) is None  # official heads: theirs


def test_maskdino_with_d2swin_loads_official_backbone_names_as_model_weights(tmp_path):
    cfg = load_config("surgdino://demo/dimaskdino_atto_trays.yaml", [
        "MODEL.BACKBONE.NAME", "D2SwinTransformer", "MODEL.SWIN.EMBED_DIM", "16", "MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]",
        "MODEL.SWIN.NUM_HEADS", "[1, 2, 2, 4]", "MODEL.DEVICE", "cpu"])
    model = build_model(cfg).eval()
    state = {f"backbone.{k}": v.float() for k, v in official_state(**TINY).items()}
    torch.save({"model": state}, tmp_path / "w.pth")
    load_weights(model, str(tmp_path / "w.pth"))
    backbone = model.backbone.state_dict()
    assert all(torch.equal(backbone[k], v.float()) for k, v in official_swin_to_ours(official_state(**TINY))[0].items())
    with torch.no_grad():
        out = model([{"image": torch.randint(0, 255, (3, 90, 122), dtype=torch.uint8), "height": 90, "width": 122}])
    assert out[0]["masks"].shape[-2:] == (90, 122)


def test_bad_weights_are_one_clear_error():
    state = official_state(**TINY)
    state["layers.0.blocks.0.attn.relative_position_index"] = state["layers.0.blocks.0.attn.relative_position_index"].flip(0)
    with pytest.raises(CheckpointError, match="relative position index"):
        load_swin_weights(_tiny(), state)
    wide = official_state(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=12)
    with pytest.raises(CheckpointError, match="WINDOW_SIZE"):
        load_swin_weights(_tiny(), wide)
    with pytest.raises(CheckpointError, match="not a Swin checkpoint"):
        load_swin_weights(_tiny(), {"conv1.weight": torch.ones(1)})


def test_qk_scale_patch_norm_and_freeze_at():
    model = _tiny(qk_scale=0.5, patch_norm=False, freeze_at=2)
    assert all(b.attention.scaling == 0.5 for layer in model.body.swin.encoder.layers for b in layer.blocks)
    assert isinstance(model.body.swin.embeddings.norm, torch.nn.Identity)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("body.swin.embeddings.", "body.swin.encoder.layers.0.")) for n in frozen)
    assert any(".layers.0.downsample." in n for n in frozen)
    model.train()
    assert not model.body.swin.encoder.layers[0].training and model.body.swin.encoder.layers[1].training
    with pytest.raises(ConfigError, match="FREEZE_AT"):
        _tiny(freeze_at=6)
    with pytest.raises(ConfigError, match="NUM_HEADS"):
        d2_swin(embed_dim=16, num_heads=[3, 6, 12, 24])


def test_use_checkpoint_gives_the_same_gradients():
    state = official_state(**TINY)
    grads = []
    for flag in (False, True):
        model = _tiny(use_checkpoint=flag).train()
        load_swin_weights(model, state)
        x = torch.randn(1, 3, 40, 56, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        sum(v.sum() for v in model(x).values()).backward()
        grads.append(model.body.swin.encoder.layers[0].blocks[1].attention.q_proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)


def test_built_from_the_official_keys():
    cfg = load_config(None, ["MODEL.BACKBONE.NAME", "D2SwinTransformer", "MODEL.SWIN.EMBED_DIM", "16",
                             "MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]", "MODEL.SWIN.NUM_HEADS", "[1, 2, 2, 4]",
                             "MODEL.SWIN.OUT_FEATURES", "['res3', 'res5']", "MODEL.BACKBONE.FREEZE_AT", "1"])
    model = build_backbone(cfg)
    assert {k: v.stride for k, v in model.output_shape().items()} == {"res3": 8, "res5": 32}
    assert not any(p.requires_grad for p in model.body.swin.embeddings.parameters())
    with torch.no_grad():
        out = model(torch.randn(1, 3, 50, 70))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"res3": (1, 32, 7, 9), "res5": (1, 128, 2, 3)}
    with pytest.raises(ConfigError, match="APE"):
        load_config(None, ["MODEL.SWIN.APE", "True"])


class _RunsCode:
    def __reduce__(self):
        return (eval, ("1 + 1",))


class _StorageOf:
    """Pickles as torch's own storage reconstruction, with chosen ``torch.save`` bytes inside."""

    def __init__(self, data: bytes):
        self.data = data

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.data,))


def test_d2_pkl_of_pickled_tensors_loads_and_stays_safe(tmp_path):
    """MaskDINO's convert-pretrained-swin-model-to-d2.py pickles torch tensors into the ``.pkl`` its Swin-L
    config names: they load (storages read weights-only); code hidden in a storage's bytes is refused."""
    import io
    import pickle

    from surgdino.checkpoint_io import UnsafeCheckpointError

    state = {k: v.float() for k, v in official_state(**TINY, classifier=5).items()}
    path = tmp_path / "swin_tiny_patch4_window7_224.pkl"
    path.write_bytes(pickle.dumps({"model": state, "__author__": "third_party", "matching_heuristics": True}))
    missing, unexpected = load_swin_weights(_tiny(), str(path))
    assert unexpected == [] and len(missing) == 8
    buf = io.BytesIO()
    torch.save(_RunsCode(), buf)
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"model": {"x": _StorageOf(buf.getvalue())}}))
    with pytest.raises(UnsafeCheckpointError, match="refused for safety"):
        load_swin_weights(_tiny(), str(bad))
