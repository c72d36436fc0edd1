"""Training-speed benchmark: seconds per full training step on real data (the figure compared with the
official LRURec code on the same machine and batch: ML-1M, 128 x 200)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lrustream.bench import median_seconds
from models import build_model, config_class


def train_step(data: str, model_name: str = "lrurec", batch: int = 128, max_len: int = 200, steps: int = 10,
               log: Callable[[str], None] = print) -> float:
    """Median seconds per training step (AdamW, clip 5) on real data windows."""
    from lrustream.kernel.config import TrainConfig
    from trainer.data import load_sequences
    from trainer.loss import sequence_loss
    from trainer.optim import clipped_step, make_optimizer
    from trainer.samples import batches, leave_one_out

    seqs = load_sequences(data)
    vocab = seqs.vocabulary()
    split = leave_one_out(seqs.encoded(vocab), max_len)
    torch.manual_seed(42)
    model = build_model(config_class(model_name)(max_len=max_len), len(vocab)).train()
    cfg = TrainConfig(batch_size=batch)
    opt = make_optimizer(model, cfg)
    it = batches(model, split, batch, seed=42)

    def one() -> None:
        tokens, labels = next(it)
        loss = sequence_loss(model, tokens, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clipped_step(model, opt, cfg.grad_clip)

    seconds = median_seconds(one, steps, warmup=3)
    log(f"{model_name} training step on {seqs.name}, batch {batch} x {max_len}: {seconds:.3f} s/step "
        f"(median of {steps}, {torch.get_num_threads()} threads)")
    return seconds
