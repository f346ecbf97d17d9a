"""ApplyAdaptiveLoRA: MODEL (+ CLIP) + ADAPTIVE_LORA or a LoRA file → patched MODEL.

Goes through ComfyUI's own LoRA loader (key map, ``load_lora``, ``clone().add_patches``), so the
weights are exactly what the stock LoraLoader gives and sampling costs nothing extra.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..lora2_engine.formats import read_lora
from ..lora2_engine.formats.lora_file import LoraFile, check_family
from . import bridge
from .types import CATEGORY, NONE, lora_choice, lora_input, show


def load_choice(adaptive_lora, lora_name: str) -> tuple[LoraFile, dict, str]:
    """The linked ADAPTIVE_LORA, else the chosen file (safetensors only): (LoRA, tensors, label).

    A file's tensors are exactly what it holds, as stock LoraLoader reads them.
    """
    if adaptive_lora is not None:
        return adaptive_lora.lora, adaptive_lora.state_dict(), adaptive_lora.name
    if not lora_name or lora_name == NONE:
        raise ValueError("link an adaptive_lora or choose a lora_name")
    lora = read_lora(bridge.lora_file(lora_name))
    return lora, lora.state_dict(), lora_name


class ApplyAdaptiveLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRA2_ApplyAdaptiveLoRA", display_name="Apply Adaptive LoRA (LoRA²)",
            category=CATEGORY,
            description="Patches the model (and CLIP) with a LoRA² adapter the way LoraLoader "
                        "does; every module keeps its own rank.",
            inputs=[io.Model.Input("model", tooltip="the model to patch (a patched copy "
                                                    "comes out; this one is unchanged)"),
                    io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0,
                                   step=0.01, tooltip="how strongly the LoRA changes the "
                                                      "model: 1 = as trained, 0 = off"),
                    lora_input(),
                    lora_choice(),
                    io.Clip.Input("clip", optional=True,
                                  tooltip="the text encoder, for LoRAs that also adapt it"),
                    io.Float.Input("strength_clip", default=1.0, min=-100.0, max=100.0,
                                   step=0.01, optional=True,
                                   tooltip="the same for the text encoder (LoRA² adapts only "
                                           "the model: no effect on its own files)")],
            outputs=[io.Model.Output(display_name="model",
                                     tooltip="the model with the LoRA applied"),
                     io.Clip.Output(display_name="clip",
                                    tooltip="the text encoder with the LoRA applied (or as "
                                            "it came in)")])

    @classmethod
    def execute(cls, model, strength_model, adaptive_lora=None, lora_name=NONE, clip=None,
                strength_clip=1.0) -> io.NodeOutput:
        lora, state_dict, label = load_choice(adaptive_lora, lora_name)
        fam = bridge.model_family(model.model)
        check_family(lora, fam.name if fam else "other")  # e.g. an SD1.5 file on SDXL
        new_model, new_clip, modules, unmatched = bridge.apply_lora(
            model, clip, state_dict, strength_model, strength_clip)
        text = f"{label}: {len(modules) - len(unmatched)} of {len(modules)} modules applied"
        if unmatched:
            text += f"; {len(unmatched)} not matched by this model, e.g. {unmatched[0]}"
        return io.NodeOutput(new_model, new_clip, ui=show(cls, text))
