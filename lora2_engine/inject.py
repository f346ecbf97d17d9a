"""Find target modules by name, wrap them with adapters, and undo it exactly.

The caller's model is modified in place only by swapping child modules; :func:`detach` puts the
original module objects back and restores every ``requires_grad`` flag, so the model is bit for
bit what it was (PEFT ``_create_and_replace`` / ``unload`` do the same).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .config import AdapterConfig
from .distribution import nu_from_param, rank_from_nu, slot_weights_batched
from .layer import AdaptiveLoRALayer, LoRALayer, Resize, dense_cap


def _matches(name: str, targets: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    if any(e and e in name for e in exclude):
        return False
    return any(name == t or name.endswith("." + t) for t in targets)


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (
        isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1)


def find_targets(model: nn.Module, targets: tuple[str, ...],
                 exclude: tuple[str, ...] = ()) -> list[str]:
    """Names of the Linear / 1x1-conv modules whose name ends with one of ``targets``."""
    names = [n for n, m in model.named_modules()
             if _adaptable(m) and not isinstance(m, LoRALayer) and _matches(n, targets, exclude)]
    if not names:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:5]
        raise ValueError(
            f"no module matches targets={list(targets)} (exclude={list(exclude)}): pass name "
            f"suffixes of nn.Linear modules of this model, e.g. {linears or 'none found'}")
    return names


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


class Adapters:
    """The adapters attached to one model: parameters, ranks, resizing, state and detaching."""

    def __init__(self, model: nn.Module, layers: dict[str, LoRALayer],
                 requires_grad: dict[str, bool], config: AdapterConfig | None) -> None:
        self.model = model
        self.layers = layers
        self.config = config
        self._requires_grad = requires_grad

    def __iter__(self) -> Iterator[tuple[str, LoRALayer]]:
        return iter(self.layers.items())

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def adaptive(self) -> bool:
        return self.config is not None

    def factor_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in (layer.A, layer.B)]

    def nu_parameters(self) -> list[nn.Parameter]:
        return [layer.nu_param for layer in self.layers.values() if hasattr(layer, "nu_param")]

    def nus(self) -> dict[str, float]:
        return {n: float(layer.nu.detach()) for n, layer in self.layers.items()
                if isinstance(layer, AdaptiveLoRALayer)}

    def ranks(self) -> dict[str, int]:
        return {n: layer.rank for n, layer in self.layers.items()}

    def num_parameters(self) -> int:
        """Parameters of the exported adapter: ``sum_l D_l (m_l + n_l)``."""
        return sum(layer.rank * (layer.m + layer.n) for layer in self.layers.values())

    def _adaptive(self) -> list[AdaptiveLoRALayer]:
        return [la for la in self.layers.values() if isinstance(la, AdaptiveLoRALayer)]

    def stacked_nu(self) -> torch.Tensor:
        """Every adaptive layer's ``nu`` in one tensor (one op instead of one per layer)."""
        layers = self._adaptive()
        p = torch.stack([la.nu_param for la in layers])
        return nu_from_param(p, layers[0].floor)

    @torch.no_grad()
    def update_ranks(self, generator: torch.Generator | None = None) -> dict[str, Resize]:
        """Set every adaptive layer's rank to ``D(nu)`` (Eq. 6); returns what changed."""
        layers = self._adaptive()
        if not layers:
            return {}
        c = self.config
        targets = [rank_from_nu(v, c.q, c.r_max) for v in self.stacked_nu().tolist()]
        changed = {}
        names = [n for n, la in self.layers.items() if isinstance(la, AdaptiveLoRALayer)]
        for name, layer, d in zip(names, layers, targets):
            # beyond the dense cap a rank adds bytes, not expressiveness
            r = layer.resize(min(d, dense_cap(layer.m, layer.n)), generator, c.random_new_b)
            if r is not None:
                changed[name] = r
        return changed

    def cache_scales(self) -> torch.Tensor | None:
        """Compute every layer's Lambda in one batched op and hand each layer its row.

        The trainer calls this once per step (after :meth:`update_ranks`) instead of letting
        168+ layers each run a dozen tiny ops: the per-step Python/dispatch overhead is what
        separates LoRA² from a fixed LoRA in step time. Returns the stacked ``nu``.
        """
        layers = self._adaptive()
        if not layers:
            return None
        c = self.config
        nu = self.stacked_nu()  # (L,)
        width = max(la.rank for la in layers)
        f = slot_weights_batched(nu, width, c.renormalize, c.q, c.r_max)  # (L, width)
        for i, layer in enumerate(layers):
            layer.cached_scale = f[i, : layer.rank]
        return nu

    def init_pending_slots(self, generator: torch.Generator | None = None) -> int:
        """After a backward pass: gradient-initialise every layer's pending slots."""
        return sum(layer.init_pending_from_gradient(generator) for layer in self.layers.values())

    def pending_grads(self) -> list[torch.Tensor]:
        """The accumulated ``dL/dDeltaW`` of the layers with pending slots (data-parallel
        training averages them over processes before :meth:`init_pending_slots`)."""
        return [g for layer in self.layers.values() if (g := layer.pending_grad) is not None]

    def clear_pending_grads(self) -> None:
        for layer in self.layers.values():
            layer.clear_pending_grad()

    def clear_scales(self) -> None:
        for layer in self._adaptive():
            layer.cached_scale = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Active slots only, plus ``nu`` (the trainer's checkpoints keep full capacity)."""
        out = {}
        for name, layer in self.layers.items():
            out[f"{name}.A"] = layer.A[: layer.rank].detach().clone()
            out[f"{name}.B"] = layer.B[:, : layer.rank].detach().clone()
            if isinstance(layer, AdaptiveLoRALayer):
                out[f"{name}.nu_param"] = layer.nu_param.detach().clone()
        return out

    def detach(self) -> nn.Module:
        """Put the original modules back and restore ``requires_grad``; returns the model."""
        for name, layer in self.layers.items():
            _set_child(self.model, name, layer.base)
        for n, p in self.model.named_parameters():
            if n in self._requires_grad:
                # a parameter created under inference_mode (ComfyUI) can only get its flag back
                # inside it
                with torch.inference_mode(p.is_inference()):
                    p.requires_grad_(self._requires_grad[n])
        self.layers = {}
        return self.model


def attach(model: nn.Module, config: AdapterConfig | None = None, *,
           fixed_rank: int | None = None, seed: int = 0,
           slot_init: str | None = None) -> Adapters:
    """Wrap the target modules of ``model`` with LoRA² layers (or fixed-rank LoRA).

    ``config`` chooses targets and the rank distribution; with ``fixed_rank`` the layers are
    plain LoRA of that rank (the baseline the benchmarks compare against). The model's own
    parameters are frozen until :func:`detach`.
    """
    config = config or AdapterConfig()
    if any(isinstance(m, LoRALayer) for m in model.modules()):
        raise ValueError("this model already carries adapters: detach them first")
    names = find_targets(model, config.targets, config.exclude)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    layers: dict[str, LoRALayer] = {}
    for name in names:
        base = model.get_submodule(name)
        layer = (LoRALayer(base, fixed_rank, generator=gen,
                           slot_init=slot_init or "random") if fixed_rank is not None
                 else AdaptiveLoRALayer(base, config, generator=gen))
        _set_child(model, name, layer)
        layers[name] = layer
    return Adapters(model, layers, requires_grad, None if fixed_rank is not None else config)


def detach(adapters: Adapters) -> nn.Module:
    """Functional alias of :meth:`Adapters.detach`."""
    return adapters.detach()
