// LoRA² nodes: show the text each node returns in its UI output (rank table, file saved,
// warnings) in a read-only box under the node's widgets. Images are drawn by ComfyUI itself.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const PREFIX = "LoRA2_";
const WIDGET = "lora2_info";
const REPORT = "LoRA2_RankReport";

function showText(node, text) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.serialize = false; // not part of the workflow: it is output, not a setting
    if (widget.inputEl) {
      widget.inputEl.readOnly = true;
      widget.inputEl.style.fontFamily = "monospace";
      widget.inputEl.style.fontSize = "11px";
      widget.inputEl.style.opacity = 0.85;
      widget.inputEl.style.whiteSpace = "pre"; // tables scroll sideways instead of wrapping
      widget.inputEl.wrap = "off";
    }
  }
  widget.value = text;
  if (node.type === REPORT) {
    // The rank table and the rank map need room; other nodes keep the size the user gave.
    node.setSize([Math.max(node.size[0], 560), Math.max(node.size[1], 560)]);
  }
  node.setDirtyCanvas?.(true, true);
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
  },
});
