"""The pack in the real ComfyUI frontend (headless Chromium), as an artist meets it: nodes in
the library, every input and output explained, the Templates browser (UI templates only, with
thumbnails), the preset's numbers in the Train widgets, advanced inputs collapsed, and a run
of the shipped workflow that ends with the loss curve, a readable status and a readable rank
report.

Screenshots go to ``test-artifacts/`` (gitignored) for a human to look at.
"""

from __future__ import annotations

import json
import re

from tests.comfyui.harness import PACK_DIR_NAME, REPO
from tests.comfyui.workflow_tools import WORKFLOWS, load, pack_node_ids, workflow_pairs

from .frontend import open_frontend

ARTIFACTS = REPO / "test-artifacts"
# Missing *nodes* or an invalid file fail the test; "missing models" does not (the shipped
# workflow names the user's own checkpoint, which no test machine has).
PROBLEM = re.compile(r"(?is)(missing|not found|were not found).{0,60}node|node.{0,60}"
                     r"(missing|not found)|invalid workflow|valid version")
TRAIN = "LoRA2_TrainAdaptiveLoRA"

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


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name))


def test_nodes_can_be_added_from_the_library(ui_server):
    with open_frontend(ui_server) as page:
        added = page.evaluate(ADD_NODES, sorted(pack_node_ids()))
        assert all(added.values()), added
        train = added[TRAIN]
        assert {"preset", "steps", "filename", "seed", "learning_rate"} <= set(train["widgets"])
        assert train["outputs"] == ["ADAPTIVE_LORA", "IMAGE", "IMAGE"]
        assert "SUBJECT" in train["inputs"]
        page.evaluate("() => window.app.graph.arrange()")
        _shot(page, "lora2_nodes.png")


OBJECT_INFO = """async () => (await (await fetch("/object_info")).json())"""


def test_every_input_and_output_has_a_tooltip(ui_server):
    """What the frontend receives for each LoRA² node: a tooltip on every input, every output,
    and a description."""
    with open_frontend(ui_server) as page:
        info = page.evaluate(OBJECT_INFO)
    missing = []
    for node_id in sorted(pack_node_ids()):
        d = info[node_id]
        assert d["description"], node_id
        for group in ("required", "optional"):
            for name, spec in d["input"].get(group, {}).items():
                if not (len(spec) > 1 and spec[1].get("tooltip")):
                    missing.append(f"{node_id}.{name}")
        tips = d.get("output_tooltips") or []
        missing += [f"{node_id} output {n}" for n, t in
                    zip(d["output_name"], tips + [None] * len(d["output_name"])) if not t]
    assert missing == []


def test_shipped_workflows_load_without_missing_nodes(ui_server):
    with open_frontend(ui_server) as page:
        for ui_path, _ in workflow_pairs():
            result = page.evaluate(LOAD, load(ui_path))
            page.wait_for_timeout(500)
            assert result["unknown"] == [] and result["extension"], result
            assert result["nodes"] == len(load(ui_path)["nodes"])
            assert _problems(page) == []
            _shot(page, ui_path.with_suffix(".png").name)


TEMPLATES = """async (pack) => {
    const listed = await (await fetch("/workflow_templates")).json();
    const names = listed[pack] ?? [];
    const thumbs = {};
    for (const name of names) {
        const r = await fetch(`/api/workflow_templates/${pack}/${name}.jpg`);
        thumbs[name] = [r.status, r.headers.get("content-type")];
    }
    const wf = {};
    for (const name of names) {
        const r = await fetch(`/api/workflow_templates/${pack}/${name}.json`);
        wf[name] = "version" in (await r.json());
    }
    return {names, thumbs, wf};
}"""

SHOW_TEMPLATES = """async ([pack, count]) => {
    // waits by polling what is drawn, never by a guessed delay (a busy CPU is slow)
    const until = async (get, ms = 30000) => {
        for (const end = Date.now() + ms; Date.now() < end;
             await new Promise(r => setTimeout(r, 200))) {
            const got = get();
            if (got) return got;
        }
        return null;
    };
    const leaf = (text) => [...document.querySelectorAll("*")].find(
        e => e.children.length === 0 && e.textContent.trim().toLowerCase() === text);
    await window.app.extensionManager.command.execute("Comfy.BrowseTemplates");
    await until(() => leaf("all templates") || leaf("templates"));
    let tab = leaf(pack.toLowerCase());
    if (!tab) {  // newer frontends fold the custom-node categories under "Extensions"
        leaf("extensions")?.click();
        tab = await until(() => leaf(pack.toLowerCase()));
    }
    if (!tab) return {tab: false, images: []};
    tab.click();
    const drawn = () => [...document.querySelectorAll(".p-dialog img, [role=dialog] img")]
        .filter(img => img.complete && img.naturalWidth > 0);
    // 1.25 shows the thumbnails by URL, 1.45 as blobs: compare what is drawn, by size
    // (lazy placeholders are 100 px wide; the pack's thumbnails are at least 200)
    await until(() => drawn().length === count
                && drawn().every(img => img.naturalWidth !== 100) && drawn());
    return {tab: true, images: drawn().map(img => [img.naturalWidth, img.naturalHeight])};
}"""


def test_templates_browser_lists_only_ui_templates_with_thumbnails(ui_server):
    """The API twins live in workflows_api/, which ComfyUI does not list; every template has
    a <name>.jpg the browser shows (an API file there used to alert "does not contain a valid
    version")."""
    with open_frontend(ui_server) as page:
        got = page.evaluate(TEMPLATES, PACK_DIR_NAME)
        assert sorted(got["names"]) == sorted(p.stem for p in WORKFLOWS.glob("*.json"))
        assert all(not n.endswith("_api") for n in got["names"])
        assert all(v == [200, "image/jpeg"] for v in got["thumbs"].values()), got["thumbs"]
        assert all(got["wf"].values())
        shown = page.evaluate(SHOW_TEMPLATES, [PACK_DIR_NAME, len(got["names"])])
        _shot(page, "lora2_templates_browser.png")
        assert _problems(page) == []
        assert shown["tab"], f"no '{PACK_DIR_NAME}' category in the Templates browser"
        shown = shown["images"]
    from PIL import Image

    sizes = []
    for name in got["names"]:
        with Image.open(WORKFLOWS / f"{name}.jpg") as im:
            sizes.append(list(im.size))
    assert sorted(shown) == sorted(sizes), shown


TRAIN_WIDGETS = """(type) => {
    window.app.graph.clear();
    const node = window.LiteGraph.createNode(type);
    window.app.graph.add(node);
    const values = () => Object.fromEntries(node.widgets.map(w => [w.name, w.value]));
    const before = values();
    const preset = node.widgets.find(w => w.name === "preset");
    preset.value = "paper";
    preset.callback?.(preset.value, window.app.canvas, node);
    const after = values();
    const advanced = node.widgets.filter(w => w.advanced || w.options?.advanced)
                                 .map(w => w.name);
    node.pos = [100, 100];
    window.app.canvas.ds.scale = 1; window.app.canvas.ds.offset = [0, 0];
    window.app.graph.setDirtyCanvas(true, true);
    return {before, after, advanced};
}"""


def test_train_widgets_show_the_preset_values(ui_server):
    """No 0 / -1 'use the preset' values: the widgets show the preset's numbers, and choosing
    another preset sets them; the rarely changed inputs carry the frontend's advanced flag."""
    with open_frontend(ui_server) as page:
        table = page.evaluate(OBJECT_INFO)[TRAIN]["input"]["required"]["preset"][1][
            "lora2_presets"]
        got = page.evaluate(TRAIN_WIDGETS, TRAIN)
        page.wait_for_timeout(300)
        _shot(page, "lora2_train_node.png")
    for name, value in table["spread"].items():
        assert got["before"][name] == value, name
    for name, value in table["paper"].items():
        assert got["after"][name] == value, name
    assert table["spread"] != table["paper"]
    assert {"r_target", "lambda_r", "r_max", "resume", "targets"} <= set(got["advanced"])
    assert not {"preset", "steps", "learning_rate", "seed", "filename"} & set(got["advanced"])


VUE_NODE = """async ([type, on]) => {
    const settings = window.app.extensionManager.setting;
    if (typeof window.LiteGraph.LGraphNode.prototype.hasAdvancedWidgets !== "function")
        return null;  // a frontend without advanced inputs (ComfyUI 0.3.54's 1.25)
    await settings.set("Comfy.VueNodes.Enabled", on);
    window.app.graph.clear();
    if (!on) return null;
    const node = window.LiteGraph.createNode(type);
    node.pos = [100, 100];
    window.app.graph.add(node);
    await new Promise(r => setTimeout(r, 1500));
    const el = document.querySelector(`[data-node-id="${node.id}"]`);
    return el ? el.innerText.split("\\n").map(t => t.trim()).filter(Boolean) : [];
}"""


def test_advanced_inputs_are_collapsed(ui_server):
    """In the frontend's node view that collapses advanced inputs (Nodes 2.0, frontend 1.45:
    ComfyUI 0.28.0) Train shows its basic widgets and a "Show advanced inputs" button; the
    classic canvas, and 0.3.54's frontend, show every widget (the flag is still sent)."""
    with open_frontend(ui_server) as page:
        try:
            shown = page.evaluate(VUE_NODE, [TRAIN, True])
            page.wait_for_timeout(300)
            _shot(page, "lora2_train_node_collapsed.png")
        finally:
            page.evaluate(VUE_NODE, [TRAIN, False])  # the setting is stored on the server
    if shown is None:
        return  # nothing to collapse with: test_train_widgets_show_the_preset_values checks
        # that the flag is there for frontends that have the feature
    assert "Show advanced inputs" in shown, shown
    for name in ("preset", "steps", "seed", "filename", "learning_rate", "preview_every"):
        assert name in shown, name
    for name in ("r_target", "lambda_r", "r_max", "resume", "targets", "batch_size"):
        assert name not in shown, name


KEEP_LOADED = """async (wf) => {
    await window.app.loadGraphData(wf);
    const node = window.app.graph._nodes.find(n => n.type === "LoRA2_TrainAdaptiveLoRA");
    return Object.fromEntries(node.widgets.map(w => [w.name, w.value]));
}"""


def test_a_loaded_workflow_keeps_its_own_numbers(ui_server):
    """The preset only sets the numbers when the user picks it, never when a file loads."""
    wf = load(WORKFLOWS / "lora2_train_and_apply.json")
    train = next(n for n in wf["nodes"] if n["type"] == TRAIN)
    values = train["widgets_values"]
    i = values.index("spread")
    values[i] = "paper"
    lr_at = next(k for k, v in enumerate(values) if v == 0.0001)  # spread's learning rate
    values[lr_at] = 0.0007
    with open_frontend(ui_server) as page:
        got = page.evaluate(KEEP_LOADED, json.loads(json.dumps(wf)))
    assert got["preset"] == "paper" and got["learning_rate"] == 0.0007


RUN = """async ([wf, ckpt]) => {
    await window.app.loadGraphData(wf);
    for (const node of window.app.graph._nodes) {
        const set = (name, value) => {
            const w = node.widgets?.find(w => w.name === name);
            if (w) w.value = value;
        };
        if (node.type === "CheckpointLoaderSimple") set("ckpt_name", ckpt);
        if (node.type === "LoRA2_TrainAdaptiveLoRA") {
            set("filename", "lora2/from_ui"); set("preview_every", 10);
        }
    }
    await window.app.queuePrompt(0, 1);
}"""

DONE = """() => {
    const save = window.app.graph._nodes.find(n => n.type === "SaveImage");
    return !!(save && window.app.nodeOutputs?.[String(save.id)]?.images?.length);
}"""

NODE_TEXT = """(type) => {
    const node = window.app.graph._nodes.find(n => n.type === type);
    const w = node?.widgets?.find(w => w.name === "lora2_info");
    return w ? w.value : null;
}"""

SHOWN = """async (type) => {
    const node = window.app.graph._nodes.find(n => n.type === type);
    const box = node.widgets.find(w => w.name === "lora2_info").inputEl;
    const canvas = window.app.canvas;
    canvas.ds.scale = 0.8;
    canvas.ds.offset = [-node.pos[0] + 500, -node.pos[1] + 80];
    canvas.setDirty(true, true);
    canvas.draw(true, true);  // now: DOM widgets follow the canvas on a draw
    // what the node draws: its last preview, else its output image (1.25 loads those lazily)
    let img = node.imgs?.[node.imgs.length - 1];
    const out = window.app.nodeOutputs?.[String(node.id)]?.images?.[0];
    if (!img && out) {
        img = new Image();
        img.src = `/view?filename=${encodeURIComponent(out.filename)}&type=${out.type}` +
                  `&subfolder=${encodeURIComponent(out.subfolder)}`;
        await img.decode();
    }
    return {lines: box.value.split("\\n"), first: box.value.split("\\n")[0],
            height: [box.clientHeight, box.scrollHeight], width: [box.clientWidth,
            box.scrollWidth], image: img ? [img.naturalWidth, img.naturalHeight] : null,
            node: [node.size[0], node.size[1]]};
}"""


def test_a_run_of_the_shipped_workflow_ends_readable(ui_server):
    """The shipped train workflow as a user runs it (only the checkpoint is the tiny test one,
    previews on): it finishes in minutes on a CPU; Train ends showing its loss curve (not the
    last preview) and its whole status; Rank Report shows its summary line first, in view."""
    wf = load(WORKFLOWS / "lora2_train_and_apply.json")
    with open_frontend(ui_server) as page:
        page.evaluate(RUN, [json.loads(json.dumps(wf)), "tiny_sd15.safetensors"])
        page.wait_for_function(NODE_TEXT, arg="LoRA2_RankReport", timeout=600_000)
        page.wait_for_function(DONE, timeout=600_000)  # the whole graph, sampling included
        page.wait_for_timeout(1500)
        train = page.evaluate(SHOWN, TRAIN)
        page.wait_for_timeout(500)
        _shot(page, "lora2_after_run_train.png")
        report = page.evaluate(SHOWN, "LoRA2_RankReport")
        page.wait_for_timeout(500)
        _shot(page, "lora2_after_run_report.png")
    steps = next(n["inputs"]["steps"] for n in load(
        WORKFLOWS.parent / "workflows_api" / "lora2_train_and_apply_api.json").values()
        if n["class_type"] == TRAIN)
    assert train["first"] == "saved models/loras/lora2/from_ui.safetensors"
    assert len(train["lines"]) == 4 and train["lines"][-1].startswith("preset spread")
    assert train["lines"][2].startswith(f"{steps} steps")  # the shipped, CPU-sized count
    assert train["height"][1] <= train["height"][0] + 1  # every line visible
    assert train["width"][1] <= train["width"][0] + 1  # no line cut off
    w, h = train["image"]  # the loss curve (a 6 x 3.5 in figure, sent at <= 512 px wide)
    assert w >= 400 and abs(w / h - 600 / 350) < 0.02, train["image"]  # not a square preview
    assert report["first"].startswith("total: 32 components")
    assert report["image"] and report["image"][0] <= 1400 and report["image"][1] <= 2000
    assert (ui_server.base / "models" / "loras" / "lora2" / "from_ui.safetensors").is_file()
