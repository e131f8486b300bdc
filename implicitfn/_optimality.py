"""Optimality conditions F(w, λ, *args) = 0 that define the inner solution w*(λ)."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.utils._pytree as pytree
from torch.func import grad, jvp, vjp

from implicitfn._curvature import (
    AbstractCurvature,
    CompositeLoss,
    GaussNewton,
    Hessian,
    jacobian_operator,
    scalar_loss,
)
from implicitfn._operator import AbstractLinearOperator
from implicitfn._solution import under_transform
from implicitfn._tree import Tree, leaves, ravel_leaves, tree_sub, unravel_leaves

__all__ = [
    "AbstractOptimalityCondition",
    "cross_vjp",
    "fixed_point",
    "root",
    "stationarity",
]


class AbstractOptimalityCondition(abc.ABC):
    r"""An optimality condition $F(w, \lambda, \ldots) = 0$ whose root is the inner solution.

    Implement [`residual`][implicitfn.AbstractOptimalityCondition.residual] (same structure as
    the parameters) and set `symmetric` when $\partial F/\partial w$ is symmetric. Override
    [`linearize`][implicitfn.AbstractOptimalityCondition.linearize] to offer cheaper or
    approximate Jacobians.

    ```python
    >>> import torch, implicitfn
    >>> condition = implicitfn.root(lambda w, h: w - h)     # w*(h) = h
    >>> condition.residual(torch.ones(2), torch.ones(2))
    tensor([0., 0.])
    ```
    """

    symmetric: bool = False

    @abc.abstractmethod
    def residual(self, params: Tree, hparams: Tree, *args: Any) -> Tree:
        """$F(w, \\lambda, \\ldots)$, a tree with the structure of `params`."""

    def linearize(
        self, curvature: AbstractCurvature, params: Tree, hparams: Tree, *args: Any
    ) -> AbstractLinearOperator:
        r"""$A = \partial F / \partial w$ at the point, as an operator, using `curvature`."""
        self.check_curvature(curvature)
        mode = getattr(curvature, "mode", "reverse-over-reverse")

        def of_params(w: Tree) -> Tree:
            return self.residual(w, hparams, *args)

        return jacobian_operator(of_params, params, symmetric=self.symmetric, mode=mode)

    def positive_semidefinite(self, curvature: AbstractCurvature) -> bool:
        """Whether $\\partial F/\\partial w$ built with `curvature` is positive semidefinite
        everywhere (then CG applies); the default solver follows this declared structure."""
        return False

    def check_curvature(self, curvature: AbstractCurvature) -> None:
        """Raise before any computing when `curvature` cannot serve this condition.

        A curvature approximates the Hessian of a training loss; a condition without one has
        only its exact Jacobian, which [`Hessian`][implicitfn.Hessian] stands for here.
        """
        if not isinstance(curvature, Hessian):
            raise TypeError(
                f"curvature: {type(curvature).__name__} approximates the Hessian of a training "
                f"loss and applies to stationarity(...) only, not to {type(self).__name__}; use "
                "curvature=implicitfn.Hessian() (the exact Jacobian)."
            )


@dataclasses.dataclass(frozen=True)
class Stationarity(AbstractOptimalityCondition):
    r"""$F = \nabla_w L(w, \lambda, \ldots)$; made by [`stationarity`][implicitfn.stationarity]."""

    loss: Callable[..., torch.Tensor]
    convex: bool = False
    symmetric = True

    def residual(self, params, hparams, *args):
        return grad(scalar_loss(self.loss, "loss"))(params, hparams, *args)

    def positive_semidefinite(self, curvature: AbstractCurvature) -> bool:
        return self.convex or curvature.positive_semidefinite

    def linearize(self, curvature, params, hparams, *args):
        return curvature.linearize(self.loss, params, hparams, *args)

    def check_curvature(self, curvature):
        if isinstance(curvature, GaussNewton):
            if not isinstance(self.loss, CompositeLoss):
                raise TypeError(
                    f"curvature: GaussNewton needs stationarity(implicitfn.CompositeLoss(predict=..., "
                    f"output_loss=..., penalty=...)), got a loss of type {type(self.loss).__name__}; "
                    "state the split or use curvature=implicitfn.Hessian()."
                )


@dataclasses.dataclass(frozen=True)
class FixedPointCondition(AbstractOptimalityCondition):
    r"""$F = w - T(w, \lambda, \ldots)$; made by [`fixed_point`][implicitfn.fixed_point]."""

    mapping: Callable[..., Tree]

    def residual(self, params, hparams, *args):
        return tree_sub(params, self.mapping(params, hparams, *args))


@dataclasses.dataclass(frozen=True)
class RootCondition(AbstractOptimalityCondition):
    r"""A user-written $F$; made by [`root`][implicitfn.root]."""

    function: Callable[..., Tree]
    symmetric: bool = False

    def residual(self, params, hparams, *args):
        return self.function(params, hparams, *args)


def _check_callable(fn: Any, name: str, what: str) -> None:
    if not callable(fn):
        raise TypeError(f"{name}: expected a callable {what}, got {type(fn).__name__}.")


def stationarity(
    loss: Callable[..., torch.Tensor], *, convex: bool = False
) -> AbstractOptimalityCondition:
    r"""The inner solution is a stationary point of `loss`: $F = \nabla_w L(w, \lambda, \ldots) = 0$.

    $\partial F/\partial w$ is the Hessian of the loss (symmetric), so every solver applies,
    and [`GaussNewton`][implicitfn.GaussNewton] applies when `loss` is a
    [`CompositeLoss`][implicitfn.CompositeLoss].

    **Arguments:**

    - `loss`: `(params, hparams, *args) -> scalar tensor`, the training loss including any
      regulariser that depends on the hyperparameters.
    - `convex`: declare the loss convex in the parameters (ridge, logistic regression): its
      Hessian is then positive semidefinite everywhere, and the default solver of
      [`ImplicitAdjoint`][implicitfn.ImplicitAdjoint] is CG instead of MINRES. Leave `False`
      for a network.

    **Returns:** an [`AbstractOptimalityCondition`][implicitfn.AbstractOptimalityCondition].

    ```python
    >>> import torch, implicitfn
    >>> condition = implicitfn.stationarity(lambda w, h: ((w - h) ** 2).sum())
    >>> condition.residual(torch.zeros(2), torch.ones(2))
    tensor([-2., -2.])
    ```
    """
    _check_callable(loss, "loss", "(params, hparams, *args) -> scalar")
    if not isinstance(convex, bool):
        raise TypeError(f"convex: expected a bool, got {type(convex).__name__}.")
    return Stationarity(loss, convex)


def fixed_point(mapping: Callable[..., Tree]) -> AbstractOptimalityCondition:
    r"""The inner solution is a fixed point $w = T(w, \lambda, \ldots)$, i.e. $F = w - T = 0$.

    $\partial F/\partial w = I - \partial T/\partial w$ is not symmetric, so
    [`CG`][implicitfn.CG] is refused; use [`FixedPoint`][implicitfn.FixedPoint] (with
    $\alpha = 1$ it is the classical adjoint fixed-point iteration, convergent when $T$ is a
    contraction) or [`Dense`][implicitfn.Dense].

    **Arguments:**

    - `mapping`: $T$, `(params, hparams, *args) -> params`.

    ```python
    >>> import torch, implicitfn
    >>> condition = implicitfn.fixed_point(lambda w, h: 0.5 * w + h)   # w* = 2h
    >>> condition.residual(torch.tensor([2.0]), torch.tensor([1.0]))
    tensor([0.])
    ```
    """
    _check_callable(mapping, "mapping", "T(params, hparams, *args) -> params")
    return FixedPointCondition(mapping)


def root(function: Callable[..., Tree], *, symmetric: bool = False) -> AbstractOptimalityCondition:
    r"""A user-written optimality condition $F(w, \lambda, \ldots) = 0$.

    **Arguments:**

    - `function`: $F$, `(params, hparams, *args) -> tree with the structure of params`.
    - `symmetric`: declare $\partial F/\partial w$ symmetric (then [`CG`][implicitfn.CG] is
      allowed). Leave `False` unless it is true: CG on a non-symmetric operator returns wrong
      answers.

    ```python
    >>> import torch, implicitfn
    >>> condition = implicitfn.root(lambda w, h, x: x * w - h, symmetric=True)
    >>> condition.residual(torch.ones(2), torch.ones(2), torch.tensor(3.0))
    tensor([2., 2.])
    ```
    """
    _check_callable(function, "function", "F(params, hparams, *args) -> params-shaped tree")
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric: expected a bool, got {type(symmetric).__name__}.")
    return RootCondition(function, symmetric)


@dataclasses.dataclass(frozen=True)
class KeywordsLast:
    """`fn` with its last `len(names)` extra arguments passed as keywords `names`.

    The decorated function may be called with keyword arguments (`fit(p, h, x=x, y=y)`); the
    backward pass passes them positionally after the others, and this calls the user's function
    as they wrote it. A frozen dataclass, so that equal wrappers compare equal (compiled graphs
    are keyed by the condition).
    """

    fn: Callable[..., Any]
    names: tuple[str, ...]

    def __call__(self, first: Any, hparams: Any, *args: Any) -> Any:
        positional, keywords = (
            args[: len(args) - len(self.names)],
            args[len(args) - len(self.names) :],
        )
        return self.fn(first, hparams, *positional, **dict(zip(self.names, keywords, strict=True)))


# What a user function of a built-in condition takes first and returns, for `map_functions`:
# the params, giving a scalar or the model's outputs (a loss, `predict`, `penalty`); the model's
# outputs (`output_loss`); the params, giving a tree like them (a fixed-point map, a root function).
Role = Literal["of_params", "of_outputs", "params_to_params"]


def map_functions(
    condition: AbstractOptimalityCondition,
    wrap: Callable[[Callable[..., Any], Role], Callable[..., Any]],
) -> AbstractOptimalityCondition | None:
    """The same built-in condition with each user function `fn` replaced by `wrap(fn, role)`
    (`role`: see `Role`); None for a user-written condition, whose functions implicitfn does
    not know."""
    if type(condition) is Stationarity:
        loss = condition.loss
        if isinstance(loss, CompositeLoss):
            return dataclasses.replace(
                condition,
                loss=CompositeLoss(
                    predict=wrap(loss.predict, "of_params"),
                    output_loss=wrap(loss.output_loss, "of_outputs"),
                    penalty=None if loss.penalty is None else wrap(loss.penalty, "of_params"),
                ),
            )
        return dataclasses.replace(condition, loss=wrap(loss, "of_params"))
    if type(condition) is FixedPointCondition:
        return FixedPointCondition(wrap(condition.mapping, "params_to_params"))
    if type(condition) is RootCondition:
        return RootCondition(wrap(condition.function, "params_to_params"), condition.symmetric)
    return None


def bind_keywords(
    condition: AbstractOptimalityCondition, names: tuple[str, ...]
) -> AbstractOptimalityCondition:
    """The same condition taking the keyword arguments `names` as its last positional ones."""
    if not names:
        return condition
    bound = map_functions(condition, lambda fn, role: KeywordsLast(fn, names))
    if bound is None:
        raise TypeError(
            f"keyword arguments {list(names)}: {type(condition).__name__} is not a built-in "
            "condition, so implicitfn cannot pass them to it; pass them positionally."
        )
    return bound


@dataclasses.dataclass(frozen=True, eq=False)
class SameDraws:
    """`fn` evaluated with the global RNGs set to one saved state, which they keep afterwards.

    A training loss with dropout or random augmentation draws new numbers at each evaluation,
    so the products of one backward pass would see different random operators. The backward
    pass wraps the condition's functions in this, so that every evaluation in it sees the same
    draws (torch.func's `randomness="same"`, across evaluations), and the user's random stream
    does not move.
    """

    fn: Callable[..., Any]
    cpu: torch.Tensor
    cuda: tuple[torch.Tensor, ...]

    @classmethod
    def now(cls, fn: Callable[..., Any]) -> SameDraws:
        cuda = tuple(torch.cuda.get_rng_state_all()) if torch.cuda.is_initialized() else ()
        return cls(fn, torch.random.get_rng_state(), cuda)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.random.fork_rng(devices=range(len(self.cuda))):
            torch.random.set_rng_state(self.cpu)
            if self.cuda:
                torch.cuda.set_rng_state_all(list(self.cuda))
            return self.fn(*args, **kwargs)


def with_same_draws(condition: AbstractOptimalityCondition) -> AbstractOptimalityCondition:
    """`condition` with every evaluation drawing the random numbers of this moment (see
    `SameDraws`); a user-written condition is returned as it is."""
    wrapped = map_functions(condition, lambda fn, role: SameDraws.now(fn))
    return condition if wrapped is None else wrapped


def on_leaves(
    condition: AbstractOptimalityCondition, spec: pytree.TreeSpec
) -> AbstractOptimalityCondition | None:
    """The same condition with the parameters given as a flat list of tensors, or None.

    Solvers then iterate on plain lists, so that no TensorDict is taken apart or built inside a
    solver step (measured: most of the time of a small problem's solve). Only the built-in
    conditions are rewritten; a user subclass may override `linearize`, so it keeps its trees.
    """

    def tree(flat: list[torch.Tensor]) -> Tree:
        return pytree.tree_unflatten(flat, spec)

    def on_flat(fn: Callable[..., Any], role: Role) -> Callable[..., Any]:
        if role == "of_outputs":  # takes no params: as it is
            return fn
        if role == "of_params":
            return lambda flat, *rest: fn(tree(flat), *rest)
        return lambda flat, *rest: pytree.tree_leaves(fn(tree(flat), *rest))

    return map_functions(condition, on_flat)


def _selected_inputs(
    condition: AbstractOptimalityCondition,
    hparams: Tree,
    args: Sequence[Any],
    selected: Sequence[bool],
) -> tuple[Callable[..., Tree], Callable[..., Any], list[Any], list[int]]:
    """`(F(w, *chosen), chosen -> (hparams, args), leaves of (hparams, args), positions of the
    chosen leaves)`."""
    flat, spec = pytree.tree_flatten((hparams, tuple(args)))
    positions = [i for i, chosen in enumerate(selected) if chosen]

    def inputs(*chosen: torch.Tensor) -> tuple[Tree, tuple[Any, ...]]:
        full = list(flat)
        for i, value in zip(positions, chosen, strict=True):
            full[i] = value
        return pytree.tree_unflatten(full, spec)

    def of_params_and_chosen(params: Tree, *chosen: torch.Tensor) -> Tree:
        h, a = inputs(*chosen)
        return condition.residual(params, h, *a)

    return of_params_and_chosen, inputs, flat, positions


def plain_autograd(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether eager `torch.autograd` may stand in for `torch.func` on these inputs: no transform
    is active and no input carries an outer graph that results must stay connected to.

    Measured on the comparison problems: a gradient by `torch.func.grad` costs 25-35% more
    than the same gradient by `torch.autograd.grad` (the functorch wrapping of every tensor).
    """
    if under_transform() or torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _scatter(values: Sequence[Any], positions: Sequence[int], size: int) -> list[Any]:
    result: list[Any] = [None] * size
    for i, value in zip(positions, values, strict=True):
        result[i] = value
    return result


def mixed_product(
    condition: AbstractOptimalityCondition,
    params: Tree,
    hparams: Tree,
    args: Sequence[Any],
    selected: Sequence[bool],
    *,
    cotangent: Tree | None = None,
    tangents: Sequence[torch.Tensor | None] | None = None,
) -> Any:
    r"""Products with $B = \partial F/\partial(\lambda, \mathrm{args})$ over selected leaves.

    The leaves are those of `pytree.tree_flatten((hparams, tuple(args)))`; `selected` marks the
    ones to differentiate. With `cotangent` $u$ it returns the list $B^\top u$ (None where not
    selected); with `tangents` it returns the tree $B\,\dot\lambda$.
    """
    function, _, flat, positions = _selected_inputs(condition, hparams, args, selected)

    def of_selected(*chosen: torch.Tensor) -> Tree:
        return function(params, *chosen)

    primals = tuple(flat[i] for i in positions)
    if cotangent is not None:
        _, pullback = vjp(of_selected, *primals)
        return _scatter(pullback(cotangent), positions, len(flat))
    assert tangents is not None
    return jvp(of_selected, primals, tuple(tangents[i] for i in positions))[1]


def linearize_reverse(
    condition: AbstractOptimalityCondition,
    params: list[torch.Tensor],
    hparams: Tree,
    args: Sequence[Any],
    selected: Sequence[bool],
) -> tuple[
    Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], list[Any]], torch.Tensor
]:
    r"""$u \mapsto A^\top u$, $u \mapsto B^\top u$ and the value $F(w, \lambda)$ (raveled),
    from one linearisation of $F$ in $(w, \lambda)$.

    The exact (reverse-over-reverse) reverse pass needs both products of the same Jacobian;
    linearising $F$ once instead of once per product type saves one evaluation of $F$ (for
    stationarity, one gradient) per hypergradient. `params` is a list of leaves that
    `_tree.can_ravel` accepts, and both products take $u$ raveled into one vector (`A^T u` is
    one too), so that a product is a single backward call with no tree in sight. `selected`
    marks the leaves of `pytree.tree_flatten((hparams, tuple(args)))` that $B^\top u$ is
    wanted for; it returns them as `mixed_product` does.

    Eagerly, when no input carries an outer graph that the result must stay connected to, $F$
    is recorded with plain autograd and each product asks only for the cotangents it needs:
    $A^\top u$ skips the $\lambda$ branch and $B^\top u$ costs a fraction of a product (the
    engine prunes what it does not need). Under `torch.func` transforms, or with an outer graph
    (higher-order derivatives), one `torch.func.vjp` in $(w, \lambda)$ serves both, and every
    $A^\top u$ also computes the (discarded) $B^\top u$: measured +4% per product on an MLP.
    """
    function, inputs, flat, positions = _selected_inputs(condition, hparams, args, selected)
    primals = [flat[i] for i in positions]
    shapes = tuple(p.shape for p in params)

    def raveled(vector: torch.Tensor, *chosen: torch.Tensor) -> torch.Tensor:
        return ravel_leaves(leaves(function(unravel_leaves(vector, shapes), *chosen)))

    vector = ravel_leaves(params)
    if not plain_autograd([*params, *primals]):
        value, pullback = vjp(raveled, vector, *primals)
        return (
            lambda u: pullback(u)[0],
            lambda u: _scatter(pullback(u)[1:], positions, len(flat)),
            value,
        )

    with torch.enable_grad():
        vector = vector.detach().requires_grad_()
        chosen = [t.detach().requires_grad_() for t in primals]
        if type(condition) is Stationarity:  # F = grad L by autograd itself: no functorch level
            h, a = inputs(*chosen)
            loss = scalar_loss(condition.loss, "loss")(unravel_leaves(vector, shapes), h, *a)
            if loss.requires_grad:
                (residual,) = torch.autograd.grad(
                    loss, vector, create_graph=True, materialize_grads=True
                )
            else:  # constant in w and in the chosen inputs
                residual = torch.zeros_like(vector)
        else:
            residual = raveled(vector, *chosen)

    def pull(u: torch.Tensor, wrt: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if not wrt or not residual.requires_grad:  # no input, or F does not depend on them
            return tuple(torch.zeros_like(t) for t in wrt)
        return torch.autograd.grad(
            residual, wrt, u, retain_graph=True, allow_unused=True, materialize_grads=True
        )

    return (
        lambda u: pull(u, [vector])[0],
        lambda u: _scatter(pull(u, chosen), positions, len(flat)),
        residual.detach(),
    )


def cross_vjp(
    condition: AbstractOptimalityCondition, cotangent: Tree, params: Tree, hparams: Tree, *args: Any
) -> tuple[Tree, tuple[Any, ...]]:
    r"""The mixed product $B^\top u$ with $B = \partial F/\partial(\lambda, \mathrm{args})$.

    For [`stationarity`][implicitfn.stationarity] this is
    $\nabla^2_{\lambda w} L\, u$, the cross term of the implicit hypergradient
    $\frac{dL_V}{d\lambda} = \frac{\partial L_V}{\partial\lambda} - B^\top v$.

    **Arguments:**

    - `condition`: an [`AbstractOptimalityCondition`][implicitfn.AbstractOptimalityCondition].
    - `cotangent`: $u$, a tree with the structure of `params`.
    - `params`, `hparams`, `*args`: the point.

    **Returns:** `(hparams_cotangent, args_cotangents)`; the latter is a tuple with one entry per
    argument, `None` for arguments that are not floating-point tensors.

    ```python
    >>> import torch, implicitfn
    >>> condition = implicitfn.stationarity(lambda w, h: 0.5 * (h * w ** 2).sum())
    >>> implicitfn.cross_vjp(condition, torch.ones(2), torch.tensor([1.0, 2.0]), torch.ones(2))
    (tensor([1., 2.]), ())
    ```
    """
    flat, spec = pytree.tree_flatten((hparams, tuple(args)))
    selected = [isinstance(leaf, torch.Tensor) and leaf.is_floating_point() for leaf in flat]
    result = mixed_product(condition, params, hparams, args, selected, cotangent=cotangent)
    hparams_bar, args_bar = pytree.tree_unflatten(result, spec)
    return hparams_bar, tuple(args_bar)
