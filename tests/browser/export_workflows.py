"""Regenerate the UI-format workflows in ``workflows/`` from their API-format twins.

The real ComfyUI frontend does the conversion (``app.loadApiJson`` → ``graph.arrange`` →
``graph.serialize``), so the files are exactly what a user's "Save" would write. Seeds are set
to "fixed" so a loaded workflow reproduces the API twin. Run after editing an ``*_api.json``:

    COMFYUI_PATH=... COMFYUI_PYTHON=... python tests/browser/export_workflows.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.browser.frontend import open_frontend  # noqa: E402
from tests.comfyui.harness import start_server  # noqa: E402

TO_UI = """async ([api, name]) => {
    await window.app.loadApiJson(api, name);
    const graph = window.app.graph;
    for (const node of graph._nodes) {
        for (const w of node.widgets ?? []) {
            if (w.name === "control_after_generate") w.value = "fixed";
        }
    }
    graph.arrange(60);
    // The rank report grows when it shows its table and map: give it free space.
    const find = (type) => graph._nodes.find((n) => n.type === type);
    const report = find("LoRA2_RankReport"), sampler = find("KSampler");
    if (report && sampler) report.pos = [sampler.pos[0], sampler.pos[1] + sampler.size[1] + 80];
    if (report) report.size = [560, 560];
    graph.setDirtyCanvas(true, true);
    return JSON.parse(JSON.stringify(graph.serialize()));  // drop undefined, as Save does
}"""


def export_all(server) -> list[Path]:
    written = []
    with open_frontend(server) as page:
        for api_path in sorted((REPO / "workflows").glob("*_api.json")):
            api = json.loads(api_path.read_text())
            ui_path = api_path.with_name(api_path.name.replace("_api.json", ".json"))
            ui = page.evaluate(TO_UI, [api, ui_path.name])
            ui_path.write_text(json.dumps(ui, indent=1) + "\n")
            written.append(ui_path)
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
