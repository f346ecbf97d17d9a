"""RankReport: an ADAPTIVE_LORA or a LoRA file → rank map IMAGE and the rank table as text."""

from __future__ import annotations

from comfy_api.latest import io

from ..lora2_engine.formats import read_lora
from ..lora2_engine.report import rank_map_figure, report_from_file
from . import bridge, core
from .types import CATEGORY, NONE, lora_choice, lora_input, show


def lora_of(adaptive_lora, lora_name: str) -> core.AdaptiveLora:
    """The linked ADAPTIVE_LORA, else the chosen file read with the engine's reader."""
    if adaptive_lora is not None:
        return adaptive_lora
    if not lora_name or lora_name == NONE:
        raise ValueError("link an adaptive_lora or choose a lora_name")
    path = bridge.lora_file(lora_name)
    return core.AdaptiveLora(read_lora(path), path.stem, path)


class RankReport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRA2_RankReport", display_name="Rank Report (LoRA²)", category=CATEGORY,
            is_output_node=True,
            description="Learned rank per component: a rank map and a table of rank, "
                        "parameters and size (works on any LoRA file).",
            inputs=[lora_input(), lora_choice()],
            outputs=[io.Image.Output(display_name="rank_map",
                                     tooltip="rank per block (rows) and module kind (columns)"),
                     io.String.Output(display_name="table",
                                      tooltip="the summary, then one line per component: "
                                              "rank, parameters, MB (and nu, error)")])

    @classmethod
    def execute(cls, adaptive_lora=None, lora_name=NONE) -> io.NodeOutput:
        lora = lora_of(adaptive_lora, lora_name)
        report = report_from_file(lora.lora)
        image = core.figure_to_image(rank_map_figure(report, f"{lora.name}: rank per component"))
        text = f"{report.summary()}\n\n{report.table(totals=False)}"  # summary first: visible
        return io.NodeOutput(image, text, ui=show(cls, text, image))
