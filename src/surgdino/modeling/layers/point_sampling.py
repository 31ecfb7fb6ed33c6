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
    cand, fill = draw_uncertain_candidates(mask_logits.shape[0], num_points, oversample_ratio,
                                           importance_sample_ratio, mask_logits.device)
    return pick_uncertain_points(mask_logits, cand, fill, int(importance_sample_ratio * num_points))


def draw_uncertain_candidates(k: int, num_points: int, oversample_ratio: float, importance_sample_ratio: float,
                              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The random draws of ``uncertain_point_coords`` for ``k`` masks, in its order: candidates
    ``[K, num_points × oversample_ratio, 2]``, then the uniform fill ``[K, num_points - n_important, 2]``.
    Drawing layer after layer and picking all layers' points in one batch later gives the same points."""
    n_cand = max(int(num_points * oversample_ratio), num_points)
    n_rand = num_points - int(importance_sample_ratio * num_points)
    cand = torch.rand(k, n_cand, 2, device=device)  # [K, P*ratio, 2]
    fill = torch.rand(k, n_rand, 2, device=device) if n_rand > 0 else cand.new_empty(k, 0, 2)  # [K, n_rand, 2]
    return cand, fill


def pick_uncertain_points(mask_logits: torch.Tensor, cand: torch.Tensor, fill: torch.Tensor,
                          n_important: int) -> torch.Tensor:
    """The ``n_important`` candidates ``cand [K, n_cand, 2]`` with the smallest |logit| of ``mask_logits
    [K, 1, h, w]``, then ``fill [K, n_rand, 2]`` → ``[K, n_important + n_rand, 2]``. Row by row, so
    stacking several layers' rows gives each row the points it gets alone."""
    certainty = point_sample(mask_logits, cand)[:, 0].abs()  # [K, n_cand]
    idx = certainty.topk(n_important, dim=1, largest=False, sorted=False).indices  # [K, n_imp]; order is irrelevant
    chosen = torch.gather(cand, 1, idx[..., None].expand(-1, -1, 2))  # [K, n_imp, 2]
    return torch.cat([chosen, fill], dim=1) if fill.shape[1] else chosen


def sample_binary_masks(masks: torch.Tensor, index: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear values of masks ``[N, H, W]`` (boolean, or already float) rows ``index [K]`` at
    ``coords [K, P, 2]`` → ``[K, P]``.

    Same numbers as ``point_sample(masks[index, None].float(), coords)`` (align_corners=False, zeros
    outside), without K copies of full-resolution masks: the pairs of each target are laid side by side
    in one grid of that target (``[N, M, P]``, M = most pairs of one target: 1 for matched queries, the
    number of groups for denoising queries), so one ``grid_sample`` reads every pair. Pass float masks
    (``masks.float()``, made once per step) to avoid converting them on every call.
    """
    n = masks.shape[0]
    k, p = coords.shape[:2]
    if k == 0 or n == 0:
        return coords.new_zeros(k, p)
    index = index.to(coords.device)
    counts = torch.bincount(index, minlength=n)
    m = int(counts.max())
    if m == 1:
        rank = torch.zeros_like(index)
    else:  # position of each pair among the pairs of its target
        order = torch.argsort(index, stable=True)
        first = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(index)
        rank[order] = torch.arange(k, device=index.device) - first[index[order]]
    grid = coords.new_zeros(n, m, p, 2)
    grid[index, rank] = 2.0 * coords - 1.0
    src = masks[:, None] if masks.dtype.is_floating_point else masks[:, None].to(coords.dtype)  # [N, 1, H, W]
    out = F.grid_sample(src.to(coords.dtype), grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)  # [N, 1, M, P]
    return out[index, 0, rank]
