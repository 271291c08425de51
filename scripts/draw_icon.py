"""Draw the pack's Registry icon, docs/img/icon.png (256 x 256, the Registry allows up to 800 x 400).

The picture is PISA's idea: one row of key blocks per query tile, a few blocks computed exactly
(bright, the diagonal and one routed block per row), the rest approximated (dim). Run it again
only to change the icon: `python scripts/draw_icon.py`; pyproject.toml's `Icon` points to the file.
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import FancyBboxPatch, Rectangle  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "img" / "icon.png"
BLOCKS = 8


def main():
    fig = plt.figure(figsize=(2.56, 2.56), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")
    ax.add_patch(FancyBboxPatch((0.03, 0.03), 0.94, 0.94, boxstyle="round,pad=0,rounding_size=0.14",
                                fc="#1d1b2e", ec="none"))
    x0, y0, w = 0.16, 0.30, 0.68 / BLOCKS
    h = w * 0.62
    routed = np.random.default_rng(7)
    for i in range(BLOCKS):
        exact = {i, max(i - 1, 0), int(routed.integers(0, BLOCKS))}
        for j in range(BLOCKS):
            alpha = 1.0 if j in exact else 0.25 + 0.25 * np.exp(-abs(i - j) / 3)
            ax.add_patch(Rectangle((x0 + j * w + 0.006, y0 + (BLOCKS - 1 - i) * h + 0.004), w - 0.012, h - 0.008,
                                   fc="#b48cff" if j in exact else "#6f5ca8", alpha=alpha, ec="none"))
    ax.text(0.5, 0.15, "PISA", ha="center", va="center", color="#f2eeff", fontsize=27, fontweight="bold",
            family="DejaVu Sans")
    fig.savefig(OUT, transparent=True)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
