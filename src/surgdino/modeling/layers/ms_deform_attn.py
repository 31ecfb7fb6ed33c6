"""Multi-scale deformable attention (Deformable DETR) in pure PyTorch: one sparse sampling matrix, no compiled kernel.

Each query looks at ``n_points`` learned offsets around its reference point on each of ``n_levels``
feature maps, per head, and sums the sampled values with softmax weights (Zhu et al., 2021, eq. 3).
Same sampling convention as the CUDA kernel: locations in [0, 1], ``align_corners=False``, zeros outside.
The four bilinear corners of every point, over all levels, form one sparse matrix (CSR: MKL on CPU, cuSPARSE
on CUDA); sampling is one sparse × dense product with the values as they lie, the backward a transposed product
and sampled dot products. The sparse kernel runs for fp32/fp64 on CPU in eager mode; everywhere else (CUDA, where cuSPARSE has not been
measured; tracing, ONNX export and ``torch.compile``, which have no sparse operators) the ``grid_sample``
kernel of ``ms_deform_attn_grid.py`` runs, with the same numbers to 1e-5.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
from torch import nn

from surgdino.modeling.layers.misc import shape_tensor
from surgdino.modeling.layers.ms_deform_attn_grid import (
    SpatialShapes,
    check_core_inputs,
    ms_deform_attn_core_grid,
    spatial_shapes_as_list,
)

__all__ = ["MSDeformAttn", "SpatialShapes", "check_core_inputs", "ms_deform_attn_core", "spatial_shapes_as_list"]

class _Corners(NamedTuple):
    """The four bilinear corners of every sampling point, as rows of one sparse sampling matrix.

    The matrix has a row per (image, query, head) and a column per (image, position over all levels, head),
    the row-major order of ``value [B, S, nH, C]`` viewed as ``[B*S*nH, C]``: so sampling is one sparse-dense
    product over all levels, with no layout copy of the values. The corner and factor axes sit before the
    (level, point) axes so that every elementwise step runs over contiguous L·P blocks."""

    col: torch.Tensor  # [B, Q, nH, 4, L, P] column of each corner (y-major: 00, 01, 10, 11)
    key: torch.Tensor  # [B, Q, nH, L, P] sort key of the top-left corner, block by block (image, level)
    wx: torch.Tensor  # [B, Q, nH, 2, L, P] x factors (1 - fx, fx), zero where that column lies outside
    wy: torch.Tensor  # [B, Q, nH, 2, L, P] y factors (1 - fy, fy), zero where that row lies outside
    sx: torch.Tensor  # [B, Q, nH, 2, L, P] d wx / d x_pixel: (-1, 1) where inside, else 0
    sy: torch.Tensor  # [B, Q, nH, 2, L, P] d wy / d y_pixel


def _axis(coord: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One axis of bilinear sampling, ``align_corners=False`` (pixel k covers [k, k+1) / size):
    coord [.., L, P] in [0, 1], size [L, 1] → first pixel (clamped to [-1, size - 1]), factors and slopes
    [.., 2, L, P]."""
    x = coord * size - 0.5
    x0 = x.floor()
    f = x - x0
    inside = torch.stack([(x0 >= 0) & (x0 < size), (x0 >= -1) & (x0 < size - 1)], -3).to(coord.dtype)
    slope = inside * torch.tensor([-1.0, 1.0], dtype=coord.dtype, device=coord.device).view(2, 1, 1)
    factors = torch.stack([1 - f, f], -3).mul_(inside)
    # far outside no corner is inside: clamping keeps the columns in (or next to) the level's block
    return torch.minimum(x0.clamp_(min=-1), size - 1), factors, slope


def _corners(value_shape: torch.Size, shapes: list[tuple[int, int]], loc: torch.Tensor) -> _Corners:
    """Corner columns and bilinear factors of ``loc [B, Q, nH, L, P, 2]`` (x, y in [0, 1])."""
    B, S, nH, _ = value_shape
    L, P = loc.shape[3], loc.shape[4]
    dev = loc.device
    # int32 indices (half the traffic) while columns and entries (4 per point) fit
    itype = torch.int32 if max(B * S * nH, 2 * loc.numel()) < 2**31 - 1 else torch.int64

    def per_point(x: torch.Tensor) -> torch.Tensor:  # [.., L, 1] → [.., L, P] contiguous: long inner loops
        return x.expand(*x.shape[:-1], P).contiguous()

    hw = torch.tensor(shapes, device=dev, dtype=itype)  # [L, 2]
    Hi, Wi = per_point(hw[:, :1]), per_point(hw[:, 1:])  # [L, P]
    x0, wx, sx = _axis(loc[..., 0], Wi.to(loc.dtype))  # [B, Q, nH, L, P], [B, Q, nH, 2, L, P] twice
    y0, wy, sy = _axis(loc[..., 1], Hi.to(loc.dtype))
    sizes = hw[:, :1] * hw[:, 1:]  # [L, 1]
    starts = torch.cumsum(sizes, 0).to(itype) - sizes
    b = torch.arange(B, device=dev, dtype=itype).view(B, 1, 1, 1, 1)
    h = torch.arange(nH, device=dev, dtype=itype).view(1, 1, nH, 1, 1)
    lo = per_point((b * S + starts) * nH)  # [B, 1, 1, L, P] first column of each (image, level) block
    hi = lo + per_point(sizes * nH - 1)
    local = (y0.to(itype) * Wi + x0.to(itype)) * nH + h  # [B, Q, nH, L, P] top-left corner within its block
    offsets = torch.stack([torch.zeros_like(Wi), torch.ones_like(Wi), Wi, Wi + 1]) * nH  # [4, L, P]
    # outside corners have zero weight; clamping them into their block keeps the columns sorted like the key
    col = torch.clamp((local + lo)[:, :, :, None] + offsets, lo[:, :, :, None], hi[:, :, :, None])  # [B,Q,nH,4,L,P]
    span = (max(h_ * w_ for h_, w_ in shapes) + max(w_ for _, w_ in shapes) + 2) * nH  # blocks never overlap
    ktype = torch.int32 if span * B * L < 2**31 - 1 else torch.int64
    block = per_point(b * L + torch.arange(L, device=dev, dtype=itype).view(L, 1))  # [B, 1, 1, L, P]
    key = local.to(ktype) + block.to(ktype) * span
    return _Corners(col, key, wx, wy, sx, sy)


def _corner_weights(c: _Corners, attention_weights: torch.Tensor) -> torch.Tensor:
    """[B, Q, nH, 4, L, P]: attention weight × bilinear weight of each corner (zero outside the map)."""
    wy = c.wy * attention_weights[:, :, :, None]
    return (wy[:, :, :, :, None] * c.wx[:, :, :, None]).flatten(3, 4)


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the products used here are stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def _sampling_matrix(c: _Corners, weights: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Sparse CSR ``[B*Q*nH, B*S*nH]`` with the 4·L·P corner weights of each (image, query, head) row."""
    n_rows = c.col.shape[0] * c.col.shape[1] * c.col.shape[2]
    k = c.col[0, 0, 0].numel()
    crow = torch.arange(0, n_rows * k + 1, k, device=c.col.device, dtype=c.col.dtype)
    return _csr(crow, c.col.reshape(-1), weights.reshape(-1), (n_rows, n_cols))


def _sample(value: torch.Tensor, c: _Corners, weights: torch.Tensor) -> torch.Tensor:
    """One sparse × dense product over all levels: [B*Q*nH, B*S*nH] @ [B*S*nH, C] → [B, Q, nH*C]."""
    B, S, nH, C = value.shape
    Q = c.col.shape[1]
    A = _sampling_matrix(c, weights, B * S * nH)
    return torch.sparse.mm(A, value.reshape(B * S * nH, C)).view(B, Q, nH * C)


def _scatter_to_values(c: _Corners, weights: torch.Tensor, grad: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Transposed sampling ``Aᵀ @ grad`` ([B*S*nH, C]) as sparse products with rows sorted by value position.

    One sort of the top-left corners (a quarter of the entries) orders all four corners, because a corner's
    column is the top-left one plus a fixed shift within each (image, level) block: each corner is then one
    CSR matrix of the transposed layout, summed corner by corner."""
    n_rows, lp = grad.shape[0], c.key[0, 0, 0].numel()
    itype = c.col.dtype
    order = torch.argsort(c.key.reshape(-1)).to(itype)  # [M] points by position of their top-left corner
    rows = order // lp  # sampling-matrix row of each sorted point
    at = order + rows * (3 * lp)  # entry (row, corner 0, l·p) of the [rows, 4, L·P] layout
    del order
    flat_col, flat_w = c.col.reshape(-1), weights.reshape(-1)
    out = None
    for _ in range(4):  # corners 00, 01, 10, 11: entries lp apart
        col = flat_col.index_select(0, at)  # [M] sorted
        counts = torch.bincount(col, minlength=n_cols)
        crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(itype)
        At = _csr(crow, rows, flat_w.index_select(0, at), (n_cols, n_rows))
        part = torch.sparse.mm(At, grad)  # [B*S*nH, C]
        out = part if out is None else out.add_(part)
        at += lp
    return out


class _MSDeformAttnFunction(torch.autograd.Function):
    """Sampling as one sparse product whose backward recomputes the corners (nothing of size points × channels
    is kept) and takes the gradients from two sparse products: the transposed one for the values, the sampled
    dot products ⟨grad, value⟩ of every corner for the attention weights and locations."""

    @staticmethod
    def forward(ctx, value, sampling_locations, attention_weights, shapes):
        ctx.shapes = shapes
        ctx.save_for_backward(value, sampling_locations, attention_weights)
        c = _corners(value.shape, shapes, sampling_locations)
        return _sample(value, c, _corner_weights(c, attention_weights).to(value.dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        value, loc, attn = ctx.saved_tensors
        B, S, nH, C = value.shape
        need_v, need_loc, need_w = ctx.needs_input_grad[:3]
        c = _corners(value.shape, ctx.shapes, loc)
        weights = _corner_weights(c, attn).to(value.dtype)
        g = grad_out.reshape(-1, C)  # [B*Q*nH, C]
        grad_value = grad_loc = grad_w = None
        if need_v:
            grad_value = _scatter_to_values(c, weights, g, B * S * nH).view(B, S, nH, C)
        if need_loc or need_w:
            A = _sampling_matrix(c, weights, B * S * nH)
            dots = torch.sparse.sampled_addmm(A, g, value.reshape(-1, C).t(), beta=0.0).values()
            dots = dots.view(c.wx.shape[:3] + (2, 2) + c.wx.shape[4:]).to(loc.dtype)  # [B, Q, nH, y, x, L, P]
            t_val = (dots * c.wx[:, :, :, None]).sum(4)  # [B, Q, nH, y, L, P] Σx dots·wx
            if need_w:
                grad_w = (t_val * c.wy).sum(3)  # [B, Q, nH, L, P]
            if need_loc:
                t_slope = (dots * c.sx[:, :, :, None]).sum(4)  # Σx dots·(d wx / dx)
                gx = (t_slope * c.wy).sum(3)
                gy = (t_val * c.sy).sum(3)
                size = torch.tensor([[w, h] for h, w in ctx.shapes], device=loc.device, dtype=loc.dtype)  # [L, 2]
                # x_pixel = x · W − 0.5, y_pixel = y · H − 0.5
                grad_loc = torch.stack([gx, gy], -1).mul_(attn[..., None]).mul_(size[:, None])
        return grad_value, grad_loc, grad_w, None


def sparse_kernel_applies(value: torch.Tensor, sampling_locations: torch.Tensor) -> bool:
    """The sparse kernel runs eagerly on CPU in fp32/fp64; CUDA (unmeasured), autocast dtypes, tracing, ONNX
    export and ``torch.compile`` (no sparse operators there) take the ``grid_sample`` kernel."""
    fp = (torch.float32, torch.float64)
    return (value.device.type == "cpu" and value.dtype in fp and sampling_locations.dtype in fp
            and not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export()
            and not torch.compiler.is_compiling())


def ms_deform_attn_core(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Sample and weight values: value [B, S, nH, C], locations [B, Q, nH, L, P, 2] (x, y in [0, 1]),
    weights [B, Q, nH, L, P] → [B, Q, nH*C]. ``spatial_shapes`` [L, 2] (H, W), tensor or list.

    Deformable DETR's formula (bilinear, zeros outside, ``align_corners=False``) as one sparse sampling
    matrix over all levels times the values. With gradients enabled it runs as one autograd function whose
    backward recomputes the corners (memory O(points), not O(points × channels)). Off the sparse kernel's
    ground (see ``sparse_kernel_applies``) the ``grid_sample`` kernel computes the same formula."""
    if not sparse_kernel_applies(value, sampling_locations):
        return ms_deform_attn_core_grid(value, spatial_shapes, sampling_locations, attention_weights)
    shapes = spatial_shapes_as_list(spatial_shapes)
    check_core_inputs(value, shapes, sampling_locations)
    dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
    value = value.to(dtype)
    if torch.is_grad_enabled() and (value.requires_grad or sampling_locations.requires_grad
                                    or attention_weights.requires_grad):
        return _MSDeformAttnFunction.apply(value, sampling_locations, attention_weights, shapes)
    c = _corners(value.shape, shapes, sampling_locations)
    return _sample(value, c, _corner_weights(c, attention_weights).to(dtype))


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module with Deformable DETR's parameter names and initialisation."""

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Offsets start on a ring of ``n_heads`` directions, point k at distance k+1; uniform attention."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)  # [nH, 2]
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)  # [nH, L, P, 2]
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: SpatialShapes,
        input_level_start_index: torch.Tensor | None = None,
        input_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query [B, Q, D]; reference_points [B, Q, L, 2] (x, y in [0, 1]) or [B, Q, L, 4] (cx, cy, w, h);
        input_flatten [B, S, D]; input_padding_mask [B, S] (True = padding) → [B, Q, D].
        ``input_level_start_index`` is accepted for interface compatibility; levels follow from the shapes."""
        B, Q, _ = query.shape
        _, S, _ = input_flatten.shape
        nH, L, P = self.n_heads, self.n_levels, self.n_points
        shapes = spatial_shapes_as_list(input_spatial_shapes)
        if len(shapes) != L:
            raise ValueError(f"MSDeformAttn built for {L} levels, got spatial shapes of {len(shapes)}")

        value = self.value_proj(input_flatten)  # [B, S, D]
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(B, S, nH, self.d_model // nH)  # [B, S, nH, C]
        offsets = self.sampling_offsets(query).view(B, Q, nH, L, P, 2)
        weights = self.attention_weights(query).view(B, Q, nH, L * P).softmax(-1).view(B, Q, nH, L, P)

        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: divide by (W, H)
            normalizer = shape_tensor([[w, h] for h, w in shapes], dtype=offsets.dtype, device=offsets.device)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            # offsets scaled to half the box size, spread over the points
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference_points last dim must be 2 or 4, got {reference_points.shape[-1]}")
        out = ms_deform_attn_core(value, shapes, locations, weights)  # [B, Q, D]
        return self.output_proj(out)
