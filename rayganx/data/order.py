"""The order training reads data in: a pure function of (train.seed, epoch).

Each epoch is a permutation of the dataset's rows drawn from (seed, epoch). Global batch after
global batch takes the next `train.batch_size` rows of it; the rows short of a whole global batch
at the end of an epoch wait for the next epoch's order (drop_last). Each worker takes its own
slice of every global batch, so the rows a global batch holds do not depend on the number of
workers, and a checkpoint's `Position` (epoch, rows of that epoch consumed, batches in the run) is
all a resumed or resized run needs to read on from the exact row where the checkpoint was taken.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Position:
    """Where a run is in its data: `sample` rows of epoch `epoch` consumed, `batches` global
    batches taken since the run began (every epoch; also the index of the next one's draws)."""

    epoch: int = 0
    sample: int = 0
    batches: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Position":
        return cls(**{k: int(v) for k, v in (d or {}).items() if k in ("epoch", "sample", "batches")})


def permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """Epoch `epoch`'s order over rows 0..n-1."""
    # spawn_key: a stream of its own (default_rng(seed) draws the 2-D mixtures' points).
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(epoch,))).permutation(n)


def global_batches(n: int, batch: int, seed: int, start: Position = Position()) -> Iterator[tuple[Position, np.ndarray]]:
    """(the position before it, its row ids) of every global batch from `start` on, without end."""
    if n < batch:
        raise ValueError(f"{n} rows are fewer than one global batch of {batch}")
    epoch, sample, batches = start.epoch, start.sample, start.batches
    while True:
        if sample + batch > n:  # the rest of this epoch is short of a batch
            epoch, sample = epoch + 1, 0
        perm = permutation(n, seed, epoch)
        while sample + batch <= n:
            yield Position(epoch, sample, batches), perm[sample:sample + batch]
            sample, batches = sample + batch, batches + 1


def after(pos: Position, batch: int) -> Position:
    """The position once the global batch at `pos` is taken."""
    return Position(pos.epoch, pos.sample + batch, pos.batches + 1)


def rank_slice(ids: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This worker's rows of a global batch (the batch divides evenly: spec.check)."""
    per = len(ids) // world
    return ids[rank * per:(rank + 1) * per]
