"""The model-versions format without a broker: what a ``done`` record must say, how received files are checked,
and how a store installs and mirrors what the topic says (the topic itself: tests/integration/test_versions.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import LRURecConfig, build_model
from models.store import META, VOCAB, WEIGHTS, ModelStore, ModelStoreError
from models.vocab import Vocabulary
from stream.versions import (
    MAX_OFFSET,
    SCRATCH,
    WHOLE,
    Digests,
    Done,
    MalformedKey,
    _check_files,
    _remove_dead_scratch,
    parse_key,
)


def _prepared(tmp_path: Path, version: str = "v000003") -> tuple[ModelStore, Path]:
    store = ModelStore(tmp_path / "models")
    torch.manual_seed(0)
    folder, _ = store.prepare(build_model(LRURecConfig(d_model=8, num_layers=1, max_len=10), 20),
                              Vocabulary.identity(20), version)
    return store, folder


def _done_for(folder: Path, version: str = "v000003") -> Done:
    files = [{"name": n, "size": (folder / n).stat().st_size,
              "sha256": hashlib.sha256((folder / n).read_bytes()).hexdigest()} for n in (META, VOCAB, WEIGHTS)]
    whole = hashlib.sha256(b"".join((folder / n).read_bytes() for n in (META, VOCAB, WEIGHTS))).hexdigest()
    body = {"version": version, "upload": "u1", "chunk_bytes": 1024, "files": files, "sha256": whole}
    return Done.parse(version, "u1", json.dumps(body).encode())


def test_a_done_record_must_name_the_files_of_a_version_and_match_its_key(tmp_path: Path) -> None:
    _, folder = _prepared(tmp_path)
    done = _done_for(folder)
    assert done.weights_chunks() == list(range(0, (folder / WEIGHTS).stat().st_size, 1024))
    body = {"version": "v000003", "upload": "u1", "chunk_bytes": 1024, "sha256": "", "files": done.files}
    with pytest.raises(ValueError, match="differs from its key"):
        Done.parse("v000004", "u1", json.dumps(body).encode())
    with pytest.raises(ValueError, match="unexpected file list"):
        Done.parse("v000003", "u1", json.dumps({**body, "files": [*done.files, {**done.files[0],
                                                                                "name": "../x"}]}).encode())
    with pytest.raises(KeyError):
        Done.parse("v000003", "u1", json.dumps({"version": "v000003"}).encode())


@pytest.mark.parametrize("damage", ["truncated", "altered", "missing"])
def test_received_files_that_differ_from_the_done_record_are_refused(tmp_path: Path, damage: str) -> None:
    _, folder = _prepared(tmp_path)
    done = _done_for(folder)
    paths = [folder / n for n in (META, VOCAB, WEIGHTS)]
    _check_files(paths, done, "v000003")  # as received: accepted
    weights = folder / WEIGHTS
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-1])
    elif damage == "altered":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 1
        weights.write_bytes(bytes(data))
    else:
        weights.unlink()
    with pytest.raises(ModelStoreError, match=r"incomplete or corrupt|missing"):
        _check_files(paths, done, "v000003")


def _chunks(folder: Path, size: int = 1024) -> list[tuple[str, int, bytes]]:
    """The version's chunks in the order a publisher sends them."""
    out = []
    for name in (META, VOCAB, WEIGHTS):
        data = (folder / name).read_bytes()
        out += [(name, offset, data[offset:offset + size]) for offset in range(0, len(data), size)]
    return out


def test_checksums_taken_as_chunks_arrive_in_order_spare_reading_the_files_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import stream.versions

    _, folder = _prepared(tmp_path)
    done = _done_for(folder)
    digests = Digests()
    for name, offset, data in _chunks(folder):
        digests.add(name, offset, data)
    known = digests.known(done)
    assert known == {**{f["name"]: f["sha256"] for f in done.files}, WHOLE: done.sha256}
    monkeypatch.setattr(stream.versions, "_file_sha256", lambda *a: pytest.fail("a file was read again"))
    paths = [folder / n for n in (META, VOCAB, WEIGHTS)]
    assert _check_files(paths, done, "v000003", known) == {f["name"]: f["sha256"] for f in done.files}
    with pytest.raises(ModelStoreError, match="whole version does not match"):
        _check_files(paths, done, "v000003", {**known, WHOLE: "0" * 64})
    with pytest.raises(ModelStoreError, match=r"weights\.safetensors is incomplete or corrupt"):
        _check_files(paths, done, "v000003", {**known, WEIGHTS: "0" * 64})


@pytest.mark.parametrize("disorder", ["swapped", "repeated", "interleaved"])
def test_chunks_out_of_order_leave_their_file_and_the_whole_to_be_read_again(tmp_path: Path, disorder: str) -> None:
    _, folder = _prepared(tmp_path)
    done = _done_for(folder)
    chunks = _chunks(folder, size=256)
    weights = [i for i, c in enumerate(chunks) if c[0] == WEIGHTS]
    if disorder == "swapped":
        chunks[weights[1]], chunks[weights[2]] = chunks[weights[2]], chunks[weights[1]]
    elif disorder == "repeated":  # a retried produce: the same key and bytes again, later
        chunks.append(chunks[weights[0]])
    else:  # the vocabulary's last chunk after the weights' first
        vocab_last = max(i for i, c in enumerate(chunks) if c[0] == VOCAB)
        chunks.insert(weights[0] + 1, chunks.pop(vocab_last))
    digests = Digests()
    for name, offset, data in chunks:
        digests.add(name, offset, data)
    known = digests.known(done)
    assert WHOLE not in known and known.get(META) == done.files[0]["sha256"]
    assert (WEIGHTS in known) == (disorder == "interleaved")
    paths = [folder / n for n in (META, VOCAB, WEIGHTS)]
    assert _check_files(paths, done, "v000003", known)[WEIGHTS] == done.files[2]["sha256"], "read again: accepted"


def test_install_refuses_files_that_describe_another_version_and_keeps_a_version_already_there(
        tmp_path: Path) -> None:
    store, folder = _prepared(tmp_path)
    with pytest.raises(ModelStoreError, match="describes 'v000003'"):
        store.install(folder, "v000009")
    info = store.install(folder, "v000003")
    assert store.versions() == ["v000003"] and store.load("v000003").info.version == info.version
    assert store.next_version() == "v000004", "an installed number is never handed out again"
    _, again = _prepared(tmp_path / "other")
    (tmp_path / "models" / "again").mkdir()
    for name in (META, VOCAB, WEIGHTS):
        os.replace(again / name, tmp_path / "models" / "again" / name)
    store.install(tmp_path / "models" / "again", "v000003")
    assert not (tmp_path / "models" / "again").exists() and store.versions() == ["v000003"]


def test_a_collected_version_is_installed_without_weights_and_refused_by_load(tmp_path: Path) -> None:
    store, folder = _prepared(tmp_path)
    (folder / WEIGHTS).unlink()
    store.install(folder, "v000003", collected=True)
    assert store.collected("v000003") and len(store.vocabulary("v000003")) == 20
    with pytest.raises(ModelStoreError, match="garbage-collected"):
        store.load("v000003")


def test_mirror_sets_and_clears_the_pointer_files(tmp_path: Path) -> None:
    store, folder = _prepared(tmp_path)
    store.install(folder, "v000003")
    store.mirror("v000003", "v000003", None)
    assert (store.current(), store.pinned(), store.shadow()) == ("v000003", "v000003", None)
    store.mirror("v000003", None, "v000003")
    assert (store.current(), store.pinned(), store.shadow()) == ("v000003", None, "v000003")
    store.mirror(None, None, None)
    assert (store.current(), store.pinned(), store.shadow()) == (None, None, None)
    with pytest.raises(ModelStoreError, match="invalid model version name"):
        store.mirror("../evil", None, None)


def test_scratch_folders_of_dead_readers_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = tmp_path / f"{SCRATCH}{int(dead.stdout)}-abc"
    alive = tmp_path / f"{SCRATCH}{os.getpid()}-def"
    for folder in (gone, alive):
        (folder / "v000001-u1").mkdir(parents=True)
    _remove_dead_scratch(tmp_path)
    assert not gone.exists() and alive.exists()


@pytest.mark.parametrize(("key", "parsed"), [
    ("v000007/0a1b2c3d4e5f/weights.safetensors/524288", ("v000007", "0a1b2c3d4e5f", [WEIGHTS, "524288"])),
    ("v000007/0a1b2c3d4e5f/meta.json/0", ("v000007", "0a1b2c3d4e5f", [META, "0"])),
    ("v000007/0a1b2c3d4e5f/done", ("v000007", "0a1b2c3d4e5f", ["done"])),
    ("v000007/up_load-1/collected", ("v000007", "up_load-1", ["collected"])),
])
def test_parse_key_accepts_every_key_a_publisher_or_gc_writes(key: str, parsed: tuple[str, str, list[str]]) -> None:
    assert parse_key(key) == parsed


@pytest.mark.parametrize(("key", "why"), [
    ("v000007/u1/weights.safetensors/-1", "offset"),  # a seek before the file: OSError in a reader
    (f"v000007/u1/weights.safetensors/{1 << 62}", "offset"),  # past any file system's file size: OSError
    (f"v000007/u1/weights.safetensors/{MAX_OFFSET}", "offset"),  # a 1 TiB sparse file
    ("v000007/u1/weights.safetensors/007", "offset"),
    ("v000007/u1/weights.safetensors/+7", "offset"),
    ("v000007/u1/weights.safetensors/", "offset"),
    ("v000007/" + "x" * 300 + "/meta.json/0", "upload"),  # a scratch folder name too long: OSError
    ("v000007/../meta.json/0", "upload"),
    ("v000007//meta.json/0", "upload"),
    ("v000007/u\x00/meta.json/0", "upload"),
    ("v000007/u1/../../etc/0", "not a model-versions key"),
    ("v000007/u1/other.bin/0", "not a model-versions key"),
    ("v000007/u1", "not a model-versions key"),
    ("", "not a model-versions key"),
    ("v7/u1/done", "invalid model version name"),
])
def test_parse_key_refuses_keys_that_could_hurt_a_reader(key: str, why: str) -> None:
    """Every part of a key a reader turns into a path or a file position is checked before it is used."""
    with pytest.raises(MalformedKey, match=why):
        parse_key(key)


@pytest.mark.parametrize("bad", [{"chunk_bytes": 0}, {"size": -1}, {"size": MAX_OFFSET}])
def test_a_done_record_with_a_chunk_size_or_file_size_out_of_range_is_refused(tmp_path: Path, bad: dict) -> None:
    """A chunk size of 0 would make gc's ``range`` raise; a negative or huge size names no file a chunk wrote."""
    _, folder = _prepared(tmp_path)
    done = _done_for(folder)
    files = [{**done.files[0], "size": bad.get("size", done.files[0]["size"])}, *done.files[1:]]
    body = {"version": "v000003", "upload": "u1", "chunk_bytes": bad.get("chunk_bytes", 1024), "files": files,
            "sha256": done.sha256}
    with pytest.raises(ValueError, match="out of range"):
        Done.parse("v000003", "u1", json.dumps(body).encode())
