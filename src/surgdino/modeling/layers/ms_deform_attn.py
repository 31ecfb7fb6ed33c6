"""Multi-scale deformable attention (Deformable DETR) in pure PyTorch: bilinear ``grid_sample``, no compiled kernel.

Each query looks at ``n_points`` learned offsets around its reference point on each of ``n_levels``
feature maps, per head, and sums the sampled values with softmax weights (Zhu et al., 2021, eq. 3).
Same sampling convention as the CUDA kernel: locations in [0, 1], ``align_corners=False``, zeros outside.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

SpatialShapes = torch.Tensor | Sequence[Sequence[int]]


def spatial_shapes_as_list(spatial_shapes: SpatialShapes) -> list[tuple[int, int]]:
    """``[(H, W), ...]`` as Python ints; pass a list to avoid a device sync in the hot path."""
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def _check(value: torch.Tensor, shapes: list[tuple[int, int]], sampling_locations: torch.Tensor) -> None:
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


class _MSDeformAttnFunction(torch.autograd.Function):
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


def ms_deform_attn_core(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Sample and weight values: value [B, S, nH, C], locations [B, Q, nH, L, P, 2] (x, y in [0, 1]),
    weights [B, Q, nH, L, P] → [B, Q, nH*C]. ``spatial_shapes`` [L, 2] (H, W), tensor or list.

    With gradients enabled this runs as one autograd function whose backward recomputes the bilinear
    samples (memory O(queries × points), not O(queries × points × channels)); gradients are those of the
    plain ``grid_sample`` formulation."""
    shapes = spatial_shapes_as_list(spatial_shapes)
    _check(value, shapes, sampling_locations)
    if torch.is_grad_enabled() and (value.requires_grad or sampling_locations.requires_grad
                                    or attention_weights.requires_grad):
        return _MSDeformAttnFunction.apply(value, sampling_locations, attention_weights, shapes)
    return _forward(value, shapes, sampling_locations, attention_weights)


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
            normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=offsets.dtype, device=offsets.device)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            # offsets scaled to half the box size, spread over the points
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference_points last dim must be 2 or 4, got {reference_points.shape[-1]}")
        out = ms_deform_attn_core(value, shapes, locations, weights)  # [B, Q, D]
        return self.output_proj(out)
