"""fit(): one fine-tuning run of a bare model through a Lightning Trainer."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from compress.config import FinetuneConfig
from compress.files import atomic_write
from compress.lit.system import ClassificationSystem

__all__ = ["fit", "begin_fit", "make_trainer", "as_callback", "AtomicCheckpointIO"]

# ``ctx`` below is a :class:`compress.stages.Context` or anything with its attributes (datamodule,
# trainer, loggers, out_dir, seed, stage_index, fits, stage_checkpoint_dir()): this layer sits
# below the stages and does not import them.
TrainingContext = Any


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary file and renamed: a kill mid-write leaves the
    previous checkpoint intact instead of a truncated one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        atomic_write(path, lambda tmp: super(AtomicCheckpointIO, self).save_checkpoint(checkpoint, tmp, storage_options))

for _name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
    logging.getLogger(_name).setLevel(logging.WARNING)


def make_trainer(ctx: TrainingContext, epochs: int, callbacks: Sequence[Any] = (), **overrides: Any) -> pl.Trainer:
    """A Trainer from the recipe's ``trainer`` block (accelerator, devices, strategy, precision...)."""
    t = dict(ctx.trainer)
    show_bar = bool(t.pop("progress_bar", True)) and sys.stderr.isatty()
    kwargs: dict[str, Any] = dict(
        max_epochs=epochs,
        accelerator=t.get("accelerator", "cpu"),
        devices=t.get("devices", 1),
        num_nodes=t.get("num_nodes", 1),
        strategy=t.get("strategy", "auto"),
        precision=t.get("precision", "32-true"),
        gradient_clip_val=t.get("gradient_clip_val"),
        log_every_n_steps=t.get("log_every_n_steps", 10),
        logger=list(ctx.loggers) or False,
        callbacks=list(callbacks),
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=show_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(ctx.out_dir) if ctx.out_dir else None,
        plugins=[AtomicCheckpointIO()],
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


def begin_fit(ctx: TrainingContext) -> None:
    """Count one more fine-tuning run of the stage and seed it (before its objective is built, so a
    distillation objective's adapters start from the same draw in a resumed run)."""
    ctx.fits += 1
    pl.seed_everything(ctx.seed + 1000 * ctx.stage_index + ctx.fits, workers=True, verbose=False)


def fit(model: nn.Module, ctx: TrainingContext, cfg: FinetuneConfig, objective: nn.Module | None = None,
        callbacks: Sequence[Any] = (), tag: str = "finetune") -> dict[str, float]:
    """Train ``model`` in place for ``cfg.epochs`` on ``objective``; returns the last logged metrics.

    The caller builds the objective (``objective(model, x, y) -> (loss, logits, parts)``; None: the
    loss of ``ctx.task``, cross-entropy without one) after :func:`begin_fit`; one with parameters (a
    distillation objective's adapters) trains them with the student, and they are dropped afterwards.
    """
    system = ClassificationSystem(model, cfg, objective, tag=tag, task=getattr(ctx, "task", None))
    callbacks = [as_callback(c) for c in callbacks]
    resume_from = None
    stage_dir = ctx.stage_checkpoint_dir()
    if stage_dir is not None:  # resumable: the last epoch of every fine-tuning run is kept
        fit_dir = stage_dir / f"fit-{ctx.fits}"
        callbacks.append(ModelCheckpoint(dirpath=str(fit_dir), filename="last", save_top_k=1, every_n_epochs=1,
                                         enable_version_counter=False))
        if (fit_dir / "last.ckpt").is_file():
            resume_from = str(fit_dir / "last.ckpt")
    if os.environ.get("COMPRESS_KILL_AT"):
        callbacks.append(_KillAt(os.environ["COMPRESS_KILL_AT"], ctx.stage_index))
    trainer = make_trainer(ctx, cfg.epochs, callbacks, limit_train_batches=cfg.limit_train_batches)
    was_training = model.training
    trainer.fit(system, datamodule=ctx.datamodule, ckpt_path=resume_from, weights_only=True if resume_from else None)
    model.train(was_training)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}



# Lightning's hooks that a plain object may implement to be driven by :func:`fit`.
HOOKS = tuple(n for n in vars(pl.Callback) if n.startswith("on_") or n in ("setup", "teardown"))


class _Forward(pl.Callback):
    """A plain object with hook methods (``on_train_batch_start`` ...) driven as a Lightning callback.

    Lower layers (pruning schedules, regularisers) write their callbacks without importing Lightning;
    ``state_key``, ``state_dict`` and ``load_state_dict`` forward too, so their state resumes.
    """

    def __init__(self, target: Any):
        self.target = target

    @property
    def state_key(self) -> str:
        return type(self.target).__qualname__

    def state_dict(self) -> dict[str, Any]:
        return self.target.state_dict() if hasattr(self.target, "state_dict") else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if hasattr(self.target, "load_state_dict"):
            self.target.load_state_dict(state_dict)


def _forwarder(name: str) -> Any:
    def hook(self: _Forward, *args: Any, **kwargs: Any) -> Any:
        method = getattr(self.target, name, None)
        return method(*args, **kwargs) if method is not None else None

    hook.__name__ = name
    return hook


for _hook in HOOKS:
    setattr(_Forward, _hook, _forwarder(_hook))


def as_callback(obj: Any) -> pl.Callback:
    """``obj`` itself when it is a Lightning callback, else an adapter calling its hook methods."""
    return obj if isinstance(obj, pl.Callback) else _Forward(obj)


class _KillAt(pl.Callback):
    """Fault injection for the crash-and-resume tests: ``COMPRESS_KILL_AT=STAGE:EPOCH:BATCH`` sends
    this process SIGKILL at that batch of that epoch of that stage (no clean-up runs, as in a crash)."""

    def __init__(self, spec: str, stage_index: int):
        stage, epoch, batch = (int(v) for v in spec.split(":"))
        self.active = stage == stage_index
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.active and trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)
