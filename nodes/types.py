"""The pack's socket types and the small helpers every node uses to build its UI output."""

from __future__ import annotations

from comfy_api.latest import io, ui

from .core import AdaptiveLora, Subject

CATEGORY = "LoRA²"
ADAPTIVE_LORA = io.Custom("ADAPTIVE_LORA")  # carries a core.AdaptiveLora
SUBJECT = io.Custom("SUBJECT")  # carries a core.Subject
NONE = "(none)"

__all__ = ["ADAPTIVE_LORA", "CATEGORY", "NONE", "SUBJECT", "AdaptiveLora", "Subject",
           "lora_choice", "show"]


def lora_choice(optional: bool = True):
    """A combo of the files in models/loras (plus '(none)' when an ADAPTIVE_LORA may be linked)."""
    from .bridge import lora_names

    return io.Combo.Input("lora_name", options=[NONE, *lora_names()], default=NONE,
                          optional=optional,
                          tooltip="a LoRA file from models/loras, used when no adaptive_lora "
                                  "is linked")


def show(cls, text: str, images=None) -> dict:
    """UI output: ``text`` (drawn by web/lora2.js) and optional preview images."""
    out = {"text": [text]}
    if images is not None:
        out.update(ui.PreviewImage(images, cls=cls).as_dict())
    return out
