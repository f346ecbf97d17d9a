"""Gradient checkpointing (and in-place safety) for models that have no switch of their own.

Each element of the outermost ``nn.ModuleList`` s (``input_blocks``, ``output_blocks``, a DiT's
``double_blocks``…) recomputes its activations in the backward pass, non-reentrant so keyword
arguments, frozen inputs and the entropy hooks work. The tiny UNets and diffusers bring their
own switch; this is for the rest (ComfyUI's models, plain torch models).

Some ComfyUI models add residuals in place inside a block (Flux: ``img += ...``). Autograd
refuses that when the tensor was saved for backward, and under checkpointing the recomputed
saved tensors are silently overwritten (wrong gradients, measured). :class:`OutOfPlaceAugmented`
runs such blocks with every augmented assignment (``a += b``, ``a *= b``, ``a -= b``) computed
out of place — Python rebinds the name, so the block's result is unchanged — while explicit
in-place calls (``a.add_(b)``) are left alone.
"""

from __future__ import annotations

import contextlib
import dis
import sys

import torch
from torch.overrides import TorchFunctionMode

_AUGMENTED = {"NB_INPLACE_ADD", "NB_INPLACE_MULTIPLY", "NB_INPLACE_SUBTRACT"}
_NB_OPS = {i: op[0] for i, op in enumerate(getattr(dis, "_nb_ops", ()))}
_OUT_OF_PLACE = {torch.Tensor.add_: torch.add, torch.Tensor.mul_: torch.mul,
                 torch.Tensor.sub_: torch.sub}


def _augmented_assignment(frame) -> bool:
    """Whether ``frame`` is executing ``a += b`` (or ``*=``/``-=``) right now."""
    code, i = frame.f_code.co_code, frame.f_lasti
    name = dis.opname[code[i]]
    if name.startswith("INPLACE_"):  # Python <= 3.10
        return name in ("INPLACE_ADD", "INPLACE_MULTIPLY", "INPLACE_SUBTRACT")
    return name == "BINARY_OP" and _NB_OPS.get(code[i + 1]) in _AUGMENTED


class OutOfPlaceAugmented(TorchFunctionMode):
    """``a += b`` on tensors computes ``a + b`` (a new tensor) while this mode is active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out_of_place = _OUT_OF_PLACE.get(func)
        if out_of_place is not None and _augmented_assignment(sys._getframe(1)):
            return out_of_place(*args, **kwargs)
        return func(*args, **kwargs)


def outermost_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The elements of the outermost ``nn.ModuleList`` s: a model's repeated blocks (the unit
    of gradient checkpointing here, and of sharding in ``parallel.Parallel.shard_frozen``)."""
    found: list[torch.nn.Module] = []

    def visit(module: torch.nn.Module) -> None:
        for child in module.children():
            if isinstance(child, torch.nn.ModuleList):
                found.extend(child)
            else:
                visit(child)

    visit(model)
    return found


@contextlib.contextmanager
def checkpointed_blocks(model: torch.nn.Module, checkpoint: bool = True,
                        out_of_place: bool = False):
    """Wrap each element of the outermost ModuleLists for training, undone on exit.

    ``checkpoint``: recompute its activations in backward (non-reentrant). ``out_of_place``:
    run it (and its recomputation) under :class:`OutOfPlaceAugmented`.
    """
    from torch.utils.checkpoint import checkpoint as ckpt

    wrapped: list[torch.nn.Module] = []
    if not (checkpoint or out_of_place):
        yield wrapped
        return

    def contexts():
        if not out_of_place:
            return contextlib.nullcontext(), contextlib.nullcontext()
        return OutOfPlaceAugmented(), OutOfPlaceAugmented()

    def wrap(block: torch.nn.Module) -> None:
        if "forward" in vars(block):  # someone else's instance patch: leave it alone
            return
        plain = type(block).forward

        def forward(*args, **kwargs):
            if checkpoint:
                return ckpt(plain, block, *args, use_reentrant=False, context_fn=contexts,
                            **kwargs)
            with OutOfPlaceAugmented():
                return plain(block, *args, **kwargs)

        block.forward = forward
        wrapped.append(block)

    for block in outermost_blocks(model):
        wrap(block)
    try:
        yield wrapped
    finally:
        for block in wrapped:
            del block.forward
