"""Token orders: which tokens share a block.

PISA pools every block of ``block_size`` consecutive tokens into one centroid, so a block should be
made of tokens that look alike.  In raster order a block of 64 video tokens is a stripe of one
latent row (Wan 720p rows are 80 tokens long, so blocks even straddle rows).  Reordering the tokens
into compact space-time tiles (e.g. 1x8x8 or 4x4x4) makes the centroids representative.  RoPE is
applied before attention, so permuting q, k and v the same way and un-permuting the output is exact.

A permutation ``perm`` is an int64 tensor with ``perm[i]`` = the input position of the i-th token of
the processing order.  The kernels take it directly (no gathered copies of q, k and v).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def tile_shape_for(grid: Sequence[int], block_size: int) -> tuple[int, ...]:
    """A tile of ``block_size`` tokens (or a divisor-friendly shape) for a 2-D or 3-D grid.

    Spatial sides of 8 suit latent grids (their sides are rarely multiples of 16); for video the
    remaining factor goes to time, so a 64-token tile is 1x8x8 and a 128-token tile is 2x8x8.
    Sides never exceed the grid.
    """
    if len(grid) == 2:
        h, w = grid
        side = 8 if block_size <= 64 else 16
        th = min(h, side)
        tw = min(w, max(1, block_size // th))
        return (th, tw)
    if len(grid) == 3:
        f, h, w = grid
        th, tw = min(h, 8), min(w, 8)
        tf = min(f, max(1, block_size // (th * tw)))
        return (tf, th, tw)
    raise ValueError(f"grid must have 2 or 3 dimensions, got {tuple(grid)}")


def tile_permutation(grid: Sequence[int], tile: Sequence[int] | None = None, block_size: int = 64,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Processing order of a raster (row-major) grid of tokens, visiting compact tiles one by one.

    Tiles are visited in raster order of tiles and tokens in raster order inside a tile.  Edge
    tiles are smaller when a side is not a multiple of the tile side, which is harmless: blocks
    are consecutive runs of the processing order, so such a block spans two small neighbouring
    tiles instead of one full one.
    """
    grid = tuple(int(g) for g in grid)
    if any(g <= 0 for g in grid):
        raise ValueError(f"grid sides must be positive, got {grid}")
    tile = tuple(int(t) for t in (tile or tile_shape_for(grid, block_size)))
    if len(tile) != len(grid) or any(t <= 0 for t in tile):
        raise ValueError(f"tile {tile} does not fit grid {grid}")
    n = math.prod(grid)
    idx = torch.arange(n, dtype=torch.int64).view(grid)
    # Pad each side up to a multiple of the tile with -1, split into (tiles, inside) axes,
    # bring all tile axes first, flatten, and drop the padding.
    padded = [math.ceil(g / t) * t for g, t in zip(grid, tile)]
    full = torch.full(padded, -1, dtype=torch.int64)
    full[tuple(slice(0, g) for g in grid)] = idx
    split = []
    for p, t in zip(padded, tile):
        split += [p // t, t]
    full = full.view(split)
    dims = len(grid)
    order = [2 * i for i in range(dims)] + [2 * i + 1 for i in range(dims)]
    flat = full.permute(order).reshape(-1)
    perm = flat[flat >= 0]
    return perm.to(device) if device is not None else perm


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[perm[i]] = i``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return inv


def joint_permutation(n_total: int, grid: Sequence[int] | None, grid_start: int,
                      block_size: int = 64, tile: Sequence[int] | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Order for a joint sequence: every token outside the grid first (text, reference tokens, in
    input order), then the grid's tokens tiled.

    ``grid_start`` is the input position of the grid's first token; the grid's tokens are
    contiguous in the input.  Putting the non-grid tokens first keeps them in their own blocks,
    which the caller usually forces exact (``sink_kv``).
    """
    if grid is None:
        return torch.arange(n_total, dtype=torch.int64, device=device)
    n_grid = math.prod(int(g) for g in grid)
    if grid_start < 0 or grid_start + n_grid > n_total:
        raise ValueError(f"grid of {n_grid} tokens at {grid_start} does not fit {n_total} tokens")
    others = torch.cat([torch.arange(0, grid_start), torch.arange(grid_start + n_grid, n_total)])
    tiled = tile_permutation(grid, tile, block_size) + grid_start
    perm = torch.cat([others, tiled])
    return perm.to(device) if device is not None else perm
