"""The hyper-optimisation loop of Lorraine, Vicol & Duvenaud (2020), Algorithm 1.

Repeat: $T$ optimiser steps on the training loss from the current (warm-started) parameters,
then one hyper step: the implicit hypergradient of the validation loss at the parameters reached,
on one training and one validation batch, and an optimiser step on the hyperparameters.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

import implicitfn
from implicitfn.hyperopt._data import BatchStream
from implicitfn.hyperopt._history import History
from implicitfn.hyperopt._optimizers import (
    OptimizerSpec,
    build_optimizer,
    check_optimizer_spec,
    training_gradient,
)

__all__ = ["Checkpoint", "HyperOptimizer", "HyperState"]

_CHECKPOINT_FORMAT = 1


def _check_tree(tree: Any, name: str) -> None:
    flat = pytree.tree_leaves(tree)
    if not flat or not all(isinstance(x, torch.Tensor) and x.is_floating_point() for x in flat):
        raise TypeError(
            f"{name}: expected a TensorDict, a dict of floating-point tensors or a tensor, with at "
            f"least one tensor; got {type(tree).__name__}."
        )


def _named_leaves(tree: Any) -> dict[str, torch.Tensor]:
    return {pytree.keystr(path): leaf for path, leaf in pytree.tree_flatten_with_path(tree)[0]}


def _float(value: torch.Tensor) -> float:
    return float(value.detach())


class HyperState:
    """The mutable state of a run of a [`HyperOptimizer`][implicitfn.hyperopt.HyperOptimizer].

    Made by [`HyperOptimizer.init`][implicitfn.hyperopt.HyperOptimizer.init] and advanced in place by
    [`step`][implicitfn.hyperopt.HyperOptimizer.step] and [`run`][implicitfn.hyperopt.HyperOptimizer.run]
    (a `torch.optim` optimiser updates its tensors in place, so the state cannot be immutable).
    It holds its own copies of the parameters and hyperparameters; the user's tensors are never
    modified.

    **Attributes:**

    - `step`: the number of hyper steps taken.
    - `history`: the [`History`][implicitfn.hyperopt.History] of the run.
    - `params`, `hparams`: copies of the current values, with the structure given to `init`.

    ```python
    >>> import functools, io, torch
    >>> from implicitfn import hyperopt
    >>> loop = hyperopt.HyperOptimizer(
    ...     train_loss=lambda w, h, x: ((w - x) ** 2).sum() + h.exp() * (w ** 2).sum(),
    ...     val_loss=lambda w, h, x: ((w - x) ** 2).sum(),
    ...     inner_optimizer=functools.partial(torch.optim.SGD, lr=0.1),
    ...     outer_optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    >>> def start():
    ...     data = torch.ones(1, 2)
    ...     return loop.init(torch.zeros(2), torch.tensor(0.0), hyperopt.Minibatches(data),
    ...                      hyperopt.Minibatches(data))
    >>> state = start()
    >>> _ = loop.run(state, outer_steps=2, progress=False)
    >>> buffer = io.BytesIO()
    >>> torch.save(state.state_dict(), buffer)
    >>> _ = buffer.seek(0)
    >>> resumed = start()
    >>> resumed.load_state_dict(torch.load(buffer, weights_only=True))
    >>> resumed.step, torch.equal(resumed.hparams, state.hparams)
    (2, True)
    ```
    """

    def __init__(
        self, params: Any, hparams: Any, inner, outer, train: BatchStream, val: BatchStream
    ):
        self.step = 0
        self.history = History()
        self._params_spec = pytree.tree_structure(params)
        self._hparams_spec = pytree.tree_structure(hparams)
        self._params_names = list(_named_leaves(params))
        self._hparams_names = list(_named_leaves(hparams))
        self._inner = inner
        self._outer = outer
        self._train = train
        self._val = val
        self._warned_not_resumable = False

    @property
    def params(self) -> Any:
        """A copy of the current parameters $w$."""
        return pytree.tree_unflatten(
            [t.detach().clone() for t in self._inner.tensors], self._params_spec
        )

    @property
    def hparams(self) -> Any:
        r"""A copy of the current hyperparameters $\lambda$."""
        return pytree.tree_unflatten(
            [t.detach().clone() for t in self._outer.tensors], self._hparams_spec
        )

    def _live_params(self) -> Any:
        return pytree.tree_unflatten(list(self._inner.tensors), self._params_spec)

    def _live_hparams(self) -> Any:
        return pytree.tree_unflatten(list(self._outer.tensors), self._hparams_spec)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run, as a snapshot of plain containers and tensors.

        It holds the step, parameters, hyperparameters, both optimiser states, the history, the
        global torch RNG state (CPU, and CUDA when initialised) and the position of the batch
        streams that support `state_dict()` (such as [`Minibatches`][implicitfn.hyperopt.Minibatches]).
        Save it with `torch.save`; it loads with `torch.load(path, weights_only=True)`. A stream
        without `state_dict()` cannot be resumed at the same batch: a warning says so.

        **Returns:** a dict.
        """
        missing = [s.name for s in (self._train, self._val) if not s.resumable]
        if missing and not self._warned_not_resumable:
            self._warned_not_resumable = True
            warnings.warn(
                f"{' and '.join(missing)} cannot save their position (no state_dict()); a run "
                "resumed from this checkpoint will draw different batches. Use "
                "hyperopt.Minibatches(...) or a torchdata StatefulDataLoader.",
                UserWarning,
                stacklevel=2,
            )
        rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "format": _CHECKPOINT_FORMAT,
            "step": self.step,
            "params": {
                n: t.detach().clone()
                for n, t in zip(self._params_names, self._inner.tensors, strict=True)
            },
            "hparams": {
                n: t.detach().clone()
                for n, t in zip(self._hparams_names, self._outer.tensors, strict=True)
            },
            "inner_optimizer": self._inner.state_dict(),
            "outer_optimizer": self._outer.state_dict(),
            "rng": rng,
            "train_batches": self._train.state_dict(),
            "val_batches": self._val.state_dict(),
            "history": self.history.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a [`state_dict`][implicitfn.hyperopt.HyperState.state_dict].

        Build this state with the same loop, parameter structure and kinds of streams as the
        saved run; the values all come from `state`. The global torch RNG is restored too.

        **Arguments:**

        - `state`: the dict, e.g. `torch.load(path, weights_only=True)`.
        """
        if not isinstance(state, Mapping) or state.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(
                "state: not a checkpoint of this loop (expected HyperState.state_dict() output "
                f"with format {_CHECKPOINT_FORMAT})."
            )
        for key, names, adapter in (
            ("params", self._params_names, self._inner),
            ("hparams", self._hparams_names, self._outer),
        ):
            saved = state[key]
            if list(saved) != names or any(
                saved[n].shape != t.shape for n, t in zip(names, adapter.tensors, strict=True)
            ):
                raise ValueError(
                    f"state: its {key} {[(n, tuple(v.shape)) for n, v in saved.items()]} do not match "
                    f"this run's {[(n, tuple(t.shape)) for n, t in zip(names, adapter.tensors, strict=True)]}; "
                    "initialise the state with the same structure as the saved run."
                )
        self._inner.load_tensors([state["params"][n] for n in self._params_names])
        self._outer.load_tensors([state["hparams"][n] for n in self._hparams_names])
        self._inner.load_state_dict(state["inner_optimizer"])
        self._outer.load_state_dict(state["outer_optimizer"])
        self._train.load_state_dict(state["train_batches"])
        self._val.load_state_dict(state["val_batches"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.history = History(state["history"])
        self.step = int(state["step"])


@dataclasses.dataclass(frozen=True)
class HyperOptimizer:
    r"""Optimise hyperparameters while the model trains (Lorraine et al. 2020, Algorithm 1).

    Each hyper step runs `inner_steps` optimiser steps on the training loss
    $L_T(w, \lambda, \text{batch})$ from the current parameters (a warm start), then computes the
    implicit hypergradient of the validation loss at the parameters reached,
    $\frac{dL_V}{d\lambda} = \frac{\partial L_V}{\partial\lambda} - \big(\nabla^2_{\lambda w}L_T\big) v$
    with $\nabla^2_w L_T\, v = \nabla_w L_V$ solved by `solver` (see
    [`hypergradient`][implicitfn.hypergradient]), on one fresh training batch and one validation
    batch, and takes one `outer_optimizer` step on $\lambda$. The batches are stochastic when the
    streams are, as in the paper.

    This object is configuration only; the run's data lives in the
    [`HyperState`][implicitfn.hyperopt.HyperState] made by [`init`][implicitfn.hyperopt.HyperOptimizer.init].

    **Arguments:**

    - `train_loss`: $L_T$, `(params, hparams, *train_batch) -> scalar`, including every term that
      depends on the hyperparameters (e.g. [`WeightDecay.penalty`][implicitfn.hyperopt.WeightDecay.penalty]).
    - `val_loss`: $L_V$, `(params, hparams, *val_batch) -> scalar`.
    - `inner_optimizer`, `outer_optimizer`: a torchopt `GradientTransformation`
      (`torchopt.adam(1e-2)`) or a callable building a `torch.optim` optimiser from a list of
      tensors (`functools.partial(torch.optim.Adam, lr=1e-2)`); the loop builds it on its own
      copies of the parameters / hyperparameters.
    - `inner_steps`: $T$, inner optimiser steps per hyper step.
    - `adjoint`: how each hypergradient is computed, an
      [`ImplicitAdjoint`][implicitfn.ImplicitAdjoint] (default: the exact Hessian, with the
      solver its structure calls for, MINRES, each solve warm-started from the previous hyper
      step's solution: 1.8-4.3x fewer products measured on the Performance page) or an
      [`UnrolledAdjoint`][implicitfn.UnrolledAdjoint]; checked here, before any computing. By
      default a failed solve raises [`ImplicitSolveError`][implicitfn.ImplicitSolveError]; with
      `ImplicitAdjoint(on_failure="warn")` the step goes on and the history records the outcome.
      The adjoint keeps its warm start and compiled graphs across the run's hyper steps. The
      loop's inner solutions are approximate by design ($T$ steps per hyper step, as in the
      paper), so the default adjoint measures how far each one is (`relative_optimality` in
      the history) without warning about it (`inner_rtol=math.inf`).
    - `tolerance_schedule`: `None`, or `step -> rtol`: the relative tolerance of hyper step
      `step`'s backward solve (1-based), e.g.
      [`GeometricTolerance`][implicitfn.hyperopt.GeometricTolerance]: inexact hypergradients
      on purpose, loose while the hyperparameters are far from good and tighter later (Pedregosa
      2016, HOAG). Needs `ImplicitAdjoint(solver=...)`; the history records `solve_rtol`.
    - `train_metrics`, `val_metrics`: `{name: fn(params, hparams, *batch) -> scalar}`
      evaluated on each hyper step's training / validation batch (so with the signature of
      `train_loss` / `val_loss`) and recorded as `train_<name>` / `val_<name>`; the two can
      differ because the batches can (indices, noise, no data at all).

    ```python
    >>> import functools, torch, implicitfn
    >>> from implicitfn import hyperopt
    >>> _ = torch.manual_seed(0)
    >>> x, y = torch.randn(40, 5), torch.randn(40)
    >>> decay = hyperopt.WeightDecay("global")
    >>> loop = hyperopt.HyperOptimizer(
    ...     train_loss=lambda w, h, x, y: ((x @ w - y) ** 2).mean() + decay.penalty(h, w),
    ...     val_loss=lambda w, h, x, y: ((x @ w - y) ** 2).mean(),
    ...     inner_optimizer=functools.partial(torch.optim.SGD, lr=0.1),
    ...     outer_optimizer=functools.partial(torch.optim.Adam, lr=0.1),
    ...     inner_steps=20,
    ...     adjoint=implicitfn.ImplicitAdjoint(solver=implicitfn.CG(max_steps=10)))
    >>> w0 = torch.zeros(5)
    >>> state = loop.init(w0, decay.init(w0), hyperopt.Minibatches(x[:20], y[:20]),
    ...                   hyperopt.Minibatches(x[20:], y[20:]))
    >>> history = loop.run(state, outer_steps=5, progress=False)
    >>> len(history), state.step, history.records[-1]["outcome"]
    (5, 5, 'successful')
    ```
    """

    train_loss: Callable[..., torch.Tensor]
    val_loss: Callable[..., torch.Tensor]
    inner_optimizer: OptimizerSpec
    outer_optimizer: OptimizerSpec
    inner_steps: int = 10
    adjoint: implicitfn.AbstractAdjoint = dataclasses.field(
        default_factory=lambda: implicitfn.ImplicitAdjoint(inner_rtol=math.inf, warm_start=True)
    )
    tolerance_schedule: Callable[[int], float] | None = None
    train_metrics: Mapping[str, Callable[..., torch.Tensor]] = dataclasses.field(
        default_factory=dict
    )
    val_metrics: Mapping[str, Callable[..., torch.Tensor]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("train_loss", "val_loss"):
            if not callable(getattr(self, name)):
                raise TypeError(
                    f"{name}: expected a callable (params, hparams, *batch) -> scalar, got "
                    f"{type(getattr(self, name)).__name__}."
                )
        check_optimizer_spec(self.inner_optimizer, "inner_optimizer")
        check_optimizer_spec(self.outer_optimizer, "outer_optimizer")
        if isinstance(self.inner_steps, bool) or not isinstance(self.inner_steps, int):
            raise TypeError(f"inner_steps: expected an int, got {type(self.inner_steps).__name__}.")
        if self.inner_steps < 1:
            raise ValueError(f"inner_steps: must be >= 1 (got {self.inner_steps}).")
        for name in ("train_metrics", "val_metrics"):
            metrics = getattr(self, name)
            if not isinstance(metrics, Mapping) or not all(
                isinstance(k, str) and callable(f) for k, f in metrics.items()
            ):
                raise TypeError(
                    f"{name}: expected a dict {{name: fn(params, hparams, *batch) -> scalar}}."
                )
            if "loss" in metrics:
                raise ValueError(
                    f"{name}: 'loss' is recorded already (train_loss, val_loss); rename it."
                )
        if not isinstance(self.adjoint, implicitfn.AbstractAdjoint):
            raise TypeError(
                f"adjoint: expected implicitfn.ImplicitAdjoint(...) or implicitfn.UnrolledAdjoint"
                f"(...), got {type(self.adjoint).__name__}."
            )
        self.adjoint.check(implicitfn.stationarity(self.train_loss))
        if self.tolerance_schedule is not None and (
            not callable(self.tolerance_schedule)
            or not isinstance(self.adjoint, implicitfn.ImplicitAdjoint)
            or self.adjoint.solver is None
        ):
            raise TypeError(
                "tolerance_schedule: expected a callable step -> rtol, with "
                "adjoint=implicitfn.ImplicitAdjoint(solver=...) (a solver given explicitly); got "
                f"{self.tolerance_schedule!r} with {self.adjoint!r}."
            )

    def init(
        self,
        params: Any,
        hparams: Any,
        train_batches: Iterable[Any] | None,
        val_batches: Iterable[Any] | None,
    ) -> HyperState:
        r"""Start a run: copy the initial values, build the optimisers, attach the batch streams.

        **Arguments:**

        - `params`: the initial parameters $w_0$ (TensorDict, dict of tensors or tensor), e.g.
          from [`functional_model`][implicitfn.functional_model].
        - `hparams`: the initial hyperparameters $\lambda_0$, e.g. a TensorDict combining the
          `init()` of several hyperparameter families.
        - `train_batches`, `val_batches`: iterables of batches (tuples of tensors, unpacked into
          the losses). Use [`Minibatches`][implicitfn.hyperopt.Minibatches] for seeded,
          resumable streams; a `DataLoader` is restarted at the end of each epoch. `None` when
          the loss reads no batch (dataset distillation trains on hyperparameters only).

        **Returns:** a [`HyperState`][implicitfn.hyperopt.HyperState].
        """
        _check_tree(params, "params")
        _check_tree(hparams, "hparams")
        train = BatchStream(train_batches, "train_batches")
        val = BatchStream(val_batches, "val_batches")
        own_params = [t.detach().clone() for t in pytree.tree_leaves(params)]
        own_hparams = [t.detach().clone() for t in pytree.tree_leaves(hparams)]
        inner = build_optimizer(self.inner_optimizer, own_params, "inner_optimizer")
        outer = build_optimizer(self.outer_optimizer, own_hparams, "outer_optimizer")
        return HyperState(params, hparams, inner, outer, train, val)

    def step(self, state: HyperState) -> dict[str, Any]:
        """One hyper step: `inner_steps` training steps, then one hyperparameter update.

        **Arguments:**

        - `state`: a [`HyperState`][implicitfn.hyperopt.HyperState], advanced in place.

        **Returns:** the step's record (also appended to `state.history`).
        """
        if not isinstance(state, HyperState):
            raise TypeError(
                f"state: expected a HyperState from HyperOptimizer.init, got {type(state).__name__}."
            )
        val_batch = state._val.next()
        hparams = state._live_hparams()
        for inner_step in range(self.inner_steps):
            batch = state._train.next()
            if state.step == 0 and inner_step == 0:
                self._check_hparams_used(state._live_params(), hparams, batch, val_batch)
            state._inner.step(
                pytree.tree_leaves(
                    training_gradient(self.train_loss, state._live_params(), hparams, *batch)
                )
            )
        params = state._live_params()
        if not all(bool(torch.isfinite(t).all()) for t in state._inner.tensors):
            raise FloatingPointError(
                f"hyper step {state.step + 1}: the inner optimiser produced NaN/Inf parameters; "
                "lower its learning rate."
            )
        train_batch = state._train.next()
        adjoint, rtol = self.adjoint, None
        if self.tolerance_schedule is not None:
            rtol = float(self.tolerance_schedule(state.step + 1))
            adjoint = adjoint.with_rtol(rtol)
        hypergradient, info = implicitfn.hypergradient(
            self.train_loss,
            self.val_loss,
            params,
            hparams,
            inner_args=train_batch,
            outer_args=val_batch,
            adjoint=adjoint,
        )
        record = self._record(
            state.step + 1, params, hparams, train_batch, val_batch, hypergradient, info
        )
        if rtol is not None:
            record["solve_rtol"] = rtol
        state._outer.step(pytree.tree_leaves(hypergradient))
        if not all(bool(torch.isfinite(t).all()) for t in state._outer.tensors):
            raise FloatingPointError(
                f"hyper step {state.step + 1}: the outer optimiser produced NaN/Inf "
                "hyperparameters; lower its learning rate."
            )
        state.step += 1
        state.history.append(record)
        return record

    def run(
        self,
        state: HyperState,
        outer_steps: int,
        *,
        callbacks: Sequence[Callable[[HyperState, dict[str, Any]], Any]] = (),
        progress: bool = True,
    ) -> History:
        """Take hyper steps until `state.step == outer_steps`, with a progress bar and callbacks.

        **Arguments:**

        - `state`: a [`HyperState`][implicitfn.hyperopt.HyperState], advanced in place; a
          resumed state continues from its `step`.
        - `outer_steps`: the total number of hyper steps of the run (not the number to add).
        - `callbacks`: called as `callback(state, record)` after each hyper step, e.g.
          [`Checkpoint`][implicitfn.hyperopt.Checkpoint] or an evaluation on test data; one that
          returns `True` stops the run (early stopping).
        - `progress`: show a tqdm progress bar with the validation loss and metrics.

        **Returns:** `state.history`.
        """
        if isinstance(outer_steps, bool) or not isinstance(outer_steps, int) or outer_steps < 0:
            raise ValueError(f"outer_steps: expected an int >= 0 (the total), got {outer_steps!r}.")
        if not all(callable(c) for c in callbacks):
            raise TypeError(
                "callbacks: expected a sequence of callables (state, record) -> bool | None."
            )
        bar = _progress_bar(outer_steps, state.step) if progress else None
        try:
            while state.step < outer_steps:
                record = self.step(state)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        {k: f"{v:.3g}" for k, v in record.items() if k.startswith("val_")}
                        | {"solve": record.get("outcome", "-")}
                    )
                # Every callback runs, even when an earlier one asks to stop.
                stop = [callback(state, record) is True for callback in callbacks]
                if any(stop):
                    break
        finally:
            if bar is not None:
                bar.close()
        return state.history

    def _check_hparams_used(
        self, params: Any, hparams: Any, train_batch: tuple, val_batch: tuple
    ) -> None:
        """Refuse hyperparameters that neither loss reads: their hypergradient would be a silent 0.

        Uses one autograd pass per loss on the first batches, with the RNG state restored so the
        check does not change the run.
        """
        with torch.random.fork_rng(), torch.enable_grad():
            probe = pytree.tree_map(lambda t: t.detach().requires_grad_(), hparams)
            named = _named_leaves(probe)
            used = dict.fromkeys(named, False)
            for name, loss, batch in (
                ("train_loss", self.train_loss, train_batch),
                ("val_loss", self.val_loss, val_batch),
            ):
                value = loss(params, probe, *batch)
                if (
                    not isinstance(value, torch.Tensor)
                    or value.ndim != 0
                    or not value.is_floating_point()
                ):
                    raise ValueError(
                        f"{name}: must return a floating-point scalar (0-dim) tensor; reduce the "
                        "per-example losses with .mean() or .sum()."
                    )
                if value.requires_grad:
                    grads = torch.autograd.grad(value, list(named.values()), allow_unused=True)
                    for key, g in zip(named, grads, strict=True):
                        used[key] = used[key] or g is not None
        unused = [name for name, is_used in used.items() if not is_used]
        if unused:
            raise ValueError(
                f"hparams: {', '.join(unused)} {'is' if len(unused) == 1 else 'are'} used by neither train_loss nor val_loss, so the "
                "hypergradient would be a silent zero; use them in the training loss (e.g. "
                "hyperopt.WeightDecay.penalty(...)) or remove them from hparams."
            )

    def _record(
        self, step, params, hparams, train_batch, val_batch, hypergradient, info
    ) -> dict[str, Any]:
        with torch.no_grad():
            record: dict[str, Any] = {
                "step": step,
                "train_loss": _float(self.train_loss(params, hparams, *train_batch)),
                "val_loss": _float(self.val_loss(params, hparams, *val_batch)),
            }
            for name, metric in self.train_metrics.items():
                record[f"train_{name}"] = _float(metric(params, hparams, *train_batch))
            for name, metric in self.val_metrics.items():
                record[f"val_{name}"] = _float(metric(params, hparams, *val_batch))
        inner_gradient = training_gradient(self.train_loss, params, hparams, *train_batch)
        record["inner_gradient_norm"] = _float(implicitfn.tree_norm(inner_gradient))
        record["hypergradient_norm"] = _float(implicitfn.tree_norm(hypergradient))
        if info is not None:  # an unrolled adjoint solves nothing
            record["relative_residual"] = _float(info.relative_residual)
            if info.relative_optimality is not None:
                record["relative_optimality"] = _float(info.relative_optimality)
            record["outcome"] = info.outcome_names()[0]
            record["solve_failed"] = bool(info.failed)
            record["solve_steps"] = int(info.num_steps)
        return record


def _progress_bar(total: int, done: int):
    try:
        from tqdm.auto import tqdm
    except ImportError as error:  # tqdm is only needed for the bar
        raise ImportError(
            "progress=True shows a tqdm progress bar: install tqdm (pip install tqdm) or pass "
            "progress=False."
        ) from error
    return tqdm(total=total, initial=min(done, total), desc="hyper steps", dynamic_ncols=True)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A callback for [`HyperOptimizer.run`][implicitfn.hyperopt.HyperOptimizer.run] that saves the run.

    Every `every` hyper steps it writes
    [`state.state_dict()`][implicitfn.hyperopt.HyperState.state_dict] to `path` with
    `torch.save` (to a temporary file first, then renamed, so an interrupted save never leaves a
    broken checkpoint). Resume with
    `state.load_state_dict(torch.load(path, weights_only=True))`.

    **Arguments:**

    - `path`: the file to write.
    - `every`: save after every `every`-th hyper step.

    ```python
    >>> from implicitfn import hyperopt
    >>> hyperopt.Checkpoint("run.pt", every=10)
    Checkpoint(path='run.pt', every=10)
    ```
    """

    path: str | os.PathLike
    every: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, os.PathLike)):
            raise TypeError(f"path: expected a str or path, got {type(self.path).__name__}.")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"every: expected an int >= 1, got {self.every!r}.")

    def __call__(self, state: HyperState, record: dict[str, Any]) -> None:
        if state.step % self.every == 0:
            temporary = f"{os.fspath(self.path)}.tmp"
            torch.save(state.state_dict(), temporary)
            os.replace(temporary, self.path)
