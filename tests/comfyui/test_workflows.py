"""The shipped workflows: well-formed, only known nodes, and UI format in sync with API format."""

from __future__ import annotations

import pytest

from .workflow_tools import (
    CORE_NODES,
    REPO,
    TEMPLATE_FOLDERS,
    WORKFLOWS,
    api_problems,
    graph_nodes,
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
    assert sorted(str(n["id"]) for n in graph_nodes(ui)) == sorted(api)
    assert {str(n["id"]): n["type"] for n in graph_nodes(ui)} == {
        k: v["class_type"] for k, v in api.items()}


def test_only_ui_workflows_are_listed_as_templates():
    """ComfyUI lists every .json of these folders in the Templates browser: an API-format file
    there is a template that fails to open ("does not contain a valid version")."""
    listed = [p for name in TEMPLATE_FOLDERS for p in (REPO / name).glob("*.json")]
    assert listed and all(not p.name.endswith("_api.json") for p in listed), listed
    assert all("version" in load(p) and "nodes" in load(p) for p in listed)


@pytest.mark.parametrize("ui_path,api_path", PAIRS, ids=IDS)
def test_every_template_has_a_thumbnail_and_a_note(ui_path, api_path):
    """The frontend shows <name>.jpg beside the template (custom-node templates are jpg)."""
    from PIL import Image

    with Image.open(ui_path.with_suffix(".jpg")) as im:
        assert im.format == "JPEG" and 200 <= im.width <= 1024 and im.height >= 100
    notes = [n for n in load(ui_path)["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1 and "GPU" in notes[0]["widgets_values"][0]


def test_shipped_train_settings_are_the_presets_and_cpu_sized(server):
    """What the Train widgets show is what trains: the method numbers equal the chosen
    preset's (the node's own table, as the frontend gets it), and the CPU sizes are small."""
    table = server.object_info()["LoRA2_TrainAdaptiveLoRA"]["input"]["required"]["preset"][1][
        "lora2_presets"]
    api = load(WORKFLOWS.parent / "workflows_api" / "lora2_train_and_apply_api.json")
    train = next(n["inputs"] for n in api.values()
                 if n["class_type"] == "LoRA2_TrainAdaptiveLoRA")
    assert {k: train[k] for k in table[train["preset"]]} == table[train["preset"]]
    subject = next(n["inputs"] for n in api.values()
                   if n["class_type"] == "LoRA2_LoadSubjectImages")
    assert train["steps"] <= 50 and train["preview_every"] == 0 and subject["resolution"] <= 256


@pytest.mark.parametrize("ui_path,api_path", PAIRS, ids=IDS)
def test_ui_and_api_formats_agree(server, ui_path, api_path):
    """Same nodes, class types, links and widget values (widget order from /object_info)."""
    assert ui_to_api(load(ui_path), server.object_info()) == load(api_path)
