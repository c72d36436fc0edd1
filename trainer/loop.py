"""The offline training loop: steps to early stop, validation, checkpoints, Ctrl-C.

``train`` takes a model, a leave-one-out split (trainer/samples.py) and ``train.*`` settings: AdamW
(trainer/optim.py) on the sequence loss (trainer/loss.py: the full softmax, or the sampled one above
``train.sampled_softmax_above`` items), gradients clipped at ``grad_clip``, the mean loss
logged every ``LOG_EVERY`` steps, validation every ``val_every`` steps and at ``max_steps``, an early stop after
``patience`` validations without a better validation Recall@10. It returns the run's :class:`History` and
leaves the best-validation weights in the model; the test metrics are those of those weights.

With a checkpoint path the loop's whole state is written there at every validation (trainer/checkpoint.py);
a run out of its time budget writes it too, then validates for its report; ``resume`` continues from it, so a
resumed run takes exactly the steps of an uninterrupted one. Ctrl-C / SIGTERM stop the loop between two steps:
the checkpoint is written and :class:`Interrupted` raised (a second Ctrl-C interrupts at once).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lrustream.kernel.config import TrainConfig
from models import SeqRecModel
from trainer.checkpoint import LoopState, load_checkpoint, save_checkpoint
from trainer.evaluate import evaluate
from trainer.loss import Sampling, sequence_loss
from trainer.optim import clipped_step, make_optimizer
from trainer.samples import Split, batches

LOG_EVERY = 50

OnValidate = Callable[[int, dict[str, float]], None]


@dataclass
class History:
    model: str
    device: str
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_metrics: list[dict[str, float]] = field(default_factory=list)
    best_step: int = 0
    best_val: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0  # training time over all sittings of a resumed run
    steps_done: int = 0
    stopped_because: str = ""
    resumed_at: list[int] = field(default_factory=list)  # steps at which an interrupted run was continued
    dropped_steps: int = 0  # steps whose gradients were not finite and were dropped (trainer.optim.clipped_step)

    def to_json(self) -> dict:
        return asdict(self)


class Interrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C or SIGTERM after its checkpoint was written."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        where = f"; checkpoint {checkpoint} (continue with --resume)" if checkpoint else ""
        super().__init__(f"training interrupted at step {step}{where}")


@contextlib.contextmanager
def _deferred_signals() -> Iterator[list[int]]:
    """Ctrl-C / SIGTERM only raise a flag, so the loop stops between steps (never half-way through an optimiser
    update) and can write its checkpoint; a second Ctrl-C interrupts at once."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def handler(signum: int, _frame: object) -> None:
        caught.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_setup(model: SeqRecModel, split: Split, cfg: TrainConfig) -> dict:
    """What a checkpoint must agree with to be resumed: same model, data and optimisation (and, when the loss is
    the sampled softmax, the same number of draws)."""
    digest = hashlib.sha1()
    for seq in split.train:
        digest.update(np.ascontiguousarray(seq, dtype=np.int64).tobytes())
        digest.update(b"|")
    setup = {"model": model.name, "hparams": model.hparams(), "num_items": model.num_items,
             "train_data_sha1": digest.hexdigest(), "batch_size": cfg.batch_size, "seed": cfg.seed,
             "lr": cfg.lr, "weight_decay": cfg.weight_decay, "adam_eps": cfg.adam_eps, "grad_clip": cfg.grad_clip,
             "val_every": cfg.val_every}
    if Sampling.of(cfg).applies(model.num_items):
        setup["sampled_softmax_negatives"] = cfg.negatives
    return setup


class _Run:
    """One sitting of a training run: the loop's state, restored from and saved to its checkpoint."""

    def __init__(self, model: SeqRecModel, split: Split, cfg: TrainConfig, device: torch.device,
                 checkpoint: Path | None, resume: bool) -> None:
        self.model, self.split, self.cfg, self.device, self.checkpoint = model, split, cfg, device, checkpoint
        self.opt = make_optimizer(model, cfg)
        self.sampling = Sampling.of(cfg)
        self.setup = run_setup(model, split, cfg)
        self.hist = History(model=model.name, device=str(device))
        self.best_state = copy.deepcopy(model.state_dict())
        self.bad_rounds, self.running = 0, torch.zeros((), device=device)
        if resume and checkpoint is not None and checkpoint.is_file():
            self._restore(checkpoint)
        self.step, self.best_r10 = self.hist.steps_done, self.hist.best_val.get("Recall@10", -1.0)
        self.dropped = torch.tensor(self.hist.dropped_steps, device=device)
        self.started, self.seconds_before = time.monotonic(), self.hist.seconds

    def _restore(self, checkpoint: Path) -> None:
        self.best_state, loop = load_checkpoint(checkpoint, setup=self.setup, model=self.model, optimizer=self.opt,
                                                retired_hparams=type(self.model.config).retired)
        self.hist = History(**{**loop.history, "device": str(self.device), "stopped_because": ""})
        self.hist.resumed_at.append(self.hist.steps_done)
        self.bad_rounds, self.running = loop.bad_rounds, torch.tensor(loop.running_loss, device=self.device)

    def tally(self) -> None:
        self.hist.steps_done = self.step
        self.hist.dropped_steps = int(self.dropped)
        self.hist.seconds = self.seconds_before + time.monotonic() - self.started

    def save(self) -> None:
        if self.checkpoint is not None:
            self.tally()
            save_checkpoint(self.checkpoint, setup=self.setup, model=self.model, best=self.best_state,
                            optimizer=self.opt,
                            loop=LoopState(self.bad_rounds, self.running.item(), self.hist.to_json()))

    def finished(self) -> bool:
        return self.bad_rounds >= self.cfg.patience or self.step >= self.cfg.max_steps

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches after the last step taken (none when the run has finished)."""
        if self.finished():
            return iter(())
        return batches(self.model, self.split, self.cfg.batch_size, self.cfg.seed, skip=self.step)

    def optimise(self, tokens: torch.Tensor, labels: torch.Tensor) -> None:
        """One optimiser step on one batch; its loss is summed on the device (no host sync)."""
        loss = sequence_loss(self.model, tokens.to(self.device, non_blocking=True),
                             labels.to(self.device, non_blocking=True), self.sampling)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.dropped += clipped_step(self.model, self.opt, self.cfg.grad_clip)
        self.running += loss.detach()

    def log_loss(self) -> None:
        """The mean loss of the last ``LOG_EVERY`` steps (one host sync per ``LOG_EVERY`` steps)."""
        self.hist.steps.append(self.step)
        self.hist.losses.append(self.running.item() / LOG_EVERY)
        self.running.zero_()

    def validate(self, on_validate: OnValidate | None) -> None:
        """Validation metrics; the best so far keeps its weights, any other counts towards the patience."""
        val = evaluate(self.model, self.split.val_inputs, self.split.val_targets, self.cfg.eval_batch_size,
                       self.device)
        self.hist.val_steps.append(self.step)
        self.hist.val_metrics.append(val)
        if on_validate:
            on_validate(self.step, val)
        if val["Recall@10"] > self.best_r10:
            self.best_r10, self.bad_rounds = val["Recall@10"], 0
            self.best_state = copy.deepcopy(self.model.state_dict())
            self.hist.best_step, self.hist.best_val = self.step, val
        else:
            self.bad_rounds += 1

    def postfix(self) -> dict[str, str]:
        """The progress bar's figures: the last logged loss and the best validation Recall@10."""
        loss = self.hist.losses[-1] if self.hist.losses else math.nan
        return {"loss": f"{loss:.3f}", "best_r10": f"{max(self.best_r10, 0):.4f}"}

    def stopped_because(self, max_minutes: float | None) -> str:
        if self.bad_rounds >= self.cfg.patience:
            return f"early stop: {self.cfg.patience} validations without a better Recall@10"
        if self.step >= self.cfg.max_steps:
            return f"max_steps={self.cfg.max_steps}"
        return f"time budget of {max_minutes} min"

    def finish(self, max_minutes: float | None) -> History:
        """Back to the best-validation weights, tested."""
        self.hist.stopped_because = self.stopped_because(max_minutes)
        self.model.load_state_dict(self.best_state)
        self.tally()
        self.hist.test = evaluate(self.model, self.split.test_inputs, self.split.test_targets,
                                  self.cfg.eval_batch_size, self.device)
        self.model.eval()
        return self.hist


def _sitting(run: _Run, bar: tqdm, caught: list[int], max_minutes: float | None,
             on_validate: OnValidate | None) -> None:
    """Steps until early stop, ``max_steps``, the time budget or a caught signal."""
    cfg = run.cfg
    for step, (tokens, labels) in enumerate(run.batches(), start=run.step + 1):
        run.step = step
        run.optimise(tokens, labels)
        bar.update(1)
        if run.step % LOG_EVERY == 0:
            run.log_loss()
            bar.set_postfix(run.postfix())
        out_of_time = max_minutes is not None and time.monotonic() - run.started > 60 * max_minutes
        scheduled = run.step % cfg.val_every == 0 or run.step == cfg.max_steps
        if out_of_time and not scheduled:
            run.save()  # a resumed run goes on from here as if never stopped; this sitting validates for its report
        if scheduled or out_of_time:
            run.validate(on_validate)
            bar.set_postfix(run.postfix())
            if scheduled:
                run.save()
        if run.finished() or out_of_time or caught:
            break


def train(model: SeqRecModel, split: Split, cfg: TrainConfig, device: torch.device,
          max_minutes: float | None = None, progress: bool = True, on_validate: OnValidate | None = None,
          checkpoint: Path | None = None, resume: bool = False) -> History:
    """Train to early stop (or max_steps / max_minutes); leaves the best-validation weights in ``model``.

    With ``checkpoint`` the loop's whole state is saved there at every validation and on Ctrl-C/SIGTERM;
    ``resume`` continues from it (``max_minutes`` then counts this sitting only)."""
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    run = _Run(model, split, cfg, device, checkpoint, resume)
    bar = tqdm(total=cfg.max_steps, initial=run.step, disable=not progress, desc=model.name, unit="step",
               dynamic_ncols=True)
    with _deferred_signals() as caught:
        _sitting(run, bar, caught, max_minutes, on_validate)
    bar.close()
    if caught:
        run.save()
        raise Interrupted(run.step, checkpoint)
    return run.finish(max_minutes)
