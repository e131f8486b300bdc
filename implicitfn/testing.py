"""Reference answers to test hypergradients against: closed forms and finite differences.

These are public so that users can check their own problems the way the library checks itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from implicitfn._tree import Tree, tree_map, tree_ravel

__all__ = [
    "finite_difference_gradient",
    "ridge_hypergradient",
    "ridge_loss",
    "ridge_solution",
]


def ridge_loss(params: Tree, hparams: Tree, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""Ridge regression with one penalty per feature: $\tfrac12\lVert Xw - y\rVert^2 + \tfrac12\sum_i \lambda_i w_i^2$.

    `params` is `{"w": ...}` and `hparams` is `{"penalty": ...}` (positive), TensorDicts or dicts.

    ```python
    >>> import torch
    >>> from implicitfn.testing import ridge_loss
    >>> ridge_loss({"w": torch.ones(2)}, {"penalty": torch.ones(2)}, torch.eye(2), torch.ones(2))
    tensor(1.)
    ```
    """
    residual = x @ params["w"] - y
    return 0.5 * (residual**2).sum() + 0.5 * (hparams["penalty"] * params["w"] ** 2).sum()


def ridge_solution(penalty: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""The minimiser $w^* = (X^\top X + \mathrm{diag}\,\lambda)^{-1} X^\top y$ of [`ridge_loss`][implicitfn.testing.ridge_loss].

    ```python
    >>> import torch
    >>> from implicitfn.testing import ridge_solution
    >>> ridge_solution(torch.ones(2), torch.eye(2), torch.ones(2))
    tensor([0.5000, 0.5000])
    ```
    """
    return torch.linalg.solve(x.T @ x + torch.diag(penalty), x.T @ y)


def ridge_hypergradient(
    penalty: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
) -> torch.Tensor:
    r"""Closed-form $dL_V/d\lambda$ for $L_V = \tfrac12\lVert X_v w^*(\lambda) - y_v\rVert^2$.

    With $H = X^\top X + \mathrm{diag}\,\lambda$ and $v = H^{-1} X_v^\top (X_v w^* - y_v)$, the
    implicit function theorem gives $dL_V/d\lambda_i = -w^*_i v_i$.

    ```python
    >>> import torch
    >>> from implicitfn.testing import ridge_hypergradient
    >>> ridge_hypergradient(torch.ones(1), torch.eye(1), torch.ones(1), torch.eye(1), torch.zeros(1))
    tensor([-0.1250])
    ```
    """
    w = ridge_solution(penalty, x, y)
    hessian = x.T @ x + torch.diag(penalty)
    adjoint = torch.linalg.solve(hessian, x_val.T @ (x_val @ w - y_val))
    return -w * adjoint


def finite_difference_gradient(
    fn: Callable[[Tree], torch.Tensor], point: Tree, eps: float = 1e-6
) -> Tree:
    r"""Central finite differences $\frac{f(x + \epsilon e_i) - f(x - \epsilon e_i)}{2\epsilon}$ of a scalar function of a tree.

    Costs $2n$ evaluations; use float64 and a tightly converged inner solve.

    **Arguments:**

    - `fn`: tree -> scalar tensor.
    - `point`: a tree (TensorDict, dict or tensor).
    - `eps`: the step.

    **Returns:** a tree with the structure of `point`.

    ```python
    >>> import torch
    >>> from implicitfn.testing import finite_difference_gradient
    >>> g = finite_difference_gradient(lambda t: (t ** 3).sum(), torch.tensor([1.0, 2.0], dtype=torch.float64))
    >>> torch.allclose(g, torch.tensor([3.0, 12.0], dtype=torch.float64))
    True
    ```
    """
    flat, unravel = tree_ravel(tree_map(lambda t: t.detach(), point))
    gradient = torch.zeros_like(flat)
    for i in range(flat.numel()):
        step = torch.zeros_like(flat)
        step[i] = eps
        gradient[i] = (fn(unravel(flat + step)) - fn(unravel(flat - step))) / (2 * eps)
    return unravel(gradient)
