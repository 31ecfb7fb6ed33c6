"""Extension points of the shared DINO parts (modeling/layers), on tiny cases with known answers:
class targets as vectors with a logit mask (matcher and focal loss), the deformable encoder's per-layer
hook, and the box-refinement loop with extra per-layer inputs and an extra sublayer."""

from dataclasses import dataclass

import torch
from torch import nn

from surgdino.modeling.layers.box_refine import DecoderInputs
from surgdino.modeling.layers.deformable_encoder import DeformableEncoder
from surgdino.modeling.layers.misc import gather_tokens
from surgdino.modeling.layers.set_prediction import focal_class_cost
from surgdino.modeling.maskdino.criterion import SetCriterion
from surgdino.modeling.maskdino.decoder import MaskDINODecoder
from surgdino.modeling.maskdino.matcher import HungarianMatcher


def _box_target(n):
    return torch.tensor([[0.5, 0.5, 0.2, 0.2]]).repeat(n, 1)


def test_matcher_with_token_maps_and_logit_mask():
    """Three queries, six logit columns (four text tokens + two padding): target 0 is the phrase of
    tokens {0, 1}, target 1 of token {2}. Boxes tie, so classes decide: query 1 is sure of tokens 0-1,
    query 0 of token 2; query 2 is sure of padding only, which the mask makes irrelevant."""
    logits = torch.full((1, 3, 6), -6.0)
    logits[0, 1, :2] = 6.0
    logits[0, 0, 2] = 6.0
    logits[0, 2, 4:] = 9.0
    mask = torch.tensor([[True, True, True, True, False, False]])
    maps = torch.tensor([[1.0, 1.0, 0, 0, 0, 0], [0, 0, 1.0, 0, 0, 0]])
    target = {"labels": torch.tensor([0, 1]), "class_vectors": maps, "boxes": _box_target(2)}
    out = {"pred_logits": logits, "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2]] * 3]), "logit_mask": mask}
    (src, tgt), = HungarianMatcher()(out, [target])
    assert dict(zip(tgt.tolist(), src.tolist())) == {0: 1, 1: 0}
    # the cost averages over the phrase's tokens and ignores masked columns
    cost = focal_class_cost(logits[0], maps, 0.25, 2.0, mask[0])
    per_col = focal_class_cost(logits[0], torch.arange(6), 0.25, 2.0)  # labels: one column each
    torch.testing.assert_close(cost[:, 0], per_col[:, :2].mean(1))
    torch.testing.assert_close(cost[:, 1], per_col[:, 2])
    # one-hot vectors are the closed-set labels, bit for bit
    labels = torch.tensor([3, 0, 3, 5])
    onehot = torch.nn.functional.one_hot(labels, 6).float()
    assert torch.equal(focal_class_cost(logits[0], onehot, 0.25, 2.0), focal_class_cost(logits[0], labels, 0.25, 2.0))


def test_focal_loss_with_token_maps_and_logit_mask_equals_loss_on_real_columns():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 6, generator=g)
    logits[..., 4:] = 8.0  # confident garbage in the padding columns
    mask = torch.tensor([[True] * 4 + [False] * 2] * 2)
    maps = [torch.tensor([[1.0, 1.0, 0, 0, 0, 0]]), torch.tensor([[0, 0, 0, 1.0, 0, 0], [0, 0, 1.0, 0, 0, 0]])]
    targets = [{"labels": torch.arange(len(m)), "class_vectors": m, "boxes": _box_target(len(m))} for m in maps]
    indices = [(torch.tensor([2]), torch.tensor([0])), (torch.tensor([0, 3]), torch.tensor([1, 0]))]
    crit = SetCriterion(num_classes=6, matcher=HungarianMatcher(), weight_dict={})
    got = crit.loss_labels({"pred_logits": logits, "logit_mask": mask}, targets, indices, 3.0)["loss_ce"]
    # the same as the loss on the four real columns alone
    real = [{"labels": torch.tensor([0]), "class_vectors": m[:, :4]} for m in maps]
    want = crit.loss_labels({"pred_logits": logits[..., :4]}, real, indices, 3.0)["loss_ce"]
    torch.testing.assert_close(got, want)
    unmasked = crit.loss_labels({"pred_logits": logits}, targets, indices, 3.0)["loss_ce"]
    assert unmasked > got + 1.0  # the padding columns would dominate without the mask


def _levels(d=16, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    srcs = [torch.randn(b, d, h, w, generator=g) for h, w in ((4, 6), (8, 12))]
    masks = [torch.zeros(b, h, w, dtype=torch.bool) for h, w in ((4, 6), (8, 12))]
    masks[0][1, :, 4:] = True
    masks[1][1, :, 8:] = True
    return srcs, masks


def test_deformable_encoder_hook_runs_before_every_layer():
    torch.manual_seed(0)
    enc = DeformableEncoder(d_model=16, d_ffn=32, n_levels=2, n_heads=2, n_points=2, num_layers=3)
    srcs, masks = _levels()
    plain, levels = enc(srcs, masks)
    assert plain.shape == (2, 4 * 6 + 8 * 12, 16) and levels.ref.shape == (2, 120, 2, 2)
    assert [t.shape for t in levels.unflatten(plain)] == [s.shape for s in srcs]
    calls = []

    def identity(i, tokens, lv):
        calls.append(i)
        assert lv is not None and tokens.shape == plain.shape
        return tokens

    assert torch.equal(enc(srcs, masks, pre_layer=identity)[0], plain) and calls == [0, 1, 2]
    # a hook that changes the tokens before the last layer only (text fusion, say) changes the output
    shifted, _ = enc(srcs, masks, pre_layer=lambda i, t, lv: t + 1.0 if i == 2 else t)
    assert not torch.allclose(shifted, plain)


@dataclass
class _TextInputs(DecoderInputs):
    text: torch.Tensor | None = None  # [B, T, D]


class _TextDecoder(MaskDINODecoder):
    """GroundingDINO-shaped: per layer self-attention → text cross-attention → deformable attention → FFN."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.text_attn = nn.ModuleList(nn.MultiheadAttention(self.hidden_dim, 2, batch_first=True)
                                       for _ in self.layers)

    def run_layer(self, i, layer, hs, query_pos, ref_input, inputs, attn_mask):
        hs = layer.self_attention(hs, query_pos, attn_mask)
        hs = hs + layer.attend(self.text_attn[i], hs + query_pos, inputs.text, inputs.text)
        hs = layer.memory_attention(hs, query_pos, ref_input, inputs.memory, inputs.memory_mask, inputs.shapes)
        return layer.ffn(hs)


def test_refinement_loop_takes_extra_inputs_and_sublayers():
    kw = dict(num_classes=3, hidden_dim=16, num_queries=5, nheads=2, dim_feedforward=32, dec_layers=2, mask_dim=16,
              num_feature_levels=2, initialize_box_type="no")
    torch.manual_seed(0)
    base = MaskDINODecoder(**kw).eval()
    text_dec = _TextDecoder(**kw).eval()
    text_dec.load_state_dict(base.state_dict(), strict=False)
    srcs, masks = _levels()
    mf = torch.randn(2, 16, 16, 24)
    sizes, padded = torch.tensor([[64, 96], [64, 64]]), (64, 96)
    inputs = base.decoder_inputs(srcs, masks, mf, sizes, padded)
    text = torch.randn(2, 7, 16)
    t_inputs = _TextInputs(**vars(inputs), text=text)
    with torch.no_grad():
        sel = base.select_queries(inputs)
        want = base.refine(sel.content, sel.boxes_unsig, inputs, None, sel)
        for attn in text_dec.text_attn:  # text attention that outputs zeros: exactly the base decoder
            nn.init.zeros_(attn.out_proj.weight)
            nn.init.zeros_(attn.out_proj.bias)
        got = text_dec.refine(sel.content, sel.boxes_unsig, t_inputs, None, sel)
        for a, b in zip(got, want):
            torch.testing.assert_close(a["pred_logits"], b["pred_logits"])
            torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"])
        nn.init.normal_(text_dec.text_attn[1].out_proj.weight)
        moved = text_dec.refine(sel.content, sel.boxes_unsig, t_inputs, None, sel)
    assert torch.equal(moved[1]["pred_logits"], got[1]["pred_logits"])  # initial + layer 0: unchanged
    assert not torch.allclose(moved[2]["pred_logits"], got[2]["pred_logits"])  # layer 1 reads the text


def test_gather_tokens():
    x = torch.arange(24.0).view(2, 4, 3)
    idx = torch.tensor([[3, 0], [1, 1]])
    assert gather_tokens(x, idx).tolist() == [[x[0, 3].tolist(), x[0, 0].tolist()], [x[1, 1].tolist()] * 2]
    assert gather_tokens(x[..., 0], idx).tolist() == [[9.0, 0.0], [15.0, 15.0]]
