"""The vocabularies of model versions other than the serving one, as a worker needs them: a state stored under
another version holds that version's item ids, which are read back through its vocabulary (stream/processor.py,
``vocab_of``).

Contract: ``OlderVocabularies(store, serving)(version)`` is a vocabulary whose ``item_of`` maps every id of
``version``'s vocabulary to the item that vocabulary names. Vocabularies only grow by appending
(models/vocab.py), so when the serving vocabulary extends ``version``'s it is that vocabulary: no second copy is
held, and at a million items a copy is over 100 MB. Any other vocabulary (a newer version's, after a rollback) is
read from the model store; the last ``keep`` answers are kept. :meth:`OlderVocabularies.swapped` is called at
each swap: it drops what was kept, which may be all that holds the vocabulary served until then in memory, and
answers for that version with the new serving vocabulary when it extends it, so that the states stored under the
version served until the swap (most of them, right after it) need no vocabulary read. Safe from any thread.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from models.store import ModelStore
from models.vocab import Vocabulary
from stream.serving import Serving


class OlderVocabularies:
    """``vocab_of`` for a worker's processor (module docstring)."""

    def __init__(self, store: ModelStore, serving: Callable[[], Serving | None], keep: int = 8) -> None:
        self.store, self.serving, self.keep = store, serving, keep
        self._kept: OrderedDict[str, Vocabulary] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, version: str) -> Vocabulary:
        with self._lock:
            if version in self._kept:
                self._kept.move_to_end(version)
                return self._kept[version]
        vocab = self.store.vocabulary(version)
        serving = self.serving()
        if serving is not None and vocab.is_prefix_of(serving.vocab):
            vocab = serving.vocab
        self._keep(version, vocab)
        return vocab

    def swapped(self, old: Serving | None, new: Serving) -> None:
        """``new`` serves from now on, ``old`` served until now (module docstring)."""
        with self._lock:
            self._kept.clear()
        if old is not None and old.version != new.version and old.vocab.is_prefix_of(new.vocab):
            self._keep(old.version, new.vocab)

    def _keep(self, version: str, vocab: Vocabulary) -> None:
        with self._lock:
            self._kept[version] = vocab
            self._kept.move_to_end(version)
            while len(self._kept) > self.keep:
                self._kept.popitem(last=False)
