"""Batch streams for the loop: a resumable minibatch sampler, and the loop's view of any iterable.

Both are mutable on purpose (an iterator has a position); their position is saved and restored
through `state_dict()` / `load_state_dict()`, the protocol of `torch.optim` optimisers and of
torchdata's `StatefulDataLoader`, so a resumed run draws the same batches.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = ["Minibatches"]


class Minibatches:
    r"""An endless, seeded and resumable stream of shuffled minibatches of aligned tensors.

    Each epoch visits every example once, in an order drawn from the stream's own
    `torch.Generator` (so the global RNG is left alone); the last batch of an epoch may be
    shorter. Its position is saved by [`HyperState.state_dict`][implicitfn.hyperopt.HyperState.state_dict],
    which is what makes a resumed run draw the same batches as an uninterrupted one.

    **Arguments:**

    - `*tensors`: one or more tensors with the same first dimension $N \ge 1$ (inputs, labels, ...).
    - `batch_size`: examples per batch, $1 \le$ `batch_size` $\le N$; `None` (default) yields the
      whole data set every time, in its original order.
    - `seed`: seed of the stream's generator.
    - `indices`: append the `int64` indices of the batch's examples, e.g. for
      [`ExampleWeights`][implicitfn.hyperopt.ExampleWeights].
    - `noise_shape`: append a standard normal tensor of shape `(len(batch), *noise_shape)`, drawn
      from the stream's generator, e.g. the noise input of a
      [`LearnedAugmentation`][implicitfn.hyperopt.LearnedAugmentation]. Being part of the batch,
      the noise is the same in every evaluation of the loss within a hypergradient, as implicit
      differentiation requires.

    **Yields:** tuples `(*tensor_batches, [indices], [noise])`.

    ```python
    >>> import torch
    >>> from implicitfn import hyperopt
    >>> x, y = torch.arange(10.0).reshape(5, 2), torch.arange(5)
    >>> stream = hyperopt.Minibatches(x, y, batch_size=2, seed=0, indices=True)
    >>> xb, yb, idx = next(stream)
    >>> xb.shape, bool((yb == idx).all())
    (torch.Size([2, 2]), True)
    >>> saved = stream.state_dict()
    >>> after = next(stream)[2]
    >>> stream.load_state_dict(saved)
    >>> torch.equal(next(stream)[2], after)
    True
    ```
    """

    def __init__(
        self,
        *tensors: torch.Tensor,
        batch_size: int | None = None,
        seed: int = 0,
        indices: bool = False,
        noise_shape: tuple[int, ...] | None = None,
    ):
        if not tensors:
            raise ValueError("tensors: pass at least one tensor, e.g. Minibatches(x, y, ...).")
        for i, tensor in enumerate(tensors):
            if not isinstance(tensor, torch.Tensor) or tensor.ndim == 0:
                raise TypeError(
                    f"tensors[{i}]: expected a tensor with a first (example) dimension, got "
                    f"{type(tensor).__name__ if not isinstance(tensor, torch.Tensor) else 'a 0-dim tensor'}."
                )
        size = len(tensors[0])
        if any(len(t) != size for t in tensors):
            raise ValueError(
                f"tensors: first dimensions differ ({[len(t) for t in tensors]}); every tensor "
                "needs one row per example."
            )
        if size == 0:
            raise ValueError("tensors: have no examples; pass at least one row.")
        if batch_size is not None:
            if isinstance(batch_size, bool) or not isinstance(batch_size, int):
                raise TypeError(
                    f"batch_size: expected an int or None, got {type(batch_size).__name__}."
                )
            if not 1 <= batch_size <= size:
                raise ValueError(
                    f"batch_size: must be between 1 and the number of examples ({size}), got "
                    f"{batch_size}; use None for full batches."
                )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed: expected an int, got {type(seed).__name__}.")
        if noise_shape is not None and (
            not isinstance(noise_shape, tuple)
            or not all(isinstance(d, int) and d > 0 for d in noise_shape)
        ):
            raise ValueError(
                f"noise_shape: expected a tuple of positive ints, got {noise_shape!r}."
            )
        self.tensors = tensors
        self.batch_size = batch_size
        self.indices = bool(indices)
        self.noise_shape = noise_shape
        floating = [t.dtype for t in tensors if t.is_floating_point()]
        self._noise_dtype = floating[0] if floating else torch.get_default_dtype()
        self._generator = torch.Generator().manual_seed(seed)
        self._order = torch.arange(size)
        self._position = size  # start a fresh epoch on the first draw

    @property
    def num_examples(self) -> int:
        """$N$, the number of examples."""
        return len(self.tensors[0])

    def __iter__(self) -> Minibatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        size = self.num_examples
        if self._position >= size:
            self._order = (
                torch.arange(size)
                if self.batch_size is None
                else torch.randperm(size, generator=self._generator)
            )
            self._position = 0
        step = size if self.batch_size is None else self.batch_size
        chosen = self._order[self._position : self._position + step]
        self._position += step
        device = self.tensors[0].device
        batch = [t[chosen.to(t.device)] for t in self.tensors]
        if self.indices:
            batch.append(chosen.to(device))
        if self.noise_shape is not None:
            noise = torch.randn(
                (len(chosen), *self.noise_shape), generator=self._generator, dtype=self._noise_dtype
            )
            batch.append(noise.to(device))
        return tuple(batch)

    def state_dict(self) -> dict[str, Any]:
        """The stream's position: generator state, current epoch order and offset (copies)."""
        return {
            "generator": self._generator.get_state(),
            "order": self._order.clone(),
            "position": self._position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by [`state_dict`][implicitfn.hyperopt.Minibatches.state_dict]."""
        if not isinstance(state, dict) or set(state) != {"generator", "order", "position"}:
            raise ValueError(
                "state: expected a dict saved by Minibatches.state_dict() with keys "
                "'generator', 'order' and 'position'."
            )
        if len(state["order"]) != self.num_examples:
            raise ValueError(
                f"state: was saved for {len(state['order'])} examples, this stream has "
                f"{self.num_examples}; build it on the same data."
            )
        self._generator.set_state(state["generator"])
        self._order = state["order"].clone()
        self._position = int(state["position"])


class BatchStream:
    """The loop's view of a user's iterable: endless, tuple-valued, with clear errors.

    A re-iterable (a `DataLoader`, a list of batches) is restarted when an epoch ends; a
    one-shot iterator that runs out is an error, as is an iterable that yields nothing.
    """

    def __init__(self, iterable: Iterable[Any] | None, name: str):
        if iterable is None:  # the loss reads no batch: every batch is empty
            iterable = itertools.repeat(())
            self.stateless = True
        else:
            self.stateless = False
        if not isinstance(iterable, Iterable):
            raise TypeError(
                f"{name}: expected an iterable of batches, got {type(iterable).__name__}; use "
                "hyperopt.Minibatches(x, y, batch_size=...) or a torch DataLoader."
            )
        if hasattr(iterable, "__len__") and len(iterable) == 0:
            raise ValueError(f"{name}: is empty; it must yield at least one batch.")
        self.iterable = iterable
        self.name = name
        self.iterator: Iterator[Any] = iter(iterable)
        self.one_shot = self.iterator is iterable

    def next(self) -> tuple[Any, ...]:
        try:
            batch = next(self.iterator)
        except StopIteration:
            if self.one_shot:
                raise ValueError(
                    f"{self.name}: the iterator is empty or exhausted; the loop needs an endless "
                    "stream: pass hyperopt.Minibatches(...), a DataLoader (restarted every "
                    "epoch) or itertools.cycle(...)."
                ) from None
            self.iterator = iter(self.iterable)
            batch = next(self.iterator, None)
            if batch is None:
                raise ValueError(
                    f"{self.name}: yielded no batches; it must yield at least one."
                ) from None
        if isinstance(batch, torch.Tensor):
            return (batch,)
        if isinstance(batch, (tuple, list)):
            return tuple(batch)
        raise TypeError(
            f"{self.name}: batches must be tensors or tuples of tensors (unpacked into the "
            f"loss's *args), got {type(batch).__name__}."
        )

    @property
    def saves_position(self) -> bool:
        """Whether the iterable follows the `state_dict()` / `load_state_dict()` protocol."""
        return hasattr(self.iterable, "state_dict") and hasattr(self.iterable, "load_state_dict")

    @property
    def resumable(self) -> bool:
        return self.stateless or self.saves_position

    def state_dict(self) -> Any:
        return self.iterable.state_dict() if self.saves_position else None

    def load_state_dict(self, state: Any) -> None:
        if state is None:
            return
        if not self.saves_position:
            raise ValueError(
                f"{self.name}: the checkpoint holds an iterator position but this iterable has no "
                "load_state_dict(); resume with the same kind of stream (e.g. hyperopt.Minibatches)."
            )
        self.iterable.load_state_dict(state)
        self.iterator = iter(self.iterable)
