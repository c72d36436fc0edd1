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

from models import build_model
from models.store import META, WEIGHTS, ModelStore, ModelStoreError
from models.vocab import Vocabulary

REPO = Path(__file__).resolve().parent.parent


def _store(tmp_path: Path) -> tuple[ModelStore, str, str]:
    store = ModelStore(tmp_path / "models")
    versions = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model("lrurec", 30, d_model=16, num_layers=1, max_len=20)
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
from models import build_model
from models.store import ModelStore
from models.vocab import Vocabulary
store = ModelStore(sys.argv[1])
print("ready", flush=True)
while True:
    model = build_model("lrurec", 300, d_model=64, num_layers=2, max_len=50)
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
    info = ModelStore(root).publish(build_model("lrurec", 300, d_model=64, num_layers=2, max_len=50),
                                    Vocabulary.identity(300))
    assert ModelStore(root).current() == info.version


def test_a_version_name_that_is_not_v_and_digits_is_refused_before_it_touches_the_filesystem(tmp_path: Path) -> None:
    """`models rollback ../evil/v999999` used to load (and serve) a version from outside the store."""
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
    model = build_model("lrurec", 8, d_model=8, num_layers=1, max_len=5)
    v3 = store.publish(model, Vocabulary(f"i{k}" for k in range(1, 9))).version
    assert int(v3[1:]) == int(v2[1:]) + 1


def test_a_pin_keeps_serving_while_new_versions_are_published_until_unpinned(tmp_path: Path) -> None:
    store, v1, _ = _store(tmp_path)
    model = build_model("lrurec", 8, d_model=8, num_layers=1, max_len=5)
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
    model = build_model("lrurec", 30, d_model=16, num_layers=1, max_len=20)
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
