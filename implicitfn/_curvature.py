"""Curvature operators: the exact Hessian (two ways) and the Gauss-Newton matrix."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch.func import grad, jvp, vjp

from implicitfn._operator import (
    POSITIVE_SEMIDEFINITE,
    SYMMETRIC,
    AbstractLinearOperator,
    FunctionLinearOperator,
)
from implicitfn._tree import Tree, tree_add, tree_zeros_like

__all__ = ["AbstractCurvature", "CompositeLoss", "GaussNewton", "Hessian"]

Loss = Callable[..., torch.Tensor]


def scalar_loss(loss: Loss, name: str) -> Loss:
    """Wrap `loss` so that a non-scalar or non-floating result raises a clear error."""

    def checked(*args: Any) -> torch.Tensor:
        value = loss(*args)
        if not isinstance(value, torch.Tensor) or value.ndim != 0:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"{name}: must return a scalar (0-dim) tensor, got {shape}; reduce it with "
                ".mean() or .sum()."
            )
        if not value.is_floating_point():
            raise TypeError(f"{name}: must return a floating-point tensor, got {value.dtype}.")
        return value

    return checked


@dataclasses.dataclass(frozen=True)
class CompositeLoss:
    r"""A training loss written as $\ell(\mathrm{predict}(w, \lambda, \ldots), \lambda, \ldots) + \mathrm{penalty}(w, \lambda, \ldots)$.

    Stating the split lets [`GaussNewton`][implicitfn.GaussNewton] form
    $J^\top H_\ell J + \nabla^2_w \mathrm{penalty}$, where $J$ is the Jacobian of `predict` with
    respect to the parameters and $H_\ell$ the Hessian of `output_loss` with respect to the
    outputs. It is also an ordinary loss: calling it returns the sum, so it can be given to
    [`stationarity`][implicitfn.stationarity] and used with [`Hessian`][implicitfn.Hessian] too.

    **Arguments:**

    - `predict`: `(params, hparams, *args) -> outputs` (a tensor or tree), e.g. the model's logits.
    - `output_loss`: `(outputs, hparams, *args) -> scalar`, e.g. cross-entropy against the labels
      in `args`. It should be convex in the outputs for the Gauss-Newton matrix to be PSD.
    - `penalty`: `(params, hparams, *args) -> scalar`, e.g. weight decay; `None` for none.

    ```python
    >>> import torch, implicitfn
    >>> loss = implicitfn.CompositeLoss(
    ...     predict=lambda p, h, x, y: x @ p["w"],
    ...     output_loss=lambda out, h, x, y: torch.nn.functional.mse_loss(out, y),
    ...     penalty=lambda p, h, x, y: h["decay"] * (p["w"] ** 2).sum(),
    ... )
    >>> x, y = torch.randn(5, 3), torch.randn(5)
    >>> loss({"w": torch.zeros(3)}, {"decay": torch.tensor(0.1)}, x, y).shape
    torch.Size([])
    ```
    """

    predict: Callable[..., Any]
    output_loss: Loss
    penalty: Loss | None = None

    def __post_init__(self) -> None:
        for name in ("predict", "output_loss", "penalty"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise TypeError(f"{name}: expected a callable, got {type(value).__name__}.")
        if self.predict is None or self.output_loss is None:
            raise TypeError("predict and output_loss are required callables.")

    def __call__(self, params: Tree, hparams: Tree, *args: Any) -> torch.Tensor:
        value = self.output_loss(self.predict(params, hparams, *args), hparams, *args)
        if self.penalty is not None:
            value = value + self.penalty(params, hparams, *args)
        return value


class AbstractCurvature(abc.ABC):
    r"""How to build the operator $A \approx \nabla^2_w L(w, \lambda)$ of a scalar loss at a point.

    Implement [`linearize`][implicitfn.AbstractCurvature.linearize] to add a curvature (a
    K-FAC or diagonal approximation, say); it must return an operator tagged `"symmetric"`.

    Declared capabilities, read by the adjoint instead of checking types:
    `positive_semidefinite` (the operator is PSD wherever it is built, like Gauss-Newton: the
    default solver is then CG), `works_on_leaves`
    (the loss may be given its parameters as a flat list of tensors, which lets the backward
    pass solve on one raveled vector) and `linearizes_jointly` (the operator is the exact
    Hessian, so one linearisation of the gradient in $(w, \lambda)$ can serve both the solve
    and the mixed product). Both default to `False`, the safe choice for a new curvature.

    ```python
    >>> import torch, implicitfn
    >>> loss = lambda p, h: (h * p ** 2).sum()
    >>> op = implicitfn.Hessian().linearize(loss, torch.ones(2), torch.tensor(3.0))
    >>> op.mv(torch.tensor([1.0, 0.0]))
    tensor([6., 0.])
    ```
    """

    works_on_leaves: bool = False
    linearizes_jointly: bool = False
    positive_semidefinite: bool = False

    @abc.abstractmethod
    def linearize(
        self, loss: Loss, params: Tree, hparams: Tree, *args: Any
    ) -> AbstractLinearOperator:
        """The curvature of `loss(params, hparams, *args)` with respect to `params`, as an operator."""


@dataclasses.dataclass(frozen=True)
class Hessian(AbstractCurvature):
    r"""The exact Hessian $\nabla^2_w L$, applied without forming it.

    **Arguments:**

    - `mode`: `"reverse-over-reverse"` (default: the gradient's linearisation is computed once
      and each product is one backward pass through it; fastest in
      `benchmarks/hessian_modes.py`) or `"forward-over-reverse"` (a `jvp` of the gradient per
      product: no stored linearisation, so less memory).

    The Hessian is symmetric; it is positive semidefinite only near a minimum, so the operator is
    tagged `"symmetric"` only. For a conditions other than stationarity, this curvature means the
    exact Jacobian $\partial F/\partial w$.

    ```python
    >>> import torch, implicitfn
    >>> loss = lambda p, h: (p ** 4).sum()
    >>> for mode in ("reverse-over-reverse", "forward-over-reverse"):
    ...     print(implicitfn.Hessian(mode).linearize(loss, torch.ones(2), None).mv(torch.ones(2)))
    tensor([12., 12.])
    tensor([12., 12.])
    ```
    """

    mode: Literal["reverse-over-reverse", "forward-over-reverse"] = "reverse-over-reverse"
    works_on_leaves = True

    @property
    def linearizes_jointly(self) -> bool:  # type: ignore[override]
        return self.mode == "reverse-over-reverse"

    def __post_init__(self) -> None:
        if self.mode not in ("reverse-over-reverse", "forward-over-reverse"):
            raise ValueError(
                f"mode: expected 'reverse-over-reverse' or 'forward-over-reverse', got {self.mode!r}."
            )

    def linearize(self, loss, params, hparams, *args):
        gradient = grad(scalar_loss(loss, "loss"))

        def grad_of(w: Tree) -> Tree:
            return gradient(w, hparams, *args)

        return jacobian_operator(grad_of, params, symmetric=True, mode=self.mode)


@dataclasses.dataclass(frozen=True)
class GaussNewton(AbstractCurvature):
    r"""The Gauss-Newton matrix $J^\top H_\ell J + \nabla^2_w \mathrm{penalty}$.

    Needs the training loss as a [`CompositeLoss`][implicitfn.CompositeLoss]. With a convex
    `output_loss` (squared error, cross-entropy) and a convex penalty it is positive
    semidefinite everywhere, even where the Hessian of a network is indefinite, so
    [`CG`][implicitfn.CG] is always applicable. It equals the Hessian when `predict` is linear
    in the parameters.

    `linearize` records `predict` and `output_loss` once; each product is then three passes
    through those stored graphs ($Jv$, obtained as the transpose of the pullback $u \mapsto
    J^\top u$; $H_\ell$ in output space; $J^\top$) and a Hessian product of `penalty`, with
    nothing recomputed: measured 0.85x the time of an exact Hessian product on an MLP.

    ```python
    >>> import torch, implicitfn
    >>> loss = implicitfn.CompositeLoss(
    ...     predict=lambda p, h, x: torch.tanh(x @ p),
    ...     output_loss=lambda out, h, x: 0.5 * (out ** 2).sum())
    >>> op = implicitfn.GaussNewton().linearize(loss, torch.zeros(2), None, torch.eye(2))
    >>> op.mv(torch.ones(2))
    tensor([1., 1.])
    ```
    """

    works_on_leaves = True

    positive_semidefinite = True

    def linearize(self, loss, params, hparams, *args):
        if not isinstance(loss, CompositeLoss):
            raise TypeError(
                f"GaussNewton needs the training loss as implicitfn.CompositeLoss(predict=..., "
                f"output_loss=..., penalty=...), got {type(loss).__name__}; state the split, or "
                "use curvature=implicitfn.Hessian()."
            )

        def predict(w: Tree) -> Any:
            return loss.predict(w, hparams, *args)

        # Everything is linearised once and reused by every product (measured on an MLP: 0.3x
        # the time of a product that re-runs `predict` in forward mode, 0.85x a Hessian product).
        outputs, predict_vjp = vjp(predict, params)
        # J v as the transpose of the linear map u -> J^T u: a pass through the stored graph
        # instead of a forward-mode run of `predict` (which would recompute its primal values).
        _, predict_jvp = vjp(lambda u: predict_vjp(u)[0], tree_zeros_like(outputs))
        output_grad = grad(
            scalar_loss(lambda out: loss.output_loss(out, hparams, *args), "output_loss")
        )
        _, output_hessian = vjp(output_grad, outputs)  # symmetric: the pullback is the product
        penalty_hessian = None
        if loss.penalty is not None:
            penalty = scalar_loss(loss.penalty, "penalty")
            penalty_hessian = Hessian().linearize(penalty, params, hparams, *args)

        def matvec(v: Tree) -> Tree:
            (jv,) = predict_jvp(v)
            (hjv,) = output_hessian(jv)
            (result,) = predict_vjp(hjv)
            if penalty_hessian is not None:
                result = tree_add(result, penalty_hessian.mv(v))
            return result

        return FunctionLinearOperator(matvec, params, tags={SYMMETRIC, POSITIVE_SEMIDEFINITE})


def jacobian_operator(
    fn: Callable[[Tree], Tree],
    params: Tree,
    *,
    symmetric: bool,
    mode: str = "reverse-over-reverse",
) -> AbstractLinearOperator:
    r"""The Jacobian of `fn` at `params` as an operator ($v \mapsto \partial\,\mathrm{fn}\; v$).

    `"reverse-over-reverse"` computes `vjp(fn)` once and reuses it: for a symmetric Jacobian
    (a Hessian) it is the product itself; otherwise it is the transpose product and the forward
    product uses `jvp`.
    """
    tags = {SYMMETRIC} if symmetric else set()

    def forward_product(v: Tree) -> Tree:
        return jvp(fn, (params,), (v,))[1]

    if mode == "forward-over-reverse":
        transpose = None if symmetric else _transpose_product(fn, params)
        return FunctionLinearOperator(forward_product, params, transpose, tags)
    if symmetric:
        # Linearise now: the work is done once, and a bad loss fails here, not mid-solve.
        _, pullback = vjp(fn, params)
        return FunctionLinearOperator(lambda u: pullback(u)[0], params, None, tags)
    return FunctionLinearOperator(forward_product, params, _transpose_product(fn, params), tags)


def _transpose_product(fn: Callable[[Tree], Tree], params: Tree) -> Callable[[Tree], Tree]:
    """`u -> J^T u`, linearising `fn` on first use and reusing the linearisation after."""
    pullbacks: list[Callable] = []

    def product(u: Tree) -> Tree:
        if not pullbacks:
            pullbacks.append(vjp(fn, params)[1])
        return pullbacks[0](u)[0]

    return product
