"""Token orders: which tokens share a block.

PISA pools every block of ``block_size`` consecutive tokens into one centroid, so a block should be
made of tokens that look alike.  In raster order a block of 64 video tokens is a stripe of one
latent row (Wan 720p rows are 80 tokens long, so blocks even straddle rows).  Reordering the tokens
into compact space-time tiles (one frame of an 8x8 patch per block) makes the centroids
representative.  RoPE is
applied before attention, so permuting q, k and v the same way and un-permuting the output is exact.

A permutation ``perm`` is an int64 tensor with ``perm[i]`` = the input position of the i-th token of
the processing order.  The Triton kernels read q and write the output through it and their
pre-scan writes k and v in this order (the reference gathers all three).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def tile_shape_for(grid: Sequence[int], block_size: int = 64) -> tuple[int, ...]:
    """The tile shape whose tile order makes every run of ``block_size`` tokens compact.

    Tiles are *columns*: 8 x 8 spatial patches through all frames for video, ``H x 8`` stripes for
    images (``H x 16`` for 128-token blocks).  Inside a tile the order is raster, so a 64-token block
    is one frame of an 8 x 8 patch (video) or 8 rows of an 8-wide stripe (image).  A tile's token
    count is then a multiple of the block size whenever the spatial sides are multiples of 8, and an
    edge tile narrower than 8 still yields compact blocks (a few consecutive frames or rows of the
    same narrow patch) instead of shifting every later block against the tiles, which is what
    64-token tiles do on grids like 30 x 52.
    """
    if len(grid) == 3:
        f, h, w = grid
        return (f, min(h, 8), min(w, 8))
    if len(grid) == 2:
        h, w = grid
        return (h, min(w, 8 if block_size <= 64 else 16))
    raise ValueError(f"grid must have 2 or 3 dimensions, got {tuple(grid)}")


def _snake_index(coords: list[torch.Tensor], sizes: list[torch.Tensor], flip: torch.Tensor) -> torch.Tensor:
    """Boustrophedon (snake) rank of integer coordinates in a box of per-token ``sizes``: each axis
    runs backwards whenever the coordinate already placed before it is odd, so consecutive ranks are
    always neighbours.  ``flip``: bool per token, reverse the first axis too."""
    idx = torch.zeros_like(coords[0])
    for c, n in zip(coords, sizes):
        x = torch.where(flip, n - 1 - c, c)
        idx = idx * n + x
        flip = (x % 2) == 1
    return idx


def tile_permutation(grid: Sequence[int], tile: Sequence[int] | None = None, block_size: int = 64,
                     device: torch.device | str | None = None, snake: bool = True) -> torch.Tensor:
    """Processing order of a raster (row-major) grid of tokens, visiting compact tiles one by one.

    Tiles are visited in snake order over the tile grid and tokens in snake order inside a tile,
    the first axis of a tile reversed on every other tile, so that consecutive tokens are always
    neighbours: a block that runs past the end of one tile continues in the adjacent part of the
    next one.  ``snake=False`` gives plain raster order of tiles and raster order inside tiles.
    Edge tiles are smaller when a side is not a multiple of the tile side.  Blocks are runs of
    this order (see :func:`tile_shape_for` for why the default tiles are columns).
    """
    grid = tuple(int(g) for g in grid)
    if any(g <= 0 for g in grid):
        raise ValueError(f"grid sides must be positive, got {grid}")
    tile = tuple(int(t) for t in (tile or tile_shape_for(grid, block_size)))
    if len(tile) != len(grid) or any(t <= 0 for t in tile):
        raise ValueError(f"tile {tile} does not fit grid {grid}")
    n = math.prod(grid)
    coords = torch.unravel_index(torch.arange(n, dtype=torch.int64), grid)
    tcoord = [c // t for c, t in zip(coords, tile)]
    inner = [c % t for c, t in zip(coords, tile)]
    ntiles = [torch.full_like(coords[0], -(-g // t)) for g, t in zip(grid, tile)]
    # Real extent of each token's tile along each axis (edge tiles are cut by the grid).
    extent = [torch.clamp(g - tc * t, max=t) for g, t, tc in zip(grid, tile, tcoord)]
    no_flip = torch.zeros(n, dtype=torch.bool)
    if snake:
        t_idx = _snake_index(tcoord, ntiles, no_flip)
        in_idx = _snake_index(inner, extent, (t_idx % 2) == 1)
    else:
        t_idx = _snake_index(tcoord, ntiles, no_flip) if len(grid) == 1 else \
            torch.stack(tcoord, -1) @ torch.tensor([math.prod(int(x[0]) for x in ntiles[a + 1:])
                                                    for a in range(len(grid))])
        in_idx = torch.stack(inner, -1) @ torch.tensor([math.prod(tile[a + 1:]) for a in range(len(grid))])
    key = t_idx * math.prod(tile) + in_idx
    perm = torch.argsort(key)
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
