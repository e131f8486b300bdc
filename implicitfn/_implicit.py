"""implicit_diff and hypergradient: the implicit function theorem behind one autograd boundary.

At an inner solution $w^*$ with $F(w^*, \\lambda) = 0$, $A = \\partial F/\\partial w$ and
$B = \\partial F/\\partial \\lambda$, reverse mode needs $v = A^{-\\top} \\bar w$ and returns
$-B^\\top v$; forward mode returns $\\dot w = -A^{-1} B \\dot\\lambda$.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.func import grad

from implicitfn._adjoint import AbstractAdjoint, ImplicitAdjoint
from implicitfn._curvature import scalar_loss
from implicitfn._inputs import (
    check_args_finite,
    check_finite,
    check_gradients,
    check_tree,
    check_unmodified,
    detached,
    input_names,
    private_copy,
    versions,
)
from implicitfn._optimality import (
    AbstractOptimalityCondition,
    bind_keywords,
    plain_autograd,
    stationarity,
)
from implicitfn._solution import SolveInfo, all_finite
from implicitfn._tree import Tree, describe, leaves, same_structure, tree_add

__all__ = ["hypergradient", "implicit_diff"]


_TENSOR = object()  # marks the leaves of (hparams, args) that are tensors passed to the Function


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How the flat tensors given to the autograd Function map back to user trees."""

    adjoint: AbstractAdjoint
    condition: AbstractOptimalityCondition
    solution_spec: pytree.TreeSpec
    inputs_spec: pytree.TreeSpec
    constants: tuple[Any, ...]  # inputs leaves; _TENSOR where the leaf is a tensor passed to apply
    num_solution: int
    input_names: list[str]  # of the leaves of (hparams, args), for messages

    def rebuild(self, tensors: Sequence[torch.Tensor]) -> tuple[Tree, Tree, tuple[Any, ...]]:
        solution = pytree.tree_unflatten(list(tensors[: self.num_solution]), self.solution_spec)
        remaining = iter(tensors[self.num_solution :])
        flat = [next(remaining) if c is _TENSOR else c for c in self.constants]
        hparams, args = pytree.tree_unflatten(flat, self.inputs_spec)
        return solution, hparams, args


class _ImplicitBoundary(torch.autograd.Function):
    """Identity on the inner solution; its derivatives come from the implicit function theorem.

    Inputs: (layout, *solution leaves, *tensor leaves of (hparams, args)). The solution is
    detached, so the inner solver's graph is never kept.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(layout: _Layout, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t.clone() for t in tensors[: layout.num_solution])

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        layout, *tensors = inputs
        ctx.layout = layout
        ctx.save_for_backward(*tensors)
        ctx.save_for_forward(*tensors)

    @staticmethod
    def backward(ctx, *solution_cotangents: torch.Tensor):
        layout: _Layout = ctx.layout
        tensors = ctx.saved_tensors
        wanted = list(ctx.needs_input_grad[1 + layout.num_solution :])
        none = (None,) * (1 + len(tensors))
        if not any(wanted):
            return none
        solution, hparams, args = layout.rebuild(tensors)
        cotangent = pytree.tree_unflatten(list(solution_cotangents), layout.solution_spec)
        selected = _select(layout.constants, wanted)
        products, _ = layout.adjoint.reverse(
            layout.condition, solution, hparams, args, cotangent, selected
        )
        check_gradients(products, lambda: layout.input_names)
        input_grads = [g for g, c in zip(products, layout.constants, strict=True) if c is _TENSOR]
        return (None,) * (1 + layout.num_solution) + tuple(input_grads)

    @staticmethod
    def jvp(ctx, *tangents: torch.Tensor | None):
        layout: _Layout = ctx.layout
        tensors = ctx.saved_tensors
        input_tangents = list(tangents[1 + layout.num_solution :])
        solution, hparams, args = layout.rebuild(tensors)
        present = [t is not None for t in input_tangents]
        if not any(present):
            return tuple(torch.zeros_like(t) for t in tensors[: layout.num_solution])
        full_tangents = _scatter(layout.constants, input_tangents)
        direction = layout.adjoint.forward(layout.condition, solution, hparams, args, full_tangents)
        # The tangent has the primal's dtype, whatever the dtype of the hyperparameters.
        return tuple(
            d.to(t.dtype)
            for d, t in zip(leaves(direction), tensors[: layout.num_solution], strict=True)
        )


def _select(constants: Sequence[Any], flags: Sequence[bool]) -> list[bool]:
    """Spread flags over the tensor inputs to all leaves of (hparams, args)."""
    flags_iter = iter(flags)
    return [bool(next(flags_iter)) if c is _TENSOR else False for c in constants]


def _scatter(constants: Sequence[Any], values: Sequence[Any]) -> list[Any]:
    values_iter = iter(values)
    return [next(values_iter) if c is _TENSOR else None for c in constants]


def _autograd_gradient(
    loss: Callable[..., torch.Tensor], params: Tree, hparams: Tree, args: tuple[Any, ...]
) -> tuple[Tree, Tree]:
    """`grad(loss, argnums=(0, 1))(params, hparams, *args)` by plain autograd (see `plain_autograd`)."""
    flat, spec = pytree.tree_flatten((params, hparams))
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in flat]
        value = loss(*pytree.tree_unflatten(inputs, spec), *args)
        if value.requires_grad:
            grads = torch.autograd.grad(value, inputs, materialize_grads=True)
        else:
            grads = tuple(torch.zeros_like(t) for t in inputs)
    return pytree.tree_unflatten(list(grads), spec)


def implicit_diff(
    condition: AbstractOptimalityCondition,
    *,
    adjoint: AbstractAdjoint | None = None,
    has_aux: bool = False,
) -> Callable[[Callable[..., Tree]], Callable[..., Tree]]:
    r"""Give an inner solver derivatives with respect to its hyperparameters and data.

    The decorated function `inner_solve(params, hparams, *args, **kwargs) -> params*` may be any
    solver (an SGD loop, `torch.optim.LBFGS`, a closed form, [`minimize`][implicitfn.minimize]).
    It receives its own detached copies of `params` and `hparams`, which it may train in place
    (`requires_grad_()` and a `torch.optim` optimiser, as usual): the caller's tensors are never
    modified, and its own autograd graph is not kept. Its result carries derivatives that
    `adjoint` computes at the returned point: by default the implicit function theorem,
    $\frac{dw^*}{d\lambda} = -A^{-1}B$ with $A = \partial F/\partial w$ and
    $B = \partial F/\partial\lambda$ of the optimality condition $F(w^*, \lambda, \ldots) = 0$.
    Gradients reach `hparams` and every floating-point tensor in `*args` and `**kwargs`; none
    reach the initial `params`.

    `params` and `hparams` may be a tensor or any tree of tensors torch knows (dict,
    TensorDict, tuple, list; `None` entries of `hparams` and the data are passed through). It
    works with `.backward()`, `torch.autograd.grad`, `torch.func.grad`, `vjp`, `jacrev`, `jvp`,
    `jacfwd` and `vmap` over batches of problems.

    **Arguments:**

    - `condition`: the optimality condition, e.g. [`stationarity`][implicitfn.stationarity]`(loss)`,
      [`fixed_point`][implicitfn.fixed_point]`(T)` or [`root`][implicitfn.root]`(F)`; it takes
      the same `(params, hparams, *args, **kwargs)` as the inner solver.
    - `adjoint`: how to differentiate through the solution:
      [`ImplicitAdjoint`][implicitfn.ImplicitAdjoint]`(...)` (default) or
      [`UnrolledAdjoint`][implicitfn.UnrolledAdjoint]`(...)`. Checked against the condition
      here, before any computing.
    - `has_aux`: the inner solver returns `(params*, aux)`; `aux` (say, a loss history) is
      returned beside the solution, detached.

    **Returns:** a decorator.

    ```python
    >>> import torch, implicitfn
    >>> def train_loss(params, hparams, x, y):
    ...     residual = x @ params["w"] - y
    ...     return 0.5 * (residual ** 2).sum() + 0.5 * (hparams["decay"] * params["w"] ** 2).sum()
    >>> adjoint = implicitfn.ImplicitAdjoint(solver=implicitfn.CG(max_steps=50))
    >>> @implicitfn.implicit_diff(implicitfn.stationarity(train_loss), adjoint=adjoint)
    ... def ridge(params, hparams, x, y):            # closed form; any solver works
    ...     matrix = x.T @ x + torch.diag(hparams["decay"])
    ...     return {"w": torch.linalg.solve(matrix, x.T @ y)}
    >>> x, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    >>> hparams = {"decay": torch.ones(3, dtype=torch.float64, requires_grad=True)}
    >>> w = ridge({"w": torch.zeros(3, dtype=torch.float64)}, hparams, x, y=y)  # keywords work
    >>> (w["w"] ** 2).sum().backward()
    >>> hparams["decay"].grad.shape
    torch.Size([3])
    ```
    """
    adjoint = _checked_adjoint(adjoint, condition)
    if not isinstance(has_aux, bool):
        raise TypeError(f"has_aux: expected a bool, got {type(has_aux).__name__}.")

    def decorator(inner_solve: Callable[..., Tree]) -> Callable[..., Tree]:
        if not callable(inner_solve):
            raise TypeError(
                f"implicit_diff decorates a function, got {type(inner_solve).__name__}."
            )
        name = getattr(inner_solve, "__name__", "the inner solver")

        @functools.wraps(inner_solve)
        def solve_with_implicit_derivatives(
            params: Tree, hparams: Tree, *args: Any, **kwargs: Any
        ) -> Tree:
            check_tree(params, "params", allow_none=False)
            check_tree(hparams, "hparams", allow_empty=True)
            check_finite(hparams, "hparams", "pass finite hyperparameters.")
            check_finite(args, "args", "clean the data before the inner solve.")
            check_finite(kwargs, "kwargs", "clean the data before the inner solve.")
            keyed = bind_keywords(condition, tuple(kwargs))  # before any computing
            adjoint.prepare()
            data_versions = versions(args), versions(kwargs)
            result = inner_solve(
                private_copy(params), private_copy(hparams), *detached(args), **detached(kwargs)
            )
            check_unmodified(args, data_versions[0], "args", name)
            check_unmodified(kwargs, data_versions[1], "kwargs", name)
            solution, aux = _split_aux(result, has_aux, name)
            if not same_structure(solution, params) or isinstance(
                solution, torch.Tensor
            ) != isinstance(params, torch.Tensor):
                raise ValueError(
                    f"{name} returned {describe(solution)}, but params is {describe(params)}; the "
                    "inner solver must return parameters with the same keys and shapes as it "
                    "was given."
                )
            check_tree(solution, f"the value returned by {name}", allow_none=False)
            if not all_finite(solution):
                raise ValueError(
                    f"{name} returned NaN/Inf parameters; the inner solve diverged (lower its "
                    "learning rate or check the data)."
                )
            everything = (*args, *kwargs.values())
            names = input_names(hparams, everything, tuple(kwargs))
            attached = _attach(adjoint, keyed, solution, hparams, everything, names)
            return (attached, detached(aux)) if has_aux else attached

        return solve_with_implicit_derivatives

    return decorator


def _split_aux(result: Any, has_aux: bool, name: str) -> tuple[Tree, Any]:
    """`(solution, aux)` from what the inner solver returned."""
    if not has_aux:
        return result, None
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TypeError(
            f"{name} must return a pair (params, aux) with has_aux=True, got "
            f"{type(result).__name__}."
        )
    return result


def _checked_adjoint(
    adjoint: AbstractAdjoint | None, condition: AbstractOptimalityCondition
) -> AbstractAdjoint:
    """The adjoint to use (the default when None), checked against the condition."""
    if adjoint is None:
        adjoint = ImplicitAdjoint()
    if not isinstance(adjoint, AbstractAdjoint):
        raise TypeError(
            f"adjoint: expected implicitfn.ImplicitAdjoint(...) or implicitfn.UnrolledAdjoint(...), "
            f"got {type(adjoint).__name__}; options such as solver= and curvature= go inside it: "
            "adjoint=implicitfn.ImplicitAdjoint(solver=implicitfn.CG())."
        )
    adjoint.check(condition)
    return adjoint


def _attach(
    adjoint: AbstractAdjoint,
    condition: AbstractOptimalityCondition,
    solution: Tree,
    hparams: Tree,
    args: Sequence[Any],
    names: list[str],
) -> Tree:
    """Route `solution` through the autograd boundary so it depends on `hparams` and `args`."""
    solution_leaves, solution_spec = pytree.tree_flatten(detached(solution))
    input_leaves, inputs_spec = pytree.tree_flatten((hparams, tuple(args)))
    constants = tuple(_TENSOR if isinstance(x, torch.Tensor) else x for x in input_leaves)
    tensors = [x for x in input_leaves if isinstance(x, torch.Tensor)]
    layout = _Layout(
        adjoint, condition, solution_spec, inputs_spec, constants, len(solution_leaves), names
    )
    outputs = _ImplicitBoundary.apply(layout, *solution_leaves, *tensors)
    return pytree.tree_unflatten(list(outputs), solution_spec)


def hypergradient(
    inner: AbstractOptimalityCondition | Callable[..., torch.Tensor],
    outer_loss: Callable[..., torch.Tensor],
    params: Tree,
    hparams: Tree,
    *,
    inner_args: Sequence[Any] = (),
    outer_args: Sequence[Any] = (),
    adjoint: AbstractAdjoint | None = None,
) -> tuple[Tree, SolveInfo | None]:
    r"""The hypergradient $\frac{dL_V}{d\lambda} = \frac{\partial L_V}{\partial\lambda} - B^\top v$, $A^\top v = \frac{\partial L_V}{\partial w}$, in one call.

    For people who do not want a decorator: give the inner solution and both losses.

    **Arguments:**

    - `inner`: the training loss `(params, hparams, *inner_args) -> scalar` (its stationarity
      is the condition) or any [`AbstractOptimalityCondition`][implicitfn.AbstractOptimalityCondition].
    - `outer_loss`: the validation objective `(params, hparams, *outer_args) -> scalar`.
    - `params`: the inner solution $w^*$.
    - `hparams`: the hyperparameters $\lambda$ (TensorDict, dict or tensor).
    - `inner_args`, `outer_args`: the extra arguments (e.g. training and validation batches).
    - `adjoint`: as in [`implicit_diff`][implicitfn.implicit_diff]. With `distributed=...`,
      `inner_args` and `outer_args` are this rank's shards and the returned hypergradient,
      direct part included, is the one of all the data. With `compile=...` the outer gradient
      is compiled too; the compiled graphs belong to the adjoint, so an outer loop that passes
      the same adjoint compiles once.

    **Returns:** `(hypergradient, info)`: a tree with the structure of `hparams` and the
    [`SolveInfo`][implicitfn.SolveInfo] of the backward solve (None with an
    [`UnrolledAdjoint`][implicitfn.UnrolledAdjoint], which solves nothing).

    ```python
    >>> import torch, implicitfn
    >>> inner = lambda w, lam: 0.5 * ((w - 1.0) ** 2).sum() + 0.5 * lam * (w ** 2).sum()
    >>> outer = lambda w, lam: (w ** 2).sum()
    >>> lam = torch.tensor(1.0, dtype=torch.float64)
    >>> w_star = torch.full((2,), 0.5, dtype=torch.float64)   # argmin: 1 / (1 + lam)
    >>> g, info = implicitfn.hypergradient(inner, outer, w_star, lam)
    >>> round(float(g), 6), bool(info.successful)               # d/dlam 2/(1+lam)^2 = -0.5
    (-0.5, True)
    ```
    """
    condition = inner if isinstance(inner, AbstractOptimalityCondition) else stationarity(inner)
    adjoint = _checked_adjoint(adjoint, condition)
    check_tree(params, "params")
    check_tree(hparams, "hparams")
    if not callable(outer_loss):
        raise TypeError(f"outer_loss: expected a callable, got {type(outer_loss).__name__}.")
    inner_args, outer_args = tuple(inner_args), tuple(outer_args)
    check_args_finite(inner_args)
    adjoint.prepare()
    flat, spec = pytree.tree_flatten((hparams, inner_args))
    num_hparams = len(leaves(hparams))
    selected = [i < num_hparams for i in range(len(flat))]
    direct_h, products, info = adjoint.reverse_from(
        condition, params, hparams, inner_args, OuterGradient(outer_loss), outer_args, selected
    )
    check_gradients(products, lambda: input_names(hparams, inner_args))
    check_finite(
        direct_h,
        "dL_V/dhparams",
        "the outer loss's gradient with respect to the "
        "hyperparameters is not finite: check the outer loss.",
    )
    implicit, _ = pytree.tree_unflatten(products, spec)  # averaged over ranks by the adjoint
    return tree_add(adjoint.mean_over_ranks(direct_h), implicit), info


@dataclasses.dataclass(frozen=True)
class OuterGradient:
    r"""`(params, hparams, outer_args) -> (dL_V/dw, dL_V/d\lambda)`: the cotangent of the reverse
    pass, and the direct part carried along. A frozen dataclass, so that the same `outer_loss`
    gives an equal object across calls (the adjoint's compiled graphs are keyed by it)."""

    outer_loss: Callable[..., torch.Tensor]

    def __call__(
        self, params: Tree, hparams: Tree, outer_args: tuple[Any, ...]
    ) -> tuple[Tree, Tree]:
        loss = scalar_loss(self.outer_loss, "outer_loss")
        if plain_autograd([*leaves(params), *leaves(hparams)]):  # eagerly, without functorch
            return _autograd_gradient(loss, params, hparams, outer_args)
        return grad(loss, argnums=(0, 1))(params, hparams, *outer_args)
