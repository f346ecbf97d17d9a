"""MergeLoRAs: 2-8 LoRA files with weights → one adaptive-rank LoRA under a size budget.

Linear, TIES or DARE on each module's Delta W, then the same joint rank allocation as
CompressLoRA (``lora2_engine.merging``). ExpandForMerge stays for tools that need equal ranks.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..lora2_engine.lycoris import read_any
from ..lora2_engine.merging import METHODS, merge_loras
from . import bridge
from .compress import SAME, budget_inputs, budget_of, dtype_of, save_result
from .types import ADAPTIVE_LORA, CATEGORY, NONE

SLOTS = 8


def _slots() -> list:
    from .bridge import lora_names

    names = [NONE, *lora_names()]
    out = []
    for i in range(1, SLOTS + 1):
        out.append(io.Combo.Input(f"lora_{i}", options=names, default=NONE, optional=True,
                                  tooltip=f"LoRA number {i} from models/loras ((none) = "
                                          "unused)"))
        out.append(io.Float.Input(f"weight_{i}", default=1.0, min=-10.0, max=10.0, step=0.01,
                                  optional=True, tooltip=f"weight of lora_{i} in the sum "
                                                         "(negative subtracts it)"))
    return out


class MergeLoRAs(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRA2_MergeLoRAs", display_name="Merge LoRAs to Size (LoRA²)",
            category=CATEGORY, is_output_node=True,
            description="Merges 2-8 LoRAs (linear, TIES or DARE) into one adaptive-rank LoRA "
                        "of a given file size and saves it to models/loras.",
            inputs=[io.Combo.Input("method", options=list(METHODS), default="linear",
                                   tooltip="linear: the exact weighted sum of the updates; "
                                           "ties / dare: resolve conflicts between LoRAs "
                                           "first (as PEFT defines them)"),
                    io.Float.Input("density", default=0.5, min=0.01, max=1.0, step=0.01,
                                   tooltip="TIES/DARE: fraction of each update's entries kept"),
                    io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                                 tooltip="DARE's random drop"),
                    *budget_inputs(),
                    io.String.Input("filename", default="lora2/merged",
                                    tooltip="models/loras/<filename>.safetensors; never "
                                            "overwritten (_2, _3... are added)"),
                    *_slots()],
            outputs=[ADAPTIVE_LORA.Output(display_name="adaptive_lora",
                                          tooltip="the merged LoRA (also saved)")])

    @classmethod
    def execute(cls, method, density, seed, size_mb, filename, max_error=0.0, save_dtype=SAME,
                **slots) -> io.NodeOutput:
        chosen = [(slots[f"lora_{i}"], slots.get(f"weight_{i}", 1.0))
                  for i in range(1, SLOTS + 1) if slots.get(f"lora_{i}", NONE) != NONE]
        if len(chosen) < 2:
            raise ValueError(f"MergeLoRAs: choose at least two LoRAs (lora_1 ... lora_{SLOTS}); "
                             f"{len(chosen)} chosen")
        loras = [read_any(bridge.lora_file(name)) for name, _ in chosen]
        result = merge_loras(loras, [w for _, w in chosen], method, budget_of(size_mb, max_error),
                             density=density, seed=seed, dtype=dtype_of(save_dtype),
                             labels=[name for name, _ in chosen])
        return save_result(cls, result, filename)
