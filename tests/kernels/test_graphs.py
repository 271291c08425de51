"""The CUDA-graph cache of pisa_kernels.graphs on the CPU, with a stand-in for the capture.

A real graph needs CUDA; what decides whether a replay is right does not: which graph a call
replays (the key: the call's plan and the shapes, strides, dtypes and devices of q, k, v), the
static input buffers and what the replay writes.  ``fake_graphs`` replaces only the CUDA part
(``graphs._record``) with a graph whose replay runs the captured call again on the static
buffers, and lets every call take the graph path (``graphs.wanted``), on the reference backend.
The same checks against real graphs run on the GPU: test_gpu.py (test_cuda_graph_*) and the
fuzz (``assert_graph_path_is_eager``).
"""

import inspect

import pytest
import torch

from pisa_kernels import graphs, pisa_attention
from pisa_test_utils import capture_routing, rand_qkv, selection_of

SHAPE = (1, 72, 72, 16)  # square in H and N, so that both layouts read it: two 64-token blocks


class _ReplayByRerun:
    """Stands in for a CUDA graph: a replay recomputes the captured call on the static buffers
    into the captured output, as a real replay recomputes the captured kernels."""

    def __init__(self, fn, plan, inputs, output):
        self.fn, self.plan, self.inputs, self.output = fn, plan, inputs, output

    def replay(self):
        self.output.copy_(self.fn(self.plan, *self.inputs, None))


@pytest.fixture
def fake_graphs(monkeypatch):
    """The list of captures made; graphs start empty and are dropped afterwards."""
    captures = []

    def record(fn, plan, inputs):
        fn(plan, *inputs, None)  # the warm-up, as in graphs._record
        output = fn(plan, *inputs, None)
        captures.append(plan)
        return _ReplayByRerun(fn, plan, inputs, output), output

    monkeypatch.setattr(graphs, "_GRAPHS", {})
    monkeypatch.setattr(graphs, "_record", record)
    monkeypatch.setattr(graphs, "wanted", lambda mode, plan, q: mode is not False)
    return captures


def _qkv(seed, layout="BHND"):
    return rand_qkv(*SHAPE, seed=seed, layout=layout, v_shift=0.5)


def _both(q, k, v, **kw):
    """(graph path, eager path) of one call on the reference backend."""
    return (pisa_attention(q, k, v, backend="reference", cuda_graph=True, **kw),
            pisa_attention(q, k, v, backend="reference", cuda_graph=False, **kw))


PERM_A, PERM_B = torch.randperm(72, generator=torch.Generator().manual_seed(1)), torch.arange(71, -1, -1)

#: For each argument of pisa_attention that changes the computation: two values that compute
#: different things at SHAPE (the base call uses the first).
VARIATIONS = {
    "sparsity": (0.5, 0.0),
    "block_size": (64, 128),
    "order": (1, "drop"),
    "scale": (None, 0.5),
    "layout": ("BHND", "BNHD"),
    "sink_kv": (None, [(64, 72)]),
    "dense_q": (None, torch.arange(72) >= 60),
    "token_perm": (PERM_A, PERM_B),
    "routing": ("topk", "cov"),
    "tail": ("plain", "lognormal"),
}
#: The other arguments, and why they need no variation here.
NOT_VARIED = {
    "q": "values: copied into the graph's buffers on every call (test_replays_read_the_new_values)",
    "k": "values, as q",
    "v": "values, as q",
    "kv_valid": "calls with a key mask never use a graph (test_calls_with_kv_valid_run_eagerly)",
    "backend": "only Triton plans use graphs (graphs.wanted); the plan key holds the backend",
    "cuda_graph": "chooses the path, not the result",
    "return_stats": "adds the stats, same output",
}


def test_every_argument_is_varied_or_exempt():
    params = set(inspect.signature(pisa_attention).parameters)
    assert params == set(VARIATIONS) | set(NOT_VARIED), \
        f"pisa_attention's arguments changed: add {params - set(VARIATIONS) - set(NOT_VARIED)} to VARIATIONS " \
        f"or NOT_VARIED; drop {(set(VARIATIONS) | set(NOT_VARIED)) - params}"


@pytest.mark.parametrize("name", sorted(VARIATIONS))
def test_another_setting_is_another_graph(fake_graphs, name):
    """A call whose setting differs from an earlier call's of the same shapes gets a graph of its
    own (a replay of the earlier graph would silently compute the earlier setting), equal to its
    eager call; the first setting again replays its graph (no new capture)."""
    base = {n: a for n, (a, _) in VARIATIONS.items()}
    other = dict(base, **{name: VARIATIONS[name][1]})
    q, k, v = _qkv(seed=3)
    graph_a, eager_a = _both(q, k, v, **base)
    assert len(fake_graphs) == 1
    graph_b, eager_b = _both(q, k, v, **other)
    assert len(fake_graphs) == 2, f"a call with another {name} replayed the earlier graph"
    assert torch.equal(graph_a, eager_a) and torch.equal(graph_b, eager_b)
    assert not torch.equal(eager_a, eager_b), f"VARIATIONS[{name!r}]: both values compute the same"
    assert torch.equal(pisa_attention(q, k, v, backend="reference", cuda_graph=True, **base), eager_a)
    assert len(fake_graphs) == 2, "the same settings captured again"


def test_replays_read_the_new_values(fake_graphs):
    q, k, v = _qkv(seed=4)
    for q_, k_, v_ in ((q, k, v), (k, v, q), (v, q, k)):
        graph, eager = _both(q_, k_, v_)
        assert torch.equal(graph, eager)
    q[0, 0] += 1.0  # in place
    graph, eager = _both(q, k, v)
    assert torch.equal(graph, eager)
    assert len(fake_graphs) == 1


def test_a_full_graph_cache_keeps_the_graphs_in_use(fake_graphs, monkeypatch):
    """With room for two graphs, a graph replayed between two new settings is never captured again;
    the least recently used one is."""
    monkeypatch.setattr(graphs, "MAX_GRAPHS", 2)
    q, k, v = _qkv(seed=6)
    for sparsity in (0.25, 0.5, 0.625, 0.75):
        _both(q, k, v, sparsity=sparsity)
        _both(q, k, v)  # the hot setting
    assert len(fake_graphs) == 5 and len(graphs._GRAPHS) == 2
    _both(q, k, v, sparsity=0.5)  # long unused: dropped, captured again
    assert len(fake_graphs) == 6


def test_a_token_order_edited_in_place_is_another_graph(fake_graphs):
    q, k, v = _qkv(seed=5)
    perm = PERM_A.clone()
    graph, eager = _both(q, k, v, token_perm=perm)
    perm.copy_(PERM_B)  # new version counter: a new plan, so a new graph
    graph2, eager2 = _both(q, k, v, token_perm=perm)
    assert len(fake_graphs) == 2
    assert torch.equal(graph, eager) and torch.equal(graph2, eager2) and not torch.equal(eager, eager2)


def test_equal_range_masks_share_one_graph(fake_graphs):
    """Ranges given as bool tensors are keyed by their values: a new tensor of the same values
    replays the graph (before, every call with a tensor mask built a new plan, so it captured a new
    graph, with warm-up, on every call and cycled the cache)."""
    q, k, v = _qkv(seed=6)
    for _ in range(3):
        graph, eager = _both(q, k, v, sink_kv=torch.arange(72) < 20, dense_q=torch.arange(72) >= 60)
        assert torch.equal(graph, eager)
    assert len(fake_graphs) == 1


def test_calls_with_kv_valid_run_eagerly(fake_graphs):
    q, k, v = _qkv(seed=7)
    for valid in ([70], [40], torch.tensor([33]), torch.arange(72)[None] % 3 > 0):
        graph, eager = _both(q, k, v, kv_valid=valid)
        assert torch.equal(graph, eager)
    assert not fake_graphs


def test_expanded_inputs(fake_graphs):
    """Keys and values shared by the heads through a stride of 0 (grouped-query attention): the
    graph's buffers are dense copies (a buffer of the caller's strides cannot be written)."""
    q = _qkv(seed=8)[0]
    _, k1, v1 = rand_qkv(1, 1, 72, 16, seed=9)
    k, v = k1.expand(SHAPE), v1.expand(SHAPE)
    graph, eager = _both(q, k, v)
    assert torch.equal(graph, eager) and len(fake_graphs) == 1


def test_capture_in_inference_mode_replay_outside(fake_graphs):
    """ComfyUI samples under torch.inference_mode(): a graph captured there holds inference tensors,
    which a later call of the same shapes outside it must still be able to fill."""
    q, k, v = _qkv(seed=10)
    with torch.inference_mode():
        inside = pisa_attention(q, k, v, backend="reference", cuda_graph=True)
    graph, eager = _both(q, k, v)
    assert len(fake_graphs) == 1
    assert not graph.is_inference()
    assert torch.equal(graph, eager) and torch.equal(inside, eager)


def test_capture_routing_observes_eager_calls(fake_graphs):
    """Where calls would be graphed, capture_routing still sees one routing per call (issue 18: a
    graph routes twice when captured, never when replayed) and captures no graph (one made with a
    replayed selection would be replayed by later calls)."""
    q, k, v = _qkv(seed=11)
    for _ in range(2):
        with capture_routing() as log:
            pisa_attention(q, k, v, backend="reference", sparsity=0.5)
        selection_of(log)
    assert not fake_graphs
    pisa_attention(q, k, v, backend="reference", sparsity=0.5)
    assert len(fake_graphs) == 1  # the fixture's graph path is back after the block
