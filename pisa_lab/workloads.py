"""DiT-like attention workloads: structured q/k/v for quality tests, with no model download.

Random Gaussian q/k give almost flat attention (every key block holds about the same mass), so
every sparse method looks equally good or bad on them.  Real DiT attention is concentrated, and
*how* it is concentrated is what decides which blocks a sparse method must compute exactly.  The
sets here reproduce the mechanisms that shape real DiT attention:

* **Tokens on a latent grid** (frames x height x width for video, height x width for images),
  optionally joined with text tokens (``[txt | img]`` as FLUX, ``[img | txt]`` as HunyuanVideo
  up to ComfyUI v0.3.64).
* **Spatially smooth content**: a per-channel latent field that is a low-pass random field plus
  piecewise-constant "objects" (Voronoi cells whose seeds move over time), so neighbouring tokens
  look alike, objects persist over frames and blocks at object edges differ from interior ones.
  Each head projects the field with its own random matrices (queries and keys correlated, so
  content attends to similar content).
* **RoPE as the models apply it**: interleaved pairs, head dim split into per-axis bands
  (Wan: ``[d - 4(d//6), 2(d//6), 2(d//6)]`` with theta 1e4; HunyuanVideo ``[16, 56, 56]`` with
  theta 256; FLUX ``[16, 56, 56]`` with theta 1e4 and image ids ``(0, h, w)``); text tokens sit
  at position 0 (identity rotation), as in FLUX and HunyuanVideo.
* **Head types** made the way trained heads make them: a bias vector shared by q and k in chosen
  RoPE bands turns into a positional kernel after rotation (``q_m . k_n = sum_f |u_f|^2
  cos(w_f (m - n))``), so putting it in all bands gives *local* heads, in the time band *spatial*
  (same-frame) heads, in the height/width bands *temporal* (same-place) heads, in one image axis
  *axial* heads; heads without it attend by content (*semantic*), and a low temperature gives
  *flat* heads.  The concentration this yields is reported by :func:`top_block_mass`.

Named sets (:data:`SETS`) come at a ``small`` size (CPU tests and the reference backend) and a
``full`` size (real model resolutions, for the GPU).  ``bench_inputs`` gives the same kind of
inputs for ``python -m pisa_lab.bench --data dit`` at any length.

Determinism: the latent field and the projection matrices come from a CPU generator (identical
on every device); per-token noise is drawn on the target device, so a seed reproduces a set
exactly on one device type.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from pisa_kernels.tiling import joint_permutation

#: Latent channels of the content field (DiT latents are projected from a few dozen channels).
CONTENT_CHANNELS = 32
#: RoPE wavelength scale (tokens) above which content lives: trained models keep semantic content
#: in the slowly rotating pairs and use the fast ones for position (Barbero et al. 2024, "Round and
#: round we go"); content energy per pair falls as ``1 / (1 + (omega * L)^2)``.
CONTENT_WAVELENGTH = 4.0
#: Norm of each head's mean value relative to the norm of the values' fluctuation (projection
#: bias and the latent's own mean: real values are not centred).
VALUE_MEAN = 1.0


# ---- sets ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SetSpec:
    """One workload: a model family's geometry and RoPE, at one size."""

    name: str
    family: str  # "wan" | "hunyuan_video" | "flux": RoPE bands and theta, position ids
    grid: tuple[int, ...]  # (F, H, W) video or (H, W) image latent grid (after patchify)
    text: int = 0  # text tokens joined with the grid
    text_side: str = "start"  # "start" ([txt | img], FLUX) or "end" ([img | txt], HunyuanVideo <= v0.3.64)
    heads: int = 8
    head_dim: int = 128
    batch: int = 1

    @property
    def grid_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def tokens(self) -> int:
        return self.grid_tokens + self.text

    @property
    def grid_start(self) -> int:
        return self.text if self.text_side == "start" else 0

    @property
    def text_range(self) -> tuple[int, int] | None:
        if not self.text:
            return None
        return (0, self.text) if self.text_side == "start" else (self.grid_tokens, self.tokens)

    @property
    def video(self) -> bool:
        return len(self.grid) == 3

    def describe(self) -> str:
        g = "x".join(str(s) for s in self.grid)
        t = f" + {self.text} text ({self.text_side})" if self.text else ""
        return f"{self.family} {g}{t} = {self.tokens} tokens, {self.heads} heads, d={self.head_dim}"


#: Heads per set: small sets have each head type once (the CPU reference's cost grows with heads),
#: full sets twice.
HEADS_SMALL, HEADS_FULL = 6, 12

#: name -> size -> spec.  Small sizes keep the CPU reference fast (a few thousand tokens, 30-50 key
#: blocks of 64) with the real models' awkward sides (Wan 30x52 halved, non-multiples of 8);
#: full sizes are the real latent grids (Wan 480p, HunyuanVideo 720p, FLUX 1024^2 with ComfyUI's
#: 256 text tokens).
SETS: dict[str, dict[str, SetSpec]] = {
    "wan-video": {
        "small": SetSpec("wan-video", "wan", (7, 15, 26), heads=HEADS_SMALL),
        "full": SetSpec("wan-video", "wan", (21, 30, 52), heads=HEADS_FULL),
    },
    "hunyuan-joint": {
        "small": SetSpec("hunyuan-joint", "hunyuan_video", (5, 16, 28), text=96, text_side="end", heads=HEADS_SMALL),
        "full": SetSpec("hunyuan-joint", "hunyuan_video", (33, 45, 80), text=256, text_side="end", heads=HEADS_FULL),
    },
    "flux-image": {
        "small": SetSpec("flux-image", "flux", (40, 48), text=128, heads=HEADS_SMALL),
        "full": SetSpec("flux-image", "flux", (64, 64), text=256, heads=HEADS_FULL),
    },
}

#: The tiny size of every set, for unit tests (a fraction of a second each on CPU).
TINY_HEADS = 6


def get_set(name: str, size: str = "small") -> SetSpec:
    """A named set at ``small``, ``full`` or ``tiny`` (small's family, a grid of about 700 tokens)."""
    if name not in SETS:
        raise ValueError(f"unknown set {name!r}; known: {', '.join(SETS)}")
    if size == "tiny":
        small = SETS[name]["small"]
        grid = (3, 12, 20) if small.video else (24, 28)
        return replace(small, grid=grid, text=min(small.text, 64), heads=TINY_HEADS)
    if size not in SETS[name]:
        raise ValueError(f"unknown size {size!r}; use small, full or tiny")
    return SETS[name][size]


# ---- RoPE ----------------------------------------------------------------------------------------

def rope_axes(family: str, head_dim: int) -> tuple[tuple[int, ...], float]:
    """(per-axis dims, theta) of a family's 3-axis RoPE, scaled to ``head_dim`` when it is not 128."""
    if family == "wan":
        third = head_dim // 6
        return (head_dim - 4 * third, 2 * third, 2 * third), 10000.0
    if family in ("hunyuan_video", "flux"):
        t = 2 * max(1, head_dim // 16)  # 16 of 128
        rest = (head_dim - t) // 2
        return (t, rest, head_dim - t - rest), (256.0 if family == "hunyuan_video" else 10000.0)
    raise ValueError(f"unknown family {family!r}")


def rope_frequencies(family: str, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(omega [D/2], axis [D/2])``: the angular frequency and the position axis of each
    interleaved pair ``(2i, 2i + 1)``, in the models' band order (t, h, w)."""
    dims, theta = rope_axes(family, head_dim)
    omegas, axes = [], []
    for a, da in enumerate(dims):
        omegas.append(theta ** (-torch.arange(0, da, 2, dtype=torch.float64) / da))
        axes.append(torch.full((da // 2,), a, dtype=torch.int64))
    return torch.cat(omegas), torch.cat(axes)


def position_ids(spec: SetSpec) -> torch.Tensor:
    """``[N, 3]`` float positions in input order: grid tokens ``(f, h, w)`` (images ``(0, h, w)``),
    text tokens all zero (FLUX and HunyuanVideo give text ids of 0: no rotation)."""
    axes = [torch.arange(s, dtype=torch.float64) for s in spec.grid]
    mesh = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(spec.grid))
    if not spec.video:
        mesh = torch.cat([torch.zeros(mesh.shape[0], 1, dtype=torch.float64), mesh], dim=1)
    text = torch.zeros(spec.text, 3, dtype=torch.float64)
    return torch.cat([text, mesh] if spec.text_side == "start" else [mesh, text])


def apply_rope(x: torch.Tensor, pos: torch.Tensor, omega: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x [B, N, H, D]`` by ``pos[n, axis[i]] * omega[i]``."""
    ang = (pos[:, axis] * omega).to(device=x.device, dtype=torch.float32)  # [N, D/2]
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


# ---- content -------------------------------------------------------------------------------------

def _standardise(x: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance per channel (dim 0).  A small grid holds few correlation lengths,
    so its low-pass field keeps a large random mean; removing it keeps sizes comparable."""
    flat = x.flatten(1)
    flat = flat - flat.mean(dim=1, keepdim=True)
    return (flat / flat.std(dim=1, keepdim=True).clamp_min(1e-12)).view_as(x)


def _lowpass(noise: torch.Tensor, widths: Sequence[float]) -> torch.Tensor:
    """Gaussian low-pass of ``noise [C, *grid]`` with per-axis widths (in tokens), unit variance."""
    dims = tuple(range(1, noise.dim()))
    spec = torch.fft.rfftn(noise, dim=dims)
    for ax, (n, w) in enumerate(zip(noise.shape[1:], widths)):
        f = torch.fft.rfftfreq(n) if ax == len(widths) - 1 else torch.fft.fftfreq(n)
        shape = [1] * noise.dim()
        shape[ax + 1] = -1
        spec = spec * torch.exp(-0.5 * (2 * math.pi * f * w) ** 2).view(shape)
    out = torch.fft.irfftn(spec, s=noise.shape[1:], dim=dims)
    return _standardise(out)


def _objects(grid: Sequence[int], channels: int, g: torch.Generator) -> torch.Tensor:
    """``[C, *grid]`` piecewise-constant features of moving Voronoi cells (objects with sharp edges
    that persist over frames)."""
    video = len(grid) == 3
    hw = grid[-2:]
    cells = max(4, round(math.prod(hw) / 160))  # about one object per 13x13 tokens
    seeds = torch.rand(cells, 2, generator=g, dtype=torch.float64) * torch.tensor(hw, dtype=torch.float64)
    feats = torch.randn(cells, channels, generator=g, dtype=torch.float64)
    yy, xx = torch.meshgrid(*(torch.arange(s, dtype=torch.float64) for s in hw), indexing="ij")
    pix = torch.stack([yy, xx], dim=-1).reshape(-1, 2)
    frames = grid[0] if video else 1
    velocity = torch.randn(cells, 2, generator=g, dtype=torch.float64) * 0.6  # tokens per latent frame
    out = []
    for f in range(frames):
        owner = torch.cdist(pix, seeds + f * velocity).argmin(dim=1)
        out.append(feats[owner].T.reshape(channels, *hw))
    return _standardise(torch.stack(out, dim=1) if video else out[0])


def content_field(spec: SetSpec, g: torch.Generator) -> torch.Tensor:
    """``[N_grid, C]`` latent content in raster order: a coarse and a fine low-pass field plus
    objects.  Correlation lengths are in tokens (time: latent frames)."""
    c = CONTENT_CHANNELS
    grid = spec.grid
    coarse = (2.5, 6.0, 6.0) if spec.video else (6.0, 6.0)
    fine = (1.0, 1.5, 1.5) if spec.video else (1.5, 1.5)
    x = 0.8 * _lowpass(torch.randn(c, *grid, generator=g, dtype=torch.float64), coarse) \
        + 0.35 * _lowpass(torch.randn(c, *grid, generator=g, dtype=torch.float64), fine) \
        + 0.6 * _objects(grid, c, g)
    return x.reshape(c, -1).T.contiguous() / math.sqrt(0.8 ** 2 + 0.35 ** 2 + 0.6 ** 2)


# ---- heads ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadType:
    """How one head attends.

    ``bands``: the RoPE axes (0 = time / text axis, 1 = height, 2 = width) holding the positional
    bias vector; ``width``: the positional kernel's width in tokens; ``pos``: its peak logit;
    ``content``: the content logit scale (queries and keys correlated, so it is a similarity).
    """

    name: str
    bands: tuple[int, ...] = ()
    width: float = 1.5
    pos: float = 0.0
    content: float = 1.0


#: Video heads (Wan, HunyuanVideo) in the order they are assigned to heads (cycled).  Widths are
#: in latent tokens (frames for the time band): DiT local heads span a few tokens to a few tens
#: (sliding-tile methods use windows of tens of tokens), spatial heads about one frame.
VIDEO_HEADS = (
    HeadType("local", bands=(0, 1, 2), width=3.0, pos=8.0, content=2.0),
    HeadType("spatial", bands=(0,), width=1.0, pos=6.0, content=2.5),
    HeadType("temporal", bands=(1, 2), width=2.0, pos=7.0, content=2.0),
    HeadType("semantic", content=6.0),
    HeadType("local-wide", bands=(0, 1, 2), width=6.0, pos=6.0, content=2.0),
    HeadType("flat", content=1.2),
)
#: Image heads (FLUX): axis 0 is constant for images, so locality lives in the h/w bands.
IMAGE_HEADS = (
    HeadType("local", bands=(1, 2), width=3.0, pos=8.0, content=2.0),
    HeadType("row", bands=(1,), width=1.5, pos=6.0, content=2.0),
    HeadType("column", bands=(2,), width=1.5, pos=6.0, content=2.0),
    HeadType("semantic", content=6.0),
    HeadType("local-wide", bands=(1, 2), width=6.0, pos=6.0, content=2.0),
    HeadType("flat", content=1.2),
)


def head_types(spec: SetSpec) -> list[HeadType]:
    types = VIDEO_HEADS if spec.video else IMAGE_HEADS
    return [types[i % len(types)] for i in range(spec.heads)]


def _positional_vector(ht: HeadType, omega: torch.Tensor, axis: torch.Tensor, scale: float,
                       g: torch.Generator) -> torch.Tensor:
    """``[D]`` bias vector shared by q and k whose RoPE kernel ``sum_f |u_f|^2 cos(w_f d)`` peaks
    at ``ht.pos`` logits and decays over about ``ht.width`` tokens: pair weights follow
    ``w exp(-(w width)^2 / 2)`` (a Gaussian kernel on log-spaced frequencies), random phases."""
    d = 2 * omega.numel()
    u = torch.zeros(d, dtype=torch.float64)
    if not ht.bands or ht.pos <= 0:
        return u
    on = torch.isin(axis, torch.tensor(ht.bands))
    w = torch.where(on, omega * torch.exp(-0.5 * (omega * ht.width) ** 2), torch.zeros_like(omega))
    w = w / w.sum() * (ht.pos / scale)  # |u|^2 * scale = peak logit
    phase = torch.rand(omega.numel(), generator=g, dtype=torch.float64) * 2 * math.pi
    u[0::2], u[1::2] = w.sqrt() * phase.cos(), w.sqrt() * phase.sin()
    return u


# ---- generation ----------------------------------------------------------------------------------

@dataclass
class Workload:
    """Generated q/k/v ``[B, N, H, D]`` (input order, post-RoPE) and what produced them."""

    spec: SetSpec
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    heads: list[str] = field(default_factory=list)  # head type names

    def token_perm(self, block_size: int = 64) -> torch.Tensor:
        """The tiled processing order PISA's node uses: text first, then compact grid tiles."""
        s = self.spec
        return joint_permutation(s.tokens, s.grid, s.grid_start, block_size=block_size, device=self.q.device)


def generate(spec: SetSpec, seed: int = 0, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.bfloat16) -> Workload:
    """The q/k/v of ``spec`` (see the module docstring for the model)."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    gd = torch.Generator(device=device).manual_seed(seed + 1)
    b, h, d, c = spec.batch, spec.heads, spec.head_dim, CONTENT_CHANNELS
    scale = d ** -0.5
    omega, axis = rope_frequencies(spec.family, d)
    types = head_types(spec)

    x = content_field(spec, g)  # [G, C]
    text = 1.3 * torch.randn(spec.text, c, generator=g, dtype=torch.float64)  # unstructured, larger norm
    x = torch.cat([text, x] if spec.text_side == "start" else [x, text]).to(device, torch.float32)

    pair = 1.0 / (1.0 + (omega * CONTENT_WAVELENGTH) ** 2)
    pair = (pair / pair.mean()).sqrt().repeat_interleave(2)  # [D], mean square 1
    wq = torch.randn(h, c, d, generator=g, dtype=torch.float64) / math.sqrt(c) * pair
    wk = (wq + 0.6 * torch.randn(h, c, d, generator=g, dtype=torch.float64) / math.sqrt(c) * pair) / math.sqrt(1.36)
    wv = torch.randn(h, c, d, generator=g, dtype=torch.float64) / math.sqrt(c)
    v_mean = torch.randn(h, d, generator=g, dtype=torch.float64) * VALUE_MEAN
    # Content logit ~ content * scale * (x Wq).(x Wk): scale the projections so that is O(content).
    amp = torch.tensor([math.sqrt(t.content / (scale * d)) for t in types], dtype=torch.float64).view(h, 1, 1)
    u = torch.stack([_positional_vector(t, omega, axis, scale, g) for t in types])  # [H, D]

    def proj(w):
        return torch.einsum("nc,hcd->nhd", x, (w * amp).to(device, torch.float32))

    noise = 0.15 * math.sqrt(1.0 / (scale * d))
    ub = u.to(device, torch.float32)
    q = proj(wq) + ub
    k = proj(wk) + ub
    v = torch.einsum("nc,hcd->nhd", x, wv.to(device, torch.float32)) + v_mean.to(device, torch.float32)
    q, k, v = (t.unsqueeze(0).expand(b, -1, -1, -1) for t in (q, k, v))
    q = q + noise * torch.randn(q.shape, generator=gd, device=device)
    k = k + noise * torch.randn(k.shape, generator=gd, device=device)
    v = v + 0.2 * torch.randn(v.shape, generator=gd, device=device)
    pos = position_ids(spec)
    q, k = apply_rope(q, pos, omega, axis), apply_rope(k, pos, omega, axis)
    return Workload(spec, q.to(dtype), k.to(dtype), v.to(dtype), [t.name for t in types])


# ---- concentration -------------------------------------------------------------------------------

#: Rows per head beyond which :func:`top_block_mass` samples rows instead of using all of them.
EXACT_ROWS = 8192


def top_block_mass(q: torch.Tensor, k: torch.Tensor, *, share: float = 0.125, block_size: int = 64,
                   token_perm: torch.Tensor | None = None, rows: int = 512, seed: int = 0,
                   scale: float | None = None) -> torch.Tensor:
    """Per head, the mean over query rows of the dense attention mass held by the row's top
    ``share`` of key blocks (blocks = runs of ``block_size`` keys in ``token_perm`` order).

    ``q, k``: ``[B, N, H, D]``.  Exact (every row) up to :data:`EXACT_ROWS` tokens, else ``rows``
    sampled rows per head.  Returns ``[H]`` float32 on the CPU.  Flat attention gives about
    ``share``; a head whose attention fits in that many blocks gives 1.
    """
    b, n, h, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    kk = k if token_perm is None else k.index_select(1, token_perm.to(k.device))
    nb = -(-n // block_size)
    top = max(1, round(share * nb))
    if n <= EXACT_ROWS:
        sel = torch.arange(n, device=q.device)
    else:
        g = torch.Generator().manual_seed(seed)
        sel = torch.randperm(n, generator=g)[:rows].to(q.device)
    chunk = max(1, (1 << 24) // n)
    out = torch.zeros(h, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            keys = kk[bi, :, hi].float()
            acc = 0.0
            for s in range(0, sel.numel(), chunk):
                qr = q[bi, sel[s:s + chunk], hi].float()
                p = torch.softmax((qr @ keys.T) * scale, dim=-1)
                p = torch.nn.functional.pad(p, (0, nb * block_size - n)).view(-1, nb, block_size).sum(-1)
                acc += float(p.topk(top, dim=-1).values.sum())
            out[hi] += acc / sel.numel()
    return (out / b).float()


# ---- benchmark inputs ----------------------------------------------------------------------------

#: Lengths of ``pisa_lab.bench`` SHAPES -> (family, grid, text, text side): the real geometry.
_KNOWN_LENGTHS = {
    75600: ("wan", (21, 45, 80), 0, "start"),
    119056: ("hunyuan_video", (33, 45, 80), 256, "end"),
    32760: ("wan", (21, 30, 52), 0, "start"),
    4608: ("flux", (64, 64), 512, "start"),
}


def spec_for_length(n: int, heads: int, head_dim: int, batch: int = 1) -> SetSpec:
    """A set of exactly ``n`` tokens.  Known model lengths get their real geometry; any other
    length gets a Wan-like video grid (up to 21 frames of 9:16 latent frames) of at most ``n``
    tokens, and the remainder (under one frame) becomes text tokens at the start, so every
    length works and the grid stays close to a real one."""
    if n in _KNOWN_LENGTHS:
        family, grid, text, side = _KNOWN_LENGTHS[n]
        return SetSpec(f"dit-{n}", family, grid, text, side, heads, head_dim, batch)
    frames = max(1, min(21, round(n ** (1 / 3) / 3)))
    per_frame = n // frames
    hh = max(1, int(math.sqrt(per_frame * 9 / 16)))
    ww = max(1, per_frame // hh)
    grid = (frames, hh, ww)
    return SetSpec(f"dit-{n}", "wan", grid, n - math.prod(grid), "start", heads, head_dim, batch)


def bench_inputs(b: int, h: int, n: int, d: int, seed: int = 0, device="cuda") -> tuple[torch.Tensor, ...]:
    """``(q, k, v)`` bf16 ``[B, N, H, D]`` of a DiT-like set of ``n`` tokens (see :func:`spec_for_length`)."""
    w = generate(spec_for_length(n, h, d, b), seed=seed, device=device)
    return w.q, w.k, w.v
