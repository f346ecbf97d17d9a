"""The optimizer, and keeping its state right when adapters grow or shrink.

Two parameter groups: the factors A, B at the base learning rate, and every ``nu`` at its own
(method.md §2: at 5e-5 a ``nu`` could not travel the distances the paper reports). When a layer
grows, the Adam moments of the newly active slots start at zero and kept slots keep theirs;
when capacity is reallocated the moments move into tensors of the new shape.
"""

from __future__ import annotations

import torch

from .config import TrainConfig
from .inject import Adapters
from .layer import Resize


def make_optimizer(adapters: Adapters, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the factor group and (for LoRA²) the ``nu`` group, no weight decay on ``nu``."""
    groups = [{"params": adapters.factor_parameters(), "lr": config.lr,
               "weight_decay": config.weight_decay, "name": "factors"}]
    nus = adapters.nu_parameters()
    if nus:
        groups.append({"params": nus, "lr": config.nu_lr, "weight_decay": 0.0, "name": "nu"})
    # foreach: one fused call per group instead of ~10 ops per tensor (CPU defaults to a loop)
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, foreach=True)


def _fit(state: torch.Tensor, param: torch.Tensor, dim: int, change: Resize) -> torch.Tensor:
    if state.shape != param.shape:  # capacity grew: copy the old moments into the new shape
        grown = torch.zeros_like(param)
        grown.narrow(dim, 0, state.shape[dim]).copy_(state)
        state = grown
    if change.new_rank > change.old_rank:  # newly active slots start with zero moments
        state.narrow(dim, change.old_rank, change.new_rank - change.old_rank).zero_()
    return state


@torch.no_grad()
def apply_resizes(optimizer: torch.optim.Optimizer, adapters: Adapters,
                  changes: dict[str, Resize]) -> None:
    """Bring the optimizer's per-parameter state in line with :meth:`Adapters.update_ranks`."""
    for name, change in changes.items():
        layer = adapters.layers[name]
        for param, dim in ((layer.A, 0), (layer.B, 1)):
            st = optimizer.state.get(param)
            if not st:
                continue
            for key, value in list(st.items()):
                if torch.is_tensor(value) and value.dim() == 2:
                    st[key] = _fit(value, param, dim, change)
