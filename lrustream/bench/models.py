"""Model benchmarks that print numbers (tests never time anything).

* ``step_cost``: wall time of ONE ``step`` per event after a history of L events, L = 50 .. 3200, for every model,
  batched (256 users at once, time per event = batch time / 256) and single (1 user). Window models (SASRec)
  keep the whole history as their window here (max_len = L) so their cost shows how attention grows with history.
* ``scan_vs_loop``: one LRURec training step (forward + backward) on a [B, L] batch with the parallel scan
  versus the same model run as a sequential Python loop over time steps (``step`` with autograd).

The full training-step benchmark (loss, optimiser, real data) lives in lrustream/bench/trainer.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lrustream.bench import median_seconds
from models import MODEL_NAMES, LRURecConfig, SeqRecModel, build_model, config_class

LENGTHS = (50, 100, 200, 400, 800, 1600, 3200)


@torch.no_grad()
def step_cost(num_items: int = 3416, d_model: int = 64, lengths: tuple[int, ...] = LENGTHS, batch: int = 256,
              repeat: int = 5, log: Callable[[str], None] = print) -> dict[tuple[str, int, int], float]:
    """Microseconds per event for one `step` after a history of L events."""
    results: dict[tuple[str, int, int], float] = {}
    g = torch.Generator().manual_seed(0)
    log(f"step cost per event (us), d_model={d_model}, {num_items} items, {torch.get_num_threads()} threads")
    log("| model | users/step | " + " | ".join(f"L={n}" for n in lengths) + " |")
    log("|---|---|" + "---|" * len(lengths))
    for name in MODEL_NAMES:
        for rows in (batch, 1):
            cells = []
            for n in lengths:
                model = _model_with_history(name, num_items, d_model, n)
                history = torch.randint(1, num_items + 1, (rows, n), generator=g)
                state = model.prefill(history)
                item = torch.randint(1, num_items + 1, (rows,), generator=g)
                seconds = median_seconds(lambda m=model, s=state, i=item: m.step(s, i), repeat)
                results[(name, rows, n)] = 1e6 * seconds / rows
                cells.append(f"{results[(name, rows, n)]:.1f}")
            log(f"| {name} | {rows} | " + " | ".join(cells) + " |")
    return results


def _model_with_history(name: str, num_items: int, d_model: int, history: int) -> SeqRecModel:
    """Model ``name`` in eval mode, seed 0; a window model's window (max_len) holds the whole history."""
    config = config_class(name)(d_model=d_model)
    torch.manual_seed(0)
    model = build_model(config, num_items)
    if model.state_is_ids:
        torch.manual_seed(0)
        model = build_model(config_class(name)(d_model=d_model, max_len=history), num_items)
    return model.eval()


def scan_vs_loop(num_items: int = 3416, batch: int = 128, length: int = 200, repeat: int = 3,
                 log: Callable[[str], None] = print) -> tuple[float, float]:
    """Seconds for forward + backward of LRURec with the parallel scan and with a loop over time."""
    torch.manual_seed(0)
    model = build_model(LRURecConfig(max_len=length), num_items).train()
    items = torch.randint(1, num_items + 1, (batch, length))

    def parallel() -> None:
        model(items).square().mean().backward()

    def loop() -> None:
        state, outs = model.init_state(batch), []
        for t in range(length):
            state, h = model.step(state, items[:, t])
            outs.append(h)
        torch.stack(outs, 1).square().mean().backward()

    p = median_seconds(parallel, repeat, warmup=1)
    s = median_seconds(loop, repeat, warmup=1)
    log(f"LRURec forward+backward, batch {batch} x {length}: parallel scan {p * 1e3:.0f} ms, "
        f"sequential loop {s * 1e3:.0f} ms  ->  scan is {s / p:.1f}x faster")
    return p, s
