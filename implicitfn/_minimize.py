"""minimize: the inner solve in one call, already differentiable by implicit differentiation.

The boilerplate every inner solver repeats (clone, `requires_grad_`, optimiser, closure,
`enable_grad`, detach) lives here once, wrapped in `implicit_diff(stationarity(loss))`.
The loop works on a flat list of cloned leaves, so any pytree torch knows (tensor, tuple, list,
dict, TensorDict) is minimised the same way and the caller's tensors are never touched.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.utils._pytree as pytree

from implicitfn._adjoint import AbstractAdjoint
from implicitfn._implicit import implicit_diff
from implicitfn._optimality import stationarity
from implicitfn._solution import concrete, under_transform

__all__ = ["MinimizeError", "MinimizeWarning", "minimize"]

# Names accepted for `optimizer`, besides a torchopt.GradientTransformation.
_TORCHOPT_NAMES = ("adam", "sgd", "rmsprop", "adagrad")
_NAMES = ("lbfgs", *_TORCHOPT_NAMES)
# Function evaluations allowed per L-BFGS iteration (the start point and the line search).
_LBFGS_EVALS_PER_STEP = 25


class MinimizeError(RuntimeError):
    """[`minimize`][implicitfn.minimize] failed: a NaN/Inf loss or gradient, or (with
    `on_failure="raise"`) the tolerance not reached.

    The attributes `step`, `loss` and `grad_norm` hold where it stopped (floats; `nan` where
    not measured).

    ```python
    >>> import implicitfn
    >>> issubclass(implicitfn.MinimizeError, RuntimeError)
    True
    ```
    """

    def __init__(self, message: str, step: int, loss: float, grad_norm: float):
        super().__init__(message)
        self.step, self.loss, self.grad_norm = step, loss, grad_norm


class MinimizeWarning(RuntimeWarning):
    """Issued by [`minimize`][implicitfn.minimize] (with `on_failure="warn"`, the default) when
    $\\lVert\\nabla_w L\\rVert$ at the returned parameters is above `tol`.

    ```python
    >>> import implicitfn
    >>> issubclass(implicitfn.MinimizeWarning, RuntimeWarning)
    True
    ```
    """


@dataclasses.dataclass(frozen=True)
class _Report:
    """Where the loop stopped: the measured loss and gradient norm of the returned point."""

    steps: int
    loss: float
    grad_norm: float
    # "tolerance": |grad| <= tol; "precision": L-BFGS cannot lower the loss any further in its
    # dtype; "max_steps": the budget was spent; "stalled": L-BFGS stopped, for another reason.
    outcome: Literal["tolerance", "precision", "max_steps", "stalled"]

    @property
    def failed(self) -> bool:
        return self.outcome in ("max_steps", "stalled")


class _Converged(Exception):
    """Raised inside the L-BFGS closure at a point that meets the tolerance, to end `step`
    there (also inside a line search) without another evaluation; args: (leaves, report)."""


def minimize(
    loss: Callable[..., torch.Tensor],
    params: Any,
    hparams: Any,
    *args: Any,
    optimizer: str | Any = "lbfgs",
    learning_rate: float | None = None,
    max_steps: int = 500,
    tol: float = 1e-6,
    on_failure: Literal["warn", "raise"] = "warn",
    adjoint: AbstractAdjoint | None = None,
    progress: bool = False,
) -> Any:
    r"""Minimise `loss(params, hparams, *args)` over `params`: the inner solve in one call, with implicit derivatives.

    It runs an optimiser from `params` until $\lVert\nabla_w L\rVert_2 \le$ `tol` and returns
    the minimiser $w^*$ through [`implicit_diff`][implicitfn.implicit_diff]`(`[`stationarity`][implicitfn.stationarity]`(loss), adjoint=adjoint)`,
    so it can be called inside an outer loss: `.backward()`, `torch.autograd.grad`,
    `torch.func.grad` or `torch.func.jvp` give hypergradients with respect to `hparams` and every
    floating-point tensor in `args`. None reach the starting `params`, which an outer loop may
    set to the previous solution (a warm start).

    The caller's tensors are never modified (the loop works on clones, also of tensors with
    `requires_grad=True`) and the result aliases none of them. The loop runs with gradients
    enabled, also under `torch.no_grad()`, on the device and in the dtype of `params`.

    **The implicit function theorem needs an optimum.** The derivatives are exact for the
    minimiser; at a point that is not stationary they are only approximate, more so the larger
    $\lVert\nabla_w L\rVert$. So the stopping test is on the gradient at the point returned, and
    it is absolute: $\lVert\nabla_w L(w)\rVert_2 \le$ `tol`. (A test relative to the start would
    demand ever smaller gradients from warm starts, which begin near the optimum.) Scale `tol`
    with your loss: a sum over examples has larger gradients than a mean. L-BFGS also stops,
    successfully, where the loss can no longer be lowered in its dtype (the decrease its model
    predicts is below the rounding of the loss, as in SciPy's L-BFGS-B). In float32 that is
    typically at $\lVert\nabla_w L\rVert$ between $10^{-6}$ and $10^{-4}$ for a loss of order
    one, where the hypergradient was measured within $10^{-3}$ (relative) of the float64 answer.

    Otherwise `on_failure` decides: a [`MinimizeWarning`][implicitfn.MinimizeWarning] (the
    default: the hypergradient is approximate, and an outer loop should go on) or a
    [`MinimizeError`][implicitfn.MinimizeError]. The message says why: the budget ran out, or
    the L-BFGS line search found no decrease that its model predicts (a noisy loss: dropout,
    random augmentation). `tol=0` asks for `max_steps` steps (L-BFGS: fewer if it can make no
    more progress) and never warns. A NaN or Inf loss or gradient always raises
    `MinimizeError`, naming the step.

    **Arguments:**

    - `loss`: the training loss `(params, hparams, *args) -> scalar tensor`, with every term
      that depends on `hparams` (a [`CompositeLoss`][implicitfn.CompositeLoss] works too, so
      the adjoint may use [`GaussNewton`][implicitfn.GaussNewton]). Weight decay belongs here,
      not in the optimiser: the condition is the stationarity of `loss`.
    - `params`: the start, a tensor or a tuple, list, dict or TensorDict of floating-point
      tensors (the structures [`implicit_diff`][implicitfn.implicit_diff] accepts); the result
      has its structure.
    - `hparams`: the hyperparameters $\lambda$, passed to `loss` (not captured in it).
    - `*args`: the other arguments of `loss`, e.g. the training data.
    - `optimizer`: `"lbfgs"` (default): `torch.optim.LBFGS` with a strong-Wolfe line search,
      for small and medium problems with a deterministic loss. `"adam"`, `"sgd"`, `"rmsprop"`
      or `"adagrad"`: torchopt's functional optimisers, with `learning_rate`. Or any
      `torchopt.GradientTransformation`, configured by itself, e.g.
      `torchopt.sgd(0.1, momentum=0.9)` or `torchopt.chain(torchopt.clip_grad_norm(1.0), torchopt.adam(1e-2))`.
    - `learning_rate`: required with a named torchopt optimiser; for `"lbfgs"` the first step
      length tried by each line search (default 1).
    - `max_steps`: the most optimiser steps (L-BFGS iterations, each with one or more loss
      evaluations in its line search).
    - `tol`: the absolute tolerance on $\lVert\nabla_w L\rVert_2$; `0` for a fixed budget of
      `max_steps` steps.
    - `on_failure`: `"warn"` (default) or `"raise"` when `tol` is not met.
    - `adjoint`: how to differentiate through the solution, as in
      [`implicit_diff`][implicitfn.implicit_diff] (default
      [`ImplicitAdjoint`][implicitfn.ImplicitAdjoint]`()`). An adjoint keeps state
      (`warm_start`, `compile`): pass the same object on every call of an outer loop.
    - `progress`: show a tqdm progress bar with the loss and the gradient norm.

    **Returns:** the minimiser, with the structure of `params`, connected to `hparams` and
    `args` by implicit differentiation.

    It cannot run under `torch.func.vmap` (the loop stops on a tensor's value): loop over the
    problems, or decorate a fixed-step solver with [`implicit_diff`][implicitfn.implicit_diff].

    ```python
    >>> import torch, implicitfn
    >>> from implicitfn.testing import ridge_loss, ridge_hypergradient
    >>> x, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    >>> xv, yv = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    >>> hparams = {"penalty": torch.ones(3, dtype=torch.float64, requires_grad=True)}
    >>> start = {"w": torch.zeros(3, dtype=torch.float64)}
    >>> w = implicitfn.minimize(ridge_loss, start, hparams, x, y)    # L-BFGS to |grad| <= 1e-6
    >>> (0.5 * ((xv @ w["w"] - yv) ** 2).sum()).backward()
    >>> expected = ridge_hypergradient(hparams["penalty"].detach(), x, y, xv, yv)
    >>> torch.allclose(hparams["penalty"].grad, expected, atol=1e-5)
    True
    >>> w = implicitfn.minimize(ridge_loss, start, hparams, x, y, optimizer="adam",
    ...                         learning_rate=0.1, max_steps=5, on_failure="raise")
    Traceback (most recent call last):
    ...
    implicitfn._minimize.MinimizeError: minimize: the gradient norm ... is above tol=1e-06 ...
    ```
    """
    step_fn = _check_arguments(
        loss, optimizer, learning_rate, max_steps, tol, on_failure, adjoint, progress
    )
    reports: list[_Report] = []

    def solve(start: Any, hparams: Any, *args: Any) -> Any:
        solution, report = _run(loss, start, hparams, args, step_fn, max_steps, tol, progress)
        reports.append(report)
        return solution

    solve.__name__ = solve.__qualname__ = "minimize"
    solution = implicit_diff(stationarity(loss), adjoint=adjoint)(solve)(params, hparams, *args)
    report = reports[-1]
    if report.failed and tol > 0:
        message = _failure_message(report, tol, step_fn)
        if on_failure == "raise":
            raise MinimizeError(message, report.steps, report.loss, report.grad_norm)
        warnings.warn(message, MinimizeWarning, stacklevel=2)
    return solution


# -- argument checks (before any computing) ------------------------------------------------------


def _check_arguments(
    loss: Any,
    optimizer: Any,
    learning_rate: Any,
    max_steps: Any,
    tol: Any,
    on_failure: Any,
    adjoint: Any,
    progress: Any,
) -> _AbstractStepper:
    if not callable(loss):
        raise TypeError(
            f"loss: expected a callable (params, hparams, *args) -> scalar, got "
            f"{type(loss).__name__}."
        )
    if isinstance(max_steps, bool) or not isinstance(max_steps, int):
        raise TypeError(f"max_steps: expected a positive int, got {type(max_steps).__name__}.")
    if max_steps < 1:
        raise ValueError(f"max_steps: must be >= 1 (got {max_steps}).")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)):
        raise TypeError(f"tol: expected a float >= 0, got {type(tol).__name__}.")
    if not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(
            f"tol: must be a finite float >= 0 (got {tol}); use 0 to run max_steps steps."
        )
    if on_failure not in ("warn", "raise"):
        raise ValueError(f"on_failure: expected 'warn' or 'raise', got {on_failure!r}.")
    if adjoint is not None and not isinstance(adjoint, AbstractAdjoint):
        raise TypeError(
            f"adjoint: expected implicitfn.ImplicitAdjoint(...), implicitfn.UnrolledAdjoint(...) "
            f"or None, got {type(adjoint).__name__}."
        )
    if not isinstance(progress, bool):
        raise TypeError(f"progress: expected a bool, got {type(progress).__name__}.")
    if learning_rate is not None:
        if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)):
            raise TypeError(
                f"learning_rate: expected a float > 0, got {type(learning_rate).__name__}."
            )
        if not (learning_rate > 0 and math.isfinite(learning_rate)):
            raise ValueError(f"learning_rate: must be a finite float > 0 (got {learning_rate}).")
    return _stepper(optimizer, learning_rate)


def _stepper(optimizer: Any, learning_rate: float | None) -> _AbstractStepper:
    import torchopt

    if isinstance(optimizer, torchopt.base.GradientTransformation):
        if learning_rate is not None:
            raise ValueError(
                "learning_rate: a torchopt.GradientTransformation carries its own learning rate; "
                "drop learning_rate=, or pass a name such as optimizer='adam'."
            )
        return _TorchoptStepper(optimizer, "the torchopt optimizer")
    if not isinstance(optimizer, str):
        raise TypeError(
            f"optimizer: expected one of {', '.join(map(repr, _NAMES))} or a "
            f"torchopt.GradientTransformation (e.g. torchopt.adam(1e-2)), got "
            f"{type(optimizer).__name__}."
        )
    name = optimizer.lower()
    if name == "lbfgs":
        return _LBFGSStepper(1.0 if learning_rate is None else float(learning_rate))
    if name in _TORCHOPT_NAMES:
        if learning_rate is None:
            raise ValueError(
                f"learning_rate: required with optimizer={optimizer!r}, e.g. "
                f"minimize(..., optimizer={optimizer!r}, learning_rate=1e-2)."
            )
        transformation = getattr(torchopt, name)(learning_rate)
        return _TorchoptStepper(transformation, f"{name} (learning_rate={learning_rate})")
    raise ValueError(
        f"optimizer: unknown name {optimizer!r}; use one of {', '.join(map(repr, _NAMES))} or a "
        "torchopt.GradientTransformation."
    )


# -- the loop -----------------------------------------------------------------------------------


class _Evaluator:
    """`loss` and its gradient with respect to a flat list of leaves, checked at every call."""

    def __init__(self, loss: Callable[..., torch.Tensor], spec: Any, hparams: Any, args: tuple):
        self.loss, self.spec, self.hparams, self.args = loss, spec, hparams, args
        self.step = 0

    def __call__(self, leaves: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.enable_grad():
            tracked = [
                leaf if leaf.requires_grad else leaf.detach().requires_grad_() for leaf in leaves
            ]
            value = self.loss(pytree.tree_unflatten(tracked, self.spec), self.hparams, *self.args)
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                shape = (
                    tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                )
                raise ValueError(
                    f"loss: must return a scalar tensor, got {shape}; reduce it with .mean() or "
                    ".sum()."
                )
            if not value.is_floating_point():
                raise TypeError(f"loss: must return a floating-point tensor, got {value.dtype}.")
            grads = (
                torch.autograd.grad(value, tracked, allow_unused=True)
                if value.requires_grad
                else (None,) * len(tracked)
            )
        if all(g is None for g in grads):
            raise ValueError(
                "loss: does not depend on params (its gradient with respect to every leaf of "
                "params is missing); compute it from the params argument, e.g. "
                "apply(params, x) from implicitfn.functional_model(net), not net(x)."
            )
        grads = [
            torch.zeros_like(t) if g is None else g for g, t in zip(grads, tracked, strict=True)
        ]
        return value.detach().reshape(()), grads

    def measure(self, value: torch.Tensor, grads: Sequence[torch.Tensor]) -> tuple[float, float]:
        """(loss, gradient norm) as floats, in one synchronisation."""
        norms = torch.stack([torch.linalg.vector_norm(g).to(value) for g in grads])
        loss_value, grad_norm = torch.stack([value, torch.linalg.vector_norm(norms)]).tolist()
        if not math.isfinite(loss_value):
            raise MinimizeError(
                f"minimize: the loss is {loss_value} at step {self.step}; "
                + _nonfinite_advice(self.step),
                self.step,
                loss_value,
                float("nan"),
            )
        if not math.isfinite(grad_norm):
            raise MinimizeError(
                f"minimize: the gradient of the loss contains NaN/Inf at step {self.step} (loss "
                f"{loss_value:.6g}); " + _nonfinite_advice(self.step),
                self.step,
                loss_value,
                grad_norm,
            )
        return loss_value, grad_norm


def _nonfinite_advice(step: int) -> str:
    if step == 0:
        return (
            "at the starting point: check params, hparams and the data for NaN/Inf, and the "
            "loss for log(0) or division by 0."
        )
    return (
        "the inner solve diverged: lower learning_rate, or check the loss for log(0) or overflow."
    )


class _AbstractStepper(abc.ABC):
    """One optimiser: runs the loop from `leaves` (which it may modify) to the stopping test."""

    name: str

    @abc.abstractmethod
    def run(
        self, evaluate: _Evaluator, leaves: list[torch.Tensor], max_steps: int, tol: float, bar: Any
    ) -> tuple[list[torch.Tensor], _Report]:
        """(solution leaves, report)."""


@dataclasses.dataclass(frozen=True)
class _TorchoptStepper(_AbstractStepper):
    transformation: Any
    name: str

    def run(self, evaluate, leaves, max_steps, tol, bar):
        import torchopt

        state = self.transformation.init(tuple(leaves))
        params = tuple(leaves)
        for step in range(max_steps + 1):
            evaluate.step = step
            value, grads = evaluate(params)
            loss_value, grad_norm = evaluate.measure(value, grads)
            _show(bar, step, loss_value, grad_norm)
            if grad_norm <= tol or step == max_steps:
                outcome = "tolerance" if grad_norm <= tol else "max_steps"
                return list(params), _Report(step, loss_value, grad_norm, outcome)
            updates, state = self.transformation.update(
                tuple(grads), state, params=params, inplace=False
            )
            params = tuple(torchopt.apply_updates(params, updates, inplace=False))
        raise AssertionError("unreachable")


@dataclasses.dataclass(frozen=True)
class _LBFGSStepper(_AbstractStepper):
    learning_rate: float
    name: str = "L-BFGS"

    def run(self, evaluate, leaves, max_steps, tol, bar):
        devices = {leaf.device for leaf in leaves}
        if len(devices) > 1:
            raise ValueError(
                f"params: optimizer='lbfgs' needs every tensor on one device, got "
                f"{sorted(map(str, devices))}; move them with .to(device), or use "
                "optimizer='adam'."
            )
        leaves = [leaf.requires_grad_() for leaf in leaves]
        tiny = min(torch.finfo(leaf.dtype).tiny for leaf in leaves)
        opt = torch.optim.LBFGS(
            leaves,
            lr=self.learning_rate,
            max_iter=max_steps,
            max_eval=max_steps * _LBFGS_EVALS_PER_STEP,
            # Stop on our own test only: no max-abs gradient test, and stop on no progress at all.
            tolerance_grad=0.0,
            tolerance_change=tiny,
            line_search_fn="strong_wolfe",
        )
        state = opt.state[leaves[0]]
        best: list[Any] = []  # (loss, grad norm) of the lowest loss seen, for the bar

        def closure() -> torch.Tensor:
            step = state.get("n_iter", 0)
            evaluate.step = step
            value, grads = evaluate(leaves)
            loss_value, grad_norm = evaluate.measure(value, grads)
            if not best or loss_value <= best[0][0]:
                best[:] = [(loss_value, grad_norm)]
            _show(bar, step, *best[0])
            if grad_norm <= tol:  # any evaluated point that meets the test is a solution
                solution = [leaf.detach().clone() for leaf in leaves]
                raise _Converged(solution, _Report(step, loss_value, grad_norm, "tolerance"))
            for leaf, g in zip(leaves, grads, strict=True):
                leaf.grad = g.contiguous()  # LBFGS views each grad as a vector
            return value

        try:
            opt.step(closure)
        except _Converged as converged:
            return converged.args
        steps = state.get("n_iter", 0)
        # Ended without meeting the test: by the budget, or by no progress. Measure the result.
        evaluate.step = steps
        final = [leaf.detach() for leaf in leaves]
        value, grads = evaluate(final)
        loss_value, grad_norm = evaluate.measure(value, grads)
        _show(bar, steps, loss_value, grad_norm)
        if steps >= max_steps:
            outcome = "max_steps"
        elif _below_precision(value, grads, state.get("d")):
            outcome = "precision"
        else:
            outcome = "stalled"
        return final, _Report(steps, loss_value, grad_norm, outcome)


def _below_precision(
    value: torch.Tensor, grads: Sequence[torch.Tensor], direction: torch.Tensor | None
) -> bool:
    r"""Whether L-BFGS stopped because its loss cannot resolve the decrease it predicts.

    Along the direction $d$ the model predicts a decrease of about $|g^\top d|$; the loss is
    rounded to $\varepsilon |L|$. Measured on ridge and logistic regression (float32 and
    float64, mean and sum losses), stops at the precision limit have
    $|g^\top d| \le 4\,\varepsilon |L|$, and stops on a noisy loss (dropout)
    $|g^\top d| \ge 5\cdot 10^4\,\varepsilon |L|$; the threshold sits between them, at 100.
    """
    if direction is None:
        return False
    flat = torch.cat([g.reshape(-1) for g in grads]).to(direction.dtype)
    predicted = torch.abs(torch.dot(flat, direction))
    eps = torch.finfo(value.dtype).eps
    return bool(predicted <= 100 * eps * torch.abs(value).clamp(min=torch.finfo(value.dtype).tiny))


def _show(bar: Any, step: int, loss_value: float, grad_norm: float) -> None:
    if bar is None:
        return
    bar.update(step - bar.n)
    bar.set_postfix(loss=f"{loss_value:.4g}", grad_norm=f"{grad_norm:.2e}", refresh=False)


def _run(
    loss: Callable[..., torch.Tensor],
    start: Any,
    hparams: Any,
    args: tuple,
    stepper: _AbstractStepper,
    max_steps: int,
    tol: float,
    progress: bool,
) -> tuple[Any, _Report]:
    # Under torch.func.grad or jvp the loop runs outside the transforms, on the plain values:
    # the derivatives come from the implicit boundary around it, not from the loop.
    isolated = contextlib.nullcontext()
    if under_transform():
        start, hparams, args = pytree.tree_map(_plain, (start, hparams, args))
        isolated = _outside_transforms()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_steps, desc=f"minimize ({stepper.name})", leave=True)
    try:
        with isolated:
            flat, spec = pytree.tree_flatten(start)
            leaves = [leaf.detach().clone() for leaf in flat]  # never the caller's storage
            evaluate = _Evaluator(loss, spec, hparams, args)
            solution, report = stepper.run(evaluate, leaves, max_steps, tol, bar)
            solution = [leaf.detach() for leaf in solution]
    finally:
        if bar is not None:
            bar.close()
    return pytree.tree_unflatten(solution, spec), report


def _outside_transforms() -> contextlib.AbstractContextManager:
    """Leave every torch.func transform for the duration (private torch API, as in `concrete`)."""
    from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack

    return temporarily_clear_interpreter_stack()


def _plain(leaf: Any) -> Any:
    """The value under functorch's wrappers; a batched (vmapped) tensor cannot be minimised."""
    if not isinstance(leaf, torch.Tensor):
        return leaf
    functorch, inner = torch._C._functorch, leaf
    while functorch.is_functorch_wrapped_tensor(inner):
        if functorch.is_batchedtensor(inner):
            raise RuntimeError(
                "minimize: cannot run under torch.func.vmap: its loop stops on a tensor's value, "
                "one problem at a time. Loop over the problems, or decorate a fixed-step inner "
                "solver with implicitfn.implicit_diff and vmap that."
            )
        inner = functorch.get_unwrapped(inner)
    return concrete(leaf)


def _failure_message(report: _Report, tol: float, stepper: _AbstractStepper) -> str:
    if report.outcome == "stalled":
        cause = (
            f"{stepper.name} stopped after {report.steps} steps: its line search found no "
            "decrease where its model predicts one, so the loss is probably noisy (dropout, "
            "random augmentation, BatchNorm batch statistics) or not smooth"
        )
        fixes = "make the loss deterministic (e.g. the module in eval mode) or use optimizer='adam'"
    else:
        cause = f"after max_steps={report.steps} steps of {stepper.name}"
        fixes = "raise max_steps, loosen tol or change optimizer/learning_rate"
    return (
        f"minimize: the gradient norm {report.grad_norm:.3e} is above tol={tol:g} ({cause}). "
        "The returned parameters are not an optimum, and the implicit function theorem behind "
        f"their derivatives assumes one, so the hypergradient is approximate. Fix: {fixes}; "
        "pass tol=0 to run a fixed number of steps on purpose."
    )
