"""The baseline that implicit differentiation replaces: reverse mode through unrolled steps."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.func import grad

from implicitfn._curvature import scalar_loss
from implicitfn._implicit import _check_args_finite, _check_tree, _detached
from implicitfn._solution import all_finite
from implicitfn._tree import Tree, tree_axpy, tree_zeros_like

__all__ = ["unrolled_hypergradient"]


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
    $k$, because every step's graph is kept.

    Started at an inner solution $w_0 = w^*$ (truncated back-propagation) with $\beta = 0$, it
    equals the [`Neumann`][implicitfn.Neumann] hypergradient with `steps=k - 1` and
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
    >>> inner = lambda w, lam: 0.5 * ((w - 1.0) ** 2).sum() + 0.5 * lam * (w ** 2).sum()
    >>> outer = lambda w, lam: (w ** 2).sum()
    >>> lam = torch.tensor(1.0, dtype=torch.float64)
    >>> w_star = torch.full((2,), 0.5, dtype=torch.float64)      # argmin: 1 / (1 + lam)
    >>> g, w_k = implicitfn.unrolled_hypergradient(inner, outer, w_star, lam,
    ...                                             steps=30, learning_rate=0.4)
    >>> round(float(g), 6)                # implicit answer: d/dlam 2/(1+lam)^2 = -0.5
    -0.5
    >>> g, _ = implicitfn.unrolled_hypergradient(inner, outer, w_star, lam, steps=1,
    ...                                          learning_rate=0.4)
    >>> round(float(g), 6)                # one step: -B^T eta dL_V/dw = -(0.5)(0.4)(1.0 * 2)
    -0.4
    ```
    """
    for fn, name in ((inner_loss, "inner_loss"), (outer_loss, "outer_loss")):
        if not callable(fn):
            raise TypeError(f"{name}: expected a callable (params, hparams, *args) -> scalar.")
    _check_tree(params, "params")
    _check_tree(hparams, "hparams")
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps: expected a positive int, got {type(steps).__name__}.")
    if steps < 1:
        raise ValueError(f"steps: must be >= 1 (got {steps}).")
    for value, name in ((learning_rate, "learning_rate"), (momentum, "momentum")):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}: expected a float, got {type(value).__name__}.")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate: must be > 0 (got {learning_rate}).")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum: must be in [0, 1) (got {momentum}); use 0 for plain descent.")
    inner_args, outer_args = tuple(inner_args), tuple(outer_args)
    _check_args_finite(inner_args)
    train_gradient = grad(scalar_loss(inner_loss, "inner_loss"))
    validation = scalar_loss(outer_loss, "outer_loss")
    start = _detached(params)

    def unrolled_objective(lam: Tree) -> tuple[torch.Tensor, Tree]:
        w, velocity = start, tree_zeros_like(start)
        for _ in range(steps):
            # Every step stays in the graph: this is what costs O(k) memory.
            velocity = tree_axpy(momentum, velocity, train_gradient(w, lam, *inner_args))
            w = tree_axpy(-learning_rate, velocity, w)
        return validation(w, lam, *outer_args), w

    hypergrad, final_params = grad(unrolled_objective, has_aux=True)(_detached(hparams))
    if not (all_finite(hypergrad) and all_finite(final_params)):
        raise FloatingPointError(
            f"unrolled_hypergradient: the {steps} unrolled steps produced NaN/Inf; the inner "
            f"optimiser diverged. Use a learning_rate below 2 / (largest Hessian eigenvalue) "
            f"(got {learning_rate}) or less momentum."
        )
    return hypergrad, final_params
