r"""Proximal- and projected-gradient optimality conditions, with the backward solve restricted to
the support when the prox holds coordinates fixed.

The inner solution of $\min_w f(w, \lambda) + g(w, \lambda)$ ($f$ smooth, $g$ with a cheap
proximal map) is a fixed point of one proximal-gradient step,
$w = T(w) = \mathrm{prox}_{\eta g}(w - \eta\nabla_w f(w, \lambda), \lambda)$, for every step
$\eta > 0$. With $z = w - \eta\nabla f$, $J = \partial\,\mathrm{prox}/\partial z$ and
$H = \nabla^2_w f$, the condition $F = w - T(w) = 0$ has
$A = \partial F/\partial w = I - J(I - \eta H)$.

Restriction (sparse-ho, Bertrand et al. 2022). When the prox holds the coordinates off a
support $S$ at values that no differentiated input moves (zero for the Lasso), the rows of $J$
and of $B = \partial F/\partial\lambda$ vanish off $S$, and $A$'s rows off $S$ are those of the
identity: $A = \begin{pmatrix} A_{SS} & A_{SN} \\ 0 & I\end{pmatrix}$. The reverse solve
$A^\top v = \bar w$ gives $v_S$ from $A_{SS}^\top v_S = \bar w_S$ alone, and $-B^\top v$ reads
only $v_S$; the forward solve gives $\dot w_N = 0$ and $A_{SS}\dot w_S = -(B\dot\lambda)_S$.
So the adjoint may solve with $\tilde A = A P + (I - P)$ ($P$ the 0/1 diagonal of $S$), which
is $A_{SS}$ on the support and the identity off it: every solver converges there at once, the
hypergradient is exactly the same, and for a prox whose Jacobian is $P$ (L1,
non-negativity) $\tilde A = \eta P H P + (I - P)$ is symmetric, so [`CG`][implicitfn.CG]
applies. A dense solve materialises only the $|S|$ columns of the support.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch.func import grad

from implicitfn._curvature import jacobian_operator, scalar_loss
from implicitfn._operator import SYMMETRIC, AbstractLinearOperator
from implicitfn._optimality import AbstractOptimalityCondition
from implicitfn._projections import AbstractProjection, AbstractProx
from implicitfn._solution import under_transform
from implicitfn._tree import Tree, tree_axpy, tree_map, tree_ravel, tree_sub

__all__ = ["projected_gradient", "proximal_gradient"]


@dataclasses.dataclass(frozen=True)
class ProximalGradient(AbstractOptimalityCondition):
    r"""$F = w - \mathrm{prox}_{\eta g}(w - \eta\nabla_w f)$; made by
    [`proximal_gradient`][implicitfn.proximal_gradient] and
    [`projected_gradient`][implicitfn.projected_gradient]."""

    loss: Callable[..., torch.Tensor]
    prox: Callable[..., Tree]
    step: float
    restrict: bool

    @property
    def symmetric(self) -> bool:  # type: ignore[override]
        """The restricted Jacobian $\\eta PHP + (I - P)$ is symmetric when the prox's Jacobian is
        the mask $P$ of its support."""
        return self.restrict and bool(getattr(self.prox, "jacobian_is_mask", False))

    def mapping(self, params: Tree, hparams: Tree, *args: Any) -> Tree:
        r"""One step $T(w) = \mathrm{prox}_{\eta g}(w - \eta\nabla_w f(w, \lambda, \ldots))$."""
        gradient = grad(scalar_loss(self.loss, "f"))(params, hparams, *args)
        return self.prox(tree_axpy(-self.step, gradient, params), self.step, hparams)

    def residual(self, params, hparams, *args):
        return tree_sub(params, self.mapping(params, hparams, *args))

    def support(self, params: Tree, hparams: Tree, *args: Any) -> torch.Tensor:
        """The boolean mask of the coordinates that move with $z$, at the point."""
        gradient = grad(scalar_loss(self.loss, "f"))(params, hparams, *args)
        mask = self.prox.support(tree_axpy(-self.step, gradient, params), self.step, hparams)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(
                f"{type(self.prox).__name__}.support must return a boolean tensor, got "
                f"{type(mask).__name__ if not isinstance(mask, torch.Tensor) else mask.dtype}; "
                "return None from restricts=False proxes, or pass restrict=False."
            )
        return mask

    def linearize(self, curvature, params, hparams, *args):
        self.check_curvature(curvature)
        mode = getattr(curvature, "mode", "reverse-over-reverse")

        def of_params(w: Tree) -> Tree:
            return self.residual(w, hparams, *args)

        operator = jacobian_operator(of_params, params, symmetric=False, mode=mode)
        if not self.restrict:
            return operator
        return SupportRestricted(operator, self.support(params, hparams, *args), self.symmetric)


@dataclasses.dataclass(frozen=True, eq=False)
class SupportRestricted(AbstractLinearOperator):
    r"""$\tilde A = A P + (I - P)$ (or its transpose $P A^\top + (I - P)$): the Jacobian $A$ on the
    support mask $P$, the identity off it. Exact for the implicit solves of a condition whose
    rows off the support are those of the identity and whose mixed Jacobian vanishes there."""

    operator: AbstractLinearOperator  # A
    mask: torch.Tensor  # P, boolean, shaped like the parameters
    symmetric: bool
    transposed: bool = False

    @property
    def template(self) -> Tree:  # type: ignore[override]
        return self.operator.template

    @property
    def tags(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({SYMMETRIC}) if self.symmetric else frozenset()

    def mv(self, vector: Tree) -> Tree:
        if self.symmetric or self.transposed:  # P A^T u + (I - P) u, one stored linearisation
            image = self.operator.transpose().mv(vector)
            return tree_map(lambda a, v: torch.where(self.mask, a, v), image, vector)
        on_support = tree_map(lambda v: torch.where(self.mask, v, torch.zeros_like(v)), vector)
        image = self.operator.mv(on_support)
        return tree_map(lambda a, v: torch.where(self.mask, a, v), image, vector)

    def transpose(self) -> AbstractLinearOperator:
        if self.symmetric:
            return self
        return dataclasses.replace(self, transposed=not self.transposed)

    def as_matrix(self, chunk_size: int = 256) -> torch.Tensor:
        r"""The identity with the $|S|$ support columns of $\tilde A^\top$ computed (one vmapped
        product over them), transposed unless this is the transposed operator: $|S|$ products
        instead of $n$. Under `vmap` or `torch.compile` (where $|S|$ is not known), all $n$."""
        if under_transform() or torch.compiler.is_compiling():
            return super().as_matrix(chunk_size)
        flat, unravel = tree_ravel(self.template)
        mask = tree_ravel(self.mask)[0]
        (columns,) = torch.nonzero(mask, as_tuple=True)
        matrix = torch.eye(flat.numel(), dtype=flat.dtype, device=flat.device)
        transpose = self.operator.transpose()
        if columns.numel():

            def column(e: torch.Tensor) -> torch.Tensor:
                image = transpose.mv(unravel(e))
                return tree_ravel(tree_map(lambda a: torch.where(self.mask, a, 0.0), image))[0]

            basis = matrix[columns]
            images = torch.func.vmap(column, chunk_size=chunk_size)(basis)
            matrix[:, columns] = images.T
        return matrix if self.symmetric or self.transposed else matrix.T


def _check_loss_and_step(f: Any, step: Any) -> None:
    if not callable(f):
        raise TypeError(
            f"f: expected a callable (params, hparams, *args) -> scalar, got {type(f).__name__}."
        )
    if isinstance(step, bool) or not isinstance(step, (int, float)):
        raise TypeError(f"step: expected a number > 0, got {type(step).__name__}.")
    if not step > 0 or step != step or step == float("inf"):
        raise ValueError(
            f"step: must be a finite number > 0, got {step}; 1/L with L the Lipschitz constant "
            "of grad f (the largest Hessian eigenvalue) conditions the backward solve best."
        )


def _restriction(prox: Any, restrict: Any) -> bool:
    if restrict is not None and not isinstance(restrict, bool):
        raise TypeError(f"restrict: expected None, True or False, got {type(restrict).__name__}.")
    restricts = isinstance(prox, AbstractProx) and prox.restricts
    if restrict and not restricts:
        raise ValueError(
            f"restrict=True: {type(prox).__name__} does not say which coordinates it holds fixed "
            "(restricting needs an AbstractProx whose support() returns a mask, e.g. "
            "implicitfn.prox_l1); pass restrict=None or False."
        )
    return restricts if restrict is None else restrict


def proximal_gradient(
    f: Callable[..., torch.Tensor],
    prox: AbstractProx | Callable[..., Tree],
    *,
    step: float = 1.0,
    restrict: bool | None = None,
) -> AbstractOptimalityCondition:
    r"""The inner solution minimises $f(w, \lambda, \ldots) + g(w, \lambda)$: it is a fixed point
    of a proximal-gradient step, $F = w - \mathrm{prox}_{\eta g}(w - \eta\nabla_w f) = 0$.

    $A = \partial F/\partial w = I - J(I - \eta\nabla^2_w f)$ with $J$ the Jacobian of the prox:
    not symmetric in general, so use [`GMRES`][implicitfn.GMRES] (or
    [`FixedPoint`][implicitfn.FixedPoint] with $\eta \le 1/L$, [`Dense`][implicitfn.Dense]).
    With a prox that holds coordinates fixed (every one here but the L2 ball and the box with
    bounds in `hparams`), the solve is restricted to the support: the same hypergradient, a
    system that is the identity off the support, and for [`prox_l1`][implicitfn.prox_l1] and
    [`projection_nonnegative`][implicitfn.projection_nonnegative] a symmetric one on it
    ($\eta\nabla^2_{SS} f$), so [`CG`][implicitfn.CG] applies. See "Constrained and non-smooth
    inner problems" for the maths and measurements.

    **Arguments:**

    - `f`: the smooth part, `(params, hparams, *args) -> scalar`.
    - `prox`: `(z, step, hparams) -> params`, e.g. [`prox_l1`][implicitfn.prox_l1]`("alpha")`,
      [`prox_elastic_net`][implicitfn.prox_elastic_net], [`prox_group_lasso`][implicitfn.prox_group_lasso]
      or any projection; a plain function works too (without restriction).
    - `step`: $\eta > 0$. Every $\eta$ gives the same solutions and hypergradients; $1/L$ ($L$
      the largest eigenvalue of $\nabla^2 f$) conditions the backward system best.
    - `restrict`: `None` (default: restrict when the prox can), `True` or `False`.

    ```python
    >>> import torch, implicitfn
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    >>> y = torch.tensor([2.0, 0.1, 2.0], dtype=torch.float64)
    >>> f = lambda w, h: 0.5 * ((x @ w - y) ** 2).sum()
    >>> condition = implicitfn.proximal_gradient(f, implicitfn.prox_l1("alpha"), step=0.3)
    >>> alpha = {"alpha": torch.tensor([1.0, 1.0], dtype=torch.float64)}
    >>> w = torch.tensor([1.5, 0.0], dtype=torch.float64)     # the Lasso solution
    >>> condition.residual(w, alpha)
    tensor([0., 0.], dtype=torch.float64)
    >>> outer = lambda w, h: w.sum()
    >>> g, info = implicitfn.hypergradient(condition, outer, w, alpha,
    ...                                    adjoint=implicitfn.ImplicitAdjoint(solver=implicitfn.CG()))
    >>> g["alpha"], int(info.num_steps)                 # w_1 = (4 - alpha_1)/2; w_2 stays 0
    (tensor([-0.5000, 0.0000], dtype=torch.float64), 2)
    ```
    """
    _check_loss_and_step(f, step)
    if not callable(prox):
        raise TypeError(
            f"prox: expected a callable (z, step, hparams) -> params such as "
            f"implicitfn.prox_l1('alpha'), got {type(prox).__name__}."
        )
    return ProximalGradient(f, prox, float(step), _restriction(prox, restrict))


@dataclasses.dataclass(frozen=True)
class _AsProx:
    """A projection written as a function `(z, hparams)`, called as a prox (the step unused)."""

    projection: Callable[..., Tree]

    def __call__(self, z: Tree, step: float, hparams: Tree) -> Tree:
        return self.projection(z, hparams)


def projected_gradient(
    f: Callable[..., torch.Tensor],
    projection: AbstractProjection | Callable[..., Tree],
    *,
    step: float = 1.0,
    restrict: bool | None = None,
) -> AbstractOptimalityCondition:
    r"""The inner solution minimises $f(w, \lambda, \ldots)$ over a convex set $C_\lambda$: it is a
    fixed point of a projected-gradient step, $F = w - \Pi_{C_\lambda}(w - \eta\nabla_w f) = 0$.

    The proximal-gradient condition with the prox of the indicator of $C_\lambda$: $A = I -
    J_\Pi(I - \eta\nabla^2 f)$, restricted to the free coordinates when the projection holds
    the others fixed ([`projection_nonnegative`][implicitfn.projection_nonnegative],
    [`projection_simplex`][implicitfn.projection_simplex], a box with constant bounds).

    **Arguments:**

    - `f`: the objective, `(params, hparams, *args) -> scalar`.
    - `projection`: [`projection_box`][implicitfn.projection_box],
      [`projection_simplex`][implicitfn.projection_simplex],
      [`projection_l2_ball`][implicitfn.projection_l2_ball],
      [`projection_nonnegative`][implicitfn.projection_nonnegative], your own
      [`AbstractProjection`][implicitfn.AbstractProjection], or a function `(z, hparams) -> params`.
    - `step`, `restrict`: as in [`proximal_gradient`][implicitfn.proximal_gradient].

    ```python
    >>> import torch, implicitfn
    >>> f = lambda w, h: 0.5 * ((w - h["target"]) ** 2).sum()      # nearest point of the ball
    >>> condition = implicitfn.projected_gradient(f, implicitfn.projection_l2_ball(1.0))
    >>> target = {"target": torch.tensor([3.0, 4.0], dtype=torch.float64)}
    >>> w = torch.tensor([0.6, 0.8], dtype=torch.float64)
    >>> g, _ = implicitfn.hypergradient(condition, lambda w, h: w[0], w, target,
    ...                                 adjoint=implicitfn.ImplicitAdjoint(solver=implicitfn.GMRES()))
    >>> g["target"]                                  # d(t_1/|t|)/dt = (t_2^2, -t_1 t_2)/|t|^3
    tensor([ 0.1280, -0.0960], dtype=torch.float64)
    ```
    """
    _check_loss_and_step(f, step)
    if isinstance(projection, AbstractProx) and not isinstance(projection, AbstractProjection):
        raise TypeError(
            f"projection: {type(projection).__name__} is a prox, not a projection; use "
            "implicitfn.proximal_gradient(f, prox) for it."
        )
    if not callable(projection):
        raise TypeError(
            f"projection: expected a callable (z, hparams) -> params such as "
            f"implicitfn.projection_box(0.0, 1.0), got {type(projection).__name__}."
        )
    prox = projection if isinstance(projection, AbstractProjection) else _AsProx(projection)
    return ProximalGradient(f, prox, float(step), _restriction(prox, restrict))
