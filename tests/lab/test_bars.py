"""The issue's bars on the small generated sets at sparsity 0.875, asserted (they can fail).

Every method of one comparison sees the same token order and the same selected blocks (routing
depends neither on the order nor on the tail): the node's configuration, tiled order where the
grid is known, text exact, routing "auto", the node's log-normal tail (the paper's plain tail is
measured next to it).  The numbers come from ``pisa_attention`` itself (reference backend on the
CPU).
"""

import pytest
import torch

from pisa_lab import eval as E
from pisa_lab import workloads as W

SPARSITY = 0.875


@pytest.fixture(scope="module", params=list(W.SETS))
def errors(request):
    case = E.cases_from_sets([f"{request.param}:small"], 0, torch.device("cpu"))[0]
    ref = E.dense_reference(case)
    routing = E.resolve_routing("auto", case)
    errs = {}
    for token_order in ("tiled", "raster") if case.video else ("tiled",):
        e = errs[token_order] = {}
        for tail in ("plain", "lognormal"):
            for order in (1, 0, "drop") if tail == "plain" else (1, 0):
                out = E.run_pisa(case, order=order, sparsity=SPARSITY, token_order=token_order, routing=routing,
                                 backend="reference", tail=tail)
                e[E.method_name(order, tail)] = E.metrics(out, ref)[0]
    return case.name, case.video, errs


def test_first_order_at_most_half_of_keep_or_drop(errors):
    name, _, errs = errors
    e = errs["tiled"]
    assert e["pisa-o1+ln"] <= 0.5 * e["pisa-drop"], (name, e)
    assert e["pisa-o1"] <= 0.5 * e["pisa-drop"], (name, e)


def test_first_order_at_most_zeroth_order(errors):
    """With the node's (log-normal) tail.  The plain tail misses this on the FLUX-like set at full
    size (docs/fidelity.md)."""
    name, _, errs = errors
    e = errs["tiled"]
    assert e["pisa-o1+ln"] <= e["pisa-o0+ln"], (name, e)


def test_tiled_at_most_raster_for_video(errors):
    name, video, errs = errors
    if not video:
        pytest.skip("image set: the tiled-vs-raster bar is for video grids")
    assert errs["tiled"]["pisa-o1+ln"] <= errs["raster"]["pisa-o1+ln"], (name, errs)
    assert errs["tiled"]["pisa-o1"] <= errs["raster"]["pisa-o1"], (name, errs)


def test_log_normal_tail_improves_the_first_order(errors):
    name, _, errs = errors
    e = errs["tiled"]
    assert e["pisa-o1+ln"] < e["pisa-o1"], (name, e)
