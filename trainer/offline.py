"""The offline recipe: ``lrustream train`` and ``lrustream evaluate``, for every model alike.

``run_offline`` reads a data set (trainer/data.py), splits it leave-one-out (trainer/samples.py), trains each
named model to early stop on the validation Recall@10 (trainer/loop.py, with a checkpoint per model in the
output folder for ``--resume``), writes its history and training curve, and publishes it with its test and
validation metrics (from the CLI on the model-versions topic). ``run_evaluate`` gives a stored version's
validation and test metrics on a data set, with the same protocol (trainer/evaluate.py); ``metric_table`` prints
either as Markdown.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from trainer.checkpoint import checkpoint_path
from trainer.evaluate import evaluate
from trainer.loop import History, train
from trainer.optim import pick_device
from trainer.samples import leave_one_out

if TYPE_CHECKING:
    from stream.versions import VersionLog

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
                resume: bool = False, publisher: VersionLog | None = None) -> list[OfflineResult]:
    """Train and evaluate each named model on one data set; publish each through ``publisher`` (a
    stream.versions.VersionLog: every worker serves it), or into the local model store alone when it is None.

    Each model's run keeps a checkpoint in ``out_dir``; ``resume`` continues the runs found there."""
    from models import build_model, model_config
    from models.store import POPULAR_NOTE, ModelStore, popular_note
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
    popular = popular_note(item for seq in seqs.items for item in seq)  # the whole data set: every model's
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
        dropped = (f"; {hist.dropped_steps} steps dropped for non-finite gradients (a wider model or less "
                   f"dropout avoids it)" if hist.dropped_steps else "")
        log(f"{name}: {hist.steps_done} steps in {hist.seconds:.0f}s ({hist.stopped_because}{resumed}); best val step "
            f"{hist.best_step}; test NDCG@10 {hist.test['NDCG@10']:.5f} Recall@10 {hist.test['Recall@10']:.5f}"
            f"{dropped}")
        version = None
        if publish:
            metrics = {**{f"test_{k}": v for k, v in hist.test.items()},
                       **{f"val_{k}": v for k, v in hist.best_val.items()}}
            info = (publisher or store).publish(model.cpu(), vocab, metrics=metrics, notes={
                "data": seqs.name, "steps": hist.steps_done, "seconds": round(hist.seconds, 1),
                "device": hist.device, "stopped_because": hist.stopped_because, "curve": str(png),
                POPULAR_NOTE: popular})  # workers seed their cold-start fallback with it (stream/popular.py)
            version = info.version
            log(f"{name}: published model version {version}"
                + (f" on {cfg.topics.model_versions}" if publisher else f" to {store.root}"))
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
