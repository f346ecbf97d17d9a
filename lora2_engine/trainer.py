"""The training loop: resize, forward, LoRA² terms, step; callbacks; exact checkpoints.

Everything random (data order, noise, timesteps, new rank slots) comes from one
``torch.Generator`` whose state is checkpointed with the adapters and the optimizer, so a run
resumed from a checkpoint continues bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpointing import checkpointed_blocks
from .config import TrainConfig, to_dict
from .formats.io import load_tensors, save_tensors
from .inject import Adapters
from .objective import EntropyCapture, rank_penalty
from .optim import apply_resizes, make_optimizer
from .parallel import Parallel, Shard

LossFn = Callable[[dict, torch.Generator], torch.Tensor]


class TrainingInterrupted(RuntimeError):
    """Training stopped on request (cancel, Ctrl-C, SIGTERM); ``checkpoint`` resumes it.

    ``signal`` is the signal number that asked for the stop (``None``: a cancel callback).
    """

    def __init__(self, step: int, checkpoint: Path | None, signal: int | None = None) -> None:
        where = f"; resume from {checkpoint}" if checkpoint else ""
        how = {2: "by Ctrl-C", 15: "by SIGTERM"}.get(signal, "")
        super().__init__(f"training cancelled {how + ' ' if how else ''}at step {step}{where}")
        self.step, self.checkpoint, self.signal = step, checkpoint, signal


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the adapters are left at the last good step."""


@dataclass
class Callbacks:
    """Hooks the caller plugs in: progress, cancel, previews (all optional)."""

    on_step: Callable[[Trainer, dict], None] | None = None
    should_stop: Callable[[], bool] | None = None
    on_preview: Callable[[Trainer], None] | None = None
    preview_every: int = 0
    # exceptions that mean "the user cancelled" even when raised inside a step (ComfyUI's
    # InterruptProcessingException is raised from inside the model's forward in 0.28)
    interrupts: tuple[type[BaseException], ...] = (KeyboardInterrupt,)


def collate(examples: Sequence[dict]) -> dict:
    """Stack the tensors of unbatched examples; other values become lists."""
    out = {}
    for key in examples[0]:
        vals = [e[key] for e in examples]
        out[key] = torch.stack(vals) if torch.is_tensor(vals[0]) else vals
    return out


class Trainer:
    """Trains the adapters of one model on a list of examples with a caller-supplied loss.

    ``loss_fn(batch, generator)`` returns the task loss (e.g. :func:`schedule.diffusion_loss`);
    the trainer adds ``lambda_r * sum|nu - nu_target|`` and ``lambda_e * entropy`` (Eq. 11).

    With ``parallel`` (several processes, ``parallel.py``) ``config.batch_size`` is per
    process: every process draws the same global batch and the same random numbers for it
    and computes its own shard (``loss_fn(batch, generator, shard=...)``, a loss marked
    ``shardable``), so N processes train what one process does with an N times larger batch.
    """

    def __init__(self, adapters: Adapters, loss_fn: LossFn, dataset: Sequence[dict],
                 config: TrainConfig, *, entropy: EntropyCapture | None = None,
                 checkpoint_path: str | os.PathLike | None = None,
                 callbacks: Callbacks | None = None, parallel: Parallel | None = None) -> None:
        if len(dataset) == 0:
            raise ValueError("the dataset is empty: give at least one training example")
        self.parallel = parallel or Parallel()
        if self.parallel.active and not getattr(loss_fn, "shardable", False):
            raise ValueError("data-parallel training needs a loss that computes one shard of "
                             "the global batch (loss_fn.shardable, e.g. "
                             "schedule.denoising_loss); run this loss in one process")
        self.adapters, self.loss_fn, self.dataset = adapters, loss_fn, dataset
        self.config = config
        self.entropy = entropy
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.callbacks = callbacks or Callbacks()
        self.generator = torch.Generator().manual_seed(config.seed)
        self.optimizer = make_optimizer(adapters, config)
        self.step = 0
        self.history: list[dict] = []
        self._order = torch.empty(0, dtype=torch.long)
        self._pos = 0
        self._stop: int | None = None  # the signal that asked to stop
        # running statistics of the objective (checkpointed): the first steps' mean task loss
        # (task_norm="initial") and the EMA of the squared task gradient of nu ("normalized")
        self.stats = {"loss_sum": 0.0, "loss_n": 0, "nu_sq": 0.0, "nu_n": 0}
        self._set_checkpointing(adapters.model, config.grad_checkpointing)
        adapters.update_ranks(self.generator)  # D(nu) before the first step
        # every process starts from process 0's adapters (DDP does the same)
        self.parallel.broadcast_(adapters.factor_parameters() + adapters.nu_parameters())
        device = adapters.factor_parameters()[0].device
        self._device_type = device.type
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision)
        self._amp_dtype = amp
        self._scaler = (torch.amp.GradScaler(self._device_type)
                        if amp is torch.float16 and device.type == "cuda" else None)

    # -- data ------------------------------------------------------------------------------
    def _set_checkpointing(self, model: torch.nn.Module, on: bool) -> None:
        """Use the model's own switch (tiny UNets, diffusers) or wrap its blocks in :meth:`run`."""
        self._wrap_blocks = False
        if hasattr(model, "gradient_checkpointing"):
            model.gradient_checkpointing = on
        elif on and hasattr(model, "enable_gradient_checkpointing"):
            model.enable_gradient_checkpointing()
        else:
            self._wrap_blocks = on

    def _next_batch(self) -> tuple[dict, Shard]:
        """This process's part of the next global batch (one sampler for all processes, so a
        state resumes the same data order whatever the process count)."""
        per, par = self.config.batch_size, self.parallel
        shard = Shard(par.rank * per, (par.rank + 1) * per, per * par.world)
        items = []
        for i in range(shard.total):
            if self._pos >= len(self._order):  # a new epoch: a fresh permutation
                self._order = torch.randperm(len(self.dataset), generator=self.generator)
                self._pos = 0
            if shard.start <= i < shard.stop:
                items.append(self.dataset[int(self._order[self._pos])])
            self._pos += 1
        return collate(items), shard

    # -- one step ----------------------------------------------------------------------------
    def _autocast(self):
        if self._amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self._device_type, dtype=self._amp_dtype)

    def train_step(self) -> dict:
        """Accumulate gradients, step, then resize every layer to its new ``D(nu)``.

        Resizing at the end of a step (= before the next) keeps everything before the
        optimizer update free of side effects but the random draws, so a step interrupted
        midway (:attr:`Callbacks.interrupts`) is rolled back exactly and checkpointed.
        """
        snapshot = (self.generator.get_state(), torch.get_rng_state(), self._order, self._pos)
        try:
            rec = self._accumulate_and_step(self.config)
        except self.callbacks.interrupts as exc:
            self.adapters.clear_pending_grads()
            self.generator.set_state(snapshot[0])
            torch.set_rng_state(snapshot[1])
            self._order, self._pos = snapshot[2], snapshot[3]
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingInterrupted(self.step, self._save_if_possible()) from exc
        finally:
            self.adapters.clear_scales()
        changes = self.adapters.update_ranks(self.generator)
        apply_resizes(self.optimizer, self.adapters, changes)
        self._check_ranks_agree()
        return rec

    def _check_ranks_agree(self) -> None:
        """Processes that disagree on a rank would train different models: stop at once."""
        if not self.parallel.active:
            return
        ranks = self.adapters.ranks()
        lo, hi = self.parallel.extremes(list(ranks.values()))
        differ = [(n, int(a), int(b)) for n, a, b in zip(ranks, lo, hi) if a != b]
        if differ:
            name, a, b = differ[0]
            raise RuntimeError(f"the processes disagree on the rank of {name} after step "
                               f"{self.step} ({a} vs {b}); this is a bug in LoRA2's "
                               "data-parallel training: please report it")

    NORM_STEPS = 8  # task_norm="initial": the loss unit is the mean of the first 8 losses
    NU_EMA = 0.99  # nu_signal="normalized": memory of the RMS of nu's task gradient

    def _task_unit(self, value: float) -> float:
        """The divisor of the task loss: 1, or the running mean of the first (global) losses."""
        if self.config.task_norm == "none":
            return 1.0
        st = self.stats
        if st["loss_n"] < self.NORM_STEPS and math.isfinite(value):
            st["loss_sum"] += value
            st["loss_n"] += 1
        unit = st["loss_sum"] / max(st["loss_n"], 1)
        return unit if unit > 0 else 1.0

    @torch.no_grad()
    def _normalize_nu_grads(self) -> None:
        """Divide the task part of every nu's gradient by its running RMS over components.

        Adam moves nu by about ``nu_lr`` per step whatever the size of its gradient, so what
        decides a rank is the *ratio* of the fit's pull to lambda_r's. Measured in units of its
        own typical size, the fit's pull no longer depends on the loss's units, on how much of
        the loss is irreducible, or on how far the factors have come (the learning rate).
        """
        params = [p for p in self.adapters.nu_parameters() if p.grad is not None]
        if not params:
            return
        g = torch.stack([p.grad.reshape(()) for p in params]).float()
        scale = float(self._scaler.get_scale()) if self._scaler else 1.0
        sq = float(g.pow(2).mean()) / scale**2
        st = self.stats
        if math.isfinite(sq):
            st["nu_sq"] = self.NU_EMA * st["nu_sq"] + (1 - self.NU_EMA) * sq
            st["nu_n"] += 1
        rms = math.sqrt(st["nu_sq"] / (1 - self.NU_EMA ** max(st["nu_n"], 1)))  # bias-corrected
        if rms > 0:
            for p in params:
                p.grad.div_(rms)

    def _accumulate_and_step(self, cfg: TrainConfig) -> dict:
        task_sum, ent_sum = 0.0, 0.0
        par = self.parallel
        for _ in range(cfg.grad_accum):
            self.adapters.cache_scales()  # Lambda for all layers in one op (per backward)
            batch, shard = self._next_batch()
            if self.entropy is not None:
                self.entropy.clear()
            with self._autocast():
                task = (self.loss_fn(batch, self.generator, shard=shard) if par.active
                        else self.loss_fn(batch, self.generator))
            ent = torch.zeros(())
            if self.entropy is not None and cfg.lambda_e > 0:
                ent = self.entropy.mean()
            # the global batch's values: the loss unit and the history are the same everywhere
            task_value, ent_value = par.average([float(task.detach()), float(ent.detach())])
            loss = task.float() / self._task_unit(task_value) + cfg.lambda_e * ent
            self._backward(loss / cfg.grad_accum)
            task_sum += task_value
            ent_sum += ent_value
        # the mean over processes of every gradient, before anything reads one
        par.mean_([p.grad for p in self.adapters.factor_parameters()
                   + self.adapters.nu_parameters() if p.grad is not None]
                  + self.adapters.pending_grads())
        self.adapters.init_pending_slots(self.generator)
        if cfg.nu_signal != "raw":
            self._normalize_nu_grads()
        reg = rank_penalty(self.adapters)
        if cfg.lambda_r > 0 and reg.requires_grad:
            self._backward(cfg.lambda_r * reg)
        task_mean = task_sum / cfg.grad_accum
        ent_mean = ent_sum / cfg.grad_accum
        total = task_mean + cfg.lambda_r * float(reg.detach()) + cfg.lambda_e * ent_mean
        if not math.isfinite(total):
            self.optimizer.zero_grad(set_to_none=True)
            where = self._save_if_possible()
            raise NonFiniteLoss(
                f"the loss became {total} at step {self.step + 1}; training stopped and the "
                f"adapters are kept at step {self.step}" + (f" ({where})" if where else "")
                + ": lower the learning rate or use mixed_precision='no'")
        self._optimizer_step()
        self.step += 1
        ranks = list(self.adapters.ranks().values())
        rec = {"step": self.step, "loss": total, "task": task_mean, "rank_reg": float(reg.detach()),
               "entropy": ent_mean, "mean_rank": sum(ranks) / len(ranks),
               "params": self.adapters.num_parameters()}
        self.history.append(rec)
        return rec

    def _backward(self, loss: torch.Tensor) -> None:
        (self._scaler.scale(loss) if self._scaler else loss).backward()

    def _optimizer_step(self) -> None:
        params = self.adapters.factor_parameters() + self.adapters.nu_parameters()
        if self._scaler:
            self._scaler.unscale_(self.optimizer)
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        if self._scaler:
            self._scaler.step(self.optimizer)
            self._scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -- the loop --------------------------------------------------------------------------
    def run(self, steps: int | None = None) -> list[dict]:
        """Train until ``steps`` (default ``config.steps``) with callbacks and checkpoints.

        Ctrl-C (in the main thread) or ``should_stop()`` ends the run at a step boundary with a
        checkpoint and :class:`TrainingInterrupted`.
        """
        steps = self.config.steps if steps is None else steps
        cb = self.callbacks
        blocks = (checkpointed_blocks(self.adapters.model) if self._wrap_blocks
                  else contextlib.nullcontext())
        with self._sigint_as_request(), blocks:
            while self.step < steps:
                stop = bool(self._stop or (cb.should_stop and cb.should_stop()))
                if self.parallel.any(stop):  # every process stops at the same step
                    raise TrainingInterrupted(self.step, self._save_if_possible(), self._stop)
                rec = self.train_step()
                if cb.on_step:
                    cb.on_step(self, rec)
                if cb.on_preview and cb.preview_every and self.step % cb.preview_every == 0:
                    cb.on_preview(self)
                every = self.config.checkpoint_every
                if every and self.step % every == 0 and self.step < steps:
                    self._save_if_possible()
        return self.history

    @contextlib.contextmanager
    def _sigint_as_request(self):
        """Ctrl-C and SIGTERM (docker stop, job schedulers) stop at the next step boundary
        with a checkpoint, instead of killing the run where it stands."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(sig, _frame):
            self._stop = sig

        sigs = [signal.SIGINT] + ([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])
        previous = {s: signal.signal(s, handler) for s in sigs}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    # -- checkpoints -----------------------------------------------------------------------
    def _save_if_possible(self) -> Path | None:
        """Write the state (main process only; the others wait until it is written)."""
        if not self.checkpoint_path:
            return None
        self.parallel.on_main(self.save_checkpoint)
        return self.checkpoint_path

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path:
        """Atomically write the whole state: A, B, nu (full capacity), optimizer, RNG, step."""
        path = Path(path or self.checkpoint_path)
        tensors: dict[str, torch.Tensor] = {}
        ranks, pending = {}, {}
        for name, layer in self.adapters.layers.items():
            tensors[f"adapter.{name}.A"] = layer.A.detach()
            tensors[f"adapter.{name}.B"] = layer.B.detach()
            if hasattr(layer, "nu_param"):
                tensors[f"adapter.{name}.nu_param"] = layer.nu_param.detach()
            ranks[name] = layer.rank
            if layer.pending:
                pending[name] = layer.pending
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            for key, value in self.optimizer.state.get(p, {}).items():
                tensors[f"optim.{i}.{key}"] = torch.as_tensor(value)
        tensors["rng.generator"] = self.generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["data.order"] = self._order
        meta = {"lora2.checkpoint": "1", "step": str(self.step), "data.pos": str(self._pos),
                "data.size": str(len(self.dataset)), "data.processes": str(self.parallel.world),
                "ranks": json.dumps(ranks), "pending": json.dumps(pending),
                "stats": json.dumps(self.stats), "history": json.dumps(self.history),
                "train_config": json.dumps(to_dict(self.config))}
        if self.adapters.config is not None:
            meta["adapter_config"] = json.dumps(to_dict(self.adapters.config))
        return save_tensors(path, tensors, meta, overwrite=True)

    def load_checkpoint(self, path: str | os.PathLike, allow_changes: bool = False) -> None:
        """Restore a state written by :meth:`save_checkpoint` into this trainer.

        The file is checked first (``resume.py``): keys, shapes, types, finite values, and
        that this run's settings, model and data match the state's; differences are refused
        unless ``allow_changes`` (they are then warned about).
        """
        import warnings

        from .formats.io import LoraFileError
        from .resume import (
            check_data_size,
            check_settings,
            check_state_tensors,
            global_batch,
            state_metadata,
        )

        tensors, raw = load_tensors(path)
        meta = state_metadata(raw, path)
        if set(meta["ranks"]) != set(self.adapters.layers):
            raise LoraFileError(f"{path}: checkpoint modules differ from the attached adapters "
                                "(other model or targets); resume with the same settings")
        check_state_tensors(tensors, meta, path, self.adapters.layers)
        adapter_cfg = to_dict(self.adapters.config) if self.adapters.config else None
        procs = (meta["data.processes"], self.parallel.world)  # batch_size is per process
        meta["train_config"] = global_batch(meta["train_config"], procs[0])
        for change in check_settings(meta, global_batch(to_dict(self.config), procs[1]),
                                     adapter_cfg, path, allow_changes):
            warnings.warn(f"resuming {path} with a changed setting: {change}", stacklevel=2)
        keep_order = check_data_size(meta, tensors["data.order"], len(self.dataset), path,
                                     allow_changes)
        ranks, pending = meta["ranks"], meta["pending"]
        self.stats.update(meta["stats"])
        with torch.no_grad():
            for name, layer in self.adapters.layers.items():
                layer.A.data = tensors[f"adapter.{name}.A"].to(layer.A.device).clone()
                layer.B.data = tensors[f"adapter.{name}.B"].to(layer.B.device).clone()
                if hasattr(layer, "nu_param"):
                    layer.nu_param.copy_(tensors[f"adapter.{name}.nu_param"])
                layer.rank = int(ranks[name])
                layer.pending = int(pending.get(name, 0))
                layer.clear_pending_grad()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.optimizer.state.clear()
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, i, name = key.split(".", 2)
                if not i.isdigit() or int(i) >= len(params) or (
                        value.ndim and value.shape != params[int(i)].shape):
                    raise LoraFileError(f"{path}: optimizer entry {key!r} does not fit this "
                                        "run's parameters; resume with the same settings")
                self.optimizer.state[params[int(i)]][name] = value.to(params[int(i)].device)
        self.generator.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])
        self._order = tensors["data.order"] if keep_order else torch.empty(0, dtype=torch.long)
        self._pos = meta["data.pos"] if keep_order else 0
        self.step = meta["step"]
        self.history = meta["history"]
