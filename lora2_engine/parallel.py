"""The processes a run trains in: one, or several launched by ``torchrun`` / ``accelerate launch``.

Data-parallel LoRA² cannot use ``DistributedDataParallel``: the adapters change shape at the
end of a step (``LoRALayer.resize``) and DDP's gradient buckets are fixed at construction. The
trainer therefore averages what it needs itself, at the one point of a step where everything
is known (after the backward passes, before new slots are initialised): the gradients of A, B
and nu, and each pending layer's accumulated ``dL/dDeltaW``. Averages are all-reduced, so every
process holds the same bits, computes the same SVD and the same ``D(nu)``; the trainer checks
that the ranks agree after every step instead of assuming it.

:meth:`Parallel.from_env` reads the variables both launchers set (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``...). Under ``accelerate launch`` it lets ``accelerate`` (an optional extra,
imported only then) set up the process group and device, so its config is honoured;
``torchrun`` needs nothing but ``torch.distributed``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import torch

T = TypeVar("T")


class Shard(NamedTuple):
    """Rows ``start:stop`` of a global batch of ``total`` examples belong to this process."""

    start: int
    stop: int
    total: int


class PeerFailed(RuntimeError):
    """Another process of the run failed; it reports its own error (this one says nothing)."""


def _env_flag(name: str, default: bool = False) -> bool:
    """An accelerate setting as a switch (FSDP1's reshard setting is a strategy name)."""
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes", "full_shard", "hybrid_shard")


def launched_by_accelerate() -> bool:
    """``accelerate launch`` exports its settings as ``ACCELERATE_*`` variables."""
    return any(k.startswith("ACCELERATE_") for k in os.environ)


@dataclass
class Parallel:
    """Rank, process count and device of this process; collective helpers that are no-ops
    in a single process (so the trainer has one code path)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    fsdp: bool = False  # shard the frozen model's weights over the processes (FSDP2)

    @property
    def is_main(self) -> bool:
        """The one process that writes files, checkpoints and progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    # -- setup ------------------------------------------------------------------------------
    @classmethod
    def from_env(cls, fsdp: bool = False) -> Parallel:
        """This process's place in a launch (one process when not launched). ``fsdp`` (or
        accelerate's ``--use_fsdp`` / FSDP config) shards the frozen model when launched."""
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return cls()
        fsdp = fsdp or _env_flag("ACCELERATE_USE_FSDP")
        import torch.distributed as dist

        if launched_by_accelerate():
            try:
                from accelerate import PartialState
            except ImportError:
                raise ValueError("this run was started by `accelerate launch`, but accelerate "
                                 "is not installed: pip install 'comfyui-lora2[distributed]', "
                                 "or start it with torchrun") from None
            # without a GPU accelerate would treat each worker as a run of its own
            state = PartialState(cpu=not torch.cuda.is_available())
            if state.num_processes != world:
                raise ValueError(f"accelerate set up {state.num_processes} process(es) for a "
                                 f"launch of {world}: check `accelerate config` (or start the "
                                 "run with torchrun)")
            return cls(state.process_index, state.num_processes, state.local_process_index,
                       state.device if state.device.type == "cuda" else None, fsdp)
        local = int(os.environ.get("LOCAL_RANK", "0") or 0)
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local % torch.cuda.device_count())
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else None
        return cls(dist.get_rank(), dist.get_world_size(), local, device, fsdp)

    def shard_frozen(self, module: torch.nn.Module, keep: Sequence[torch.nn.Parameter]) -> int:
        """Shard ``module``'s weights over the processes with FSDP2 (``fully_shard``): each
        outermost block is one unit (gathered for its forward and backward, then freed), the
        root holds the rest. The parameters in ``keep`` (the adapters: they change shape) are
        left out of FSDP, replicated, and averaged by the trainer. accelerate's
        ``FSDP_RESHARD_AFTER_FORWARD`` and ``FSDP_OFFLOAD_PARAMS`` are honoured.
        The module stays sharded: it is the run's, not reusable afterwards. Returns the
        number of blocks sharded."""
        if not self.active:
            return 0
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        from .checkpointing import outermost_blocks

        mesh = init_device_mesh(self.device.type if self.device else "cpu", (self.world,))
        options = {"mesh": mesh, "ignored_params": set(keep),
                   "reshard_after_forward": _env_flag("FSDP_RESHARD_AFTER_FORWARD", True),
                   "offload_policy": (CPUOffloadPolicy() if _env_flag("FSDP_OFFLOAD_PARAMS")
                                      else OffloadPolicy())}
        blocks = outermost_blocks(module)
        for block in blocks:
            fully_shard(block, **options)
        fully_shard(module, **options)
        return len(blocks)

    # -- collectives ----------------------------------------------------------------------------
    @torch.no_grad()
    def mean_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace every tensor by its average over the processes (one all-reduce per dtype
        and device). Every process must pass the same list of shapes."""
        if not self.active or not tensors:
            return
        import torch.distributed as dist

        groups: dict[tuple, list[torch.Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t)
        for ts in groups.values():
            flat = torch.cat([t.reshape(-1) for t in ts])
            dist.all_reduce(flat)
            flat /= self.world
            i = 0
            for t in ts:
                t.copy_(flat[i:i + t.numel()].view_as(t))
                i += t.numel()

    def average(self, values: Sequence[float]) -> list[float]:
        """The mean of each value over the processes."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        self.mean_([t])
        return t.tolist()

    @torch.no_grad()
    def broadcast_(self, tensors: Sequence[torch.Tensor], src: int = 0) -> None:
        """Give every process ``src``'s values (one call per tensor: used once per run)."""
        if not self.active:
            return
        import torch.distributed as dist

        for t in tensors:
            dist.broadcast(t.data, src)

    def extremes(self, values: Sequence[float]) -> tuple[list[float], list[float]]:
        """Element-wise minimum and maximum of ``values`` over the processes."""
        v = torch.tensor([*values, *(-x for x in values)], dtype=torch.float64,
                         device=self._collective_device())
        if self.active:
            import torch.distributed as dist

            dist.all_reduce(v, dist.ReduceOp.MAX)
        n = len(values)
        return [-x for x in v[n:].tolist()], v[:n].tolist()

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on one."""
        return bool(self.extremes([float(flag)])[1][0]) if self.active else bool(flag)

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Run ``fn`` on the main process only; every process learns whether it worked.

        The main process re-raises its own exception; the others raise :class:`PeerFailed`,
        so no process waits forever in a collective for one that has given up.
        """
        return self._vote(fn, self.is_main, "process 0 failed (it printed why)")

    def agree(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on every process; if it fails on any, it fails on all (the failing
        processes raise their own error, the others :class:`PeerFailed`)."""
        return self._vote(fn, True, "another process of this run failed (it printed why)")

    def _vote(self, fn: Callable[[], T], here: bool, peer_failed: str) -> T | None:
        if not self.active:
            return fn()
        result, error = None, None
        if here:
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 (re-raised below, after the vote)
                error = exc
        failed = self.any(error is not None)
        if error is not None:
            raise error
        if failed:
            raise PeerFailed(peer_failed)
        return result

    def _collective_device(self) -> torch.device:
        import torch.distributed as dist

        if self.active and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
