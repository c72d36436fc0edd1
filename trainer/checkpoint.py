"""Resumable offline training: one checkpoint file per model run, written at every validation.

A run to convergence on ML-1M takes hours on a CPU, longer than one sitting; an interrupted run (Ctrl-C, a
time budget, a killed machine) must continue where it stopped instead of starting over. The checkpoint holds
everything the training loop's future depends on, so a resumed run takes the same steps as an uninterrupted
one (bit for bit on the same CPU):

* the current weights, the best-validation weights and the AdamW moments;
* the loop's position (step), early-stopping counters and history;
* the dropout RNG (torch's global generator; CUDA's too when used) — the batch order is re-derived from the
  seed and the step, so it needs nothing stored.

Format: a single safetensors file (tensors only, no pickle) whose string metadata carries the JSON part. It is
written to a temporary name, fsynced and renamed, so a crash while writing leaves the previous checkpoint.
A checkpoint from a different set-up (model, hyper-parameters, data, batch size, seed, optimiser settings) is
refused with the list of what differs: resuming it would silently train something else.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from lrustream.kernel.errors import LrustreamError
from lrustream.kernel.files import replace_durably

FORMAT = 1


class CheckpointError(LrustreamError):
    """A checkpoint that cannot be resumed; the message says why, in one line."""


@dataclass
class LoopState:
    """Where the training loop stands, apart from tensors. The history carries the step, the training seconds
    and the best validation so far; only what it cannot tell is kept beside it."""

    bad_rounds: int  # validations since the best one (early-stopping patience)
    running_loss: float  # loss summed since the last logged step
    history: dict[str, Any]


def checkpoint_path(out_dir: Path, model_name: str) -> Path:
    return out_dir / f"{model_name}-checkpoint.safetensors"


def _flat(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _unflat(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    cut = len(prefix) + 1
    return {k[cut:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def save_checkpoint(path: Path, *, setup: dict[str, Any], model: torch.nn.Module,
                    best: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, loop: LoopState) -> None:
    """Write atomically: the previous checkpoint stays readable until the new one is complete."""
    opt = optimizer.state_dict()
    tensors = {**_flat("model", model.state_dict()), **_flat("best", best)}
    for idx, per_param in opt["state"].items():
        tensors.update(_flat(f"opt.{idx}", per_param))
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {"format": FORMAT, "setup": setup, "param_groups": opt["param_groups"], "loop": loop.__dict__}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={"lrustream": json.dumps(meta)})
        replace_durably(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(now))
    return [f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


def load_checkpoint(path: Path, *, setup: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    retired_hparams: Collection[str] = ()) -> tuple[dict[str, torch.Tensor], LoopState]:
    """Restore model, optimiser and RNG in place; returns the best weights and the loop state. Hyper-parameters
    in ``retired_hparams`` (recorded by older code for a model that never read them) do not count as a
    difference of set-up."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["lrustream"])
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open is no dict
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable training checkpoint ({exc})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r}, this version reads {FORMAT}")
    saved_hparams = {k: v for k, v in meta["setup"].get("hparams", {}).items() if k not in retired_hparams}
    diff = _differences({**meta["setup"], "hparams": saved_hparams}, setup)
    if diff:
        raise CheckpointError(f"{path} was written for another set-up ({'; '.join(diff)}); "
                              "start afresh without --resume or restore that set-up")
    device = next(model.parameters()).device
    model.load_state_dict(_unflat("model", tensors))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value if name == "step" else value.to(device)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    best = {k: v.to(device) for k, v in _unflat("best", tensors).items()}
    return best, LoopState(**meta["loop"])
