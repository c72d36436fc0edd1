"""Catalogue benchmark (``lrustream bench catalogue``): what the number of items costs, size by size, in one run.

The stream is a real data set's (``--data``): its events, users and items. A catalogue of N items is the data
set's own items plus N minus those synthetic ones that no event names (the size of the table a worker ranks and
a version carries, while the stream keeps its real shape). The model is LRURec at the configured size: with
``--start-model`` (a model store holding a version trained on the data) its trained rows are kept and every
other row, real or synthetic, is drawn from a Gaussian with the trained rows' mean and covariance (biases
alike), so the added items compete with the real ones for the top-K; without it, every row is a fresh
initialisation (cost only: an untrained model's rankings are noise).

Per size, on the same broker:

* **index**: exact ranking vs the approximate index (stream/retrieval.py) on the replay's real states: the
  model's output after each of ``RECALL_USERS`` users' histories cut at a random point, that history excluded
  as serving excludes it. Prints recall@10 against exact ranking, the index's build seconds and its scanned
  clusters, and ms per micro-batch of 16 rows both ways. The worker uses the index above
  ``stream.approximate_above_items`` only, so the smaller sizes show what exact ranking costs;
* **worker**: the version published through the topic to one worker on fresh topics; above
  ``stream.approximate_above_items`` the worker's line on its index (built after the swap) is awaited and
  printed, so what follows is its steady state. It drains ``--events`` events produced at once (events/s over
  the outputs' broker-timestamp span, as ``bench stream`` counts), then the
  latency of events arriving at ``--rate`` (p50/p99 event to recommendation), then GET /recommendations of
  owned users at ``--request-rate`` (p50/p99, from each request's scheduled time);
* **training**: one CPU training step of 32 x 200 at this size (lrustream/bench/training.py), seconds and peak
  memory;
* **versions**: publish -> every one of two workers serving a version of this size (lrustream/bench/versions.py).

Ratios against the smallest size close the run.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lrustream.kernel.config import Config, load_config

Log = Callable[[str], None]
RECALL_USERS = 1000
"""Users whose real states measure the index's recall."""
SCORE_ROWS = 16
"""Rows of a timed ranking call: a micro-batch at a steady rate."""
SYNTHETIC_PREFIX = "synthetic-"


def catalogue_model(cfg: Config, data: str, num_items: int, start_model: Path | None,
                    seed: int = 0) -> tuple[Any, Any]:
    """(model, vocabulary) of ``num_items`` items: the data set's items first, then synthetic ones (module
    docstring)."""
    from models import build_model, model_config
    from models.vocab import Vocabulary
    from trainer.data import load_sequences

    items = load_sequences(data).vocabulary().items()
    items += [f"{SYNTHETIC_PREFIX}{i}" for i in range(max(0, num_items - len(items)))]
    vocab = Vocabulary(items)
    torch.manual_seed(seed)
    model = build_model(model_config(cfg.model), len(vocab))
    if start_model is not None:
        _with_trained_rows(model, vocab, start_model, seed)
    model.eval()
    return model, vocab


def _with_trained_rows(model: Any, vocab: Any, start_model: Path, seed: int) -> None:
    """Copy the trained version's weights and item rows; other rows drawn from the trained rows' Gaussian."""
    from models.store import ModelStore

    trained = ModelStore(start_model).load()
    own = {k: v for k, v in trained.model.state_dict().items() if "token" not in k and "item_bias" not in k}
    model.load_state_dict(own, strict=False)
    t_emb, t_bias = trained.model.item_table()
    rows = t_emb[1: trained.model.num_items + 1].detach().double()
    mean, cov = rows.mean(0), torch.cov(rows.T)
    g = torch.Generator().manual_seed(seed)
    normal = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov + 1e-6 * torch.eye(len(mean)))
    torch.manual_seed(seed)
    emb, bias = model.item_table()
    with torch.no_grad():
        n = model.num_items
        emb[1: n + 1] = normal.sample((n,)).float()
        if bias is not None and t_bias is not None:
            b = t_bias[1: trained.model.num_items + 1].detach()
            bias[1: n + 1] = b.mean() + b.std() * torch.randn(n, generator=g)
        for i in range(1, trained.model.num_items + 1):
            at = vocab.get(trained.vocab.item_of(i))
            if at is not None:
                emb[at] = t_emb[i]
                if bias is not None and t_bias is not None:
                    bias[at] = t_bias[i]


def real_windows(data: str, model: Any, vocab: Any, users: int, seed: int = 0) -> torch.Tensor:
    """[users, max_len] left-padded windows: sampled users' histories cut at a random point."""
    from trainer.data import load_sequences

    seqs = load_sequences(data)
    rng = random.Random(seed)
    picked = rng.sample(range(len(seqs.users)), min(users, len(seqs.users)))
    L = model.max_len
    out = torch.zeros(len(picked), L, dtype=torch.long)
    for row, u in enumerate(picked):
        history = seqs.items[u][: rng.randint(1, len(seqs.items[u]))][-L:]
        ids = [vocab.get(str(i), 0) or 0 for i in history]
        out[row, L - len(ids):] = torch.tensor(ids, dtype=torch.long)
    return out


def index_figures(cfg: Config, model: Any, vocab: Any, data: str, log: Log) -> dict[str, float]:
    """Recall@k of the index against exact ranking on real states, its build time, and both rankings' cost."""
    from stream.retrieval import IndexSettings, ItemIndex, exact_top_ids, recall_at
    from stream.serving import Serving

    k = cfg.stream.top_k
    index = ItemIndex.build(model, IndexSettings(0, cfg.stream.approximate_recall, k))
    exact, approximate = Serving(model, vocab, "bench"), Serving(model, vocab, "bench", index=index)
    windows = real_windows(data, model, vocab, RECALL_USERS)
    with torch.inference_mode():
        h = model.last_hidden(windows).float()
        truth = exact_top_ids(model, h, windows, k)
        _, found = approximate.top_ids(h, windows, k, SCORE_ROWS)
        recall = recall_at(found, truth)
        exact_ms = _ms_per_call(exact, h, windows, k)
        approx_ms = _ms_per_call(approximate, h, windows, k)
    n = model.num_items
    log(f"  index: recall@{k} {recall:.4f} on {len(h)} real states (calibrated {index.recall:.4f}); "
        f"{index.nprobe} of {index.nlist} clusters scanned; built in {index.build_seconds:.1f} s; ranking "
        f"{SCORE_ROWS} rows: exact {exact_ms:.2f} ms, index {approx_ms:.2f} ms")
    return {f"items_{n}_recall": recall, f"items_{n}_index_build_s": index.build_seconds,
            f"items_{n}_exact_rank_ms": exact_ms, f"items_{n}_index_rank_ms": approx_ms}


def _ms_per_call(serving: Any, h: torch.Tensor, windows: torch.Tensor, k: int, calls: int = 40) -> float:
    """Median ms of ranking ``SCORE_ROWS`` rows (one thread, as a worker ranks)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        for c in range(calls):
            s = (c * SCORE_ROWS) % max(1, len(h) - SCORE_ROWS)
            t0 = time.perf_counter()
            serving.top_ids(h[s: s + SCORE_ROWS], windows[s: s + SCORE_ROWS], k, SCORE_ROWS)
            times.append(time.perf_counter() - t0)
        return float(np.median(times) * 1000)
    finally:
        torch.set_num_threads(threads)


def worker_figures(base: list[str], model: Any, vocab: Any, data: str, events: int, rate: float,
                   request_rate: float, seconds: float, workdir: Path, log: Log) -> dict[str, float]:
    """One worker serving this catalogue: drain, latency at ``rate``, owned-user request latency."""
    from itertools import islice

    from lrustream.bench.requests import Client, phase, served_topics
    from lrustream.bench.stream import LatencyPlan, Output, drop_topics, latency_phases
    from lrustream.children import spawn_cli, stop
    from lrustream.replay import replay
    from stream.versions import publish_version
    from trainer.data import load_sequences

    n = model.num_items
    cfg, overrides, tmp, port = served_topics(base, f"catalogue-{n}-{uuid.uuid4().hex[:6]}", workdir)
    version = publish_version(cfg, model, vocab, who="bench").version
    proc = spawn_cli(["worker", "--loglevel", "warning", *overrides], tmp / "log")
    output = Output(cfg)
    out: dict[str, float] = {}
    try:
        if _indexed(cfg, model):  # steady state: the index is built after the swap, beside serving
            log(f"  worker: {_index_outcome(tmp / 'log', version)}")
        sent = replay(cfg, data, None, events, False)
        served = output.read(sent, timeout_s=sent / 200 + 180)
        out[f"items_{n}_drain_per_s"] = output.rate()
        log(f"  worker: {served} of {sent} pre-loaded events out, {out[f'items_{n}_drain_per_s']:,.0f} events/s")
        plan = LatencyPlan(rates=(rate,), seconds=seconds, wait_s=10.0)
        for key, value in latency_phases(cfg, data, output, plan, sent, lambda line: log("  " + line)).items():
            out[f"items_{n}_{key}"] = value
        known = sorted({str(user) for user, _, _ in islice(load_sequences(data).events(), events)})
        client, rng = Client(cfg.http.host, port), random.Random(0)
        phase(client, "warm-up", lambda: rng.choice(known), request_rate, 2.0, lambda _: None)
        figures = phase(client, "owned", lambda: rng.choice(known), request_rate, seconds,
                        lambda line: log("  " + line))
        client.close()
        out.update({f"items_{n}_{key}": value for key, value in figures.items()})
    finally:
        output.close()
        stop([proc])
        drop_topics(cfg, log)
    return out


def _index_outcome(log_file: Path, version: str, timeout_s: float = 600.0) -> str:
    """The worker's line saying what came of ``version``'s approximate index, once it has built it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log_file.read_text(errors="replace") if log_file.exists() else ""
        for line in text.splitlines():
            if f"version {version} ranks through" in line or f"version {version} stays ranked exactly" in line:
                return line.split("] ", 3)[-1].strip()
        time.sleep(0.5)
    return f"no word of version {version}'s index after {timeout_s:.0f} s"


def training_and_version_figures(base: list[str], num_items: int, workdir: Path, log: Log) -> dict[str, float]:
    """A CPU training step at this size (lrustream/bench/training.py) and publish -> every worker serving a
    version of this size (lrustream/bench/versions.py)."""
    from lrustream.bench.training import report, step_time
    from lrustream.bench.versions import publish_to_serving

    step = step_time(num_items)
    log(f"  training: {report(step).strip()}")
    rollout = publish_to_serving(num_items, base=base, workdir=workdir, log=lambda _: None)
    log(f"  versions: {rollout['weights_mb']:,.0f} MB of weights; publish -> every one of 2 workers serving "
        f"{rollout['publish_to_serving_s']:.1f} s; a worker started later serving it {rollout['late_worker_s']:.1f} s")
    return {f"items_{num_items}_train_step_s": step["mean_step_s"],
            f"items_{num_items}_train_peak_rss_bytes": float(step["peak_rss_bytes"]),
            **{f"items_{num_items}_{key}": value for key, value in rollout.items()}}


def ratio_lines(sizes: list[int], results: dict[str, float], rate: float) -> list[str]:
    """Each larger size's figures as ratios to the smallest size's."""
    first = sizes[0]
    keys = [("drain_per_s", "drain"), (f"worker_{rate:g}_total_p99_ms", f"p99 at {rate:,.0f}/s"),
            ("requests_owned_p99_ms", "request p99"), ("train_step_s", "training step")]
    lines = []
    for n in sizes[1:]:
        parts = [f"{label} x{results[f'items_{n}_{k}'] / results[f'items_{first}_{k}']:.2f}"
                 for k, label in keys if f"items_{n}_{k}" in results and f"items_{first}_{k}" in results]
        lines.append(f"{n:,} items vs {first:,}: " + ", ".join(parts))
    return lines


def run(base: list[str], data: str, sizes: list[int], events: int, rate: float, request_rate: float,
        seconds: float, start_model: Path | None, workdir: Path, log: Log = print) -> dict[str, float]:
    """The whole benchmark (module docstring); returns every figure it printed, by name."""
    cfg = load_config(overrides=base)
    results: dict[str, float] = {}
    for n in sizes:
        model, vocab = catalogue_model(cfg, data, n, start_model)
        log(f"{model.num_items:,} items ({'exact' if not _indexed(cfg, model) else 'approximate index'} ranking "
            f"in the worker):")
        results.update(index_figures(cfg, model, vocab, data, log))
        results.update(worker_figures(base, model, vocab, data, events, rate, request_rate, seconds, workdir, log))
        results.update(training_and_version_figures(base, model.num_items, workdir, log))
    for line in ratio_lines([int(k.split("_")[1]) for k in results if k.endswith("_recall")], results, rate):
        log(line)
    return results


def _indexed(cfg: Config, model: Any) -> bool:
    from stream.retrieval import IndexSettings

    s = cfg.stream
    return IndexSettings(s.approximate_above_items, s.approximate_recall, s.top_k).wants_index(model.num_items)
