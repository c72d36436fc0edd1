"""Model-store faults: every broken checkpoint is refused with a clear message, the previous version stays
loadable, and nothing in the project ever unpickles weights."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import LinRecConfig, LRURecConfig, SASRecConfig, build_model
from models.store import (
    META,
    POPULAR_NOTE,
    POPULAR_SEED_ITEMS,
    WEIGHTS,
    ModelStore,
    ModelStoreError,
    popular_note,
    popular_seed,
)
from models.vocab import Vocabulary
from tests.conftest import REPO


def _store(tmp_path: Path) -> tuple[ModelStore, str, str]:
    store = ModelStore(tmp_path / "models")
    versions = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model(LRURecConfig(d_model=16, num_layers=1, max_len=20), 30)
        versions.append(store.publish(model, Vocabulary.identity(30)).version)
    return store, versions[0], versions[1]


def _rehash(store: ModelStore, version: str) -> None:
    """Make the checksum match the altered file, so that a deeper check has to catch the fault."""
    folder = store.versions_dir / version
    meta = json.loads((folder / META).read_text())
    meta["files"][WEIGHTS] = hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()
    (folder / META).write_text(json.dumps(meta))


def truncated(store: ModelStore, v: str) -> None:
    path = store.versions_dir / v / WEIGHTS
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flipped_byte(store: ModelStore, v: str) -> None:
    path = store.versions_dir / v / WEIGHTS
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def non_finite(store: ModelStore, v: str) -> None:
    path = store.versions_dir / v / WEIGHTS
    tensors = load_file(str(path))
    tensors["item_bias"] = torch.full_like(tensors["item_bias"], float("inf"))
    save_file(tensors, str(path))
    _rehash(store, v)


def wrong_shape(store: ModelStore, v: str) -> None:
    path = store.versions_dir / v / WEIGHTS
    tensors = load_file(str(path))
    tensors["token.weight"] = torch.zeros(5, 16)
    save_file(tensors, str(path))
    _rehash(store, v)


class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/lrustream-pickle-was-executed"),))


def a_pickle(store: ModelStore, v: str) -> None:
    (store.versions_dir / v / WEIGHTS).write_bytes(pickle.dumps({"token.weight": _Boom()}))
    _rehash(store, v)


@pytest.mark.parametrize(("corrupt", "message"), [
    (truncated, "checksum mismatch"), (flipped_byte, "checksum mismatch"), (non_finite, "non-finite"),
    (wrong_shape, "has shape"), (a_pickle, "not a valid safetensors file"),
], ids=["truncated", "wrong-checksum", "non-finite", "wrong-shape", "pickle"])
def test_broken_checkpoint_is_refused_and_previous_version_still_loads(
        tmp_path: Path, corrupt: Callable[[ModelStore, str], None], message: str) -> None:
    marker = Path("/tmp/lrustream-pickle-was-executed")
    marker.unlink(missing_ok=True)
    store, good, bad = _store(tmp_path)
    corrupt(store, bad)
    with pytest.raises(ModelStoreError, match=re.escape(message)) as info:
        store.load(bad)
    assert bad in str(info.value) and "\n" not in str(info.value), "one clear line naming the version"
    assert store.load(good).info.version == good
    assert not marker.exists(), "a pickle was executed"


def test_no_project_code_unpickles() -> None:
    """Weights load only through safetensors: no torch.load / pickle.load(s) anywhere in the packages."""
    offenders = []
    for pkg in ("models", "state", "stream", "trainer", "lrustream"):
        for path in (REPO / pkg).rglob("*.py"):
            text = path.read_text()
            if re.search(r"torch\.load\(|pickle\.loads?\(|import pickle|import dill|joblib\.load", text):
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


PUBLISH_LOOP = """
import sys, torch
from models import LRURecConfig, build_model
from models.store import ModelStore
from models.vocab import Vocabulary
store = ModelStore(sys.argv[1])
print("ready", flush=True)
while True:
    model = build_model(LRURecConfig(d_model=64, num_layers=2, max_len=50), 300)
    store.publish(model, Vocabulary.identity(300), parent=store.current())
"""


def test_trainer_killed_while_publishing_leaves_only_complete_versions(tmp_path: Path) -> None:
    """SIGKILL a process that publishes versions back to back, at random moments (mostly mid-publish):
    every version that is visible loads and verifies, CURRENT always names one of them, and publishing
    continues afterwards."""
    import random
    import signal
    import subprocess
    import sys
    import time

    root = tmp_path / "models"
    rng = random.Random(5)
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", PUBLISH_LOOP, str(root)], cwd=REPO, stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"  # imports done (~1.5 s idle)
        time.sleep(rng.uniform(0.5, 2.5))  # then a publish every few tens of ms
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        store = ModelStore(root)
        for version in store.versions():
            store.load(version)  # raises on any partial or corrupt version
        assert store.current() in store.versions()
    assert len(ModelStore(root).versions()) >= 6
    torch.manual_seed(0)
    info = ModelStore(root).publish(build_model(LRURecConfig(d_model=64, num_layers=2, max_len=50), 300),
                                    Vocabulary.identity(300))
    assert ModelStore(root).current() == info.version


def test_a_version_name_that_is_not_v_and_digits_is_refused_before_it_touches_the_filesystem(tmp_path: Path) -> None:
    """`models rollback ../evil/v999999` must not load (and serve) a version from outside the store."""
    store, v1, _ = _store(tmp_path)
    evil = store.root / "evil" / "v999999"  # where versions/../evil/v999999 leads
    evil.parent.mkdir()
    shutil.copytree(store.versions_dir / v1, evil)  # a complete, valid version, but outside versions/
    for name in ("../evil/v999999", str(evil), "v1", "v000001/../v000002", "V000001", "v000001 "):
        with pytest.raises(ModelStoreError, match="invalid model version name"):
            store.load(name)
        with pytest.raises(ModelStoreError, match="invalid model version name"):
            store.set_current(name, pin=True)
    assert store.current() == store.versions()[-1]


def test_version_numbers_are_never_reused_after_a_version_is_deleted(tmp_path: Path) -> None:
    store, _, v2 = _store(tmp_path)
    shutil.rmtree(store.versions_dir / v2)
    model = build_model(LRURecConfig(d_model=8, num_layers=1, max_len=5), 8)
    v3 = store.publish(model, Vocabulary(f"i{k}" for k in range(1, 9))).version
    assert int(v3[1:]) == int(v2[1:]) + 1


def test_a_pin_keeps_serving_while_new_versions_are_published_until_unpinned(tmp_path: Path) -> None:
    store, v1, _ = _store(tmp_path)
    model = build_model(LRURecConfig(d_model=8, num_layers=1, max_len=5), 8)
    vocab = Vocabulary(f"i{k}" for k in range(1, 9))
    store.set_current(v1, pin=True)  # an operator's rollback
    v3 = store.publish(model, vocab).version
    assert (store.current(), store.pinned()) == (v1, v1), "the trainer's publish did not undo the rollback"
    with pytest.raises(ModelStoreError, match="pinned to"):
        store.set_current(v3)
    assert store.unpin() == v1 and store.pinned() is None and store.current() == v1
    v4 = store.publish(model, vocab).version
    assert store.current() == v4


def test_gc_keeps_the_newest_the_serving_and_the_pinned_versions_and_every_vocabulary(tmp_path: Path) -> None:
    store, v1, _ = _store(tmp_path)
    model = build_model(LRURecConfig(d_model=16, num_layers=1, max_len=20), 30)
    newer = [store.publish(model, Vocabulary.identity(30)).version for _ in range(4)]
    store.set_current(v1, pin=True)  # pinned and serving: never collected, however old
    assert store.gc(keep=2) == [store.versions()[1], newer[0], newer[1]]
    assert store.load(v1).info.version == v1 and store.load(newer[-1]).info.version == newer[-1]
    with pytest.raises(ModelStoreError, match="garbage-collected"):
        store.load(newer[0])
    with pytest.raises(ModelStoreError, match="garbage-collected"):
        store.set_current(newer[0], pin=True)
    assert len(store.vocabulary(newer[0])) == 30, "states stored under a collected version still read its items"
    assert not (store.versions_dir / newer[0] / WEIGHTS).exists()
    assert store.gc(keep=2) == [], "nothing twice"
    assert int(store.publish(model, Vocabulary.identity(30)).version[1:]) == int(newer[-1][1:]) + 1


def test_a_shadow_version_is_verified_first_never_collected_and_cleared_by_none(tmp_path: Path) -> None:
    store, v1, _ = _store(tmp_path)
    model = build_model(LRURecConfig(d_model=16, num_layers=1, max_len=20), 30)
    newer = [store.publish(model, Vocabulary.identity(30)).version for _ in range(3)]
    with pytest.raises(ModelStoreError):
        store.set_shadow("../v000001")
    assert store.shadow() is None
    store.set_shadow(v1)
    assert store.shadow() == v1 and store.current() == newer[-1], "shadowing serves nothing"
    assert v1 not in store.gc(keep=1)
    assert store.load(v1).info.version == v1
    store.set_shadow(None)
    assert store.shadow() is None and store.gc(keep=1) == [v1]
    with pytest.raises(ModelStoreError, match="garbage-collected"):
        store.set_shadow(v1)


# ----- meta.json written by older code ---------------------------------------------------------------------------
OLD_FORMAT = [  # (the model, meta.json's "hparams" as the format-1 code wrote them: model.hparams() of its day)
    (LRURecConfig(d_model=16, num_layers=1, max_len=20),
     {"num_items": 30, "d_model": 16, "num_layers": 1, "dropout": 0.2, "attn_dropout": 0.2, "max_len": 20}),
    (SASRecConfig(d_model=16, num_layers=1, max_len=20, dropout=0.1, num_heads=4),
     {"num_items": 30, "d_model": 16, "num_layers": 1, "num_heads": 4, "dropout": 0.1, "attn_dropout": 0.2,
      "max_len": 20}),
    (LinRecConfig(d_model=16, num_layers=1, max_len=20, causal=False),  # LinRec never read attn_dropout
     {"num_items": 30, "d_model": 16, "num_layers": 1, "num_heads": 2, "dropout": 0.2, "attn_dropout": 0.2,
      "max_len": 20, "causal": False}),
]


def _write_format_1(root: Path, name: str, hparams: dict, model: torch.nn.Module) -> str:
    """A version folder exactly as the format-1 code laid it out, meta.json written by hand."""
    folder = root / "versions" / "v000001"
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS),
              metadata={"model": name})
    (folder / "vocab.json").write_text(json.dumps(Vocabulary.identity(30).to_json()))
    files = {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in (WEIGHTS, "vocab.json")}
    (folder / META).write_text(json.dumps({
        "format": 1, "version": "v000001", "model": name, "hparams": hparams, "created": 1_700_000_000.0,
        "parent": None, "metrics": {"test_NDCG@10": 0.25}, "notes": {"data": "ml-1m"}, "files": files}))
    (root / "CURRENT").write_text("v000001\n")
    return "v000001"


@pytest.mark.parametrize(("config", "hparams"), OLD_FORMAT, ids=[c.name for c, _ in OLD_FORMAT])
def test_a_version_written_by_the_format_1_code_still_loads(tmp_path: Path, config, hparams: dict) -> None:
    torch.manual_seed(0)
    model = build_model(config, 30)
    version = _write_format_1(tmp_path, config.name, hparams, model)
    store = ModelStore(tmp_path)
    loaded = store.load()
    assert (loaded.info.version, loaded.info.model, loaded.info.num_items) == (version, config.name, 30)
    assert loaded.model.config == config and type(loaded.model) is type(model)
    assert loaded.info.metrics == {"test_NDCG@10": 0.25} and [i.version for i in store.list()] == [version]
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], tensor), key
    newer = store.publish(loaded.model, loaded.vocab, parent=version)  # the next version is written as format 2
    assert json.loads((store.versions_dir / newer.version / META).read_text())["format"] == 2
    assert store.load(newer.version).model.config == config


@pytest.mark.parametrize(("change", "message"), [
    (lambda meta: meta["hparams"].pop("num_items"), "meta.json is missing or mistypes 'num_items'"),
    (lambda meta: meta["hparams"].update(causal=True), "cannot build lrurec from its hyper-parameters (unknown "
                                                       "hyper-parameters for lrurec: ['causal'])"),
    (lambda meta: meta.update(model="gru4rec"), "cannot build gru4rec from its hyper-parameters (unknown model "
                                                "'gru4rec'"),
    (lambda meta: meta.update(format=3), "meta.json is not a lrustream model description (format 1 or 2)"),
], ids=["no-num-items", "unknown-field", "unknown-model", "unknown-format"])
def test_a_format_1_version_that_cannot_be_rebuilt_is_refused_in_one_line(tmp_path: Path, change, message: str
                                                                         ) -> None:
    config, hparams = OLD_FORMAT[0]
    version = _write_format_1(tmp_path, config.name, dict(hparams), build_model(config, 30))
    meta_path = tmp_path / "versions" / version / META
    meta = json.loads(meta_path.read_text())
    change(meta)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelStoreError, match=re.escape(message)) as refused:
        ModelStore(tmp_path).load(version)
    assert version in str(refused.value) and "\n" not in str(refused.value)


def test_a_published_version_carries_the_item_counts_of_its_training_data(tmp_path: Path) -> None:
    """The "popular" note: the most frequent items, at most POPULAR_SEED_ITEMS of them, read back by load (a
    store folder is what a worker installs from the model-versions topic); older versions and a malformed note
    give no seed."""
    store = ModelStore(tmp_path / "models")
    torch.manual_seed(0)
    model = build_model(LRURecConfig(d_model=16, num_layers=1, max_len=20), 1200)
    interactions = [str(i) for i in range(1, 1201) for _ in range(1 + (i % 7 == 0))] + ["5"] * 9
    note = popular_note(interactions)
    assert len(note) == POPULAR_SEED_ITEMS and next(iter(note.items())) == ("5", 10)
    info = store.publish(model, Vocabulary.identity(1200), notes={POPULAR_NOTE: note, "data": "synthetic"})
    loaded = store.load(info.version)
    seed = popular_seed(loaded.info)
    assert seed == {item: float(n) for item, n in note.items()}
    assert all(str(7 * k) in seed for k in range(1, 172)), "every item seen twice is kept"
    assert popular_seed(store.load(store.publish(model, Vocabulary.identity(1200)).version).info) == {}
    loaded.info.notes[POPULAR_NOTE] = {"5": "many", "6": 3, "7": float("nan"), "8": True}
    assert popular_seed(loaded.info) == {"6": 3.0}
    loaded.info.notes[POPULAR_NOTE] = ["5", "6"]
    assert popular_seed(loaded.info) == {}


def test_install_reads_a_file_again_unless_the_caller_verified_the_checksum_meta_json_names(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import models.store

    store = ModelStore(tmp_path / "models")
    torch.manual_seed(0)
    model = build_model(LRURecConfig(d_model=8, num_layers=1, max_len=10), 20)
    hashed: list[str] = []
    real = models.store._sha256
    monkeypatch.setattr(models.store, "_sha256", lambda path: hashed.append(path.name) or real(path))
    folder, info = store.prepare(model, Vocabulary.identity(20), "v000003")
    hashed.clear()
    store.install(folder, "v000003", verified={WEIGHTS: info.files[WEIGHTS]})
    assert hashed == ["vocab.json"], "the weights the caller verified are not read again"
    assert store.load("v000003").info.version == "v000003"

    folder, info = store.prepare(model, Vocabulary.identity(20), "v000004")
    flipped = bytearray((folder / WEIGHTS).read_bytes())
    flipped[-5] ^= 0xFF
    (folder / WEIGHTS).write_bytes(bytes(flipped))
    with pytest.raises(ModelStoreError, match=r"weights\.safetensors checksum mismatch"):
        store.install(folder, "v000004", verified={WEIGHTS: hashlib.sha256(bytes(flipped)).hexdigest()})
    assert store.versions() == ["v000003"]
