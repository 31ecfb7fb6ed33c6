"""Small shared layers: a multi-layer perceptron, the inverse sigmoid of box refinement, token gathering, and
shape-derived tensors that stay traced under export."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """logit(x) with x clamped to [eps, 1 - eps] so boxes at the border stay finite."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (DETR's box head); parameters ``layers.i.*``."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.num_layers = num_layers
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return x


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx [B, K]`` of ``x [B, S, ...]`` → ``[B, K, ...]`` (top-k query selection)."""
    return torch.gather(x, 1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))


def shape_tensor(rows: Sequence[Sequence[int]], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.tensor(rows)`` of numbers derived from tensor shapes; under tracing built from the tracer's
    size values (``torch.tensor`` would make them constants of the graph)."""
    if not torch.jit.is_tracing():
        return torch.tensor(rows, dtype=dtype, device=device)
    return torch.stack([torch.stack([(v if isinstance(v, torch.Tensor) else torch.as_tensor(v, device=device)).to(dtype)
                                     for v in r]) for r in rows])
