"""The ``grid_sample`` multi-scale deformable attention kernel: what runs on CUDA, under tracing / ONNX export /
``torch.compile``, and for dtypes other than fp32/fp64; on CPU it is also the reference the sparse kernel of
``ms_deform_attn.py`` is tested and benchmarked against: per level, value permuted to ``[B*nH, C, H, W]``, ``grid_sample`` (bilinear, zeros outside,
``align_corners=False``) and a per-point ``addcmul_`` weighted sum; its autograd function recomputes the samples
in backward and calls ``grid_sampler_2d_backward`` per level. Same numbers as Deformable DETR's
``ms_deform_attn_core_pytorch``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

SpatialShapes = torch.Tensor | Sequence[Sequence[int]]


def spatial_shapes_as_list(spatial_shapes: SpatialShapes) -> list[tuple[int, int]]:
    """``[(H, W), ...]`` as Python ints; pass a list to avoid a device sync in the hot path. Under tracing,
    sizes read from tensor shapes stay the tracer's values, so the graph follows the input size (ONNX
    export with dynamic height/width)."""
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()
    if torch.jit.is_tracing():
        return [(h, w) for h, w in spatial_shapes]
    return [(int(h), int(w)) for h, w in spatial_shapes]


def check_core_inputs(value: torch.Tensor, shapes: list[tuple[int, int]], sampling_locations: torch.Tensor) -> None:
    """The levels of ``shapes`` match the locations' level axis and cover exactly the value's positions
    (not checked under tracing, where the sizes are graph values)."""
    if torch.jit.is_tracing():
        return
    L, S = sampling_locations.shape[3], value.shape[1]
    if len(shapes) != L:
        raise ValueError(f"spatial_shapes has {len(shapes)} levels but sampling_locations has {L}")
    if sum(h * w for h, w in shapes) != S:
        raise ValueError(f"spatial_shapes cover {sum(h * w for h, w in shapes)} positions, value has {S}")


def _level_values(value: torch.Tensor, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """value [B, S, nH, C] → per level [B*nH, C, H, W]."""
    B, _, nH, C = value.shape
    return [v.permute(0, 2, 3, 1).reshape(B * nH, C, h, w)
            for v, (h, w) in zip(value.split([h * w for h, w in shapes], dim=1), shapes)]


def _layout(sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """locations [B, Q, nH, L, P, 2] → grids [B*nH, L, P, Q, 2] in [-1, 1]; weights → [B*nH, L, P, Q]."""
    B, Q, nH, L, P, _ = sampling_locations.shape
    grids = (2 * sampling_locations - 1).permute(0, 2, 3, 4, 1, 5).reshape(B * nH, L, P, Q, 2)
    weights = attention_weights.permute(0, 2, 3, 4, 1).reshape(B * nH, L, P, Q)
    return grids, weights


def _sample(value_l: torch.Tensor, grid_l: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] at [N, P, Q, 2] → [N, C, P, Q] (bilinear, zeros outside, align_corners=False)."""
    return F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)


def _forward(value: torch.Tensor, shapes: list[tuple[int, int]], sampling_locations: torch.Tensor,
             attention_weights: torch.Tensor) -> torch.Tensor:
    B, _, nH, C = value.shape
    Q, P = sampling_locations.shape[1], sampling_locations.shape[4]
    grids, weights = _layout(sampling_locations, attention_weights)
    out = value.new_zeros(B * nH, C, Q)
    for lvl, value_l in enumerate(_level_values(value, shapes)):
        sampled = _sample(value_l, grids[:, lvl])  # [B*nH, C, P, Q]
        for p in range(P):  # weighted sum over points, accumulated over levels, without a [.., P, Q] product
            out.addcmul_(sampled[:, :, p], weights[:, None, lvl, p])
    return out.view(B, nH * C, Q).transpose(1, 2).contiguous()  # [B, Q, nH*C]


class _ReferenceFunction(torch.autograd.Function):
    """Same numbers as sampling with ``grid_sample`` and weighting under autograd, but like the CUDA kernel
    the backward re-reads the sampled values instead of keeping ``[B*nH, C, L, P, Q]`` of them alive
    between forward and backward (the largest activation of a deformable encoder)."""

    @staticmethod
    def forward(ctx, value, sampling_locations, attention_weights, shapes):
        ctx.shapes = shapes
        ctx.save_for_backward(value, sampling_locations, attention_weights)
        return _forward(value, shapes, sampling_locations, attention_weights)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        value, sampling_locations, attention_weights = ctx.saved_tensors
        shapes = ctx.shapes
        B, S, nH, C = value.shape
        _, Q, _, L, P, _ = sampling_locations.shape
        need_v, need_loc, need_w = ctx.needs_input_grad[:3]
        grids, weights = _layout(sampling_locations, attention_weights)
        g = grad_out.view(B, Q, nH, C).permute(0, 2, 3, 1).reshape(B * nH, C, Q)
        grad_value = torch.empty_like(value) if need_v else None
        grad_grids = torch.empty_like(grids) if need_loc else None
        grad_w = torch.empty_like(weights) if need_w else None
        start = 0
        for lvl, value_l in enumerate(_level_values(value, shapes)):
            h, w = shapes[lvl]
            grid_l = grids[:, lvl]
            if need_w:
                sampled = _sample(value_l, grid_l)  # [B*nH, C, P, Q], recomputed
                for p in range(P):
                    grad_w[:, lvl, p] = (sampled[:, :, p] * g).sum(1)
                del sampled
            if need_v or need_loc:
                grad_sampled = g[:, :, None] * weights[:, None, lvl]  # [B*nH, C, P, Q]
                gv, gg = torch.ops.aten.grid_sampler_2d_backward(grad_sampled, value_l, grid_l, 0, 0, False,
                                                                 [need_v, need_loc])
                if need_v:
                    grad_value[:, start:start + h * w] = gv.view(B, nH, C, h * w).permute(0, 3, 1, 2)
                if need_loc:
                    grad_grids[:, lvl] = gg
            start += h * w
        grad_loc = None
        if need_loc:  # grid = 2 * location - 1
            grad_loc = (2 * grad_grids).view(B, nH, L, P, Q, 2).permute(0, 4, 1, 2, 3, 5)
        if need_w:
            grad_w = grad_w.view(B, nH, L, P, Q).permute(0, 4, 1, 2, 3)
        return grad_value, grad_loc, grad_w, None


def ms_deform_attn_core_grid(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Same contract as ``ms_deform_attn_core``: value [B, S, nH, C], locations [B, Q, nH, L, P, 2], weights
    [B, Q, nH, L, P] → [B, Q, nH*C]."""
    shapes = spatial_shapes_as_list(spatial_shapes)
    check_core_inputs(value, shapes, sampling_locations)
    # under tracing the level sizes are graph values, which an autograd Function cannot hold: plain ops
    if not torch.jit.is_tracing() and torch.is_grad_enabled() and (
            value.requires_grad or sampling_locations.requires_grad or attention_weights.requires_grad):
        return _ReferenceFunction.apply(value, sampling_locations, attention_weights, shapes)
    return _forward(value, shapes, sampling_locations, attention_weights)
