"""Regenerate the UI-format templates in ``workflows/`` from the API workflows in
``workflows_api/``, each with a Note for the reader and a thumbnail ``<name>.jpg``.

The real ComfyUI frontend does the conversion (``app.loadApiJson`` → ``graph.arrange`` →
``graph.serialize``), so the files are exactly what a user's "Save" would write. Seeds are set
to "fixed" so a loaded workflow reproduces the API twin. The thumbnail is the graph as the
frontend draws it (the Templates browser shows ``<name>.jpg`` beside ``<name>.json``). Run
after editing a ``workflows_api/*_api.json``:

    COMFYUI_PATH=... COMFYUI_PYTHON=... python tests/browser/export_workflows.py
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.browser.frontend import open_frontend  # noqa: E402
from tests.comfyui.harness import start_server  # noqa: E402

NOTES = {
    "lora2_train_and_apply": (
        "LoRA² — train a LoRA whose every component learns its own rank.\n\n"
        "Put 5-20 photos of one subject in ComfyUI/input/subject (a name.txt beside name.jpg "
        "replaces that photo's caption), pick your checkpoint, press Queue.\n\n"
        "As shipped this runs on a CPU in minutes: 256 px photos, 30 steps, no previews, a "
        "256 px test image. It only shows the pipeline: the LoRA will be weak.\n\n"
        "GPU settings for a real LoRA:\n"
        "  SD1.5: resolution 512, steps 500-800, preview_every 100; test image 512 x 512, "
        "sampler 25 steps\n"
        "  SDXL: resolution 1024, steps 800-1500, preview_every 100; test image 1024 x 1024; "
        "gradient_checkpointing on below 16 GB (advanced inputs)\n\n"
        "The preset sets the method's numbers (shown in the widgets). Rank Report draws each "
        "component's learned rank."),
    "lora2_expand_for_merge": (
        "Expand for Merge pads every module to one rank (same effect) for tools that need one "
        "rank, e.g. a fixed-rank trainer resuming from the file.\n\n"
        "Not for merging: PEFT 'linear' and sd-scripts' merge without --concat sum the "
        "factors and give the wrong result (about 100% error) even on padded files; PEFT "
        "'cat'/'svd' and sd-scripts --concat need no padding. For an exact weighted sum use "
        "Merge LoRAs to Size.\n\nNo GPU needed: this runs in seconds on a CPU."),
    "lora2_compress_and_merge": (
        "Compress LoRA to Size shrinks any LoRA to a file size, spending the bytes where they "
        "remove the most error across the whole file. Merge LoRAs to Size merges 2-8 LoRAs "
        "(linear = exact weighted sum, TIES, DARE) into one file of a given size.\n\n"
        "Choose your own LoRA files in lora_name / lora_1, lora_2. No GPU needed: a few "
        "seconds to a minute on a CPU for SD/SDXL-sized LoRAs."),
}

TO_UI = """async ([api, name, note]) => {
    window.app.graph.clear();  // loadApiJson keeps frontend-only nodes (notes) of the last one
    await window.app.loadApiJson(api, name);
    const graph = window.app.graph;
    for (const node of graph._nodes) {
        for (const w of node.widgets ?? []) {
            if (w.name === "control_after_generate") w.value = "fixed";
        }
    }
    // room for the text the LoRA² nodes show after a run (web/lora2.js widens them to it)
    for (const node of graph._nodes) {
        if (node.type.startsWith("LoRA2_")) node.size[0] = Math.max(node.size[0], 440);
    }
    graph.arrange(60);
    // The rank report grows when it shows its table and map: give it free space.
    const find = (type) => graph._nodes.find((n) => n.type === type);
    const report = find("LoRA2_RankReport"), sampler = find("KSampler");
    if (report && sampler) report.pos = [sampler.pos[0], sampler.pos[1] + sampler.size[1] + 80];
    if (report) report.size = [560, 560];
    const text = window.LiteGraph.createNode("Note");
    text.widgets[0].value = note;
    graph.add(text);
    const left = Math.min(...graph._nodes.filter((n) => n !== text).map((n) => n.pos[0]));
    const top = Math.min(...graph._nodes.filter((n) => n !== text).map((n) => n.pos[1]));
    text.size = [420, 330];
    text.pos = [left, top - text.size[1] - 60];
    graph.setDirtyCanvas(true, true);
    return JSON.parse(JSON.stringify(graph.serialize()));  // drop undefined, as Save does
}"""

FIT = """() => {
    const canvas = window.app.canvas, nodes = window.app.graph._nodes;
    const x0 = Math.min(...nodes.map((n) => n.pos[0])) - 30;
    const y0 = Math.min(...nodes.map((n) => n.pos[1])) - 60;
    const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0])) + 30;
    const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1])) + 30;
    const box = canvas.canvas.getBoundingClientRect();
    const w = box.width - 40, h = box.height - 260;  // above the minimap and the toolbar
    // at least 0.65: below LiteGraph's low-quality zoom it draws nodes without text
    const scale = Math.max(0.65, Math.min(1, w / (x1 - x0), h / (y1 - y0)));
    canvas.ds.scale = scale;
    canvas.ds.offset = [-x0 + 20 / scale, -y0 + 20 / scale];
    canvas.setDirty(true, true);
    return {x: box.x + 20, y: box.y + 20, width: Math.min((x1 - x0) * scale, w),
            height: Math.min((y1 - y0) * scale, h)};
}"""


def thumbnail(page, path: Path) -> None:
    """The graph as drawn, fitted to the canvas, as a 512 px wide JPEG."""
    from PIL import Image

    clip = page.evaluate(FIT)
    page.wait_for_timeout(500)
    png = page.screenshot(clip=clip)
    with Image.open(io.BytesIO(png)) as im:
        im = im.convert("RGB")
        im.thumbnail((512, 512))
        im.save(path, "JPEG", quality=85)


def export_all(server) -> list[Path]:
    written = []
    with open_frontend(server, viewport=(3000, 2200)) as page:
        for api_path in sorted((REPO / "workflows_api").glob("*_api.json")):
            api = json.loads(api_path.read_text())
            stem = api_path.name.removesuffix("_api.json")
            ui_path = REPO / "workflows" / f"{stem}.json"
            ui = page.evaluate(TO_UI, [api, ui_path.name, NOTES[stem]])
            ui_path.write_text(json.dumps(ui, indent=1) + "\n")
            thumbnail(page, ui_path.with_suffix(".jpg"))
            written += [ui_path, ui_path.with_suffix(".jpg")]
    return written


def main() -> None:
    server = start_server(Path(tempfile.mkdtemp(prefix="lora2-export-")))
    try:
        for path in export_all(server):
            print("wrote", path.relative_to(REPO))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
