"""Multi-scale deformable attention against a loop written from the Deformable DETR formula and against the
previous grid_sample kernel (forward and gradients); position encodings."""

from __future__ import annotations

import math

import pytest
import torch

from surgdino.modeling.layers import (
    MLP,
    MSDeformAttn,
    PositionEmbeddingSine,
    gen_sineembed_for_position,
    inverse_sigmoid,
    ms_deform_attn_core,
)
from surgdino.modeling.layers.ms_deform_attn_grid import (
    ms_deform_attn_core_grid as ms_deform_attn_core_reference,
)


def _bilinear(img: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """img [C, H, W]; (x, y) in pixel units with pixel centres at k + 0.5; zero outside."""
    C, H, W = img.shape
    px, py = x - 0.5, y - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(C, dtype=img.dtype)
    for yy in (y0, y0 + 1):
        for xx in (x0, x0 + 1):
            wgt = (1 - abs(px - xx)) * (1 - abs(py - yy))
            if 0 <= xx < W and 0 <= yy < H:
                out = out + wgt * img[:, yy, xx]
    return out


def _slow_core(value, shapes, locs, weights):
    """Sum over levels l and points p of A[b,q,h,l,p] * V_l[b,h](loc[b,q,h,l,p] scaled to (W_l, H_l))."""
    B, S, nH, C = value.shape
    _, Q, _, L, P, _ = locs.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(B, Q, nH, C, dtype=value.dtype)
    for b in range(B):
        for q in range(Q):
            for hd in range(nH):
                for lvl, (H, W) in enumerate(shapes):
                    img = value[b, starts[lvl]:starts[lvl + 1], hd].T.reshape(C, H, W)
                    for p in range(P):
                        x, y = locs[b, q, hd, lvl, p].tolist()
                        out[b, q, hd] += weights[b, q, hd, lvl, p] * _bilinear(img, x * W, y * H)
    return out.flatten(2)


@pytest.mark.parametrize("shapes,nH,P", [([(5, 3)], 2, 3), ([(4, 6), (2, 3), (1, 2)], 1, 2), ([(6, 4), (3, 5), (2, 2), (1, 1)], 2, 1)])
def test_core_matches_formula(shapes, nH, P):
    g = torch.Generator().manual_seed(len(shapes) * 10 + nH + P)
    B, Q, C, L = 2, 3, 4, len(shapes)
    S = sum(h * w for h, w in shapes)
    value = torch.randn(B, S, nH, C, generator=g, dtype=torch.float64)
    locs = torch.rand(B, Q, nH, L, P, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2  # some outside [0, 1]
    weights = torch.rand(B, Q, nH, L, P, generator=g, dtype=torch.float64)
    ref = _slow_core(value, shapes, locs, weights)
    out = ms_deform_attn_core(value, torch.tensor(shapes), locs, weights)
    assert out.shape == (B, Q, nH * C)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ms_deform_attn_core(value, shapes, locs, weights), out)


def _random_inputs(shapes, B, Q, nH, C, P, dtype, seed, pad=False):
    """Locations spread over [-0.3, 1.3] (some points outside, some corners across the border); with ``pad``,
    image 1's value is zero on a padded region, as the module's padding mask makes it."""
    g = torch.Generator().manual_seed(seed)
    L, S = len(shapes), sum(h * w for h, w in shapes)
    value = torch.randn(B, S, nH, C, generator=g, dtype=dtype)
    if pad:
        value[1, : shapes[0][0] * shapes[0][1] // 2] = 0
    locs = torch.rand(B, Q, nH, L, P, 2, generator=g, dtype=dtype) * 1.6 - 0.3
    weights = torch.rand(B, Q, nH, L * P, generator=g, dtype=dtype).softmax(-1).view(B, Q, nH, L, P)
    return value, locs, weights


CASES = [  # shapes (non-square, 1 and 4 levels), batch, queries, heads, channels, points, padding
    ([(5, 3)], 2, 7, 2, 4, 3, False),
    ([(6, 4), (3, 5), (2, 2), (1, 1)], 2, 9, 2, 3, 2, True),
    ([(7, 9), (4, 5), (2, 3), (1, 2)], 3, 11, 4, 8, 4, True),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_core_forward_and_gradients_equal_reference(case, dtype):
    shapes, B, Q, nH, C, P, pad = case
    value, locs, weights = _random_inputs(shapes, B, Q, nH, C, P, dtype, seed=len(shapes) + B, pad=pad)
    inputs = [t.clone().requires_grad_() for t in (value, locs, weights)]
    out = ms_deform_attn_core(inputs[0], shapes, inputs[1], inputs[2])
    ref_inputs = [t.clone().requires_grad_() for t in (value, locs, weights)]
    ref = ms_deform_attn_core_reference(ref_inputs[0], shapes, ref_inputs[1], ref_inputs[2])
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    with torch.no_grad():  # the inference path (no autograd function) gives the same numbers
        torch.testing.assert_close(ms_deform_attn_core(value, shapes, locs, weights), out.detach())
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad)
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad)
    for name, gr, rg in zip(("value", "locations", "weights"), grads, ref_grads):
        scale = rg.abs().max().item()
        torch.testing.assert_close(gr, rg, rtol=tol, atol=tol * max(1.0, scale), msg=name)
    assert grads[1].abs().sum() > 0 and grads[0].abs().sum() > 0


def test_core_points_outside_give_zero_output_and_gradient():
    shapes = [(4, 3), (2, 2)]
    value, locs, weights = _random_inputs(shapes, 1, 5, 2, 3, 2, torch.float64, seed=3)
    far = torch.tensor([-0.75, 1.8, -5.0, 40.0], dtype=torch.float64)  # every corner outside the map
    locs = far[torch.randint(0, 4, locs.shape)]
    inputs = [t.clone().requires_grad_() for t in (value, locs, weights)]
    out = ms_deform_attn_core(inputs[0], shapes, inputs[1], inputs[2])
    assert out.abs().max() == 0
    grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
    assert all(g.abs().max() == 0 for g in grads)


def test_core_only_requested_gradients():
    shapes = [(3, 4), (2, 1)]
    value, locs, weights = _random_inputs(shapes, 2, 4, 2, 3, 2, torch.float64, seed=5)
    v = value.clone().requires_grad_()
    out = ms_deform_attn_core(v, shapes, locs, weights)
    (gv,) = torch.autograd.grad(out, [v], torch.ones_like(out))
    ref = ms_deform_attn_core_reference(value.requires_grad_(), shapes, locs, weights)
    torch.testing.assert_close(gv, torch.autograd.grad(ref, [value], torch.ones_like(ref))[0])


def test_core_gradcheck_fp64_and_fp32_gradients_match_it():
    """Finite differences in fp64; fp32 analytic gradients equal the checked fp64 ones (finite differences in
    fp32 are too coarse for a piecewise-bilinear function)."""
    shapes = [(3, 2), (2, 3)]
    value, locs, weights = _random_inputs(shapes, 2, 3, 2, 2, 2, torch.float64, seed=7, pad=True)
    inputs = [t.clone().requires_grad_() for t in (value, locs, weights)]
    assert torch.autograd.gradcheck(lambda v, lc, w: ms_deform_attn_core(v, shapes, lc, w), inputs)
    out = ms_deform_attn_core(*inputs[:1], shapes, *inputs[1:])
    grad = torch.randn_like(out)
    grads64 = torch.autograd.grad(out, inputs, grad)
    inputs32 = [t.detach().float().requires_grad_() for t in inputs]
    out32 = ms_deform_attn_core(inputs32[0], shapes, inputs32[1], inputs32[2])
    for g32, g64 in zip(torch.autograd.grad(out32, inputs32, grad.float()), grads64):
        torch.testing.assert_close(g32.double(), g64, rtol=1e-5, atol=1e-5)


def test_core_rejects_mismatched_shapes():
    value, locs, weights = _random_inputs([(3, 2)], 1, 2, 1, 2, 1, torch.float32, seed=0)
    with pytest.raises(ValueError, match="levels"):
        ms_deform_attn_core(value, [(3, 2), (1, 1)], locs, weights)
    with pytest.raises(ValueError, match="positions"):
        ms_deform_attn_core(value, [(2, 2)], locs, weights)


def _slow_module(m: MSDeformAttn, query, ref_pts, src, shapes, mask):
    """The module's math with the slow core: value projection, padding zeroed, offsets, softmax, output."""
    B, Q, D = query.shape
    nH, L, P = m.n_heads, m.n_levels, m.n_points
    value = m.value_proj(src)
    if mask is not None:
        value = value * (~mask)[..., None]
    value = value.view(B, -1, nH, D // nH)
    off = m.sampling_offsets(query).view(B, Q, nH, L, P, 2)
    att = m.attention_weights(query).view(B, Q, nH, L * P).softmax(-1).view(B, Q, nH, L, P)
    locs = torch.empty_like(off)
    for lvl, (H, W) in enumerate(shapes):
        if ref_pts.shape[-1] == 2:
            locs[:, :, :, lvl, :, 0] = ref_pts[:, :, None, lvl, None, 0] + off[:, :, :, lvl, :, 0] / W
            locs[:, :, :, lvl, :, 1] = ref_pts[:, :, None, lvl, None, 1] + off[:, :, :, lvl, :, 1] / H
        else:
            for k in range(2):
                locs[:, :, :, lvl, :, k] = (ref_pts[:, :, None, lvl, None, k]
                                            + off[:, :, :, lvl, :, k] / P * ref_pts[:, :, None, lvl, None, k + 2] / 2)
    return m.output_proj(_slow_core(value, shapes, locs, att))


@pytest.mark.parametrize("box", [False, True])
def test_module_matches_formula_with_padding(box):
    torch.manual_seed(0)
    shapes = [(4, 5), (2, 3), (1, 2)]
    D, nH, P, L, B, Q = 8, 2, 2, len(shapes), 2, 3
    m = MSDeformAttn(d_model=D, n_levels=L, n_heads=nH, n_points=P).double()
    for prm in (m.sampling_offsets.weight, m.attention_weights.weight):
        torch.nn.init.normal_(prm, std=0.3)
    S = sum(h * w for h, w in shapes)
    src = torch.randn(B, S, D, dtype=torch.float64)
    query = torch.randn(B, Q, D, dtype=torch.float64)
    ref_pts = torch.rand(B, Q, L, 4 if box else 2, dtype=torch.float64)
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[1, :10] = True  # padded region of image 1 on level 0 must not leak
    starts = torch.tensor([0, 20, 26])
    out = m(query, ref_pts, src, torch.tensor(shapes), starts, mask)
    with torch.no_grad():
        ref = _slow_module(m, query, ref_pts, src, shapes, mask)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    # changing padded input changes nothing
    src2 = src.clone()
    src2[1, :10] += 100.0
    torch.testing.assert_close(m(query, ref_pts, src2, shapes, starts, mask), out)
    out.square().sum().backward()
    grads = [p.grad for p in m.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert m.sampling_offsets.weight.grad.abs().sum() > 0


def test_init_ring_and_uniform_attention():
    m = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3)
    bias = m.sampling_offsets.bias.view(4, 2, 3, 2)
    torch.testing.assert_close(bias[0, 0], torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]))
    torch.testing.assert_close(bias[1, 1, 2], torch.tensor([0.0, 3.0]), atol=1e-6, rtol=0)
    assert m.attention_weights.weight.abs().sum() == 0 and m.attention_weights.bias.abs().sum() == 0
    with pytest.raises(ValueError):
        MSDeformAttn(d_model=10, n_heads=4)


def test_position_embedding_sine_mask_normalises_by_unpadded_extent():
    pe = PositionEmbeddingSine(num_pos_feats=8, normalize=True)
    x = torch.zeros(2, 3, 4, 6)
    mask = torch.zeros(2, 4, 6, dtype=torch.bool)
    mask[1, 2:, :] = True
    mask[1, :, 3:] = True  # image 1 is 2x3 inside a 4x6 canvas
    pos = pe(x, mask)
    assert pos.shape == (2, 16, 4, 6)
    small = pe(torch.zeros(1, 3, 2, 3))
    torch.testing.assert_close(pos[1:, :, :2, :3], small)
    # y-part at the last unpadded row equals sin/cos(2π / dim_t): first channel sin(2π) ≈ 0
    assert abs(pos[0, 0, -1, 0].item()) < 1e-5
    assert not torch.allclose(pos[0, :, :2, :3], small[0])


def test_gen_sineembed_for_position():
    pts = torch.rand(2, 5, 4)
    emb4 = gen_sineembed_for_position(pts, d_model=32)
    emb2 = gen_sineembed_for_position(pts[..., :2], d_model=32)
    assert emb4.shape == (2, 5, 64) and emb2.shape == (2, 5, 32)
    torch.testing.assert_close(emb4[..., :32], emb2)
    # x part: channel 2k = sin(2π x / T^(2k/16))
    x = pts[..., 0]
    torch.testing.assert_close(emb2[..., 16], torch.sin(2 * math.pi * x))
    torch.testing.assert_close(emb2[..., 19], torch.cos(2 * math.pi * x / 10000 ** (2 / 16)))
    # w part equals the x formula applied to w
    torch.testing.assert_close(emb4[..., 32:48], gen_sineembed_for_position(pts[..., [2, 3]], 32)[..., 16:])


def test_inverse_sigmoid_and_mlp():
    x = torch.tensor([0.0, 0.25, 0.5, 1.0])
    y = inverse_sigmoid(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[1:3].sigmoid(), x[1:3])
    mlp = MLP(4, 8, 3, 3)
    assert [tuple(lyr.weight.shape) for lyr in mlp.layers] == [(8, 4), (8, 8), (3, 8)]
    assert mlp(torch.randn(5, 4)).shape == (5, 3)


def test_kernel_choice_follows_device_dtype_and_tracing():
    """Eager fp32 on CPU takes the sparse kernel; bf16 and tracing take the grid_sample kernel, same numbers."""
    from surgdino.modeling.layers.ms_deform_attn import sparse_kernel_applies

    shapes = [(4, 5), (2, 3)]
    g = torch.Generator().manual_seed(0)
    value = torch.randn(1, 26, 2, 4, generator=g)
    locs = torch.rand(1, 7, 2, 2, 3, 2, generator=g) * 1.4 - 0.2
    weights = torch.rand(1, 7, 2, 2, 3, generator=g)
    assert sparse_kernel_applies(value, locs)
    assert not sparse_kernel_applies(value.bfloat16(), locs)
    seen = []

    def traced(v, lo, w):
        seen.append(sparse_kernel_applies(v, lo))
        return ms_deform_attn_core(v, shapes, lo, w)

    fn = torch.jit.trace(traced, (value, locs, weights), check_trace=False)
    assert seen == [False]
    ref = ms_deform_attn_core_reference(value, shapes, locs, weights)
    torch.testing.assert_close(fn(value, locs, weights), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ms_deform_attn_core(value, shapes, locs, weights), ref, rtol=1e-5, atol=1e-6)
    low = ms_deform_attn_core(value.bfloat16(), shapes, locs.bfloat16(), weights.bfloat16())
    assert low.dtype == torch.bfloat16 and torch.allclose(low.float(), ref, atol=0.05)
