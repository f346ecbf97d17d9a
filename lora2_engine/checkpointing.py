"""Gradient checkpointing for models that have no switch of their own.

Each element of the outermost ``nn.ModuleList`` s (``input_blocks``, ``output_blocks``, a DiT's
``blocks``…) recomputes its activations in the backward pass, non-reentrant so keyword
arguments and frozen inputs work. The tiny UNets and diffusers bring their own switch; this is
for the rest (ComfyUI's UNet, plain torch models).
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def checkpointed_blocks(model: torch.nn.Module):
    """Gradient checkpointing for any UNet/DiT: each element of the outermost ModuleLists
    (``input_blocks``, ``output_blocks``, a DiT's ``blocks``...) recomputes its activations in
    the backward pass (non-reentrant, so kwargs and frozen inputs work). Undone on exit."""
    from torch.utils.checkpoint import checkpoint

    wrapped: list[torch.nn.Module] = []

    def wrap(block: torch.nn.Module) -> None:
        if "forward" in vars(block):  # someone else's instance patch: leave it alone
            return
        plain = type(block).forward

        def forward(*args, **kwargs):
            return checkpoint(plain, block, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        wrapped.append(block)

    def visit(module: torch.nn.Module) -> None:
        for child in module.children():
            if isinstance(child, torch.nn.ModuleList):
                for block in child:
                    wrap(block)
            else:
                visit(child)

    visit(model)
    try:
        yield wrapped
    finally:
        for block in wrapped:
            del block.forward
