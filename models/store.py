"""The model store: versioned weights in a local folder, each host's cache of the model-versions topic.

Every host (worker, trainer, operator's shell) keeps its own store; the broker's model-versions topic
(stream/versions.py) is what they share. A version published through the topic is installed here whole
(:meth:`ModelStore.install`) and the pointer files below mirror the topic's; ``publish`` and the pointer
setters write this folder only (a store used on its own, as in offline experiments and unit tests).

Layout::

    <root>/versions/v000007/weights.safetensors   tensors only (safetensors: no pickle, no code execution)
                           /vocab.json           external item ids in model-id order
                           /meta.json            model name, its config (models/registry.py) and number of
                                                 items, metrics, parent, created, sha256 of the two files above
    <root>/CURRENT                               the version workers should serve (rollback rewrites it)
    <root>/PINNED                                present while an operator pins CURRENT (rollback, pin)
    <root>/SHADOW                                present while workers score a candidate version beside
                                                 CURRENT (stream/shadow.py)
    <root>/LAST                                  the highest number ever published (never reused)

Publishing is atomic: files are written into a temporary directory, fsynced, and the directory is renamed into
``versions/``; a reader therefore sees a version completely or not at all. Loading re-checks everything it can
(checksums, JSON shape, tensor names and shapes, finiteness) and raises :class:`ModelStoreError` with a one-line
reason instead of serving a corrupt model.

``gc`` bounds the store: versions older than the newest ``keep`` (never CURRENT, PINNED or SHADOW) lose their
weights, the bulk of a version, and keep meta.json and vocab.json (a few KB to MB), because states stored under a
version name its vocabulary; a collected version is refused by ``load`` for good.

meta.json's format 2 keeps the model as ``"model": name, "config": {field: value}, "num_items": N``: the name's
config class rebuilds the model (:func:`models.registry.config_from_dict`). Format 1, written before per-model
configs existed, kept ``"hparams": {"num_items": N, field: value}``; it is still read, into the same fields.

A version's notes may hold ``"popular"``: ``{item: count}``, the most frequent items (external ids) of the
data it was trained on, at most :data:`POPULAR_SEED_ITEMS` of them (:func:`popular_note`). Workers seed their
cold-start fallback with it (stream/popular.py); a version without it (or with a malformed one) seeds nothing.
meta.json has no checksum of its own: the note is checked for shape when read (:func:`popular_seed`).

Version names are ``v`` and six or more digits; any other name (``../x``, an absolute path) is refused before
it touches the filesystem. Numbers only grow, even after versions are deleted. While PINNED exists a publish
writes its version but leaves CURRENT alone, so an operator's rollback is not undone by the trainer's next round.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lrustream.kernel.errors import LrustreamError
from lrustream.kernel.files import fsync, replace_durably
from models import SeqRecModel, build_model, config_from_dict
from models.vocab import Vocabulary

WEIGHTS, VOCAB, META = "weights.safetensors", "vocab.json", "meta.json"
COLLECTED = "COLLECTED"  # present in a version folder whose weights ``gc`` removed
FORMAT = 2
READABLE_FORMATS = (1, 2)


POPULAR_NOTE = "popular"
POPULAR_SEED_ITEMS = 1000
"""Items a version's popularity note keeps: the most a request may ask for (stream/worker.py checks ``k``
against it), so that a cold user's answer can be filled from the seed whatever its ``k``."""


def popular_note(items: Iterable[str], n: int = POPULAR_SEED_ITEMS) -> dict[str, int]:
    """The ``n`` most frequent of ``items`` (external ids, one per interaction) with their counts, most frequent
    first (ties by first occurrence): the ``"popular"`` note of a version trained on them."""
    return dict(Counter(items).most_common(n))


def popular_seed(info: VersionInfo) -> dict[str, float]:
    """A version's popularity note as ``{item: count}``; empty when the version has none or it is malformed
    (then the version seeds nothing, as one published without it)."""
    note = info.notes.get(POPULAR_NOTE)
    if not isinstance(note, dict):
        return {}
    out = {}
    for item, count in note.items():
        if isinstance(item, str) and isinstance(count, int | float) and not isinstance(count, bool) \
                and math.isfinite(count) and count > 0:
            out[item] = float(count)
    return out


class ModelStoreError(LrustreamError):
    """A version that cannot be served; the message says which and why, in one line. ``transient``: it may load
    later (a file missing or unreadable now), as opposed to a version that is corrupt for good."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


VERSION_NAME = re.compile(r"v[0-9]{6,12}")


def check_version_name(version: str) -> str:
    """``version`` if it is a well-formed name, else ModelStoreError (never a path outside the store)."""
    if not isinstance(version, str) or not VERSION_NAME.fullmatch(version):
        raise ModelStoreError(f"invalid model version name {str(version)[:80]!r}: expected v and 6 digits, "
                              "e.g. v000003")
    return version


@dataclass
class VersionInfo:
    version: str
    model: str
    """The model's name in the registry."""
    config: dict[str, Any]
    """Its config's fields (``SeqRecConfig.as_dict``)."""
    num_items: int
    created: float
    parent: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": self.version, "model": self.model, "config": self.config,
                "num_items": self.num_items, "created": self.created, "parent": self.parent,
                "metrics": self.metrics, "notes": self.notes, "files": self.files}

    @classmethod
    def from_json(cls, data: Any, where: str) -> VersionInfo:
        if not isinstance(data, dict) or data.get("format") not in READABLE_FORMATS:
            raise ModelStoreError(f"{where}: meta.json is not a lrustream model description "
                                  f"(format {' or '.join(map(str, READABLE_FORMATS))})")
        try:
            config, num_items = _model_fields(data)
            return cls(version=str(data["version"]), model=str(data["model"]), config=config, num_items=num_items,
                       created=float(data["created"]), parent=data.get("parent"),
                       metrics=dict(data.get("metrics") or {}), notes=dict(data.get("notes") or {}),
                       files=dict(data["files"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelStoreError(f"{where}: meta.json is missing or mistypes {exc}") from None


def _model_fields(data: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """(config fields, number of items) from meta.json of either format."""
    if data["format"] == 1:
        config = dict(data["hparams"])
        return config, int(config.pop("num_items"))
    return dict(data["config"]), int(data["num_items"])


@dataclass
class LoadedModel:
    model: SeqRecModel
    vocab: Vocabulary
    info: VersionInfo


def _finite(tensor: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN or infinity: its smallest and largest values are finite (NaN propagates to
    both). One pass that allocates nothing of the tensor's size: ``isfinite(t).all()`` writes a mask as large as
    the tensor first, and took 0.65 s instead of 0.02 s on a 1,000,000 x 64 item table."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    lo, hi = tensor.aminmax()
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ModelStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.versions_dir = self.root / "versions"

    # ----- writing -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _next_version(self) -> str:
        numbers = [int(p.name[1:]) for p in self.versions_dir.glob("v*") if p.name[1:].isdigit()]
        with contextlib.suppress(OSError, ValueError):  # absent in stores written before LAST existed
            numbers.append(int((self.root / "LAST").read_text()))
        return f"v{max(numbers, default=0) + 1:06d}"

    def publish(self, model: SeqRecModel, vocab: Vocabulary, metrics: dict[str, float] | None = None,
                parent: str | None = None, notes: dict[str, Any] | None = None,
                make_current: bool = True) -> VersionInfo:
        """Write a new version atomically into this folder alone; returns its description. (Workers elsewhere
        see versions published through the model-versions topic: stream/versions.py.)"""
        with self._lock():
            version = self._next_version()
            tmp, info = self.prepare(model, vocab, version, metrics, parent, notes)
            try:
                os.rename(tmp, self.versions_dir / version)
                fsync(self.versions_dir)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._write_small("LAST", version[1:])
            if make_current and self.pinned() is None:
                self._write_small("CURRENT", version)
        return info

    def next_version(self, above: int = 0) -> str:
        """The number a new version gets here: above every one this store holds or handed out, and ``above``."""
        with self._lock():
            return max(self._next_version(), f"v{above + 1:06d}")

    def prepare(self, model: SeqRecModel, vocab: Vocabulary, version: str, metrics: dict[str, float] | None = None,
                parent: str | None = None, notes: dict[str, Any] | None = None) -> tuple[Path, VersionInfo]:
        """A version's files, written and fsynced into a new scratch folder of this store (for
        :meth:`install`, or a rename into ``versions/``); refuses non-finite weights."""
        if len(vocab) != model.num_items:
            raise ValueError(f"vocabulary has {len(vocab)} items but the model scores {model.num_items}")
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
        bad = [k for k, v in tensors.items() if not _finite(v)]
        if bad:
            raise ModelStoreError(f"refusing to publish non-finite weights: {bad[:3]}")
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{check_version_name(version)}-", dir=self.root))
        try:
            save_file(tensors, str(tmp / WEIGHTS), metadata={"model": model.name})
            (tmp / VOCAB).write_text(json.dumps(vocab.to_json()))
            info = VersionInfo(version=version, model=model.name, config=model.config.as_dict(),
                               num_items=model.num_items, created=time.time(), parent=parent,
                               metrics=dict(metrics or {}), notes=dict(notes or {}),
                               files={WEIGHTS: _sha256(tmp / WEIGHTS), VOCAB: _sha256(tmp / VOCAB)})
            (tmp / META).write_text(json.dumps(info.to_json(), indent=2, sort_keys=True))
            for name in (WEIGHTS, VOCAB, META):
                fsync(tmp / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp, info

    def install(self, folder: Path, version: str, collected: bool = False,
                verified: Mapping[str, str] | None = None) -> VersionInfo:
        """Move ``version``, received whole (``folder`` holds meta.json, vocab.json and, unless ``collected``,
        weights.safetensors, on the same filesystem), into ``versions/`` atomically, after checking that its
        meta.json describes that version and the files match the checksums it names. ``verified``: sha256 the
        caller computed of files in ``folder`` as they are (by name); a file whose checksum there is the one
        meta.json names is not read again. A version already here is kept (the same number is never two versions:
        stream/versions.py refuses a second upload); returns the description either way."""
        where = f"model version {check_version_name(version)}"
        try:
            info = VersionInfo.from_json(json.loads((folder / META).read_text()), where)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelStoreError(f"{where}: meta.json unreadable ({exc})") from None
        if info.version != version:
            raise ModelStoreError(f"{where}: its meta.json describes {info.version[:20]!r}")
        for name in (VOCAB,) if collected else (VOCAB, WEIGHTS):
            if info.files.get(name) is None or (verified or {}).get(name) != info.files[name]:
                self._verify(folder, info, name)
        if collected:
            (folder / COLLECTED).write_text(f"weights removed by gc before they came here ({time.time():.0f})\n")
        for path in folder.iterdir():
            fsync(path)
        with self._lock():
            self.versions_dir.mkdir(parents=True, exist_ok=True)
            if (self.versions_dir / info.version).exists():
                shutil.rmtree(folder, ignore_errors=True)
                return info
            os.rename(folder, self.versions_dir / info.version)
            fsync(self.versions_dir)
            self._reserve(int(info.version[1:]))
        return info

    def _reserve(self, number: int) -> None:
        """Never hand out version numbers up to ``number`` (a version installed from elsewhere has it)."""
        with contextlib.suppress(OSError, ValueError):
            if int((self.root / "LAST").read_text()) >= number:
                return
        self.root.mkdir(parents=True, exist_ok=True)
        self._write_small("LAST", f"{number:06d}")

    def files(self, version: str) -> list[Path]:
        """A version's files as published (meta.json, vocab.json, then the weights unless collected)."""
        folder = self.versions_dir / check_version_name(version)
        names = (META, VOCAB) if (folder / COLLECTED).exists() else (META, VOCAB, WEIGHTS)
        return [folder / name for name in names]

    def mirror(self, current: str | None, pinned: str | None, shadow: str | None) -> None:
        """Set the three pointer files to what the model-versions topic says (None removes one)."""
        with self._lock():
            for name, version in (("CURRENT", current), ("PINNED", pinned), ("SHADOW", shadow)):
                if version is None:
                    self._remove_small(name)
                elif self._read_small(name) != version:
                    self._write_small(name, check_version_name(version))

    def _write_small(self, name: str, text: str) -> None:
        tmp = self.root / f".{name}.{os.getpid()}"
        tmp.write_text(text + "\n")
        replace_durably(tmp, self.root / name)

    def _remove_small(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / name).unlink()
            fsync(self.root)

    def set_current(self, version: str, pin: bool = False) -> VersionInfo:
        """Point workers at ``version``, verified first; ``pin`` keeps it there until :meth:`unpin` (rollback).
        Refused while another version is pinned, unless this call pins."""
        loaded = self.load(version)
        with self._lock():
            pinned = self.pinned()
            if pinned is not None and not pin and pinned != version:
                raise ModelStoreError(f"serving is pinned to {pinned}: unpin first (lrustream models unpin)")
            self._write_small("CURRENT", version)
            if pin:
                self._write_small("PINNED", version)
        return loaded.info

    def unpin(self) -> str | None:
        """Release the pin (CURRENT stays until the next publish); returns the version that was pinned."""
        with self._lock():
            pinned = self.pinned()
            self._remove_small("PINNED")
        return pinned

    def set_shadow(self, version: str | None) -> VersionInfo | None:
        """Have workers score ``version`` (verified first) beside the serving one; None stops it."""
        if version is None:
            with self._lock():
                self._remove_small("SHADOW")
            return None
        loaded = self.load(version)
        with self._lock():
            self._write_small("SHADOW", version)
        return loaded.info

    def shadow(self) -> str | None:
        """The candidate version workers score beside the serving one (None: none)."""
        return self._read_small("SHADOW")

    def gc(self, keep: int) -> list[str]:
        """Remove the weights of every version but the newest ``keep``, CURRENT, PINNED and SHADOW; returns those
        versions. Their meta.json and vocab.json stay (see the module docstring)."""
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        with self._lock():
            spared = {*self.versions()[-keep:], self.current(), self.pinned(), self.shadow()}
            collected = [v for v in self.versions() if v not in spared and self._collect(v)]
        return collected

    def collect(self, version: str) -> None:
        """Remove one version's weights (another host's gc, through the model-versions topic)."""
        with self._lock():
            self._collect(check_version_name(version))

    def _collect(self, version: str) -> bool:
        """Remove a version's weights, marked first (a crash before the unlink still refuses it); True when it
        was not collected before."""
        folder = self.versions_dir / version
        fresh = folder.is_dir() and not (folder / COLLECTED).exists()
        if fresh:
            (folder / COLLECTED).write_text(f"weights removed by gc at {time.time():.0f}\n")
            fsync(folder / COLLECTED)
        (folder / WEIGHTS).unlink(missing_ok=True)
        if fresh:
            fsync(folder)
        return fresh

    def collected(self, version: str) -> bool:
        return (self.versions_dir / check_version_name(version) / COLLECTED).exists()

    def pinned(self) -> str | None:
        return self._read_small("PINNED")

    # ----- reading -----------------------------------------------------------------------------------------
    def current(self) -> str | None:
        return self._read_small("CURRENT")

    def _read_small(self, name: str) -> str | None:
        """A pointer file's version (CURRENT, PINNED, SHADOW); None when it is absent or empty."""
        try:
            return (self.root / name).read_text().strip() or None
        except OSError:
            return None

    def versions(self) -> list[str]:
        if not self.versions_dir.is_dir():
            return []
        return sorted(p.name for p in self.versions_dir.iterdir() if p.is_dir() and p.name.startswith("v"))

    def info(self, version: str) -> VersionInfo:
        where = f"model version {check_version_name(version)}"
        path = self.versions_dir / version / META
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelStoreError(f"{where} does not exist in {self.root}", transient=True) from None
        except OSError as exc:
            raise ModelStoreError(f"{where}: meta.json unreadable ({exc})", transient=True) from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelStoreError(f"{where}: meta.json unreadable ({exc})") from None
        return VersionInfo.from_json(data, where)

    def list(self) -> list[VersionInfo]:
        out = []
        for version in self.versions():
            with contextlib.suppress(ModelStoreError):
                out.append(self.info(version))
        return out

    def _verify(self, folder: Path, info: VersionInfo, name: str) -> None:
        try:
            digest = _sha256(folder / name)
        except OSError as exc:
            raise ModelStoreError(f"model version {info.version}: {name} unreadable ({exc.strerror})",
                                  transient=True) from None
        if digest != info.files.get(name):
            raise ModelStoreError(f"model version {info.version}: {name} checksum mismatch (truncated or altered file)")

    def vocabulary(self, version: str, info: VersionInfo | None = None) -> Vocabulary:
        """A version's item vocabulary alone (verified), e.g. to read ids stored under an older version."""
        info = info or self.info(version)
        folder = self.versions_dir / check_version_name(version)
        self._verify(folder, info, VOCAB)
        try:
            return Vocabulary.from_json(json.loads((folder / VOCAB).read_text()))
        except (ValueError, TypeError) as exc:
            raise ModelStoreError(f"model version {version}: vocab.json invalid ({exc})") from None

    def load(self, version: str | None = None, device: str | torch.device = "cpu") -> LoadedModel:
        """Load and verify a version (default: CURRENT). Raises ModelStoreError on anything suspicious."""
        version = version or self.current()
        if version is None:
            raise ModelStoreError(f"no model version in {self.root} (train or publish one first)")
        where = f"model version {version}"
        info = self.info(version)
        folder = self.versions_dir / version
        if (folder / COLLECTED).exists():
            raise ModelStoreError(f"{where} was garbage-collected (lrustream models gc): its weights are gone")
        self._verify(folder, info, WEIGHTS)
        vocab = self.vocabulary(version, info)
        try:
            tensors = load_file(str(folder / WEIGHTS))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelStoreError(f"{where}: weights are not a valid safetensors file ({exc})") from None
        try:
            model = build_model(config_from_dict(info.model, info.config), info.num_items)
        except (TypeError, ValueError) as exc:
            raise ModelStoreError(f"{where}: cannot build {info.model} from its hyper-parameters ({exc})") from None
        if model.num_items != len(vocab):
            raise ModelStoreError(f"{where}: vocabulary has {len(vocab)} items, model expects {model.num_items}")
        expected = model.state_dict()
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise ModelStoreError(f"{where}: tensor names differ (missing {missing[:3]}, unexpected {extra[:3]})")
        for name, tensor in tensors.items():
            if tensor.shape != expected[name].shape:
                raise ModelStoreError(f"{where}: {name} has shape {tuple(tensor.shape)}, "
                                      f"expected {tuple(expected[name].shape)}")
            if not _finite(tensor):
                raise ModelStoreError(f"{where}: {name} holds non-finite values (NaN/inf)")
        model.load_state_dict(tensors)
        model.to(device).eval()
        return LoadedModel(model, vocab, info)
