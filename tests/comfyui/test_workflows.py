"""The shipped workflows: well-formed, only known nodes, and UI format in sync with API format."""

from __future__ import annotations

import pytest

from .workflow_tools import (
    CORE_NODES,
    api_problems,
    load,
    pack_node_ids,
    ui_problems,
    ui_to_api,
    workflow_pairs,
)

PAIRS = workflow_pairs()
IDS = [api.name for _, api in PAIRS]


def test_every_node_of_the_pack_has_a_workflow():
    used = {n["class_type"] for _, api in PAIRS for n in load(api).values()}
    assert pack_node_ids() <= used, pack_node_ids() - used
    assert len(pack_node_ids()) == 7


@pytest.mark.parametrize("ui_path,api_path", PAIRS, ids=IDS)
def test_workflow_is_well_formed(ui_path, api_path):
    assert ui_path.is_file(), f"{ui_path.name} is missing: run tests/browser/export_workflows.py"
    api, ui = load(api_path), load(ui_path)
    assert api_problems(api, pack_node_ids() | CORE_NODES) == []
    assert ui_problems(ui) == []
    assert sorted(str(n["id"]) for n in ui["nodes"]) == sorted(api)
    assert {str(n["id"]): n["type"] for n in ui["nodes"]} == {
        k: v["class_type"] for k, v in api.items()}


@pytest.mark.parametrize("ui_path,api_path", PAIRS, ids=IDS)
def test_ui_and_api_formats_agree(server, ui_path, api_path):
    """Same nodes, class types, links and widget values (widget order from /object_info)."""
    assert ui_to_api(load(ui_path), server.object_info()) == load(api_path)
