"""Hot swap on real Kafka: a running worker follows the versions published on the model-versions topic between
micro-batches, re-derives old users' states with the new model (never advances old states with new weights),
refuses broken versions (chunks lost or altered, NaN weights) while serving on (so does a worker started after
them), and follows a rollback."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lrustream.cli import app
from lrustream.kernel.config import Config
from models.store import META, WEIGHTS, ModelStore
from stream.serving import Serving
from stream.topics import create_topics
from tests.streamkit import (
    WorkerProcess,
    produce_events,
    publish_model,
    recommendations,
    stored_states,
    synthetic_events,
    upload_raw,
    version_files,
    wait_for_version,
)


def rederived_reference(cfg: Config, version: str, before: list[tuple[str, str]], after: list[tuple[str, str]]
                        ) -> dict[str, dict]:
    """Users' windows from ``before`` read in parallel by ``version`` (prefill), then ``after`` stepped."""
    serving = Serving.load(ModelStore(cfg.model_store.dir), version)
    model, vocab = serving.model, serving.vocab
    windows: dict[str, list[int]] = {}
    for user, item in before:
        windows.setdefault(user, []).append(vocab.id_of(item))
    out: dict[str, dict] = {}
    with torch.inference_mode():
        for user in {u for u, _ in after}:
            window = windows.get(user, [])[-model.max_len:]
            state = model.prefill(torch.tensor([window])) if window else model.init_state(1)
            recs = []
            for u, item in after:
                if u != user:
                    continue
                idx = vocab.id_of(item)
                state, h = model.step(state, torch.tensor([idx]))
                window = ([*window, idx])[-model.max_len:]
                scores = model.score(h)[0]
                scores[torch.tensor(window)] = float("-inf")
                top = torch.topk(scores, 10)
                recs.append([vocab.item_of(i) for i, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)
                             if v != float("-inf")])
            out[user] = {"recs": recs, "state": model.state_to_bytes(state)[0]}
    return out


def corrupt_truncated(store: ModelStore, version: str) -> None:
    path = store.versions_dir / version / WEIGHTS
    path.write_bytes(path.read_bytes()[:100])


def nan_weights(files: dict[str, bytes], scratch: Path) -> dict[str, bytes]:
    """The same version with NaN weights and checksums that match them: only the finiteness check can refuse it."""
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / WEIGHTS).write_bytes(files[WEIGHTS])
    tensors = load_file(str(scratch / WEIGHTS))
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(scratch / WEIGHTS))
    weights = (scratch / WEIGHTS).read_bytes()
    meta = json.loads(files[META])
    meta["files"][WEIGHTS] = hashlib.sha256(weights).hexdigest()
    return {**files, META: json.dumps(meta).encode(), WEIGHTS: weights}


def lose_a_chunk(chunks: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    weights = [c for c in chunks if f"/{WEIGHTS}/".encode() in c[0]]
    return [c for c in chunks if c is not weights[len(weights) // 2]]


def alter_a_byte(chunks: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    key, data = chunks[-1]
    return [*chunks[:-1], (key, data[:-1] + bytes([data[-1] ^ 1]))]


def test_worker_swaps_versions_rederives_states_and_refuses_broken_ones(kafka_cfg: Config,
                                                                         kafka_overrides: list[str],
                                                                         tmp_path: Path) -> None:
    create_topics(kafka_cfg)
    store = ModelStore(kafka_cfg.model_store.dir)
    v1 = publish_model(kafka_cfg, seed=0)
    events = synthetic_events(400, users=15, seed=5)
    before, after = events[:250], events[250:]
    produce_events(kafka_cfg, before)
    worker = WorkerProcess(kafka_overrides, tmp_path / "worker.log").start()
    try:
        worker.wait_healthy()
        recommendations(kafka_cfg, expect=len(before))
        t0 = time.monotonic()
        v2 = publish_model(kafka_cfg, seed=1)
        published = time.monotonic()
        wait_for_version(worker, v2)
        print(f"\nworker served {v2} {time.monotonic() - published:.2f} s after its publish returned "
              f"({time.monotonic() - t0:.2f} s after the publish began)")
        produce_events(kafka_cfg, after, ts0=1_800_000_000_000)
        recs = recommendations(kafka_cfg, expect=len(events))
        # broken versions are refused; serving continues on v2
        for number, make_files, alter, why in ((90, None, lose_a_chunk, "incomplete or corrupt"),
                                               (91, None, alter_a_byte, "incomplete or corrupt"),
                                               (92, nan_weights, None, "non-finite")):
            bad = f"v{number:06d}"
            files = version_files(kafka_cfg, bad, tmp_path / "scratch", seed=2)
            upload_raw(kafka_cfg, bad, make_files(files, tmp_path / "nan") if make_files else files, alter=alter)
            deadline = time.monotonic() + 20
            while not any(s["version"] == bad and not s["ok"] for s in json.loads(worker.get("/model"))["swaps"]):
                assert time.monotonic() < deadline, f"{bad} was not refused"
                time.sleep(0.1)
            model = json.loads(worker.get("/model"))
            assert model["version"] == v2
            assert why in next(s["reason"] for s in model["swaps"] if s["version"] == bad), model
        # a worker started now, on another host, serves what the running one does: the newest version that loads
        late = WorkerProcess([*kafka_overrides, f"state.dir={tmp_path / 'late' / 'state'}",
                              f"model_store.dir={tmp_path / 'late' / 'models'}"], tmp_path / "late.log").start()
        try:
            assert late.wait_healthy()["model_version"] == v2
            refused = {s["version"] for s in json.loads(late.get("/model"))["swaps"] if not s["ok"]}
            assert refused == {"v000090", "v000091", "v000092"}, refused
        finally:
            late.stop()
        listed = CliRunner().invoke(app, ["models", "list", *kafka_overrides]).output
        assert "! v000090  refused" in listed and "! v000091  refused" in listed and f"* {v2}" not in listed, listed
        # rollback to v1 is followed like a new version
        assert CliRunner().invoke(app, ["models", "rollback", v1, *kafka_overrides]).exit_code == 0
        wait_for_version(worker, v1)
    finally:
        worker.stop()
    log = (tmp_path / "worker.log").read_text()
    assert "refused model version" in log and "incomplete or corrupt" in log and "non-finite" in log
    assert not any((store.versions_dir / f"v0000{n}").exists() for n in (90, 91)), "never visible"
    after_recs = sorted((r for r in recs if r["event_ts"] >= 1_800_000_000_000),
                        key=lambda r: (r["source"]["partition"], r["source"]["offset"]))
    assert len(after_recs) == len(after) and {r["model_version"] for r in after_recs} == {v2}
    ref = rederived_reference(kafka_cfg, v2, before, after)
    got: dict[str, list[list[str]]] = {}
    for r in after_recs:
        got.setdefault(r["user_id"], []).append(r["items"])
    for user, want in ref.items():
        assert got[user] == want["recs"], user
    for user, (state, _) in stored_states(kafka_cfg, set(ref)).items():
        np.testing.assert_allclose(np.frombuffer(state, np.float32), np.frombuffer(ref[user]["state"], np.float32),
                                   atol=1e-5, err_msg=user)


def test_a_version_that_failed_to_load_for_a_transient_reason_is_tried_again_a_corrupt_one_is_not(
        kafka_cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    import stream.worker
    from stream.worker import Worker

    monkeypatch.setattr(stream.worker, "RETRY_LOAD_AFTER_S", 0.0)
    store = ModelStore(kafka_cfg.model_store.dir)
    v1 = publish_model(kafka_cfg, seed=0)
    worker = Worker(kafka_cfg)
    v2 = publish_model(kafka_cfg, seed=1)
    weights = store.versions_dir / v2 / WEIGHTS
    weights.rename(weights.with_suffix(".away"))  # e.g. a disk that cannot be read for a moment
    assert not asyncio.run(worker.swap_to(v2))
    assert worker.swaps[-1]["retry"] is True and "unreadable" in worker.swaps[-1]["reason"]
    weights.with_suffix(".away").rename(weights)
    assert asyncio.run(worker.swap_to(v2)) and worker.processor.serving.version == v2, "tried again, served"

    v3 = publish_model(kafka_cfg, seed=2)
    corrupt_truncated(store, v3)
    assert not asyncio.run(worker.swap_to(v3))
    assert worker.swaps[-1]["retry"] is False and "checksum mismatch" in worker.swaps[-1]["reason"]
    refusals = len(worker.swaps)
    assert not asyncio.run(worker.swap_to(v3)) and len(worker.swaps) == refusals, "a corrupt version stays refused"
    assert worker.processor.serving.version == v2 and v1 != v2
    worker.store.close()
    worker.versions.close()
