"""The pack in the real ComfyUI frontend (headless Chromium): nodes can be added, the shipped
workflows load with no missing node, and a run from the UI shows the rank table in the node.

Screenshots go to ``test-artifacts/`` (gitignored) for a human to look at.
"""

from __future__ import annotations

import json
import re

from tests.comfyui.harness import REPO
from tests.comfyui.workflow_tools import load, pack_node_ids, workflow_pairs

from .frontend import open_frontend

ARTIFACTS = REPO / "test-artifacts"
# Missing *nodes* or an invalid file fail the test; "missing models" does not (the shipped
# workflow names the user's own checkpoint, which no test machine has).
PROBLEM = re.compile(r"(?is)(missing|not found|were not found).{0,60}node|node.{0,60}"
                     r"(missing|not found)|invalid workflow")

ADD_NODES = """(ids) => {
    const out = {};
    for (const id of ids) {
        const node = window.LiteGraph.createNode(id);
        if (!node) { out[id] = null; continue; }
        window.app.graph.add(node);
        out[id] = {title: node.title, widgets: (node.widgets ?? []).map(w => w.name),
                   inputs: (node.inputs ?? []).map(i => i.type),
                   outputs: (node.outputs ?? []).map(o => o.type),
                   category: node.constructor.category ?? node.category ?? null};
    }
    return out;
}"""

LOAD = """async (wf) => {
    await window.app.loadGraphData(wf);
    const g = window.app.graph;
    return {nodes: g._nodes.length,
            unknown: g._nodes.filter(n => !window.LiteGraph.registered_node_types[n.type])
                             .map(n => n.type),
            extension: window.app.extensions.some(e => e.name === "LoRA2.ShowText")};
}"""


def _problems(page) -> list[str]:
    """Dialogs, alerts and toasts that complain (missing nodes, invalid workflow)."""
    texts = page.locator(".p-dialog, .p-toast-message, .comfy-modal, [role=alert]")
    return [t for t in texts.all_inner_texts() if PROBLEM.search(t)]


def test_nodes_can_be_added_from_the_library(ui_server):
    ARTIFACTS.mkdir(exist_ok=True)
    with open_frontend(ui_server) as page:
        added = page.evaluate(ADD_NODES, sorted(pack_node_ids()))
        assert all(added.values()), added
        train = added["LoRA2_TrainAdaptiveLoRA"]
        assert {"preset", "steps", "filename", "seed"} <= set(train["widgets"])
        assert train["outputs"] == ["ADAPTIVE_LORA", "IMAGE", "IMAGE"]
        assert "SUBJECT" in train["inputs"]
        page.evaluate("() => window.app.graph.arrange()")
        page.screenshot(path=str(ARTIFACTS / "lora2_nodes.png"))


def test_shipped_workflows_load_without_missing_nodes(ui_server):
    ARTIFACTS.mkdir(exist_ok=True)
    with open_frontend(ui_server) as page:
        for ui_path, _ in workflow_pairs():
            result = page.evaluate(LOAD, load(ui_path))
            page.wait_for_timeout(500)
            assert result["unknown"] == [] and result["extension"], result
            assert result["nodes"] == len(load(ui_path)["nodes"])
            assert _problems(page) == []
            page.screenshot(path=str(ARTIFACTS / ui_path.with_suffix(".png").name))


RUN = """async ([wf, ckpt]) => {
    await window.app.loadGraphData(wf);
    for (const node of window.app.graph._nodes) {
        const set = (name, value) => {
            const w = node.widgets?.find(w => w.name === name);
            if (w) w.value = value;
        };
        if (node.type === "CheckpointLoaderSimple") set("ckpt_name", ckpt);
        if (node.type === "LoRA2_LoadSubjectImages") set("resolution", 64);
        if (node.type === "LoRA2_TrainAdaptiveLoRA") {
            set("steps", 3); set("preview_every", 0); set("filename", "lora2/from_ui");
        }
        if (node.type === "EmptyLatentImage") { set("width", 64); set("height", 64); }
        if (node.type === "KSampler") set("steps", 1);
    }
    await window.app.queuePrompt(0, 1);
}"""

SHOW_REPORT = """() => {
    const canvas = window.app.canvas, node = window.app.graph._nodes.find(
        n => n.type === "LoRA2_RankReport");
    canvas.ds.scale = 0.75;
    canvas.ds.offset = [-node.pos[0] + 700, -node.pos[1] + 120];
    canvas.setDirty(true, true);
}"""

REPORT_TEXT = """() => {
    const node = window.app.graph._nodes.find(n => n.type === "LoRA2_RankReport");
    const w = node?.widgets?.find(w => w.name === "lora2_info");
    return w ? w.value : null;
}"""


def test_a_run_from_the_ui_shows_the_rank_table(ui_server):
    ARTIFACTS.mkdir(exist_ok=True)
    wf = load(REPO / "workflows" / "lora2_train_and_apply.json")
    with open_frontend(ui_server) as page:
        page.evaluate(RUN, [json.loads(json.dumps(wf)), "tiny_sd15.safetensors"])
        page.wait_for_function(REPORT_TEXT, timeout=240_000)
        text = page.evaluate(REPORT_TEXT)
        assert "total: 32 components" in text
        page.wait_for_timeout(1000)
        page.evaluate(SHOW_REPORT)
        page.wait_for_timeout(500)
        page.screenshot(path=str(ARTIFACTS / "lora2_after_run.png"))
    assert (ui_server.base / "models" / "loras" / "lora2" / "from_ui.safetensors").is_file()
