"""Differentiation through unrolled steps: the adjoint that replays them from the solution, and
the baseline that implicit differentiation replaces (unrolling a whole inner optimisation)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.func import grad, jvp, vjp

from implicitfn._adjoint import AbstractAdjoint
from implicitfn._curvature import scalar_loss
from implicitfn._inputs import check_args_finite, check_tree, detached
from implicitfn._optimality import AbstractOptimalityCondition, stationarity
from implicitfn._solution import ImplicitSolveError, all_finite
from implicitfn._tree import Tree, tree_axpy, tree_zeros_like

__all__ = ["UnrolledAdjoint", "unrolled_hypergradient"]


@dataclasses.dataclass(frozen=True)
class UnrolledAdjoint(AbstractAdjoint):
    r"""Differentiate through $k$ unrolled steps of the inner iteration, started at the solution.

    In the backward pass it replays $u_t = \beta u_{t-1} + F(w_{t-1}, \lambda)$,
    $w_t = w_{t-1} - \eta\,u_t$ from $w_0 = w^*$ — gradient descent with heavy-ball momentum
    for [`stationarity`][implicitfn.stationarity] (where $F = \nabla_w L$), the relaxed map
    $w \leftarrow w + \eta(T(w) - w)$ for [`fixed_point`][implicitfn.fixed_point] — and
    differentiates $w_k$ with respect to $\lambda$ and the data in reverse (or forward) mode.
    This is truncated back-propagation (Shaban et al. 2019): with $\beta = 0$ it equals the
    [`Neumann`][implicitfn.Neumann] series with `max_steps=k`, `alpha` $=\eta$ and `rtol=0` (Lorraine
    et al. 2020), at $O(k)$ memory. Use it to compare against the implicit adjoint on the same
    decorated solver. It runs no linear solve: `hypergradient` returns `info=None`, and a
    NaN/Inf result raises [`ImplicitSolveError`][implicitfn.ImplicitSolveError].

    **Arguments:**

    - `steps`: $k \ge 1$.
    - `learning_rate`: $\eta > 0$ (below $2/\lambda_{\max}$ of $A$, or the derivative grows
      like $|1-\eta\lambda_{\max}|^k$).
    - `momentum`: $\beta \in [0, 1)$.

    ```python
    >>> import torch, implicitfn
    >>> inner = lambda w, lam: 0.5 * ((w - 1.0) ** 2).sum() + 0.5 * lam * (w ** 2).sum()
    >>> outer = lambda w, lam: (w ** 2).sum()
    >>> lam, w_star = torch.tensor(1.0, dtype=torch.float64), torch.full((2,), 0.5, dtype=torch.float64)
    >>> g, info = implicitfn.hypergradient(inner, outer, w_star, lam,
    ...     adjoint=implicitfn.UnrolledAdjoint(steps=30, learning_rate=0.4))
    >>> round(float(g), 6), info                          # exact: -0.5
    (-0.5, None)
    ```
    """

    steps: int
    learning_rate: float
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int):
            raise TypeError(f"steps: expected a positive int, got {type(self.steps).__name__}.")
        if self.steps < 1:
            raise ValueError(f"steps: must be >= 1 (got {self.steps}).")
        for value, name in ((self.learning_rate, "learning_rate"), (self.momentum, "momentum")):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name}: expected a float, got {type(value).__name__}.")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate: must be > 0 (got {self.learning_rate}).")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum: must be in [0, 1) (got {self.momentum}); use 0 for none.")

    def check(self, condition: AbstractOptimalityCondition) -> None:
        if not isinstance(condition, AbstractOptimalityCondition):
            raise TypeError(
                f"condition: expected an optimality condition, got {type(condition).__name__}."
            )

    def unroll(
        self,
        condition: AbstractOptimalityCondition,
        start: Tree,
        hparams: Tree,
        args: Sequence[Any],
    ) -> Tree:
        """$w_k$ after `steps` steps from `start` (differentiable in everything)."""
        w, velocity = start, tree_zeros_like(start)
        for _ in range(self.steps):
            velocity = tree_axpy(self.momentum, velocity, condition.residual(w, hparams, *args))
            w = tree_axpy(-self.learning_rate, velocity, w)
        return w

    def _of_inputs(self, condition, solution, hparams, args, positions):
        flat, spec = pytree.tree_flatten((hparams, tuple(args)))

        def unrolled(*chosen: torch.Tensor) -> Tree:
            full = list(flat)
            for i, value in zip(positions, chosen, strict=True):
                full[i] = value
            h, a = pytree.tree_unflatten(full, spec)
            return self.unroll(condition, solution, h, a)

        return unrolled, [flat[i] for i in positions], len(flat)

    def reverse(self, condition, solution, hparams, args, cotangent, selected):
        positions = [i for i, chosen in enumerate(selected) if chosen]
        unrolled, primals, size = self._of_inputs(condition, solution, hparams, args, positions)
        _, pullback = vjp(unrolled, *primals)
        products: list[Any] = [None] * size
        for i, value in zip(positions, pullback(cotangent), strict=True):
            products[i] = value
        self._check_finite([p for p in products if p is not None])
        return products, None

    def forward(self, condition, solution, hparams, args, tangents):
        positions = [i for i, t in enumerate(tangents) if t is not None]
        unrolled, primals, _ = self._of_inputs(condition, solution, hparams, args, positions)
        direction = jvp(unrolled, tuple(primals), tuple(tangents[i] for i in positions))[1]
        self._check_finite(direction)
        return direction

    def _check_finite(self, tree: Any) -> None:
        if not all_finite(tree):
            raise ImplicitSolveError(
                f"UnrolledAdjoint: the {self.steps} unrolled steps produced NaN/Inf; the "
                f"unrolled iteration diverges. Use a learning_rate below 2 / (largest eigenvalue "
                f"of dF/dw) (got {self.learning_rate}) or less momentum."
            )


def unrolled_hypergradient(
    inner_loss: Callable[..., torch.Tensor],
    outer_loss: Callable[..., torch.Tensor],
    params: Tree,
    hparams: Tree,
    *,
    steps: int,
    learning_rate: float,
    momentum: float = 0.0,
    inner_args: Sequence[Any] = (),
    outer_args: Sequence[Any] = (),
) -> tuple[Tree, Tree]:
    r"""Differentiate $L_V(w_k(\lambda), \lambda)$ in reverse mode through $k$ unrolled inner steps.

    Iterative differentiation (ITD; Grazzi et al., ICML 2020): run $k$ steps of gradient descent
    (heavy-ball momentum $\beta$ when `momentum > 0`, as in `torch.optim.SGD`) on the training
    loss from $w_0$ = `params`,

    $$u_t = \beta u_{t-1} + \nabla_w L_T(w_{t-1}, \lambda), \qquad w_t = w_{t-1} - \eta\, u_t,$$

    keep the whole computation graph, and differentiate $L_V(w_k(\lambda), \lambda)$ with respect
    to $\lambda$. $w_0$ is a constant. This is the baseline that
    [`implicit_diff`][implicitfn.implicit_diff] replaces: its time and memory grow linearly in
    $k$, because every step's graph is kept. (Started at $w^*$ instead, the same unrolling is
    the [`UnrolledAdjoint`][implicitfn.UnrolledAdjoint], usable with any decorated solver.)

    Started at an inner solution $w_0 = w^*$ (truncated back-propagation) with $\beta = 0$, it
    equals the [`Neumann`][implicitfn.Neumann] hypergradient with `max_steps=k` and
    `alpha=learning_rate` (Lorraine et al., 2020): $-B^\top \eta\sum_{j<k}(I - \eta A)^j
    \nabla_w L_V$. Started far from $w^*$, it also carries the error of the unfinished inner
    optimisation.

    **Arguments:**

    - `inner_loss`: the training loss `(params, hparams, *inner_args) -> scalar`.
    - `outer_loss`: the validation objective `(params, hparams, *outer_args) -> scalar`.
    - `params`: $w_0$, the starting point (TensorDict, dict or tensor); not modified.
    - `hparams`: $\lambda$ (TensorDict, dict or tensor); not modified.
    - `steps`: $k \ge 1$, the number of unrolled steps.
    - `learning_rate`: $\eta > 0$. Gradient descent, and with it the derivative, diverges when
      $\eta \ge 2/\lambda_{\max}$ of the Hessian; a result with NaN/Inf raises
      `FloatingPointError`. A derivative that grows but stays finite cannot be detected here:
      started at $w^*$ the iterates do not move ($\nabla_w L_T = 0$) while the derivative grows
      like $|1 - \eta\lambda_{\max}|^k$. Unlike the implicit solvers there is no residual to check.
    - `momentum`: $\beta \in [0, 1)$.
    - `inner_args`, `outer_args`: the extra arguments of the two losses (not differentiated).

    **Returns:** `(hypergradient, final_params)`: a tree with the structure of `hparams`, and
    $w_k$ (detached), so you can check how far the unrolled optimiser moved.

    ```python
    >>> import torch, implicitfn
    >>> train = lambda w, lam: 0.5 * ((w - 2.0) ** 2).sum() + 0.5 * lam * (w ** 2).sum()
    >>> validation = lambda w, lam: (w ** 2).sum()          # w* = 2 / (1 + lam) = 1 at lam = 1
    >>> lam, w_0 = torch.tensor(1.0, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    >>> g, w_k = implicitfn.unrolled_hypergradient(train, validation, w_0, lam,
    ...                                             steps=30, learning_rate=0.4)
    >>> round(float(g), 6), w_k                # converged: the implicit -16 / (1 + lam)^3
    (-2.0, tensor([1., 1.], dtype=torch.float64))
    >>> g, w_1 = implicitfn.unrolled_hypergradient(train, validation, w_0, lam, steps=1,
    ...                                            learning_rate=0.4)
    >>> float(g), w_1                          # one step from 0: lam has not acted yet
    (0.0, tensor([0.8000, 0.8000], dtype=torch.float64))
    ```
    """
    for fn, name in ((inner_loss, "inner_loss"), (outer_loss, "outer_loss")):
        if not callable(fn):
            raise TypeError(f"{name}: expected a callable (params, hparams, *args) -> scalar.")
    check_tree(params, "params")
    check_tree(hparams, "hparams")
    unrolling = UnrolledAdjoint(steps, learning_rate, momentum)  # validates the three numbers
    inner_args, outer_args = tuple(inner_args), tuple(outer_args)
    check_args_finite(inner_args)
    condition = stationarity(inner_loss)
    validation = scalar_loss(outer_loss, "outer_loss")
    start = detached(params)

    def unrolled_objective(lam: Tree) -> tuple[torch.Tensor, Tree]:
        # Every step stays in the graph: this is what costs O(k) memory.
        w = unrolling.unroll(condition, start, lam, inner_args)
        return validation(w, lam, *outer_args), w

    hypergrad, final_params = grad(unrolled_objective, has_aux=True)(detached(hparams))
    if not (all_finite(hypergrad) and all_finite(final_params)):
        raise FloatingPointError(
            f"unrolled_hypergradient: the {steps} unrolled steps produced NaN/Inf; the inner "
            f"optimiser diverged. Use a learning_rate below 2 / (largest Hessian eigenvalue) "
            f"(got {learning_rate}) or less momentum."
        )
    return hypergrad, final_params
