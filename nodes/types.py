"""The pack's socket types and the small helpers every node uses to build its UI output."""

from __future__ import annotations

from comfy_api.latest import io, ui

from .core import AdaptiveLora, Subject

CATEGORY = "LoRA²"
ADAPTIVE_LORA = io.Custom("ADAPTIVE_LORA")  # carries a core.AdaptiveLora
SUBJECT = io.Custom("SUBJECT")  # carries a core.Subject
NONE = "(none)"

__all__ = ["ADAPTIVE_LORA", "CATEGORY", "NONE", "SUBJECT", "AdaptiveLora", "Subject",
           "advanced", "lora_choice", "show"]
LORA_OUT_TIP = ("the LoRA in memory (its ranks, file and training history): link it to Apply, "
                "Rank Report, Expand for Merge or Compress")


def advanced(inp):
    """``inp`` marked as advanced: hidden behind the node's "show advanced inputs" in
    frontends that have it. ComfyUI versions whose V3 inputs know ``advanced`` (0.28.0) get it
    set; older ones (0.3.54) get the same flag in the input's options, which their frontend
    ignores (the input is then simply shown)."""
    if hasattr(inp, "advanced"):
        inp.advanced = True
    else:
        inp.extra_dict["advanced"] = True
    return inp


def with_options(inp, **options):
    """``inp`` with extra entries in its options (what /object_info sends the frontend)."""
    inp.extra_dict.update(options)
    return inp


def lora_choice(optional: bool = True):
    """A combo of the files in models/loras (plus '(none)' when an ADAPTIVE_LORA may be linked)."""
    from .bridge import lora_names

    return io.Combo.Input("lora_name", options=[NONE, *lora_names()], default=NONE,
                          optional=optional,
                          tooltip="a LoRA file from models/loras, used when no adaptive_lora "
                                  "is linked")


def lora_input():
    """The ADAPTIVE_LORA input every LoRA-reading node has (or choose a file instead)."""
    return ADAPTIVE_LORA.Input("adaptive_lora", optional=True,
                               tooltip="a LoRA from Train / Compress / Merge; when linked, "
                                       "lora_name is ignored")


def show(cls, text: str, images=None) -> dict:
    """UI output: ``text`` (drawn by web/lora2.js) and optional preview images."""
    out = {"text": [text]}
    if images is not None:
        out.update(ui.PreviewImage(images, cls=cls).as_dict())
    return out
