r"""KKT conditions of equality- and inequality-constrained problems, primal and dual variables
in one tree.

The inner problem $\min_w f(w, \lambda)$ subject to $h(w, \lambda) = 0$ and
$g(w, \lambda) \le 0$ has, at a regular solution, multipliers $\nu$ and $\mu \ge 0$ with
$F(w, \nu, \mu) = (\nabla_w L,\ h,\ \mu \odot g) = 0$, $L = f + \nu^\top h + \mu^\top g$
(the differentiable KKT map of OptNet, cvxpylayers and jaxopt's `make_kkt_optimality_fun`).
Its Jacobian in $(w, \nu, \mu)$,

$$
A = \begin{pmatrix}
\nabla^2_w L & \partial h^\top & \partial g^\top \\
\partial h & 0 & 0 \\
\mathrm{diag}(\mu)\,\partial g & 0 & \mathrm{diag}(g)
\end{pmatrix},
$$

is not symmetric (the last block row is scaled by $\mu$ and $g$), so the default backward
solver is GMRES. It is invertible under LICQ, second-order sufficiency and strict
complementarity ($\mu_i > 0$ on every active constraint, $g_i < 0$ on every inactive one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.func import grad

from implicitfn._optimality import AbstractOptimalityCondition
from implicitfn._tree import Tree

__all__ = ["kkt"]

PRIMAL, EQ, INEQ = "primal", "eq", "ineq"


def _weighted_sum(multiplier: torch.Tensor, value: Any, name: str, key: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{name}: must return a tensor shaped like params[{key!r}], got {type(value).__name__}."
        )
    if value.shape != multiplier.shape:
        raise ValueError(
            f"{name}: returned shape {tuple(value.shape)}, but params[{key!r}] has shape "
            f"{tuple(multiplier.shape)}; give one multiplier per constraint."
        )
    return (multiplier * value).sum()


@dataclasses.dataclass(frozen=True)
class KKT(AbstractOptimalityCondition):
    r"""$F = (\nabla_w L,\ h,\ \mu \odot g)$ with $L = f + \nu^\top h + \mu^\top g$; made by
    [`kkt`][implicitfn.kkt]."""

    objective: Callable[..., torch.Tensor]
    equality: Callable[..., torch.Tensor] | None = None
    inequality: Callable[..., torch.Tensor] | None = None
    symmetric = False

    @property
    def keys(self) -> tuple[str, ...]:
        """The keys the params must have: `"primal"`, then `"eq"` and `"ineq"` if given."""
        return (
            (PRIMAL,)
            + ((EQ,) if self.equality is not None else ())
            + ((INEQ,) if self.inequality is not None else ())
        )

    def check_params(self, params: Any) -> None:
        """Raise `TypeError` unless `params` is a mapping with exactly the expected keys."""
        if not isinstance(params, Mapping) and not hasattr(params, "keys"):
            raise TypeError(
                f"params: expected a dict or TensorDict with keys {list(self.keys)}, got "
                f"{type(params).__name__}."
            )
        found = set(params.keys())
        if found != set(self.keys):
            raise TypeError(
                f"params: expected the keys {list(self.keys)} (primal variables, then one "
                f"multiplier tensor per constraint function given), got {sorted(found)}."
            )

    def lagrangian(self, params: Tree, hparams: Tree, *args: Any) -> torch.Tensor:
        r"""$L = f(w) + \nu^\top h(w) + \mu^\top g(w)$ at the point."""
        self.check_params(params)
        return self._lagrangian(params[PRIMAL], params, hparams, *args)[0]

    def _lagrangian(
        self, w: Tree, params: Tree, hparams: Tree, *args: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        value = self.objective(w, hparams, *args)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise TypeError(
                "objective: must return a scalar tensor, got "
                f"{type(value).__name__ if not isinstance(value, torch.Tensor) else tuple(value.shape)}."
            )
        value = value.reshape(())
        constraints = {}  # the constraint values, by key
        if self.equality is not None:
            constraints[EQ] = self.equality(w, hparams, *args)
            value = value + _weighted_sum(params[EQ], constraints[EQ], "equality", EQ)
        if self.inequality is not None:
            constraints[INEQ] = self.inequality(w, hparams, *args)
            value = value + _weighted_sum(params[INEQ], constraints[INEQ], "inequality", INEQ)
        return value, constraints

    def residual(self, params, hparams, *args):
        self.check_params(params)

        def of_primal(w: Tree) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            return self._lagrangian(w, params, hparams, *args)

        gradient, parts = grad(of_primal, has_aux=True)(params[PRIMAL])
        parts[PRIMAL] = gradient
        if INEQ in parts:  # complementary slackness
            parts[INEQ] = params[INEQ] * parts[INEQ]
        out = {key: parts[key] for key in params.keys()}  # the params' key order
        if isinstance(params, dict):
            return out
        return type(params)(out, batch_size=params.batch_size, device=params.device)


def _check_function(fn: Any, name: str, what: str) -> None:
    if not callable(fn):
        raise TypeError(f"{name}: expected a callable {what}, got {type(fn).__name__}.")


def kkt(
    objective: Callable[..., torch.Tensor],
    *,
    equality: Callable[..., torch.Tensor] | None = None,
    inequality: Callable[..., torch.Tensor] | None = None,
) -> AbstractOptimalityCondition:
    r"""The inner solution solves $\min_w f(w, \lambda, \ldots)$ subject to
    $h(w, \lambda, \ldots) = 0$ and $g(w, \lambda, \ldots) \le 0$: with its multipliers $\nu$
    and $\mu \ge 0$ it is a root of the KKT map
    $F = (\nabla_w L,\ h,\ \mu \odot g)$, $L = f + \nu^\top h + \mu^\top g$.

    The params are one tree `{"primal": w, "eq": nu, "ineq": mu}` (a dict or a TensorDict; the
    keys of the constraints given only): the inner solver returns the multipliers too, and the
    hypergradient reaches $\lambda$ through $f$, $h$ and $g$. $\partial F/\partial(w, \nu, \mu)$
    is not symmetric, so the default solver of [`ImplicitAdjoint`][implicitfn.ImplicitAdjoint]
    is [`GMRES`][implicitfn.GMRES]; [`Dense`][implicitfn.Dense] suits small problems. It is
    invertible under strict complementarity ($\mu_i > 0$ on active constraints), LICQ and
    second-order sufficiency. See "KKT conditions" in "Constrained and non-smooth inner
    problems".

    **Arguments:**

    - `objective`: $f$, `(w, hparams, *args) -> scalar`.
    - `equality`: $h$, `(w, hparams, *args) -> tensor` shaped like `params["eq"]`, or None.
    - `inequality`: $g$, `(w, hparams, *args) -> tensor` shaped like `params["ineq"]`
      (constraints $g \le 0$), or None.

    **Returns:** an [`AbstractOptimalityCondition`][implicitfn.AbstractOptimalityCondition].

    ```python
    >>> import torch, implicitfn
    >>> f = lambda w, h: 0.5 * (w ** 2).sum()                  # min |w|^2/2 s.t. sum(w) = b
    >>> sum_is_b = lambda w, h: w.sum(0, keepdim=True) - h["b"]
    >>> condition = implicitfn.kkt(f, equality=sum_is_b)
    >>> b = {"b": torch.tensor([2.0], dtype=torch.float64)}
    >>> solution = {"primal": torch.tensor([1.0, 1.0], dtype=torch.float64),   # w = b/2
    ...             "eq": torch.tensor([-1.0], dtype=torch.float64)}           # nu = -b/2
    >>> condition.residual(solution, b)["primal"]
    tensor([0., 0.], dtype=torch.float64)
    >>> g, _ = implicitfn.hypergradient(condition, lambda p, h: p["primal"][0], solution, b,
    ...                                 adjoint=implicitfn.ImplicitAdjoint(solver=implicitfn.Dense()))
    >>> g["b"]                                                   # d(b/2)/db
    tensor([0.5000], dtype=torch.float64)
    ```
    """
    _check_function(objective, "objective", "(w, hparams, *args) -> scalar")
    for name, fn in (("equality", equality), ("inequality", inequality)):
        if fn is not None:
            _check_function(fn, name, "(w, hparams, *args) -> tensor of constraint values, or None")
    if equality is None and inequality is None:
        raise ValueError(
            "kkt: give equality=h or inequality=g (or both); without constraints use "
            "implicitfn.stationarity(objective)."
        )
    return KKT(objective, equality, inequality)
