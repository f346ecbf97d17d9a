// LoRA² nodes in the ComfyUI frontend (tested with frontend 1.25 and 1.45; uses only
// app.registerExtension and node.addDOMWidget, no legacy scripts/widgets.js):
//  - the text a node returns (status, rank table) in a read-only box sized to it;
//  - Train Adaptive LoRA's preset combo sets the method widgets to that preset's values
//    (the table comes with the node definition: input "preset", option "lora2_presets").
import { app } from "../../scripts/app.js";

const PREFIX = "LoRA2_";
const WIDGET = "lora2_info";
const LINE = 14; // px per line of the 11 px monospace text
const CHAR = 6.7; // px per character
const SHOWN_LINES = { LoRA2_RankReport: 18 }; // more lines scroll; the summary comes first
const MAX_WIDTH = { LoRA2_RankReport: 900 };
const IMAGE_ROOM = { LoRA2_RankReport: 460, LoRA2_TrainAdaptiveLoRA: 320 }; // map, loss curve

function infoWidget(node) {
  const found = node.widgets?.find((w) => w.name === WIDGET);
  if (found) return found;
  const box = document.createElement("textarea");
  box.readOnly = true;
  box.wrap = "off";
  box.spellcheck = false;
  Object.assign(box.style, {
    fontFamily: "monospace", fontSize: "11px", lineHeight: `${LINE}px`, whiteSpace: "pre",
    overflow: "auto", resize: "none", boxSizing: "border-box", width: "100%", height: "100%",
    padding: "4px", opacity: "0.9",
  });
  const lines = () => Math.min(box.value.split("\n").length, SHOWN_LINES[node.type] ?? 12);
  // + 10 px padding and border, + 20 px: the frontend's margin above and below a DOM widget
  const height = () => lines() * LINE + 10 + 20;
  const widget = node.addDOMWidget(WIDGET, "lora2_text", box, {
    getValue: () => box.value,
    setValue: (v) => { box.value = v; },
    getMinHeight: height,
    getMaxHeight: height,
    serialize: false,
  });
  widget.serialize = false; // output, not a setting: never part of the saved workflow
  widget.inputEl = box;
  return widget;
}

function showText(node, text) {
  const widget = infoWidget(node);
  widget.value = text;
  const longest = Math.max(...text.split("\n").map((l) => l.length));
  const width = Math.min(longest * CHAR + 40, MAX_WIDTH[node.type] ?? 520);
  const need = node.computeSize();
  const height = need[1] + (IMAGE_ROOM[node.type] ?? 0);
  node.setSize([Math.max(node.size[0], width, need[0]), Math.max(node.size[1], height)]);
  node.setDirtyCanvas?.(true, true);
}

function presetTable(nodeData) {
  for (const group of ["required", "optional"]) {
    const spec = nodeData?.input?.[group]?.preset;
    if (spec?.[1]?.lora2_presets) return spec[1].lora2_presets;
  }
  return null;
}

function followPreset(node, table) {
  const combo = node.widgets?.find((w) => w.name === "preset");
  if (!combo) return;
  const callback = combo.callback;
  combo.callback = function (value, ...rest) {
    const result = callback?.call(this, value, ...rest);
    for (const [name, v] of Object.entries(table[combo.value] ?? {})) {
      const w = node.widgets.find((x) => x.name === name);
      if (w) w.value = v;
    }
    node.setDirtyCanvas?.(true, true);
    return result;
  };
}

app.registerExtension({
  name: "LoRA2.ShowText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith(PREFIX)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (text && text.length) showText(this, [].concat(text).join("\n"));
    };
    const table = presetTable(nodeData);
    if (table) {
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const r = onNodeCreated?.apply(this, arguments);
        followPreset(this, table);
        return r;
      };
    }
  },
});
