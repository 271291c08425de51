"""The PISAPatch node's public contract (docs/architecture.md) and its input validation.

Saved workflows store widget values by position, so names, order, types and defaults are fixed.
"""

import pytest

CONTRACT = [  # (name, type or combo, default)
    ("sparsity", "FLOAT", 0.875),
    ("block_size", ["64", "128"], "64"),
    ("taylor_order", ["1", "0", "drop"], "1"),
    ("dense_steps", "INT", 10),
    ("dense_blocks", "STRING", "0"),
    ("min_tokens", "INT", 8192),
    ("token_order", ["auto", "raster"], "auto"),
    ("routing", ["auto", "topk", "covariance", "adaptive"], "auto"),
    ("verbose", "BOOLEAN", False),
]


def test_pack_exports_what_comfyui_loads(pack):
    # PISACapture: tests/lab/test_capture.py; PISARaylightPatch: tests/comfy/test_raylight.py
    assert set(pack.NODE_CLASS_MAPPINGS) == {"PISAPatch", "PISACapture", "PISARaylightPatch"}
    assert pack.NODE_DISPLAY_NAME_MAPPINGS == {"PISAPatch": "PISA Patch", "PISACapture": "PISA Capture (Q/K/V)",
                                               "PISARaylightPatch": "PISA Patch (Raylight)"}
    assert pack.WEB_DIRECTORY == "./web"
    node = pack.NODE_CLASS_MAPPINGS["PISAPatch"]
    assert node.CATEGORY == "model/patch"
    assert node.RETURN_TYPES == ("MODEL",)
    assert callable(getattr(node(), node.FUNCTION))


def test_widgets_match_the_contract(pack):
    inputs = pack.NODE_CLASS_MAPPINGS["PISAPatch"].INPUT_TYPES()
    required = inputs["required"]
    assert list(required) == ["model"] + [name for name, _, _ in CONTRACT]
    assert required["model"][0] == "MODEL"
    for name, kind, default in CONTRACT:
        spec_type, options = required[name]
        assert spec_type == kind, name
        assert options["default"] == default, name
        assert len(options.get("tooltip", "")) > 60, f"{name} needs a tooltip that explains the trade-off"
    assert (required["sparsity"][1]["min"], required["sparsity"][1]["max"], required["sparsity"][1]["step"]) == \
        (0.0, 0.99, 0.005)
    assert (required["dense_steps"][1]["min"], required["dense_steps"][1]["max"]) == (0, 10000)
    assert (required["min_tokens"][1]["min"], required["min_tokens"][1]["max"],
            required["min_tokens"][1]["step"]) == (0, 1000000, 256)
    assert inputs["hidden"] == {"unique_id": "UNIQUE_ID"}


def test_dense_blocks_parsing(pack):
    parse = pack.pisa_comfy.parse_dense_blocks
    assert parse("0, 1, 38-39") == {0, 1, 38, 39}
    assert parse(" 3 ") == {3}
    assert parse("") == frozenset()
    assert parse("2-2,5") == {2, 5}


@pytest.mark.parametrize("overrides, message", [
    ({"dense_blocks": "0, first"}, "cannot read 'first'"),
    ({"dense_blocks": "9-3"}, "runs backwards"),
    ({"dense_blocks": "-1"}, "cannot read '-1'"),
    ({"sparsity": 1.0}, "sparsity must be a number in [0, 1)"),
    ({"block_size": "32"}, "block_size must be one of 64, 128"),
    ({"taylor_order": "2"}, "taylor_order must be one of"),
    ({"routing": "cov"}, "routing must be one of auto, topk, covariance"),
    ({"dense_steps": -1}, "dense_steps must be a whole number"),
])
def test_invalid_widget_values_raise_clear_errors(pack, node_widgets, overrides, message):
    node = pack.NODE_CLASS_MAPPINGS["PISAPatch"]()
    with pytest.raises(ValueError) as err:
        node.patch(object(), **node_widgets(**overrides))  # validated before the model is touched
    assert message in str(err.value)


def test_settings_speak_the_kernel_vocabulary(pack, node_widgets):
    settings = pack.pisa_comfy.PisaSettings.from_widgets(**node_widgets(
        taylor_order="drop", routing="covariance", token_order="raster", block_size="128"))
    assert settings.order == "drop" and settings.routing == "cov"
    assert settings.tile_tokens is False and settings.block_size == 128
    assert pack.pisa_comfy.PisaSettings.from_widgets(**node_widgets(taylor_order="0")).order == 0
