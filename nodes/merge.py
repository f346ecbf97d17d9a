"""ExpandForMerge: zero-pad every module to one rank for merge tools that need equal ranks."""

from __future__ import annotations

from comfy_api.latest import io

from ..lora2_engine.formats import write_lora
from ..lora2_engine.merge import PadRankError, pad_lora
from . import bridge, core
from .report import lora_of
from .types import ADAPTIVE_LORA, CATEGORY, NONE, lora_choice, lora_input, show

# tests/test_merge.py measures the numbers below with PEFT on two padded LoRA² files
DESCRIPTION = (
    "Pads every module with zeros to one rank (same effect, one alpha) and saves it to "
    "models/loras, for tools that need one rank. Padding does not make merging right: "
    "merges that concatenate or use SVD (PEFT 'cat'/'svd', sd-scripts --concat) give the "
    "weighted sum with or without padding; factor-wise merges (PEFT 'linear', sd-scripts "
    "without --concat) do not, even when padded (median 96%, up to 101% error measured "
    "with PEFT on two padded LoRA² files). For an "
    "exact weighted sum use Merge LoRAs to Size.")


class ExpandForMerge(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRA2_ExpandForMerge", display_name="Expand for Merge (LoRA²)",
            category=CATEGORY, is_output_node=True,
            description=DESCRIPTION,
            inputs=[lora_input(), lora_choice(),
                    io.Int.Input("rank", default=0, min=0, max=4096,
                                 tooltip="0 = the largest rank in the LoRA"),
                    io.String.Input("filename", default="lora2/subject_padded",
                                    tooltip="models/loras/<filename>.safetensors; never "
                                            "overwritten (_2, _3... are added)")],
            outputs=[ADAPTIVE_LORA.Output(display_name="adaptive_lora",
                                          tooltip="the padded LoRA (same effect, one rank)")])

    @classmethod
    def execute(cls, rank, filename, adaptive_lora=None, lora_name=NONE) -> io.NodeOutput:
        source = lora_of(adaptive_lora, lora_name)
        try:
            padded = pad_lora(source.lora, rank or None)
        except PadRankError as exc:
            raise ValueError(f"ExpandForMerge: {exc}") from None
        path = write_lora(padded, core.free_path(bridge.loras_folder(), filename))
        target = next(iter(padded.modules.values())).rank
        text = f"{len(padded.modules)} modules padded to rank {target}\nsaved {path}"
        return io.NodeOutput(core.AdaptiveLora(padded, path.stem, path, source.history),
                             ui=show(cls, text))
