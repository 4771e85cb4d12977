"""Process-group setup from torchrun's environment, rank helpers and per-rank data sharding.

Under ``torchrun --nproc_per_node=N`` every process has ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` set. :func:`setup` initialises the default process group from
them (once per process; torn down at exit): backend ``cpu:gloo,cuda:nccl`` when CUDA is available
(NCCL for CUDA tensors, gloo for CPU ones), else ``gloo``. Without those variables, or with
``WORLD_SIZE=1``, nothing is initialised and every helper answers as a single process would.

Sharding (:func:`shard_loader`) keeps the *global* batch equal to the single-process one, so the
same learning rate and schedule apply at any process count:

- a ``torch.utils.data.DataLoader`` is rebuilt over the same dataset with a batch sampler that draws
  each global batch exactly as the original loader would (a shuffling loader without its own
  generator gets one seeded with ``seed``, identical on every rank) and gives rank ``r`` the ``r``-th
  of ``world_size`` near-equal contiguous parts of it; each rank loads only its own samples;
- a loader with a ``shard(rank, world_size, *, allow_empty=False)`` method shards itself: it returns
  a re-iterable loader of rank ``rank``'s part of every global batch (the parts of all ranks, in
  rank order, make up the batch). A global batch too small to give every rank a part is a
  ValueError, or with ``allow_empty`` the ranks left without a part skip it. ``BPTTLoader`` does
  this by its columns;
- any other re-iterable loader (``SpeechLoader``...) is iterated in full on every rank and each
  tensor of a batch is cut into the same parts along dimension 0. The loader must produce the same
  batches on every rank (seed its generator identically).

In training, a global batch smaller than the number of ranks is a ValueError (a rank would get
no samples); unequal parts (a short last batch) weight their samples slightly differently from a
single process, as DDP averages per-rank mean gradients.
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta
from typing import Any, Callable, Iterator, Sized, TypeVar, cast

import torch
from torch import Tensor
from torch import distributed as dist
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler

__all__ = [
    "launched",
    "setup",
    "teardown",
    "is_distributed",
    "rank",
    "world_size",
    "local_rank",
    "is_main",
    "device_for_rank",
    "barrier",
    "all_reduce_sum",
    "any_rank",
    "run_on_main",
    "shard_loader",
]

T = TypeVar("T")
_MESSAGE_BYTES = 2048


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer") from None
    if value < 0:
        raise ValueError(f"environment variable {name}={raw!r} must be >= 0")
    return value


def launched() -> bool:
    """Whether this process was started by torchrun (or alike) with ``WORLD_SIZE`` > 1."""
    size = _env_int("WORLD_SIZE")
    return size is not None and size > 1


def setup(timeout_s: float = 1800.0) -> bool:
    """Initialise the default process group from torchrun's environment if needed.

    Returns whether training is distributed (a group with more than one rank exists). Idempotent;
    a group created here is destroyed at interpreter exit (or by :func:`teardown`)."""
    if is_distributed():
        return True
    if not launched():
        return False
    size, rank_ = _env_int("WORLD_SIZE"), _env_int("RANK")
    assert size is not None  # launched()
    if rank_ is None or rank_ >= size:
        raise ValueError(f"RANK must be set to an integer in [0, {size}) when WORLD_SIZE={size}, "
                         f"got {os.environ.get('RANK')!r}")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ValueError(f"WORLD_SIZE={size} but {name} is not set; launch with torchrun")
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    atexit.register(teardown)
    return True


def teardown() -> None:
    """Destroy the default process group, if any."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """Whether a default process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's rank on its node: ``LOCAL_RANK`` (0 if unset)."""
    return _env_int("LOCAL_RANK") or 0


def is_main() -> bool:
    """Whether this is rank 0 (always true when not distributed)."""
    return rank() == 0


def device_for_rank(requested: str | torch.device | None) -> torch.device:
    """The device this rank trains on: ``cuda:LOCAL_RANK`` for a CUDA request, or for None when
    CUDA is available; otherwise the requested device (default CPU)."""
    dev = torch.device(requested) if requested is not None else None
    if dev is None:
        dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if dev.type == "cuda":
        if dev.index is not None and dev.index != local_rank():
            raise ValueError(f"device {dev} given, but this rank's LOCAL_RANK is {local_rank()}; pass "
                             "device='cuda' to use cuda:LOCAL_RANK")
        return torch.device("cuda", local_rank())
    return dev


def _comm_device() -> torch.device:
    backend = str(dist.get_backend())
    return torch.device("cpu") if "gloo" in backend else torch.device("cuda", torch.cuda.current_device())


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: list[float] | tuple[float, ...]) -> list[float]:
    """Element-wise float64 sum of ``values`` over ranks (the values themselves when not distributed)."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on at least one rank."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([int(bool(flag))], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, RuntimeError)


def run_on_main(fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0 only; every rank waits for it and raises if it failed.

    Rank 0 re-raises its own exception; the other ranks raise the same kind (ValueError, OSError,
    else RuntimeError) with rank 0's message, so no rank is left waiting in a later collective.
    Returns ``fn()`` on rank 0 and None elsewhere (``fn()`` when not distributed)."""
    if not is_distributed():
        return fn()
    result, error, code = None, None, 0
    if is_main():
        try:
            result = fn()
        except BaseException as e:  # reported to the other ranks, then re-raised below
            error = e
            code = next((i + 1 for i, kind in enumerate(_ERRORS) if isinstance(e, kind)), len(_ERRORS))
    message = f"{type(error).__name__}: {error}" if error is not None else ""
    raw = message.encode("utf-8")[: _MESSAGE_BYTES - 8]
    buf = torch.zeros(_MESSAGE_BYTES + 1, dtype=torch.uint8)
    buf[0] = code
    buf[1 : 1 + len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else buf[1:1]
    buf = buf.to(_comm_device())
    dist.broadcast(buf, src=0)
    if error is not None:
        raise error
    code = int(buf[0])
    if code:
        text = bytes(buf[1:].cpu().tolist()).rstrip(b"\0").decode("utf-8", errors="replace")
        raise _ERRORS[code - 1](f"rank 0 failed: {text}")
    return result


# ------------------------------------------------------------------------------- sharding
def _bounds(n: int, rank_: int, size: int, allow_empty: bool) -> tuple[int, int]:
    if n < size and not allow_empty:
        raise ValueError(f"a global batch of {n} sample(s) cannot be shared by {size} ranks; "
                         f"use a batch size of at least {size}")
    return rank_ * n // size, (rank_ + 1) * n // size


class _RankBatches(Sampler[list[int]]):
    """This rank's part of every global batch of ``batches`` (empty parts skipped if allowed);
    ``generator`` (the one drawing the order, if any) is exposed so that the training loop
    checkpoints its state."""

    def __init__(self, batches: Any, rank_: int, size: int, generator: torch.Generator | None,
                 allow_empty: bool) -> None:
        self.batches, self.rank, self.size, self.generator = batches, rank_, size, generator
        self.allow_empty = allow_empty

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            batch = list(batch)
            start, stop = _bounds(len(batch), self.rank, self.size, self.allow_empty)
            if stop > start:
                yield batch[start:stop]


def _tensors(batch: Any) -> Iterator[Tensor]:
    if isinstance(batch, Tensor):
        yield batch
    elif isinstance(batch, (tuple, list)):
        for b in batch:
            yield from _tensors(b)
    elif isinstance(batch, dict):
        for b in batch.values():
            yield from _tensors(b)


def _slice_batch(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, Tensor):
        return batch.narrow(0, start, stop - start)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice_batch(b, start, stop) for b in batch)
    if isinstance(batch, dict):
        return {k: _slice_batch(v, start, stop) for k, v in batch.items()}
    return batch


class _SlicedLoader:
    """Iterates ``loader`` in full and yields this rank's slice of every batch along dimension 0."""

    def __init__(self, loader: Any, rank_: int, size: int, allow_empty: bool) -> None:
        self.loader, self.rank, self.size, self.allow_empty = loader, rank_, size, allow_empty
        self.generator = getattr(loader, "generator", None)
        self.sampler = getattr(loader, "sampler", None)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            first = next(_tensors(batch), None)
            if first is None:
                raise ValueError(f"cannot shard a batch of {type(batch).__name__} without tensors")
            start, stop = _bounds(first.shape[0], self.rank, self.size, self.allow_empty)
            if stop > start:
                yield _slice_batch(batch, start, stop)


def shard_loader(loader: Any, seed: int = 0, *, allow_empty: bool = False, rank_: int | None = None,
                 size: int | None = None) -> Any:
    """This rank's view of ``loader`` (see the module docstring); ``loader`` itself on one process.

    ``allow_empty``: skip a batch whose part for this rank is empty instead of raising (for
    evaluation, where sums and counts are reduced over ranks afterwards)."""
    rank_ = rank() if rank_ is None else rank_
    size = world_size() if size is None else size
    if size == 1:
        return loader
    if callable(getattr(loader, "shard", None)):  # it knows how to shard itself
        return loader.shard(rank_, size, allow_empty=allow_empty)
    if isinstance(loader, DataLoader):
        if loader.batch_sampler is None:
            raise ValueError("cannot shard a DataLoader with batch_size=None (no batches); give it a batch size")
        batches, order_generator = loader.batch_sampler, None
        if isinstance(loader.sampler, RandomSampler):
            order_generator = loader.sampler.generator
            if order_generator is None and isinstance(batches, BatchSampler):
                # the global RNG may drift apart between ranks; the order must not
                order_generator = torch.Generator().manual_seed(seed)
                dataset = cast(Sized, loader.dataset)  # a RandomSampler's: sized (torch types it Dataset)
                sampler = RandomSampler(dataset, replacement=loader.sampler.replacement,
                                        num_samples=loader.sampler._num_samples, generator=order_generator)
                batches = BatchSampler(sampler, batches.batch_size, batches.drop_last)
        return DataLoader(loader.dataset, batch_sampler=_RankBatches(batches, rank_, size, order_generator, allow_empty),
                          num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                          pin_memory=loader.pin_memory, timeout=loader.timeout,
                          worker_init_fn=loader.worker_init_fn, generator=loader.generator,
                          persistent_workers=loader.persistent_workers)
    if not hasattr(loader, "__iter__"):
        raise ValueError(f"cannot shard a {type(loader).__name__}: expected a re-iterable loader")
    return _SlicedLoader(loader, rank_, size, allow_empty)
