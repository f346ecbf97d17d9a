"""Read the shipped workflows: UI format in ``workflows/`` (the frontend's Templates browser
lists that folder), API format in ``workflows_api/`` (for ``POST /prompt``; kept out of any
folder ComfyUI lists as templates). UI format → API format, and checks.

The UI format stores widget values as a list in the order of the node's inputs in
``/object_info`` (required, then optional), plus the frontend's extra "control after generate"
value after seed-like INTs; links are ``[id, from_node, from_slot, to_node, to_slot, type]``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .harness import REPO

WORKFLOWS = REPO / "workflows"
WORKFLOWS_API = REPO / "workflows_api"
# Folders ComfyUI (app/custom_node_manager.py, 0.3.54 and 0.28.0) lists as templates
TEMPLATE_FOLDERS = ("example_workflows", "example", "examples", "workflow", "workflows")
VIRTUAL_NODES = {"Note", "MarkdownNote"}  # frontend-only: not in /object_info, not in the API
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
# Core ComfyUI nodes the shipped workflows may use (present in 0.3.54 and 0.28.0).
CORE_NODES = {"CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler",
              "VAEDecode", "VAEEncode", "SaveImage", "PreviewImage", "LoraLoader",
              "LoraLoaderModelOnly", "LoadImage", "UNETLoader", "CLIPLoader", "VAELoader"}


def pack_node_ids() -> set[str]:
    """The node ids our nodes declare (read from the source: no ComfyUI needed)."""
    ids = set()
    for path in (REPO / "nodes").glob("*.py"):
        ids.update(re.findall(r'node_id="([^"]+)"', path.read_text()))
    return ids


def workflow_pairs() -> list[tuple[Path, Path]]:
    """``(workflows/x.json, workflows_api/x_api.json)`` for every API workflow."""
    apis = sorted(WORKFLOWS_API.glob("*_api.json"))
    return [(WORKFLOWS / p.name.replace("_api.json", ".json"), p) for p in apis]


def graph_nodes(ui: dict) -> list[dict]:
    """The UI workflow's nodes that run (notes are only for the reader)."""
    return [n for n in ui["nodes"] if n["type"] not in VIRTUAL_NODES]


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def _is_widget(spec) -> bool:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    if opts.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _ordered_inputs(info: dict) -> list[tuple[str, list]]:
    out = []
    for group in ("required", "optional"):
        specs = info["input"].get(group, {})
        order = info.get("input_order", {}).get(group, list(specs))
        out += [(name, specs[name]) for name in order]
    return out


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """The API prompt a UI workflow stands for (what the frontend queues)."""
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in graph_nodes(ui):
        info = object_info[node["type"]]
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", [])
                  if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for name, spec in _ordered_inputs(info):
            if _is_widget(spec):
                value = values.pop(0) if values else None
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                seedlike = spec[0] == "INT" and (name in ("seed", "noise_seed")
                                                 or opts.get("control_after_generate"))
                if seedlike and values and values[0] in CONTROL_VALUES:
                    values.pop(0)
                if name not in linked:
                    inputs[name] = value
            if name in linked:
                link = linked[name]
                inputs[name] = [str(link[1]), link[2]]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def api_problems(api: dict, known: set[str]) -> list[str]:
    """Links that point nowhere and class types that do not exist."""
    bad = []
    for nid, node in api.items():
        if node["class_type"] not in known:
            bad.append(f"node {nid}: unknown class_type {node['class_type']}")
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                if len(value) != 2 or value[0] not in api or not isinstance(value[1], int):
                    bad.append(f"node {nid}.{name}: bad link {value}")
    return bad


def ui_problems(ui: dict) -> list[str]:
    """UI links table vs the nodes' own input/output link records."""
    bad = []
    nodes = {n["id"]: n for n in ui["nodes"]}
    for lid, src, src_slot, dst, dst_slot, _type in ui["links"]:
        if src not in nodes or dst not in nodes:
            bad.append(f"link {lid}: missing node")
            continue
        outs = nodes[src].get("outputs", [])
        if src_slot >= len(outs) or lid not in (outs[src_slot].get("links") or []):
            bad.append(f"link {lid}: not listed on node {src} output {src_slot}")
        ins = nodes[dst].get("inputs", [])
        if dst_slot >= len(ins) or ins[dst_slot].get("link") != lid:
            bad.append(f"link {lid}: not on node {dst} input {dst_slot}")
    return bad
