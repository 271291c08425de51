"""Headless smoke test: ComfyUI's own ``main.py --cpu`` with only this pack loaded serves the node.

The server setup (free loopback port, in-memory database, the pack symlinked into a temporary
custom_nodes folder named by an extra-model-paths YAML, ``--disable-all-custom-nodes
--whitelist-custom-nodes``, the process group always killed) is shared with the packaging tests.
The server helper also puts the front-end packages of older checkouts on the server's PYTHONPATH.
"""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _server_module():
    spec = importlib.util.spec_from_file_location("pisa_tests_comfy_server",
                                                  REPO / "tests" / "packaging" / "comfy_server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_object_info_serves_the_node(comfy_checkout, tmp_path: Path):
    server = _server_module()
    with server.comfy_server(comfy_checkout, REPO, tmp_path) as url:
        status, info = server.http(url + "/object_info/PISAPatch")
    assert status == 200, info
    node = info["PISAPatch"]
    assert node["display_name"] == "PISA Patch" and node["category"] == "model/patch"
    assert list(node["input"]["required"]) == ["model", "sparsity", "block_size", "taylor_order", "dense_steps",
                                               "dense_blocks", "min_tokens", "token_order", "routing", "verbose"]
    assert node["output"] == ["MODEL"]
    assert node["input"]["hidden"] == {"unique_id": "UNIQUE_ID"}
