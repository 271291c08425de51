"""The PISA Capture node: its widgets, and full sampling of tiny models with it after PISA Patch
(files written where ComfyUI's output folder is, outputs unchanged, PISA unaffected)."""

import pytest
import torch

from pisa_kernels.capture_format import read_capture

CONTRACT = [("filename_prefix", "STRING", "pisa_capture"), ("blocks", "STRING", "0, 10, 20"),
            ("steps", "STRING", "10, 30"), ("max_calls", "INT", 6)]
EVERYTHING_SPARSE = dict(dense_steps=0, dense_blocks="", min_tokens=0)


def test_widgets_and_registration(pack):
    node = pack.NODE_CLASS_MAPPINGS["PISACapture"]
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["PISACapture"] == "PISA Capture (Q/K/V)"
    assert (node.CATEGORY, node.RETURN_TYPES, node.FUNCTION) == ("model/patch", ("MODEL",), "capture")
    required = node.INPUT_TYPES()["required"]
    assert list(required) == ["model"] + [name for name, _, _ in CONTRACT]
    for name, kind, default in CONTRACT:
        assert required[name][0] == kind and required[name][1]["default"] == default, name
        assert len(required[name][1]["tooltip"]) > 40, name


@pytest.fixture
def capture(pack, comfy, tmp_path, monkeypatch):
    """``capture(model, **widgets)`` through the node, with ComfyUI's output folder in tmp_path."""
    import folder_paths

    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    node = pack.NODE_CLASS_MAPPINGS["PISACapture"]()

    def run(model, **widgets):
        values = dict(filename_prefix="t", blocks="", steps="", max_calls=6)
        values.update(widgets)
        (patched,) = node.capture(model, unique_id="9", **values)
        return patched

    run.folder = tmp_path / "pisa_captures"
    return run


@pytest.mark.parametrize("family", ["wan", "hunyuan_video"])
def test_capture_after_pisa_records_real_calls(tiny, sample, patch, capture, family):
    tm = tiny(family)
    patched, state = patch(tm.patcher, sparsity=0.5, **EVERYTHING_SPARSE)
    reference = sample(tm, patched)
    recording = capture(patched, blocks="1", steps="2", max_calls=4)
    out = sample(tm, recording)
    torch.testing.assert_close(out, reference, atol=0, rtol=0)  # recording changes nothing
    assert state.last_summary["calls"] >= 3 * tm.blocks  # PISA's override below saw every call
    files = sorted(capture.folder.iterdir())
    assert files and all(f.name.startswith("t_") and f.name.endswith("_block1_step2.safetensors") for f in files)
    cap = read_capture(str(files[0]))
    b, n, h, _ = cap.q.shape
    assert n == tm.main_tokens and cap.meta["block"] == 1 and cap.meta["step"] == 2
    assert cap.meta["family"] == family and cap.meta["heads"] == h == 2
    grids = cap.meta["grids"]
    assert len(grids) == 1 and grids[0][1] == [3, 4, 6]
    assert sorted(cap.token_perm.tolist()) == list(range(n))
    if family == "hunyuan_video":  # 7 text tokens, 2 of them padding: kept exact, mask recorded
        assert cap.meta["text_tokens"] == 7 and cap.meta["exact"]
        assert cap.kv_valid is not None and int((~cap.kv_valid).sum()) == 2 * b
    assert not tm.patcher.model_options.get("transformer_options", {}).get("optimized_attention_override")


def test_bad_widgets_are_refused(capture, tiny):
    with pytest.raises(ValueError, match="leaves the pisa_captures folder"):
        capture(tiny("wan").patcher, filename_prefix="../outside")
    with pytest.raises(ValueError, match="steps: cannot read"):
        capture(tiny("wan").patcher, steps="two")
