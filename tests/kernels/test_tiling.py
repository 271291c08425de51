"""Token orders (pisa_kernels.tiling): the permutations the node passes as ``token_perm``.

They must be permutations (or the kernel would drop or duplicate tokens), their blocks must be
spatially compact (the point of tiling: pooled centroids of compact blocks are representative,
pitfall 11), joint sequences must keep the non-grid tokens (text) first in their own blocks, and
the inverse must undo them."""

import math

import pytest
import torch

from pisa_kernels.tiling import inverse_permutation, joint_permutation, tile_permutation, tile_shape_for

GRIDS = [(1, 1), (1, 7), (7, 1), (8, 8), (13, 21), (30, 52), (45, 80), (64, 64),
         (1, 8, 8), (3, 5, 7), (5, 30, 52), (21, 45, 80)]


def is_perm(p: torch.Tensor, n: int) -> bool:
    return p.dtype == torch.int64 and p.shape == (n,) and torch.equal(torch.sort(p).values, torch.arange(n))


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("block", [64, 128])
def test_tile_permutation_is_a_permutation(grid, block):
    p = tile_permutation(grid, block_size=block)
    assert is_perm(p, math.prod(grid))


@pytest.mark.parametrize("grid,tile", [((13, 21), (4, 4)), ((13, 21), (1, 21)), ((13, 21), (13, 21)),
                                       ((5, 9, 11), (2, 4, 4)), ((5, 9, 11), (5, 1, 1)), ((6, 6), (7, 7))])
def test_explicit_tiles_are_permutations(grid, tile):
    assert is_perm(tile_permutation(grid, tile), math.prod(grid))


def test_tile_order_by_hand():
    """snake=False: tiles in raster order of tiles, tokens in raster order inside a tile; edge tiles
    smaller."""
    p = tile_permutation((4, 5), (2, 3), snake=False)
    grid = torch.arange(20).view(4, 5)
    expect = torch.cat([grid[0:2, 0:3].flatten(), grid[0:2, 3:5].flatten(),
                        grid[2:4, 0:3].flatten(), grid[2:4, 3:5].flatten()])
    assert torch.equal(p, expect)


def test_snake_order_by_hand():
    """Snake order: tiles boustrophedon over the tile grid, tokens boustrophedon inside a tile with
    the first axis reversed on odd tiles, so that a block running past a tile's end continues near
    where it left off."""
    p = tile_permutation((4, 5), (2, 3))
    grid = torch.arange(20).view(4, 5)
    expect = torch.tensor([0, 1, 2, 7, 6, 5,  # tile (0,0): rows 0-1, cols 0-2
                           8, 9, 4, 3,  # tile (0,1): rows reversed (odd tile), then snake
                           13, 14, 19, 18,  # tile (1,1): visited before (1,0) (snake over tiles)
                           15, 16, 17, 12, 11, 10])  # tile (1,0): rows reversed
    assert torch.equal(p, expect)
    inside = torch.stack(torch.unravel_index(p[:6], (4, 5)), -1)  # steps inside a tile: neighbours
    assert int((inside[1:] - inside[:-1]).abs().sum(-1).max()) == 1
    del grid


def test_tile_shapes():
    """Default tiles are columns: 8x8 patches through all frames (video), 8-wide stripes (image)."""
    assert tile_shape_for((45, 80), 64) == (45, 8)
    assert tile_shape_for((45, 80), 128) == (45, 16)
    assert tile_shape_for((21, 45, 80), 64) == (21, 8, 8)
    assert tile_shape_for((21, 45, 80), 128) == (21, 8, 8)
    for grid in GRIDS:  # sides never exceed the grid
        for block in (64, 128):
            t = tile_shape_for(grid, block)
            assert len(t) == len(grid) and all(1 <= a <= g for a, g in zip(t, grid))


def block_extent(grid, perm, block):
    """Largest Chebyshev extent (max over axes of max - min coordinate) of any block, and the mean."""
    coords = torch.stack(torch.unravel_index(perm, grid), dim=-1)  # [N, dims] in processing order
    ext = []
    for s in range(0, perm.numel(), block):
        c = coords[s:s + block]
        ext.append(int((c.max(0).values - c.min(0).values).max()))
    return max(ext), sum(ext) / len(ext)


#: Latent grids of the target models (pisa-method.md §7): Wan 720p / 480p frames and videos,
#: HunyuanVideo 720p, FLUX 1024².  45 and 30 rows and 52 columns are not multiples of 8.
TARGET_GRIDS = {"wan720_frame": (45, 80), "wan480_frame": (30, 52), "flux1024": (64, 64),
                "wan720": (21, 45, 80), "wan480": (21, 30, 52), "hunyuan720": (33, 45, 80)}


@pytest.mark.parametrize("grid", list(TARGET_GRIDS.values()), ids=list(TARGET_GRIDS))
def test_tiled_blocks_are_compact(grid):
    """A raster block of 64 tokens is a stripe up to a whole row long; a tiled one should be about
    an 8x8 tile (extent 7), with ragged exceptions only near the grid's edges.

    Caution: if an edge tile has fewer than 64 tokens and blocks are plain runs of the tile order,
    every later block is shifted against the tiles and straddles two of them (or the wrap from one
    row of tiles to the next), so the blocks of whole frames stop being compact.
    """
    n = math.prod(grid)
    raster_max, raster_mean = block_extent(grid, torch.arange(n), 64)
    tiled_max, tiled_mean = block_extent(grid, tile_permutation(grid, block_size=64), 64)
    assert tiled_max < raster_max, f"largest block extent {tiled_max} vs raster {raster_max}"
    assert tiled_mean <= 10, f"mean block extent {tiled_mean:.1f} (8x8 tile: 7; raster: {raster_mean:.1f})"


def test_inverse_permutation():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 17, 1000):
        p = torch.randperm(n, generator=g)
        inv = inverse_permutation(p)
        assert torch.equal(p[inv], torch.arange(n)) and torch.equal(inv[p], torch.arange(n))
        x = torch.randn(n, 3, generator=g)
        assert torch.equal(x[p][inv], x)
    p = tile_permutation((21, 45, 80))
    assert torch.equal(tile_permutation((21, 45, 80))[inverse_permutation(p)], torch.arange(p.numel()))


@pytest.mark.parametrize("n_before,n_after", [(0, 0), (40, 0), (0, 33), (256, 7)])
def test_joint_permutation(n_before, n_after):
    grid = (13, 21)
    n_grid = math.prod(grid)
    n = n_before + n_grid + n_after
    p = joint_permutation(n, grid, n_before)
    assert is_perm(p, n)
    others = torch.cat([torch.arange(n_before), torch.arange(n_before + n_grid, n)])
    assert torch.equal(p[:others.numel()], others), "non-grid tokens first, in input order"
    assert torch.equal(p[others.numel():], tile_permutation(grid) + n_before), "then the grid, tiled"


def test_joint_permutation_without_grid_is_identity():
    assert torch.equal(joint_permutation(77, None, 0), torch.arange(77))


@pytest.mark.parametrize("bad", [dict(grid=(0, 5)), dict(grid=(5,)), dict(grid=(2, 2, 2, 2)),
                                 dict(grid=(4, 4), tile=(2, 2, 2)), dict(grid=(4, 4), tile=(0, 2))])
def test_tile_permutation_errors(bad):
    with pytest.raises(ValueError):
        tile_permutation(bad["grid"], bad.get("tile"))


@pytest.mark.parametrize("n,start", [(100, -1), (100, 20), (50, 0)])
def test_joint_permutation_errors(n, start):
    with pytest.raises(ValueError):
        joint_permutation(n, (9, 9), start)  # 81 grid tokens do not fit


def test_device_argument():
    p = tile_permutation((9, 9), device="cpu")
    assert p.device.type == "cpu"
    assert joint_permutation(90, (9, 9), 9, device="cpu").device.type == "cpu"
