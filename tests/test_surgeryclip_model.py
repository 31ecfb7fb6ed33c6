"""SurgeryCLIP model: equivalence with open_clip, CLIP Surgery's closed form, any input size, gradients, checkpoints."""

from __future__ import annotations

import copy
import math
import warnings

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from surgdino.errors import CheckpointError, SurgDinoError
from surgdino.modeling.backbone.surgeryclip import SurgeryCLIP, clip_feature_surgery, similarity_map

PATCH, GRID, WIDTH, LAYERS = 8, 4, 128, 4  # 2 heads of 64, 32×32 pre-training images


def make_open_clip(quick_gelu: bool = True, seed: int = 0) -> CLIP:
    """A small random open_clip CLIP (OpenAI key layout) with non-trivial weights everywhere."""
    torch.manual_seed(seed)
    model = CLIP(32, CLIPVisionCfg(layers=LAYERS, width=WIDTH, patch_size=PATCH, image_size=PATCH * GRID),
                 CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=2), quick_gelu=quick_gelu)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight")):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name != "logit_scale":
                p.copy_(0.08 * torch.randn_like(p))
    return model.eval()


def save_checkpoint(model: torch.nn.Module, path, wrap=None) -> str:
    sd = model.state_dict()
    if wrap == "open_clip":  # open_clip's training checkpoint: DDP prefix under "state_dict"
        sd = {"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in sd.items()}}
    elif wrap == "model":
        sd = {"model": sd}
    torch.save(sd, path)
    return str(path)


@pytest.fixture(scope="module")
def ref() -> CLIP:
    return make_open_clip()


@pytest.fixture(scope="module")
def ckpt(ref, tmp_path_factory) -> str:
    return save_checkpoint(ref, tmp_path_factory.mktemp("ckpt") / "clip.pt")


def open_clip_tokens(ref: CLIP, images: torch.Tensor) -> torch.Tensor:
    """open_clip's image tower, all tokens after ln_post and proj: [B, 1+N, D]."""
    v = ref.visual
    x = v.ln_post(v.transformer(v._embeds(images)))
    return x @ v.proj


def vanilla_hidden_states(ref: CLIP, images: torch.Tensor) -> list[torch.Tensor]:
    """Hidden states x_l entering each block l of open_clip's image tower (and the output as the last entry)."""
    x = ref.visual._embeds(images)
    states = [x]
    for block in ref.visual.transformer.resblocks:
        x = block(x)
        states.append(x)
    return states


def vv_attention(block, x: torch.Tensor) -> torch.Tensor:
    """CLIP Surgery's v–v path of one open_clip block, from the definition: out_proj(softmax(v·vᵀ/√d)·v)."""
    attn = block.attn
    b, n, c = x.shape
    heads = attn.num_heads
    v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)[..., 2 * c:]  # [B, N, C]
    v = v.reshape(b, n, heads, c // heads).transpose(1, 2)  # [B, h, N, d]
    a = torch.softmax(v @ v.transpose(-1, -2) / math.sqrt(c // heads), dim=-1)  # [B, h, N, N]
    out = (a @ v).transpose(1, 2).reshape(b, n, c)
    return attn.out_proj(out)


def test_depth0_equals_open_clip(ref, ckpt):
    model = SurgeryCLIP.from_checkpoint(ckpt, surgery_depth=0).eval()
    images = torch.randn(2, 3, 32, 32)
    tokens = open_clip.tokenize(["a photo of metzenbaum scissors", "allis forceps"])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), open_clip_tokens(ref, images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_image(images)[:, 0], ref.encode_image(images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_text(tokens), ref.encode_text(tokens), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_text(["a photo of metzenbaum scissors", "allis forceps"]),
                                   model.encode_text(tokens))


def test_gelu_option_equals_open_clip_gelu(tmp_path):
    ref = make_open_clip(quick_gelu=False)
    model = SurgeryCLIP.from_checkpoint(save_checkpoint(ref, tmp_path / "g.pt"), surgery_depth=0, act="gelu").eval()
    quick = SurgeryCLIP.from_checkpoint(tmp_path / "g.pt", surgery_depth=0).eval()  # auto = QuickGELU
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), open_clip_tokens(ref, images), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(quick.encode_image(images), model.encode_image(images), atol=1e-4)


@pytest.mark.parametrize("depth", [1, 3])
def test_surgery_closed_form_and_cls(ref, ckpt, depth):
    model = SurgeryCLIP.from_checkpoint(ckpt, surgery_depth=depth, text=False).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model.encode_image_with_all_tokens(images)  # [B, 1+N, width]
        states = vanilla_hidden_states(ref, images)
        start = LAYERS - depth
        expected = states[start] + sum(vv_attention(ref.visual.transformer.resblocks[i], states[i])
                                       for i in range(start, LAYERS))
    torch.testing.assert_close(ours[:, 1:], expected[:, 1:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours[:, 0], states[-1][:, 0], rtol=1e-5, atol=1e-5)  # CLS from the original path
    assert not torch.allclose(ours[:, 1:], states[-1][:, 1:], atol=1e-3)  # surgery really changed the patches
    with torch.no_grad():
        projected = model.encode_image(images)
    torch.testing.assert_close(projected, ref.visual.ln_post(ours) @ ref.visual.proj, rtol=1e-5, atol=1e-5)


def test_non_square_and_unpadded_sizes(ref, ckpt):
    model = SurgeryCLIP.from_checkpoint(ckpt, surgery_depth=0, text=False, pos_interp="bicubic").eval()
    table = model.visual.positional_embedding.detach().clone()
    # 40×24 → a 5×3 grid; the reference is open_clip with an independently interpolated table.
    grid = table[1:].reshape(1, GRID, GRID, WIDTH).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(5, 3), mode="bicubic", align_corners=False, antialias=True)
    resized = torch.cat([table[:1], grid.permute(0, 2, 3, 1).reshape(15, WIDTH)])
    images = torch.randn(2, 3, 40, 24)
    with torch.no_grad():
        ours = model.encode_image(images)
        first = model.visual.pos_embed(5, 3)
        assert model.visual.pos_embed(5, 3) is first  # cached per grid size
        ref_pos = ref.visual.positional_embedding.data.clone()
        ref.visual.positional_embedding.data = resized
        try:
            expected = open_clip_tokens(ref, images)
            # sides not a multiple of the patch are zero-padded up to it: 37×19 → 40×24
            padded = F.pad(images[..., :37, :19], (0, 5, 0, 3))
            torch.testing.assert_close(model.encode_image(images[..., :37, :19]), open_clip_tokens(ref, padded),
                                       rtol=1e-5, atol=1e-5)
        finally:
            ref.visual.positional_embedding.data = ref_pos
    assert ours.shape == (2, 16, 32)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.visual.positional_embedding.detach(), table, rtol=0, atol=0)  # untouched


def test_gradients_reach_every_parameter(ckpt):
    model = SurgeryCLIP.from_checkpoint(ckpt, surgery_depth=2, text=False).train()
    images = torch.randn(2, 3, 40, 24, requires_grad=True)  # non-square: gradients through the interpolation
    model.encode_image(images).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_state_dict_round_trip_through_open_clip(ref, ckpt, tmp_path):
    model = SurgeryCLIP.from_checkpoint(ckpt, surgery_depth=3)
    sd = model.state_dict()
    assert set(sd) == set(ref.state_dict())  # the OpenAI/open_clip key layout
    other = make_open_clip(seed=1)
    other.load_state_dict(sd, strict=True)
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(other.encode_image(images), ref.encode_image(images))
        for wrap in ("open_clip", "model"):
            again = SurgeryCLIP.from_checkpoint(save_checkpoint(model, tmp_path / f"{wrap}.pt", wrap), surgery_depth=3)
            torch.testing.assert_close(again.eval().encode_image(images), model.eval().encode_image(images))


def test_torchscript_archive_loads(ref, tmp_path):
    """Like OpenAI's archives: a traced CLIP with fp16 weights and input_resolution/context_length/vocab_size."""
    half = copy.deepcopy(ref).half().float()  # the weights as fp16 stores them
    for name, value in (("input_resolution", 32), ("context_length", 77), ("vocab_size", 49408)):
        if hasattr(half, name):
            delattr(half, name)
        half.register_buffer(name, torch.tensor(value))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(half, {"encode_image": (torch.randn(1, 3, 32, 32),)}, check_trace=False)
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = open_clip_tokens(half, images)
    traced.half()  # (shares its tensors with `half`)
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(traced, str(path))
    model = SurgeryCLIP.from_checkpoint(path, surgery_depth=0).eval()
    assert model.visual.conv1.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), expected, rtol=1e-5, atol=1e-5)


def test_bad_checkpoints_are_named(tmp_path):
    resnet = {"visual.conv1.weight": torch.zeros(32, 3, 3, 3), "visual.layer1.0.conv1.weight": torch.zeros(8, 8, 1, 1),
              "visual.attnpool.c_proj.weight": torch.zeros(8, 8), "text_projection": torch.zeros(8, 8)}
    torch.save(resnet, tmp_path / "rn50.pt")
    with pytest.raises(CheckpointError, match="ResNet CLIP"):
        SurgeryCLIP.from_checkpoint(tmp_path / "rn50.pt")
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a CLIP ViT"):
        SurgeryCLIP.from_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not found"):
        SurgeryCLIP.from_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        SurgeryCLIP.from_checkpoint(tmp_path / "junk.pt")


def test_text_errors(ckpt, monkeypatch):
    model = SurgeryCLIP.from_checkpoint(ckpt, surgery_depth=0)

    def no_vocab(*args, **kwargs):
        raise FileNotFoundError("bpe_simple_vocab_16e6.txt.gz")

    monkeypatch.setattr(open_clip, "tokenize", no_vocab)
    with pytest.raises(SurgDinoError, match="BPE vocabulary"):
        model.encode_text(["scissors"])
    with pytest.raises(SurgDinoError, match="no text tower"):
        SurgeryCLIP.from_checkpoint(ckpt, text=False, surgery_depth=0).encode_text(torch.zeros(1, 77, dtype=torch.long))


def test_bad_surgery_depth(ckpt):
    with pytest.raises(SurgDinoError, match="SURGERY_DEPTH"):
        SurgeryCLIP.from_checkpoint(ckpt, surgery_depth=LAYERS + 1)


def reference_feature_surgery(image_features, text_features):
    """CLIP Surgery's clip_feature_surgery (clip/clip.py, no redundant_feats), written out for one image [1, N, C]."""
    prob = image_features[:, :1, :] @ text_features.t()  # CLS token only: [1, 1, T]
    prob = (prob * 2).softmax(-1)
    w = prob / prob.mean(-1, keepdim=True)
    b, n_t, n_i, c = image_features.shape[0], text_features.shape[0], image_features.shape[1], image_features.shape[2]
    feats = image_features.reshape(b, n_i, 1, c) * text_features.reshape(1, 1, n_t, c)
    feats = feats * w.reshape(1, 1, n_t, 1)
    feats = feats - feats.mean(2, keepdim=True)
    return feats.sum(-1)  # [1, N, T]


def test_clip_feature_surgery_matches_reference_formula():
    torch.manual_seed(0)
    image = F.normalize(torch.randn(3, 10, 16), dim=-1)  # [B, N, C], CLS first
    text = F.normalize(torch.randn(5, 16), dim=-1)  # [T, C]
    expected = torch.cat([reference_feature_surgery(image[i:i + 1], text) for i in range(3)])  # per image
    ours = clip_feature_surgery(image, text)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    # one weight per class shared by all tokens: changing a patch token changes only its own row
    moved = image.clone()
    moved[:, 5] = F.normalize(torch.randn(3, 16), dim=-1)
    changed = (clip_feature_surgery(moved, text) - ours).abs().amax(-1)  # [B, N]
    assert (changed[:, 5] > 1e-3).all() and changed[:, torch.arange(10) != 5].max() < 1e-6
    redundant = torch.randn(16)
    torch.testing.assert_close(clip_feature_surgery(image, text, redundant), image @ (text - redundant).t())


def test_position_embeddings_bilinear_as_clip_surgery_by_default(ref, ckpt):
    model = SurgeryCLIP.from_checkpoint(ckpt, surgery_depth=0, text=False).eval()
    assert model.visual.pos_interp == "bilinear"
    table = model.visual.positional_embedding.detach()
    # CLIP Surgery (clip/clip_surgery_model.py): the square table resized with F.interpolate(..., mode='bilinear')
    new_side = 6  # 48×48 images, patch 8
    new_pos = table[1:, :].reshape(-1, GRID, GRID, WIDTH).permute(0, 3, 1, 2)
    new_pos = F.interpolate(new_pos, (new_side, new_side), mode="bilinear")
    new_pos = new_pos.reshape(-1, WIDTH, new_side * new_side).transpose(1, 2)
    expected = torch.cat([table[:1, :], new_pos[0]], 0)
    with torch.no_grad():
        torch.testing.assert_close(model.visual.pos_embed(6, 6), expected, rtol=0, atol=1e-6)
        bicubic = SurgeryCLIP.from_checkpoint(ckpt, surgery_depth=0, text=False, pos_interp="bicubic").eval()
        assert not torch.allclose(bicubic.visual.pos_embed(6, 6), expected, atol=1e-3)
        torch.testing.assert_close(bicubic.visual.pos_embed(GRID, GRID), model.visual.pos_embed(GRID, GRID))
    with pytest.raises(SurgDinoError, match="POS_INTERP"):
        SurgeryCLIP.from_checkpoint(ckpt, text=False, pos_interp="nearest")


def test_explicit_head_counts(tmp_path):
    """Checkpoints whose heads are not 64 wide: head counts given explicitly reproduce open_clip."""
    torch.manual_seed(1)
    ref4 = CLIP(32, CLIPVisionCfg(layers=2, width=WIDTH, head_width=32, patch_size=PATCH, image_size=PATCH * GRID),
                CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2, layers=1), quick_gelu=True).eval()
    with torch.no_grad():
        for name, p in ref4.named_parameters():
            if name != "logit_scale" and ".ln_" not in name and not name.startswith("ln_"):
                p.copy_(0.08 * torch.randn_like(p))
    path = save_checkpoint(ref4, tmp_path / "clip4.pt")
    images, tokens = torch.randn(1, 3, 32, 32), torch.randint(1, 1000, (2, 77))
    with torch.no_grad():
        ours = SurgeryCLIP.from_checkpoint(path, surgery_depth=0, heads=4, text_heads=2).eval()
        torch.testing.assert_close(ours.encode_image(images), open_clip_tokens(ref4, images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.encode_text(tokens), ref4.encode_text(tokens), rtol=1e-5, atol=1e-5)
        default = SurgeryCLIP.from_checkpoint(path, surgery_depth=0).eval()  # width/64 = 2 and 1 heads: wrong here
        assert not torch.allclose(default.encode_image(images), ours.encode_image(images), atol=1e-4)
        assert not torch.allclose(default.encode_text(tokens), ours.encode_text(tokens), atol=1e-4)
    with pytest.raises(CheckpointError, match="not divisible by 3 heads"):
        SurgeryCLIP.from_checkpoint(path, heads=3)


def test_similarity_map_square_and_non_square():
    sm = torch.randn(2, 15, 4)  # 5×3 grid
    out = similarity_map(sm, (50, 30), grid=(5, 3))
    assert out.shape == (2, 50, 30, 4)
    assert out.min() >= 0 and out.max() <= 1
    square = similarity_map(torch.randn(1, 16, 2), (8, 8))
    assert square.shape == (1, 8, 8, 2)
    with pytest.raises(SurgDinoError, match="grid"):
        similarity_map(sm, (50, 30))
