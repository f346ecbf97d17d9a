"""CompressLoRA: a LoRA file or ADAPTIVE_LORA + a size budget → ADAPTIVE_LORA + a smaller file.

Ranks are chosen jointly over the whole LoRA (``lora2_engine.compress``); the file lands within
2% below the budget. LyCORIS LoHa/LoKr files are converted exactly first; other types refused.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..lora2_engine.budget import Budget
from ..lora2_engine.compress import compress
from ..lora2_engine.lycoris import read_any
from . import bridge, core
from .types import ADAPTIVE_LORA, CATEGORY, NONE, lora_choice, lora_input, show

SAME = "same as input"
DTYPES = [SAME, "float16", "bfloat16", "float32"]


def budget_inputs() -> list:
    """The budget widgets CompressLoRA and MergeLoRAs share."""
    return [io.Float.Input("size_mb", default=32.0, min=0.001, max=100000.0, step=0.1,
                           tooltip="file size on disk in MB (10^6 bytes), header included"),
            io.Float.Input("max_error", default=0.0, min=0.0, max=0.99, step=0.001,
                           optional=True,
                           tooltip="0 = use size_mb; else the smallest file whose relative "
                                   "Delta W error over the whole LoRA is at most this"),
            io.Combo.Input("save_dtype", options=DTYPES, default=SAME, optional=True,
                           tooltip="number format of the new file; float16 halves a float32 "
                                   "file's size"),
            ]


def budget_of(size_mb: float, max_error: float) -> Budget:
    return Budget.of_error(max_error) if max_error > 0 else Budget.megabytes(size_mb)


def dtype_of(save_dtype: str) -> str | None:
    return None if save_dtype == SAME else save_dtype


def save_result(cls, result, filename: str, history=None) -> io.NodeOutput:
    """Write a compress/merge result into models/loras (never overwriting) and show it."""
    path = result.write(core.free_path(bridge.loras_folder(), filename))
    text = f"{result.report().table()}\n{result.summary()}\nsaved {path}"
    return io.NodeOutput(core.AdaptiveLora(result.lora, path.stem, path, history or []),
                         ui=show(cls, text))


class CompressLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRA2_CompressLoRA", display_name="Compress LoRA to Size (LoRA²)",
            category=CATEGORY, is_output_node=True,
            description="Shrinks any LoRA to a file size: every module gets the rank its share "
                        "of the error is worth, chosen across the whole file; saves it to "
                        "models/loras.",
            inputs=[lora_input(), lora_choice(),
                    *budget_inputs(),
                    io.String.Input("filename", default="lora2/compressed",
                                    tooltip="models/loras/<filename>.safetensors; never "
                                            "overwritten (_2, _3... are added)")],
            outputs=[ADAPTIVE_LORA.Output(display_name="adaptive_lora",
                                          tooltip="the compressed LoRA (also saved)")])

    @classmethod
    def execute(cls, size_mb, filename, adaptive_lora=None, lora_name=NONE, max_error=0.0,
                save_dtype=SAME) -> io.NodeOutput:
        budget = budget_of(size_mb, max_error)
        if adaptive_lora is not None:
            lora, history = adaptive_lora.lora, adaptive_lora.history
        elif lora_name and lora_name != NONE:
            lora, history = read_any(bridge.lora_file(lora_name)), []
        else:
            raise ValueError("CompressLoRA: link an adaptive_lora or choose a lora_name")
        result = compress(lora, budget, dtype_of(save_dtype))
        return save_result(cls, result, filename, history)
