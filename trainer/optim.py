"""The optimiser and the device training runs on, alike for the offline and the online trainer.

AdamW with ``train.lr``, ``train.adam_eps`` (1e-9) and ``train.weight_decay`` (0.01) on every weight except
biases and LayerNorms (no decay); an optional linear warm-up of the learning rate over an optimiser's first
steps (the online learner's fresh optimisers use it). The device is ``train.device``: ``auto`` takes CUDA when
there is one, ``cuda`` without one is refused.
"""

from __future__ import annotations

import torch

from lrustream.kernel.config import TrainConfig
from models import SeqRecModel


def make_optimizer(model: SeqRecModel, cfg: TrainConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW over the model's parameters in two groups: decayed weights, then biases and LayerNorms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if ("bias" in name or "layer_norm" in name) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr or cfg.lr, eps=cfg.adam_eps)


def warm_up(opt: torch.optim.Optimizer, lr: float, warmup_steps: int) -> None:
    """Set the learning rate for the optimiser's next step: ``lr`` ramped linearly over its first
    ``warmup_steps`` (none when ``warmup_steps <= 0``)."""
    done = next((int(s["step"]) for s in opt.state.values() if "step" in s), 0)
    scale = min(1.0, (done + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    for group in opt.param_groups:
        group["lr"] = lr * scale


def pick_device(name: str) -> torch.device:
    """``train.device`` as a torch device: ``auto`` is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def clipped_step(model: SeqRecModel, opt: torch.optim.Optimizer, grad_clip: float) -> torch.Tensor:
    """Clip the gradients to a global norm of ``grad_clip`` and take the optimiser step; returns a device tensor,
    1 when this step's gradients were not finite and were dropped, else 0 (no host sync). Offline training's
    step (the online learner instead refuses a round that diverged, trainer/online.py).

    A non-finite global norm makes clipping multiply every gradient by 0, which turns an inf or NaN gradient into
    NaN and the step's weights into NaN: those are zeroed instead, so the step applies no gradient (AdamW's
    momentum and weight decay still move the weights). It happens to narrow models with heavy dropout, where a
    whole token is zeroed and a normalisation multiplies its gradient by up to 1e12 per layer."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    dropped = (~torch.isfinite(norm)).to(torch.int64)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    opt.step()
    return dropped
