"""Piecewise-linear encoding of numeric inputs over quantile bins (Gorishniy et al., 2022, "On Embeddings for
Numerical Features in Tabular Deep Learning").

A network fed one standardised number per input draws smooth functions of it; a tree cuts it anywhere. The
encoding gives the network the cuts: each input becomes ``bins`` numbers, one per quantile bin of the training
rows, 0 below the bin, 1 above it and the position within it in between. A linear layer on top can then express
any piecewise-linear function of the input (a bump, a threshold), which is where gradient boosting beat our
network on tabular inputs.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def quantile_edges(numeric: np.ndarray, bins: int) -> np.ndarray:
    """Bin edges per column: the distinct quantiles ``0, 1/bins, …, 1`` of the finite values, padded.

    A column with fewer distinct quantiles than ``bins + 1`` (a 0/1 flag, a mostly-zero count) repeats its
    last edge: the padded bins have zero width and encode nothing. A column with a single value gets one bin
    of width 1 around it.

    Args:
        numeric: rows × columns of (normalised) inputs.
        bins: bins per column (≥ 1).

    Returns:
        float32 array of shape ``(columns, bins + 1)``, non-decreasing along each row.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    x = np.asarray(numeric, dtype=np.float64)
    out = np.zeros((x.shape[1], bins + 1), dtype=np.float64)
    probabilities = np.linspace(0.0, 1.0, bins + 1)
    for j in range(x.shape[1]):
        column = x[:, j][np.isfinite(x[:, j])]
        edges = np.unique(np.quantile(column, probabilities)) if column.size else np.zeros(1)
        if edges.size < 2:
            edges = np.array([edges[0] - 0.5, edges[0] + 0.5])
        out[j, : edges.size] = edges
        out[j, edges.size :] = edges[-1]
    return out.astype(np.float32)


def piecewise_linear(x: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Encode ``x`` (rows × columns) over ``edges`` (columns × (bins + 1)): rows × (columns · bins).

    Bin ``t`` of a column with edges ``e`` is ``(x − e[t]) / (e[t+1] − e[t])`` clipped to [0, 1]; the first bin
    is not clipped below and the last is not clipped above, so values outside the training range extrapolate
    linearly. Zero-width (padding) bins are 0.
    """
    left, right = edges[:, :-1], edges[:, 1:]
    width = right - left
    real = width > 0
    z = (x.unsqueeze(-1) - left) / torch.where(real, width, torch.ones_like(width))
    bins = edges.shape[1] - 1
    position = torch.arange(bins, device=x.device)
    # The last real bin of a column: the one whose right edge is the column's maximum.
    last = real.sum(dim=1, keepdim=True) - 1
    low = torch.where(
        position == 0, torch.tensor(-torch.inf, device=x.device), torch.zeros((), device=x.device)
    )
    high = torch.where(
        position == last, torch.tensor(torch.inf, device=x.device), torch.ones((), device=x.device)
    )
    z = torch.minimum(torch.maximum(z, low), high)
    return torch.where(real, z, torch.zeros_like(z)).flatten(1)


class PiecewiseLinearEncoding(nn.Module):
    """:func:`piecewise_linear` with its edges as a saved buffer (set once from the training rows).

    Args:
        columns: numeric inputs encoded.
        bins: bins per input.
    """

    def __init__(self, columns: int, bins: int) -> None:
        super().__init__()
        self.register_buffer("edges", torch.zeros(columns, bins + 1))

    def set_edges(self, edges: np.ndarray) -> None:
        """Set the edges (shape ``(columns, bins + 1)``, e.g. from :func:`quantile_edges`)."""
        if tuple(edges.shape) != tuple(self.edges.shape):
            raise ValueError(f"edges have shape {edges.shape}; expected {tuple(self.edges.shape)}")
        self.edges.copy_(torch.from_numpy(np.asarray(edges, dtype=np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return piecewise_linear(x, self.edges)
