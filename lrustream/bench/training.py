"""Training-step cost against the catalogue's size: seconds and memory of one offline training step (loss,
backward, clipping, AdamW) of a default LRURec on synthetic random item sequences of N items.

``step_time(num_items)`` is what ``lrustream bench catalogue`` reports per catalogue size. With the default
``train.*`` settings the loss is the full softmax up to ``train.sampled_softmax_above`` items and the sampled
softmax above (trainer/loss.py); pass a ``TrainConfig`` to compare either at any size. Memory figures: the
process's peak resident set while the timed steps run (sampled every millisecond), its growth over the resident
set before the model was built, and the largest tensor any operation of one step created (the logits buffer, a
dense table gradient: whatever grows with the catalogue shows there); on CUDA also the peak allocated bytes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psutil
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lrustream.kernel.config import TrainConfig
from models import LRURecConfig, SeqRecModel, build_model
from trainer.loss import Sampling, sequence_loss
from trainer.optim import clipped_step, make_optimizer


class LargestTensor(TorchDispatchMode):
    """Records the bytes of the largest tensor any operation creates while active: outputs that share memory
    with an input (views, in-place results) are not new; a sparse tensor counts its stored values and indices."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        given = {_storage(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and (t.is_sparse or _storage(t) not in given):
                self.bytes = max(self.bytes, tensor_bytes(t))
        return out


def _storage(t: torch.Tensor) -> int | None:
    """Where a strided tensor's memory starts (None for a sparse one)."""
    return None if t.is_sparse else t.untyped_storage().data_ptr()


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds: its elements, or a sparse tensor's stored indices and values."""
    if t.is_sparse:
        return tensor_bytes(t._indices()) + tensor_bytes(t._values())
    return t.numel() * t.element_size()


class PeakRss:
    """The process's peak resident set size while active, polled every ``interval_s`` by a thread."""

    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s, self.peak = interval_s, 0
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRss:
        self.peak = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def random_batches(num_items: int, batch: int, length: int, count: int, seed: int = 0
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of full windows of random items (tokens, next-item labels), no padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        seq = torch.randint(1, num_items + 1, (batch, length + 1), generator=g)
        out.append((seq[:, :-1], seq[:, 1:].contiguous()))
    return out


def _stepper(model: SeqRecModel, cfg: TrainConfig, device: torch.device
             ) -> Callable[[tuple[torch.Tensor, torch.Tensor]], None]:
    opt = make_optimizer(model, cfg)
    sampling = Sampling.of(cfg)

    def one(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        loss = sequence_loss(model, batch[0].to(device), batch[1].to(device), sampling)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clipped_step(model, opt, cfg.grad_clip)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return one


def step_time(num_items: int, batch: int = 32, length: int = 200, steps: int = 5, *,
              cfg: TrainConfig | None = None, device: str = "cpu") -> dict[str, Any]:
    """Mean seconds of ``steps`` training steps (after one untimed step, which also creates AdamW's moments) of a
    default LRURec over ``num_items`` items on ``batch`` x ``length`` random windows, with the peak memory.

    Returns ``num_items``, ``loss`` ("full" | "sampled"), ``mean_step_s``, ``steps``, ``threads``,
    ``peak_rss_bytes``, ``rss_growth_bytes`` (peak over the resident set before the model was built),
    ``largest_tensor_bytes`` (one extra step, traced), and on CUDA ``peak_allocated_bytes``."""
    cfg = cfg or TrainConfig()
    dev = torch.device(device)
    before = psutil.Process().memory_info().rss
    torch.manual_seed(cfg.seed)
    model = build_model(LRURecConfig(max_len=length), num_items).to(dev).train()
    one = _stepper(model, cfg, dev)
    data = random_batches(num_items, batch, length, steps + 2, seed=cfg.seed)
    one(data[0])
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with PeakRss() as rss:
        start = time.perf_counter()
        for b in data[1: steps + 1]:
            one(b)
        seconds = (time.perf_counter() - start) / steps
    with LargestTensor() as largest:
        one(data[-1])
    out = {"num_items": num_items, "loss": "sampled" if Sampling.of(cfg).applies(num_items) else "full",
           "mean_step_s": seconds, "steps": steps, "threads": torch.get_num_threads(), "peak_rss_bytes": rss.peak,
           "rss_growth_bytes": rss.peak - before, "largest_tensor_bytes": largest.bytes}
    if dev.type == "cuda":
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
    return out


def report(result: dict[str, Any]) -> str:
    """One line of :func:`step_time`'s figures."""
    mb = 1 << 20
    r = result
    return (f"{r['num_items']:>9,} items ({r['loss']} softmax): {r['mean_step_s']:.3f} s/step (mean of "
            f"{r['steps']}, {r['threads']} threads), peak RSS {r['peak_rss_bytes'] / mb:,.0f} MB "
            f"(+{r['rss_growth_bytes'] / mb:,.0f} MB), largest tensor {r['largest_tensor_bytes'] / mb:,.1f} MB")


if __name__ == "__main__":
    import sys

    for n in map(int, sys.argv[1:] or ["3615", "100000", "1000000"]):
        print(report(step_time(n)), flush=True)
