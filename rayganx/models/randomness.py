"""Every random stream of a training run, and how each is kept reproducible.

- Training draws (latents, augmentation, instance noise, gradient-penalty weights, the VAE's
  reparameterisation) come from `Draws`: one generator per global batch, seeded by
  (train.seed, the batch's index in the run), drawn for the whole global batch, each rank keeping
  its own rows. They are a function of the data position alone: the same whatever the number of
  workers, and nothing to restore on resume beyond the position.
- The global streams (torch CPU and device, NumPy, Python's `random`) still exist for whatever
  draws from them (the classifier's dropout): `capture` / `restore` keep them per rank in every
  checkpoint.
- Evaluation, sampling and CAS run inside `isolated()`: whatever they draw from a global stream,
  the training streams are where they were before.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def mix(*words: int) -> int:
    """A 63-bit seed from integers (NumPy's SeedSequence hashing: nearby inputs, unrelated seeds)."""
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class Draws:
    """The random numbers of one global batch. Each call draws for all `world` ranks' rows in a
    fixed order and returns this rank's rows, so a rank's numbers depend on its rows' place in the
    global batch, not on how many workers share it."""

    # Salt: the generator of batch i is unrelated to the data order's and the points' streams.
    SALT = 0x5EED

    def __init__(self, seed: int, index: int, rank: int = 0, world: int = 1, device="cpu"):
        self.rank, self.world, self.device = rank, world, torch.device(device)
        self.gen = torch.Generator(device=self.device).manual_seed(mix(seed, index, self.SALT))

    def _mine(self, full: torch.Tensor, n: int) -> torch.Tensor:
        return full[self.rank * n:(self.rank + 1) * n]

    def rand(self, n: int, *shape: int) -> torch.Tensor:
        return self._mine(torch.rand(n * self.world, *shape, generator=self.gen, device=self.device), n)

    def randn(self, n: int, *shape: int) -> torch.Tensor:
        return self._mine(torch.randn(n * self.world, *shape, generator=self.gen, device=self.device), n)

    def randint(self, low: int, high: int, n: int, *shape: int) -> torch.Tensor:
        return self._mine(torch.randint(low, high, (n * self.world, *shape), generator=self.gen,
                                        device=self.device), n)


class GlobalDraws:
    """The `Draws` interface on torch's global stream (a caller outside the training loop)."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)

    def rand(self, n: int, *shape: int) -> torch.Tensor:
        return torch.rand(n, *shape, device=self.device)

    def randn(self, n: int, *shape: int) -> torch.Tensor:
        return torch.randn(n, *shape, device=self.device)

    def randint(self, low: int, high: int, n: int, *shape: int) -> torch.Tensor:
        return torch.randint(low, high, (n, *shape), device=self.device)


def capture() -> dict:
    """This process's global random streams, as plain data and tensors (weights_only-loadable)."""
    state = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": _python_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(v) for v in internal.tolist()), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    """Every global stream of this process from one seed."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _numpy_state():
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def _python_state():
    version, internal, gauss = random.getstate()
    return [version, torch.tensor(internal, dtype=torch.int64), gauss]


def deterministic_kernels() -> None:
    """train.deterministic: the same result for the same inputs on a GPU too. PyTorch then refuses
    an op that has no deterministic kernel (an error naming it) rather than running a racy one;
    cuBLAS needs its workspace size fixed before the first GEMM, cuDNN its autotuner off."""
    import os

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


@contextlib.contextmanager
def isolated():
    """Work that must not move the training streams (evaluation, sample grids, CAS): every global
    stream is put back as it was, on the CPU and on every visible GPU."""
    state = capture()
    try:
        yield
    finally:
        restore(state)
