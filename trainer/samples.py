"""Training samples with the LRURec protocol: the leave-one-out split and the batches a model trains on.

The split: per user with at least three items, the last item is the test target, the second-to-last the
validation target, and the rest (all but the last two items) trains; shorter users train on everything.

Training samples follow the official LRURec loader: per user the training part as one window of up to
``max_len`` next-item pairs, or non-overlapping windows of ``max_len`` (from the end) for users with at least
twice that many items; the loss reads every labelled position (label 0 is padding). Models that see the whole
window (the unmasked LinRec, ``loss_positions == "last"``) are trained as RecBole trains them: every prefix is a
sample, with its next item as the one label.

Batches are drawn endlessly, epoch after epoch, in an order derived from the seed alone: batch ``k`` is the
same whether a run started at 0 or resumed at ``k``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models import SeqRecModel
from trainer.evaluate import left_pad


@dataclass
class Split:
    train: list[np.ndarray]
    val_inputs: torch.Tensor
    val_targets: torch.Tensor
    test_inputs: torch.Tensor
    test_targets: torch.Tensor


def leave_one_out(encoded: list[np.ndarray], max_len: int) -> Split:
    """Last item = test, second-to-last = validation (users with >= 3 items); the rest trains."""
    train, val_in, val_y, test_in, test_y = [], [], [], [], []
    for seq in encoded:
        if len(seq) >= 3:
            train.append(seq[:-2])
            val_in.append(seq[:-2])
            val_y.append(seq[-2])
            test_in.append(seq[:-1])
            test_y.append(seq[-1])
        else:
            train.append(seq)
    return Split(train, left_pad(val_in, max_len), torch.tensor(val_y, dtype=torch.long),
                 left_pad(test_in, max_len), torch.tensor(test_y, dtype=torch.long))


def train_windows(train: list[np.ndarray], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, labels) [S, max_len] as the official loader builds them; labels 0 are ignored."""
    windows: list[np.ndarray] = []
    for seq in train:
        if len(seq) < 2:
            continue
        if len(seq) < 2 * max_len:
            windows.append(seq)
        else:
            windows.extend(seq[i: i + max_len] for i in range(len(seq) - max_len, -1, -max_len))
    tokens = left_pad([w[:-1] for w in windows], max_len)
    labels = left_pad([w[-max_len:] for w in windows], max_len)
    return tokens, labels


class PrefixSamples:
    """Every (user, position) pair as a sample: input = the max_len items before it, target = the item."""

    def __init__(self, train: list[np.ndarray], max_len: int) -> None:
        longest = max(len(s) for s in train)
        self.max_len = max_len
        self.matrix = left_pad(train, longest)  # [U, longest], each user right-aligned
        self.matrix = F.pad(self.matrix, (max_len, 0))
        lengths = np.array([len(s) for s in train])
        users, ends = [], []
        for u, n in enumerate(lengths):
            users.append(np.full(n - 1, u))
            ends.append(np.arange(1, n))
        self.users = torch.from_numpy(np.concatenate(users))
        # column (in the padded matrix) of each target
        self.cols = torch.from_numpy(np.concatenate(ends) + max_len + longest - lengths[np.concatenate(users)])

    def __len__(self) -> int:
        return len(self.users)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, col = self.users[idx], self.cols[idx]
        window = col[:, None] - self.max_len + torch.arange(self.max_len)
        return self.matrix[u[:, None], window], self.matrix[u, col]


def _shuffled(n: int, batch_size: int, seed: int, skip: int) -> Iterator[torch.Tensor]:
    """Endless index batches, epoch after epoch, from ``seed``; the first ``skip`` are drawn but not yielded,
    so a resumed run sees exactly the batches an uninterrupted one would."""
    g = torch.Generator().manual_seed(seed)
    per_epoch = math.ceil(n / batch_size)
    while True:
        perm = torch.randperm(n, generator=g)
        if skip >= per_epoch:
            skip -= per_epoch
            continue
        yield from perm.split(batch_size)[skip:]
        skip = 0


def batches(model: SeqRecModel, split: Split, batch_size: int, seed: int, skip: int = 0
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled batches in the form the model trains on, starting after ``skip`` batches."""
    if model.loss_positions == "last":
        samples = PrefixSamples(split.train, model.max_len)
        for idx in _shuffled(len(samples), batch_size, seed, skip):
            yield samples.batch(idx)
    else:
        tokens, labels = train_windows(split.train, model.max_len)
        for idx in _shuffled(len(tokens), batch_size, seed, skip):
            yield tokens[idx], labels[idx]
