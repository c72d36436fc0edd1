"""Offline training and evaluation: data formats, the LRURec protocol, the loss, and a tiny end-to-end run."""

from __future__ import annotations

import copy
import gzip
import json
import math
import os
import signal
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import safe_open, save_file

from lrustream.kernel.config import load_config
from models import MODEL_NAMES, LinRecConfig, LRURecConfig, build_model, config_class, model_config
from models.store import ModelStore, popular_seed
from trainer.checkpoint import CheckpointError
from trainer.data import DataError, load_sequences
from trainer.evaluate import evaluate, metrics_from_ranks, ranks_of
from trainer.loop import Interrupted, train
from trainer.loss import catalogue_cross_entropy
from trainer.offline import run_evaluate, run_offline
from trainer.optim import clipped_step, make_optimizer
from trainer.samples import PrefixSamples, leave_one_out, train_windows


def synthetic_sequences(users: int = 60, items: int = 100, length: int = 30, seed: int = 0) -> list[list[int]]:
    """Users walk a cycle of items with a user-specific stride: learnable next-item structure, no repeats
    within a user (repeats would be masked by the protocol and could never be hit)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(users):
        start, stride = rng.integers(1, items + 1), rng.integers(1, 3)
        out.append([int((start - 1 + k * stride) % items) + 1 for k in range(length)])
    return out


def write_lrurec(path: Path, seqs: list[list[int]]) -> Path:
    path.write_text("".join(f"{u + 1} " + " ".join(map(str, s)) + "\n" for u, s in enumerate(seqs)))
    return path


def test_formats_parse_and_preprocess(tmp_path: Path) -> None:
    seqs = load_sequences(write_lrurec(tmp_path / "sequences.txt", [[1, 2, 3], [3, 2]]))
    assert seqs.items == [["1", "2", "3"], ["3", "2"]] and seqs.times is None and len(seqs.vocabulary()) == 3

    rows = [(u, i, 1000 + 10 * k) for u in (1, 2, 3, 4, 5) for k, i in enumerate([10, 11, 12, 13, 14, 14])]
    rows.append((9, 99, 5))  # an item with one interaction and a user with one row: filtered out
    text = "".join(f"{u}::{i}::4::{t}\n" for u, i, t in rows)
    (tmp_path / "ml").mkdir()
    (tmp_path / "ml" / "ratings.dat.gz").write_bytes(gzip.compress(text.encode()))
    ml = load_sequences(tmp_path / "ml")
    assert ml.users == ["1", "2", "3", "4", "5"]
    assert ml.items[0] == ["10", "11", "12", "13", "14"]  # immediate repeat of 14 removed
    assert [e[2] for e in ml.events()] == sorted(e[2] for e in ml.events())

    (tmp_path / "u.data").write_text("".join(f"{u}\t{i}\t3\t{t}\n" for u, i, t in rows))
    assert load_sequences(tmp_path / "u.data").items == ml.items

    (tmp_path / "X_item.txt").write_text("1 5 6 7\n2 7 5\n")
    (tmp_path / "X_time.txt").write_text("1 100 200 300\n2 150 250\n")
    amazon = load_sequences(tmp_path / "X_item.txt")
    assert [(u, i, t) for u, i, t in amazon.events()] == [
        ("1", "5", 100_000), ("2", "7", 150_000), ("1", "6", 200_000), ("2", "5", 250_000), ("1", "7", 300_000)]
    with pytest.raises(DataError, match="not found"):
        load_sequences(tmp_path / "nope.txt")


def test_leave_one_out_and_official_windows() -> None:
    split = leave_one_out([np.arange(1, 8), np.array([5, 6])], max_len=4)
    assert [s.tolist() for s in split.train] == [[1, 2, 3, 4, 5], [5, 6]]
    assert split.val_inputs.tolist() == [[2, 3, 4, 5]] and split.val_targets.tolist() == [6]
    assert split.test_inputs.tolist() == [[3, 4, 5, 6]] and split.test_targets.tolist() == [7]
    tokens, labels = train_windows([np.arange(1, 4), np.arange(1, 11)], max_len=4)
    # short user: next-item pairs, first label predicted from padding (as the official loader does)
    assert tokens[0].tolist() == [0, 0, 1, 2] and labels[0].tolist() == [0, 1, 2, 3]
    # long user (>= 2 * max_len): non-overlapping windows from the end
    assert labels[1:].tolist() == [[7, 8, 9, 10], [3, 4, 5, 6]]
    assert tokens[1].tolist() == [0, 7, 8, 9]
    prefixes = PrefixSamples([np.arange(1, 6)], max_len=3)
    x, y = prefixes.batch(torch.arange(len(prefixes)))
    assert x.tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4]] and y.tolist() == [2, 3, 4, 5]


def test_ranking_masks_input_items_and_metrics_follow_ranks() -> None:
    scores = torch.tensor([[0.0, 5.0, 4.0, 3.0, 2.0]])
    # item 1 scores best but is in the input window: masked, so target 2 ranks first
    assert ranks_of(scores, torch.tensor([[0, 1]]), torch.tensor([2])).tolist() == [1]
    assert ranks_of(scores, torch.tensor([[0, 0]]), torch.tensor([3])).tolist() == [3]
    m = metrics_from_ranks(torch.tensor([1, 3, 11]))
    assert m["Recall@10"] == pytest.approx(2 / 3) and m["Recall@20"] == 1.0
    assert m["NDCG@10"] == pytest.approx((1 + 1 / np.log2(4)) / 3)
    assert m["MRR"] == pytest.approx((1 + 1 / 3 + 1 / 11) / 3)


def test_a_non_finite_score_is_a_miss_not_a_hit() -> None:
    """A diverged model (NaN scores) once ranked every target first: NDCG@10 = Recall@10 = 1.0, so it was kept as
    the best checkpoint."""
    nan = float("nan")
    scores = torch.tensor([[0.0, nan, nan, nan, nan], [0.0, 1.0, nan, 3.0, 2.0]])
    inputs = torch.tensor([[0, 0], [0, 0]])
    assert ranks_of(scores, inputs, torch.tensor([2, 3])).tolist() == [5, 2]  # a NaN target last; a NaN item above


def test_chunked_cross_entropy_equals_the_plain_one() -> None:
    torch.manual_seed(0)
    h = torch.randn(700, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(50, dtype=torch.float64, requires_grad=True)
    y = torch.randint(1, 50, (700,))
    loss = catalogue_cross_entropy(h, w, b, y, chunk=128)
    grads = torch.autograd.grad(loss, (h, w, b))
    logits = h @ w.T + b
    ref = F.cross_entropy(torch.cat([torch.full_like(logits[:, :1], float("-inf")), logits[:, 1:]], 1), y)
    ref_grads = torch.autograd.grad(ref, (h, w, b))
    assert torch.allclose(loss, ref, atol=1e-12)
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.allclose(g, r, atol=1e-12)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_training_learns_and_publishes_a_version(name: str, tmp_path: Path) -> None:
    data = write_lrurec(tmp_path / "sequences.txt", synthetic_sequences())
    cfg = load_config(overrides=[f"model_store.dir={tmp_path / 'store'}", "model.d_model=32", "model.max_len=20",
                                 "train.batch_size=32", "train.max_steps=240", "train.val_every=80",
                                 "train.lr=0.005", "train.device=cpu"])
    seqs = load_sequences(data)
    untrained = build_model(config_class(name)(d_model=32, max_len=20), 100)
    split = leave_one_out(seqs.encoded(seqs.vocabulary()), 20)
    before = evaluate(untrained, split.test_inputs, split.test_targets)
    [result] = run_offline(cfg, str(data), [name], tmp_path / "runs", progress=False, log=lambda _: None)
    assert result.history.test["Recall@10"] > before["Recall@10"] + 0.3  # the cycles are learnable
    assert result.curve.is_file() and result.curve.stat().st_size > 1000
    info = ModelStore(tmp_path / "store").info(result.version)
    assert info.model == name and info.metrics["test_Recall@10"] == result.history.test["Recall@10"]
    counts = Counter(item for seq in seqs.items for item in seq)
    assert popular_seed(info) == {item: float(n) for item, n in counts.items()}  # under 1000 items: all of them
    evaluated = run_evaluate(cfg, str(data), result.version)
    assert evaluated["test"]["Recall@10"] == pytest.approx(result.history.test["Recall@10"])
    history = json.loads((tmp_path / "runs" / f"{name}-history.json").read_text())
    assert history["val_steps"] == [80, 160, 240]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_a_narrow_model_with_heavy_dropout_keeps_finite_weights(name: str, tmp_path: Path) -> None:
    """d_model 8 with dropout 0.6 zeroes whole tokens (about 1 in 60). A LayerNorm (eps 1e-12, the official
    code's) or LinRec's normalisation of such a row multiplies its gradient by up to 1e6-1e12 per layer: the
    global norm overflowed to inf, clipping turned that into NaN, and two steps gave NaN weights that then ranked
    every target first. Now such a step is dropped and counted (LinRec's constant rows drop every step here)."""
    data = write_lrurec(tmp_path / "sequences.txt", synthetic_sequences(users=200, length=30))
    cfg = load_config(overrides=["model.d_model=8", "model.dropout=0.6", "model.attn_dropout=0.6",
                                 "model.max_len=30", "train.batch_size=64", "train.max_steps=40",
                                 "train.val_every=20", "train.device=cpu"])
    seqs = load_sequences(data)
    split = leave_one_out(seqs.encoded(seqs.vocabulary()), 30)
    torch.manual_seed(0)
    model = build_model(model_config(cfg.model, name), 100)
    history = train(model, split, cfg.train, torch.device("cpu"), progress=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(math.isfinite(loss) for loss in history.losses)
    assert history.test["Recall@10"] < 0.9  # not the NaN model's perfect score
    assert history.dropped_steps <= history.steps_done == 40


def test_a_step_with_non_finite_gradients_is_dropped_and_counted() -> None:
    torch.manual_seed(0)
    model = build_model(LRURecConfig(d_model=8, max_len=4), 10).eval()  # no dropout: both see the same gradients
    reference = copy.deepcopy(model)
    cfg = load_config().train
    opts = [make_optimizer(m, cfg) for m in (model, reference)]
    for m in (model, reference):
        m(torch.tensor([[1, 2, 3]])).sum().backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), cfg.grad_clip)
    opts[1].step()
    assert int(clipped_step(model, opts[0], cfg.grad_clip)) == 0  # finite: clip and step as before
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters(), strict=True))
    model.zero_grad()
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
    assert int(clipped_step(model, opts[0], cfg.grad_clip)) == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_unmasked_linrec_trains_on_the_last_position_only() -> None:
    model = build_model(LinRecConfig(causal=False, max_len=8), 10)
    assert model.loss_positions == "last"
    assert build_model(LinRecConfig(), 10).loss_positions == "all"


# ----- resumable runs -------------------------------------------------------------------------------------------
def _tiny_run(tmp_path: Path, **train_overrides: object) -> tuple:
    data = write_lrurec(tmp_path / "sequences.txt", synthetic_sequences(users=40, length=25))
    overrides = {"train.batch_size": 16, "train.val_every": 20, "train.max_steps": 60, "train.lr": 0.005,
                 "train.device": "cpu", **train_overrides}
    cfg = load_config(overrides=[f"{k}={v}" for k, v in overrides.items()])
    seqs = load_sequences(data)
    return cfg, leave_one_out(seqs.encoded(seqs.vocabulary()), 20)


def _fresh(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(config_class(name)(d_model=16, max_len=20), 100)


@pytest.mark.parametrize("how", ["max_steps", "ctrl_c", "time_budget"])
@pytest.mark.parametrize("name", ["lrurec", "sasrec"])
def test_a_resumed_run_takes_exactly_the_steps_of_an_uninterrupted_one(name: str, how: str, tmp_path: Path) -> None:
    cfg, split = _tiny_run(tmp_path)
    whole = _fresh(name)
    ref = train(whole, split, cfg.train, torch.device("cpu"), progress=False, checkpoint=tmp_path / "a.safetensors")

    ckpt = tmp_path / "b.safetensors"
    first = _fresh(name)
    if how == "max_steps":
        cut, _ = _tiny_run(tmp_path, **{"train.max_steps": 20})
        train(first, split, cut.train, torch.device("cpu"), progress=False, checkpoint=ckpt)
    elif how == "time_budget":  # out of time after step 1: checkpoint first, then a validation for the report
        cut_short = train(first, split, cfg.train, torch.device("cpu"), progress=False, checkpoint=ckpt,
                          max_minutes=0)
        assert cut_short.val_steps == [1] and cut_short.stopped_because == "time budget of 0 min"
    else:  # Ctrl-C during the first validation: the step finishes, the checkpoint is written, then it stops
        def press_ctrl_c(step: int, _val: dict) -> None:
            os.kill(os.getpid(), signal.SIGINT)

        with pytest.raises(Interrupted, match="interrupted at step 20"):
            train(first, split, cfg.train, torch.device("cpu"), progress=False, checkpoint=ckpt,
                  on_validate=press_ctrl_c)
    second = _fresh(name)  # a new process would start from a new model: the checkpoint must supply everything
    resumed = train(second, split, cfg.train, torch.device("cpu"), progress=False, checkpoint=ckpt, resume=True)

    assert resumed.resumed_at == [1 if how == "time_budget" else 20] and resumed.steps_done == ref.steps_done == 60
    assert resumed.losses == ref.losses and resumed.val_metrics == ref.val_metrics
    assert resumed.best_step == ref.best_step and resumed.test == ref.test
    for (k, a), b in zip(whole.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_a_checkpoint_from_another_set_up_or_a_damaged_one_is_refused(tmp_path: Path) -> None:
    cfg, split = _tiny_run(tmp_path, **{"train.max_steps": 20})
    ckpt = tmp_path / "c.safetensors"
    train(_fresh("lrurec"), split, cfg.train, torch.device("cpu"), progress=False, checkpoint=ckpt)
    other, _ = _tiny_run(tmp_path, **{"train.lr": 0.01})
    with pytest.raises(CheckpointError, match=r"lr: checkpoint 0\.005, now 0\.01"):
        train(_fresh("lrurec"), split, other.train, torch.device("cpu"), progress=False, checkpoint=ckpt, resume=True)
    with pytest.raises(CheckpointError, match="hparams"):
        train(build_model(LRURecConfig(d_model=8, max_len=20), 100), split, cfg.train, torch.device("cpu"),
              progress=False, checkpoint=ckpt, resume=True)
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable training checkpoint"):
        train(_fresh("lrurec"), split, cfg.train, torch.device("cpu"), progress=False, checkpoint=ckpt, resume=True)


def test_a_linrec_checkpoint_of_the_older_code_resumes(tmp_path: Path) -> None:
    """Older code recorded LinRec's attn_dropout (which LinRec never read) among the checkpoint's hyper-parameters;
    the registry's LinRecConfig retires it, and such a checkpoint still resumes."""
    cfg, split = _tiny_run(tmp_path)
    cut, _ = _tiny_run(tmp_path, **{"train.max_steps": 20})
    ckpt = tmp_path / "old.safetensors"
    train(_fresh("linrec"), split, cut.train, torch.device("cpu"), progress=False, checkpoint=ckpt)
    with safe_open(str(ckpt), framework="pt") as f:
        meta, tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    old = json.loads(meta["lrustream"])
    old["setup"]["hparams"]["attn_dropout"] = 0.2
    save_file(tensors, str(ckpt), metadata={**meta, "lrustream": json.dumps(old)})
    resumed = train(_fresh("linrec"), split, cfg.train, torch.device("cpu"), progress=False, checkpoint=ckpt,
                    resume=True)
    assert resumed.resumed_at == [20] and resumed.steps_done == 60


def test_train_command_resumes_the_run_in_its_out_folder(tmp_path: Path) -> None:
    data = write_lrurec(tmp_path / "sequences.txt", synthetic_sequences(users=40, length=25))
    common = [f"model_store.dir={tmp_path / 'store'}", "model.d_model=16", "model.max_len=20", "train.batch_size=16",
              "train.val_every=20", "train.device=cpu"]
    out, lines = tmp_path / "runs", []
    run_offline(load_config(overrides=[*common, "train.max_steps=20"]), str(data), ["lrurec"], out,
                progress=False, log=lines.append, publish=False)
    [result] = run_offline(load_config(overrides=[*common, "train.max_steps=40"]), str(data), ["lrurec"], out,
                           progress=False, log=lines.append, publish=False, resume=True)
    assert any("continuing the run in" in line for line in lines)
    assert result.history.resumed_at == [20] and result.history.val_steps == [20, 40]
    assert "resumed at steps [20]" in lines[-1]
