"""Offline training and evaluation with the LRURec protocol, for every model alike.

Training samples follow the official LRURec loader: per user the training part (all but the last two items),
as one window of up to ``max_len`` next-item pairs, or non-overlapping windows of ``max_len`` for users with
at least twice that many items; cross-entropy over ALL items at every labelled position. Models that see the
whole window (the unmasked LinRec) are trained as RecBole trains them: every prefix is a sample, loss at its
last position only. AdamW (lr 1e-3, eps 1e-9, weight decay 0.01 except biases and LayerNorms), gradients
clipped at 5, validation every ``val_every`` steps, early stop after ``patience`` validations without a better
validation Recall@10; the test metrics are those of the best validation checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lrustream.kernel.config import TrainConfig
from models import SeqRecModel
from trainer.checkpoint import LoopState, checkpoint_path, load_checkpoint, save_checkpoint
from trainer.evaluate import evaluate, left_pad
from trainer.loss import catalogue_cross_entropy


# ----- split and samples ---------------------------------------------------------------------------------------
@dataclass
class Split:
    train: list[np.ndarray]
    val_inputs: torch.Tensor
    val_targets: torch.Tensor
    test_inputs: torch.Tensor
    test_targets: torch.Tensor


def leave_one_out(encoded: list[np.ndarray], max_len: int) -> Split:
    """Last item = test, second-to-last = validation (users with >= 3 items); the rest trains."""
    train, val_in, val_y, test_in, test_y = [], [], [], [], []
    for seq in encoded:
        if len(seq) >= 3:
            train.append(seq[:-2])
            val_in.append(seq[:-2])
            val_y.append(seq[-2])
            test_in.append(seq[:-1])
            test_y.append(seq[-1])
        else:
            train.append(seq)
    return Split(train, left_pad(val_in, max_len), torch.tensor(val_y, dtype=torch.long),
                 left_pad(test_in, max_len), torch.tensor(test_y, dtype=torch.long))


def train_windows(train: list[np.ndarray], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, labels) [S, max_len] as the official loader builds them; labels 0 are ignored."""
    windows: list[np.ndarray] = []
    for seq in train:
        if len(seq) < 2:
            continue
        if len(seq) < 2 * max_len:
            windows.append(seq)
        else:
            windows.extend(seq[i: i + max_len] for i in range(len(seq) - max_len, -1, -max_len))
    tokens = left_pad([w[:-1] for w in windows], max_len)
    labels = left_pad([w[-max_len:] for w in windows], max_len)
    return tokens, labels


class PrefixSamples:
    """Every (user, position) pair as a sample: input = the max_len items before it, target = the item."""

    def __init__(self, train: list[np.ndarray], max_len: int) -> None:
        longest = max(len(s) for s in train)
        self.max_len = max_len
        self.matrix = left_pad(train, longest)  # [U, longest], each user right-aligned
        self.matrix = F.pad(self.matrix, (max_len, 0))
        lengths = np.array([len(s) for s in train])
        users, ends = [], []
        for u, n in enumerate(lengths):
            users.append(np.full(n - 1, u))
            ends.append(np.arange(1, n))
        self.users = torch.from_numpy(np.concatenate(users))
        # column (in the padded matrix) of each target
        self.cols = torch.from_numpy(np.concatenate(ends) + max_len + longest - lengths[np.concatenate(users)])

    def __len__(self) -> int:
        return len(self.users)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, col = self.users[idx], self.cols[idx]
        window = col[:, None] - self.max_len + torch.arange(self.max_len)
        return self.matrix[u[:, None], window], self.matrix[u, col]


def _shuffled(n: int, batch_size: int, seed: int, skip: int) -> Iterator[torch.Tensor]:
    """Endless index batches, epoch after epoch, from ``seed``; the first ``skip`` are drawn but not yielded,
    so a resumed run sees exactly the batches an uninterrupted one would."""
    g = torch.Generator().manual_seed(seed)
    per_epoch = math.ceil(n / batch_size)
    while True:
        perm = torch.randperm(n, generator=g)
        if skip >= per_epoch:
            skip -= per_epoch
            continue
        yield from perm.split(batch_size)[skip:]
        skip = 0


def batches(model: SeqRecModel, split: Split, batch_size: int, seed: int, skip: int = 0
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled batches in the form the model trains on, starting after ``skip`` batches."""
    if model.loss_positions == "last":
        samples = PrefixSamples(split.train, model.max_len)
        for idx in _shuffled(len(samples), batch_size, seed, skip):
            yield samples.batch(idx)
    else:
        tokens, labels = train_windows(split.train, model.max_len)
        for idx in _shuffled(len(tokens), batch_size, seed, skip):
            yield tokens[idx], labels[idx]


LOG_EVERY = 50


# ----- optimisation --------------------------------------------------------------------------------------------
def make_optimizer(model: SeqRecModel, cfg: TrainConfig, lr: float | None = None) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if ("bias" in name or "layer_norm" in name) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr or cfg.lr, eps=cfg.adam_eps)


def sequence_loss(model: SeqRecModel, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Full-softmax cross-entropy; logits only where there is a label (padding costs nothing)."""
    emb, bias = model.item_table()
    n = model.num_items + 1  # the OOV row is never a target
    if model.loss_positions == "last":
        return catalogue_cross_entropy(model.last_hidden(tokens), emb[:n], None if bias is None else bias[:n], labels)
    hidden = model(tokens)
    sel = labels > 0
    return catalogue_cross_entropy(hidden[sel], emb[:n], None if bias is None else bias[:n], labels[sel])


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


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
    """What a checkpoint must agree with to be resumed: same model, data and optimisation."""
    digest = hashlib.sha1()
    for seq in split.train:
        digest.update(np.ascontiguousarray(seq, dtype=np.int64).tobytes())
        digest.update(b"|")
    return {"model": model.name, "hparams": model.hparams(), "num_items": model.num_items,
            "train_data_sha1": digest.hexdigest(), "batch_size": cfg.batch_size, "seed": cfg.seed,
            "lr": cfg.lr, "weight_decay": cfg.weight_decay, "adam_eps": cfg.adam_eps, "grad_clip": cfg.grad_clip,
            "val_every": cfg.val_every}


def train(model: SeqRecModel, split: Split, cfg: TrainConfig, device: torch.device,
          max_minutes: float | None = None, progress: bool = True,
          on_validate: Callable[[int, dict[str, float]], None] | None = None,
          checkpoint: Path | None = None, resume: bool = False) -> History:
    """Train to early stop (or max_steps / max_minutes); leaves the best-validation weights in ``model``.

    With ``checkpoint`` the loop's whole state is saved there at every validation and on Ctrl-C/SIGTERM;
    ``resume`` continues from it (``max_minutes`` then counts this sitting only)."""
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    opt = make_optimizer(model, cfg)
    setup = run_setup(model, split, cfg)
    hist = History(model=model.name, device=str(device))
    best_state = copy.deepcopy(model.state_dict())
    bad_rounds, running = 0, torch.zeros((), device=device)
    if resume and checkpoint is not None and checkpoint.is_file():
        best_state, loop = load_checkpoint(checkpoint, setup=setup, model=model, optimizer=opt)
        hist = History(**{**loop.history, "device": str(device), "stopped_because": ""})
        hist.resumed_at.append(hist.steps_done)
        bad_rounds, running = loop.bad_rounds, torch.tensor(loop.running_loss, device=device)
    step, best_r10 = hist.steps_done, hist.best_val.get("Recall@10", -1.0)
    started, seconds_before = time.monotonic(), hist.seconds

    def tally() -> None:
        hist.steps_done, hist.seconds = step, seconds_before + time.monotonic() - started

    def save() -> None:
        if checkpoint is not None:
            tally()
            save_checkpoint(checkpoint, setup=setup, model=model, best=best_state, optimizer=opt,
                            loop=LoopState(bad_rounds, running.item(), hist.to_json()))

    bar = tqdm(total=cfg.max_steps, initial=step, disable=not progress, desc=model.name, unit="step",
               dynamic_ncols=True)
    finished = bad_rounds >= cfg.patience or step >= cfg.max_steps
    with _deferred_signals() as caught:
        done = step
        stream = () if finished else batches(model, split, cfg.batch_size, cfg.seed, skip=done)
        for step, (tokens, labels) in enumerate(stream, start=done + 1):
            loss = sequence_loss(model, tokens.to(device, non_blocking=True), labels.to(device, non_blocking=True))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            running += loss.detach()
            bar.update(1)
            if step % LOG_EVERY == 0:  # one host sync per LOG_EVERY steps
                hist.steps.append(step)
                hist.losses.append(running.item() / LOG_EVERY)
                running.zero_()
                bar.set_postfix(loss=f"{hist.losses[-1]:.3f}", best_r10=f"{max(best_r10, 0):.4f}")
            out_of_time = max_minutes is not None and time.monotonic() - started > 60 * max_minutes
            scheduled = step % cfg.val_every == 0 or step == cfg.max_steps
            if out_of_time and not scheduled:
                save()  # a resumed run goes on from here as if never stopped; this sitting validates for its report
            if scheduled or out_of_time:
                val = evaluate(model, split.val_inputs, split.val_targets, cfg.eval_batch_size, device)
                hist.val_steps.append(step)
                hist.val_metrics.append(val)
                if on_validate:
                    on_validate(step, val)
                if val["Recall@10"] > best_r10:
                    best_r10, bad_rounds = val["Recall@10"], 0
                    best_state = copy.deepcopy(model.state_dict())
                    hist.best_step, hist.best_val = step, val
                else:
                    bad_rounds += 1
                bar.set_postfix(loss=f"{hist.losses[-1] if hist.losses else math.nan:.3f}",
                                best_r10=f"{best_r10:.4f}")
                if scheduled:
                    save()
            if bad_rounds >= cfg.patience or step >= cfg.max_steps or out_of_time or caught:
                break
    bar.close()
    if caught:
        save()
        raise Interrupted(step, checkpoint)
    hist.stopped_because = (
        f"early stop: {cfg.patience} validations without a better Recall@10" if bad_rounds >= cfg.patience
        else f"max_steps={cfg.max_steps}" if step >= cfg.max_steps
        else f"time budget of {max_minutes} min")
    model.load_state_dict(best_state)
    tally()
    hist.test = evaluate(model, split.test_inputs, split.test_targets, cfg.eval_batch_size, device)
    model.eval()
    return hist


# ----- reporting -----------------------------------------------------------------------------------------------
METRIC_COLUMNS = ("NDCG@10", "Recall@10", "NDCG@20", "Recall@20", "MRR")


def metric_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per model."""
    head = "| model | " + " | ".join(METRIC_COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(METRIC_COLUMNS) + 1)]
    for name, metrics in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics.get(c, math.nan):.5f}" for c in METRIC_COLUMNS) + " |")
    return "\n".join(lines)


def save_history(hist: History, out_dir: Path) -> tuple[Path, Path]:
    """history.json and training_curve.png (loss and validation NDCG/Recall@10 over steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    hist_path = out_dir / f"{hist.model}-history.json"
    hist_path.write_text(json.dumps(hist.to_json(), indent=1))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(hist.steps, hist.losses)
    ax1.set(xlabel="step", ylabel="training loss", title=f"{hist.model}: loss")
    for key in ("Recall@10", "NDCG@10"):
        ax2.plot(hist.val_steps, [m[key] for m in hist.val_metrics], label=f"val {key}")
    ax2.axvline(hist.best_step, color="grey", linestyle=":", label=f"best (step {hist.best_step})")
    ax2.set(xlabel="step", title=f"{hist.model}: validation")
    ax2.legend()
    fig.tight_layout()
    png = out_dir / f"{hist.model}-training-curve.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return hist_path, png


# ----- the command ---------------------------------------------------------------------------------------------
@dataclass
class OfflineResult:
    model: str
    version: str | None
    history: History
    curve: Path


def run_offline(cfg, data_path: str, names: list[str], out_dir: Path, max_minutes: float | None = None,
                publish: bool = True, progress: bool = True, log: Callable[[str], None] = print,
                resume: bool = False) -> list[OfflineResult]:
    """Train and evaluate each named model on one data set; publish each to the model store.

    Each model's run keeps a checkpoint in ``out_dir``; ``resume`` continues the runs found there."""
    from models import build_model, model_config
    from models.store import ModelStore
    from trainer.data import load_sequences

    seqs = load_sequences(data_path)
    vocab = seqs.vocabulary()
    split = leave_one_out(seqs.encoded(vocab), cfg.model.max_len)
    device = pick_device(cfg.train.device)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    # full fp32 matmuls on GPUs too (no TF32): the paper's numbers were produced that way
    torch.backends.cuda.matmul.allow_tf32 = False
    log(f"data {seqs.name}: {len(seqs)} users, {len(vocab)} items, {seqs.num_interactions} interactions; "
        f"device {device} ({torch.get_num_threads()} CPU threads)")
    store = ModelStore(cfg.model_store.dir)
    results = []
    for name in names:
        torch.manual_seed(cfg.train.seed)
        model = build_model(model_config(cfg.model, name), len(vocab))
        ckpt = checkpoint_path(out_dir, name)
        if ckpt.is_file():
            log(f"{name}: continuing the run in {ckpt}" if resume
                else f"{name}: starting afresh (pass --resume to continue the run in {ckpt})")
        hist = train(model, split, cfg.train, device, max_minutes=max_minutes, progress=progress,
                     checkpoint=ckpt, resume=resume)
        _, png = save_history(hist, out_dir)
        resumed = f", resumed at steps {hist.resumed_at}" if hist.resumed_at else ""
        log(f"{name}: {hist.steps_done} steps in {hist.seconds:.0f}s ({hist.stopped_because}{resumed}); best val step "
            f"{hist.best_step}; test NDCG@10 {hist.test['NDCG@10']:.5f} Recall@10 {hist.test['Recall@10']:.5f}")
        version = None
        if publish:
            metrics = {**{f"test_{k}": v for k, v in hist.test.items()},
                       **{f"val_{k}": v for k, v in hist.best_val.items()}}
            info = store.publish(model.cpu(), vocab, metrics=metrics, notes={
                "data": seqs.name, "steps": hist.steps_done, "seconds": round(hist.seconds, 1),
                "device": hist.device, "stopped_because": hist.stopped_because, "curve": str(png)})
            version = info.version
            log(f"{name}: published model version {version} to {store.root}")
        results.append(OfflineResult(name, version, hist, png))
    return results


def run_evaluate(cfg, data_path: str, version: str | None) -> dict[str, dict[str, float]]:
    """Validation and test metrics of a stored version on a data set (its vocabulary maps the items)."""
    from models.store import ModelStore
    from trainer.data import load_sequences

    loaded = ModelStore(cfg.model_store.dir).load(version)
    seqs = load_sequences(data_path)
    split = leave_one_out(seqs.encoded(loaded.vocab), loaded.model.max_len)
    device = pick_device(cfg.train.device)
    model = loaded.model.to(device)
    return {
        "validation": evaluate(model, split.val_inputs, split.val_targets, cfg.train.eval_batch_size, device),
        "test": evaluate(model, split.test_inputs, split.test_targets, cfg.train.eval_batch_size, device),
    }
