"""Point sampling of masks and features (PointRend): bilinear reads at normalised [0, 1] coordinates."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def point_sample(inputs: torch.Tensor, coords: torch.Tensor, align_corners: bool = False) -> torch.Tensor:
    """Bilinear values of ``inputs [N, C, H, W]`` at ``coords [N, P, 2]`` (x, y in [0, 1]) → ``[N, C, P]``."""
    grid = 2.0 * coords[:, :, None, :] - 1.0  # [N, P, 1, 2] in [-1, 1]
    out = F.grid_sample(inputs, grid.to(inputs.dtype), mode="bilinear", padding_mode="zeros",
                        align_corners=align_corners)  # [N, C, P, 1]
    return out[..., 0]


def uncertain_point_coords(mask_logits: torch.Tensor, num_points: int, oversample_ratio: float,
                           importance_sample_ratio: float) -> torch.Tensor:
    """Points where ``mask_logits [K, 1, h, w]`` are least certain (|logit| smallest), plus random points.

    Draws ``num_points × oversample_ratio`` uniform candidates, keeps the ``importance_sample_ratio``
    share with the smallest |logit| and fills the rest uniformly → ``[K, num_points, 2]``.
    """
    k = mask_logits.shape[0]
    device = mask_logits.device
    n_cand = max(int(num_points * oversample_ratio), num_points)
    n_imp = int(importance_sample_ratio * num_points)
    n_rand = num_points - n_imp
    cand = torch.rand(k, n_cand, 2, device=device)  # [K, P*ratio, 2]
    uncertainty = -point_sample(mask_logits, cand)[:, 0].abs()  # [K, P*ratio]
    idx = uncertainty.topk(n_imp, dim=1).indices  # [K, n_imp]
    chosen = torch.gather(cand, 1, idx[..., None].expand(-1, -1, 2))  # [K, n_imp, 2]
    if n_rand > 0:
        chosen = torch.cat([chosen, torch.rand(k, n_rand, 2, device=device)], dim=1)
    return chosen


def sample_binary_masks(masks: torch.Tensor, index: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear values of boolean ``masks [N, H, W]`` rows ``index [K]`` at ``coords [K, P, 2]`` → ``[K, P]``.

    Same numbers as ``point_sample(masks[index, None].float(), coords)`` (align_corners=False, zeros
    outside), without materialising K float copies of full-resolution masks.
    """
    h, w = masks.shape[-2:]
    x = coords[..., 0] * w - 0.5  # [K, P] pixel coordinates
    y = coords[..., 1] * h - 0.5
    x0 = x.floor()
    y0 = y.floor()
    wx = x - x0
    wy = y - y0
    x0 = x0.long()
    y0 = y0.long()
    rows = index[:, None].expand_as(x0)
    out = torch.zeros_like(x)
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        xi = x0 + dx
        yi = y0 + dy
        inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        val = masks[rows, yi.clamp(0, h - 1), xi.clamp(0, w - 1)] & inside
        weight = (wx if dx else 1 - wx) * (wy if dy else 1 - wy)
        out = out + val.to(out.dtype) * weight
    return out
