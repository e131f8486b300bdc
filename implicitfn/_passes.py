"""The implicit passes, each written once as a pure function of tensors.

[`ImplicitAdjoint`][implicitfn.ImplicitAdjoint] runs them eagerly, and `torch.compile` traces
these same functions (see `_compile`). The adjoint's configuration is read from the object it
passes in (`solver`, `curvature`, `damping`, and its data-parallel reduction).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.utils._pytree as pytree

from implicitfn._curvature import AbstractCurvature, CompositeLoss, Hessian
from implicitfn._distributed import DataParallel
from implicitfn._inputs import check_finite
from implicitfn._linear_solve import AbstractLinearSolver
from implicitfn._linear_solve._estimates import random_matrix
from implicitfn._operator import (
    SYMMETRIC,
    AbstractLinearOperator,
    FunctionLinearOperator,
    RaveledOperator,
    ResamplingOperator,
    damp,
)
from implicitfn._optimality import (
    AbstractOptimalityCondition,
    Stationarity,
    linearize_reverse,
    mixed_product,
    on_leaves,
)
from implicitfn._solution import SolveInfo, concrete
from implicitfn._tree import (
    Tree,
    can_ravel,
    leaves,
    ravel_leaves,
    same_structure,
    tree_map,
    tree_norm,
    tree_ravel,
    tree_sub,
    unravel_leaves,
)


class PassConfig(Protocol):
    """What the passes read of an [`ImplicitAdjoint`][implicitfn.ImplicitAdjoint]."""

    curvature: AbstractCurvature
    damping: float
    inner_rtol: float | None

    def solver_for(self, condition: AbstractOptimalityCondition) -> AbstractLinearSolver: ...

    @property
    def reduction(self) -> DataParallel | None: ...


def unbatched(tree: Tree) -> bool:
    """No leaf carries a hidden vmap batch dimension."""
    return all(concrete(leaf).shape == leaf.shape for leaf in leaves(tree))


def usable(initial: Tree | None, rhs: Tree) -> Tree | None:
    """A remembered solution when it fits the system being solved now (shape, dtype, device)."""
    if initial is None or not unbatched(rhs) or not same_structure(initial, rhs):
        return None
    pairs = zip(leaves(initial), leaves(rhs), strict=True)
    if any(a.dtype != b.dtype or a.device != b.device for a, b in pairs):
        return None
    return initial


@dataclasses.dataclass
class Linearised:
    """The condition linearised at a point, in the layout the solver works in.

    The built-in conditions are rewritten on leaf lists (`on_leaves`) and, when the leaves
    share a dtype and device, the system is solved on one raveled vector: every solver step is
    then a few single-tensor kernels instead of a walk over a TensorDict.
    """

    operator: AbstractLinearOperator  # A (damped, averaged over ranks), possibly raveled
    cross: Callable[[Tree], list[Any]]  # u -> B^T u over the selected leaves
    rhs: Tree  # the cotangent in the solver's layout
    point: Tree  # the solution w* in the solver's layout
    value: Callable[[], Tree]  # F(w*, lambda) in the solver's layout

    @classmethod
    def at(
        cls,
        adjoint: PassConfig,
        condition: AbstractOptimalityCondition,
        solution: Tree,
        hparams: Tree,
        args: Sequence[Any],
        cotangent: Tree,
        selected: Sequence[bool],
    ) -> Linearised:
        reduction, curvature = adjoint.reduction, adjoint.curvature
        spec = pytree.tree_structure(solution)
        flat = on_leaves(condition, spec) if curvature.works_on_leaves else None
        params, rhs, shapes = solution, cotangent, None
        if flat is not None:
            condition, params, rhs = flat, leaves(solution), leaves(cotangent)
            if can_ravel([*params, *rhs]):
                shapes = tuple(p.shape for p in params)
                rhs = ravel_leaves(rhs)
        if reduction is not None:  # then every vector the solver sees is the same on all ranks
            rhs = reduction.mean(rhs)
        point = params if shapes is None else ravel_leaves(params)

        def finish(operator: AbstractLinearOperator) -> AbstractLinearOperator:
            if reduction is not None:
                operator = reduction.operator(operator)
            return damp(operator, adjoint.damping)

        def jacobian(*batch: Any) -> AbstractLinearOperator:
            operator = condition.linearize(curvature, params, hparams, *batch)
            return operator if shapes is None else RaveledOperator(operator, shapes, rhs)

        def linearize(*batch: Any) -> AbstractLinearOperator:
            return finish(jacobian(*batch))

        def value() -> Tree:
            residual = condition.residual(params, hparams, *args)
            return residual if shapes is None else ravel_leaves(leaves(residual))

        if shapes is not None and curvature.linearizes_jointly:
            # One linearisation of F in (w, lambda) serves A^T u, B^T u and F itself.
            transpose_product, cross, joint_value = linearize_reverse(
                condition, params, hparams, args, selected
            )
            tags = {SYMMETRIC} if condition.symmetric else set()
            forward = transpose_product if condition.symmetric else jacobian(*args).mv
            operator = finish(FunctionLinearOperator(forward, rhs, transpose_product, tags))
            value = functools.partial(_identity, joint_value)
        else:
            operator = linearize(*args)

            def cross(u: Tree) -> list[Any]:
                u = u if shapes is None else unravel_leaves(u, shapes)
                return mixed_product(condition, params, hparams, args, selected, cotangent=u)

        return cls(ResamplingOperator(operator, linearize), cross, rhs, point, value)

    def optimality(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(||F(w*)||, ||A p||)` with p = w*, or a fixed random direction where w* = 0: how far
        the point is from satisfying the condition, and the size of F's linear part to compare
        it with (0 only when F does not depend on the parameters). One product."""
        flat, unravel = tree_ravel(self.point)
        direction = random_matrix("gaussian", flat.numel(), 1, 0, flat.dtype, flat.device)[:, 0]
        probe = unravel(torch.where(torch.linalg.vector_norm(flat) > 0, flat, direction))
        return tree_norm(self.value()), tree_norm(self.operator.mv(probe))

    def residual_norm(self, solution: Tree) -> torch.Tensor:
        r"""$\lVert A^\top v - \bar w\rVert$ for `solution` in the solver's layout."""
        return tree_norm(tree_sub(self.operator.transpose().mv(solution), self.rhs))


Preconditioning = Callable[
    [AbstractLinearOperator, Callable[[Tree], Tree] | None], tuple[Callable[[Tree], Tree], int]
]


def penalty_of(condition: AbstractOptimalityCondition) -> Callable[..., torch.Tensor] | None:
    """The penalty of `stationarity(CompositeLoss(..., penalty=...))`, else None."""
    loss = condition.loss if type(condition) is Stationarity else None
    return loss.penalty if isinstance(loss, CompositeLoss) else None


def penalty_hessian(
    condition: AbstractOptimalityCondition,
    solution: Tree,
    hparams: Tree,
    args: Sequence[Any],
    layout: Tree,
) -> Callable[[Tree], Tree] | None:
    r"""$v \mapsto \nabla^2_w \mathrm{penalty}(w^*, \lambda)\,v$ in the solver's layout (that of
    `layout`: raveled or the tree itself; a kept preconditioner needs one dtype and device, so
    never a leaf list), or None without a penalty. Nothing is computed until a build of a kept
    preconditioner calls it."""
    penalty = penalty_of(condition)
    if penalty is None:
        return None
    raveled = isinstance(layout, torch.Tensor) and not isinstance(solution, torch.Tensor)

    def product(v: Tree) -> Tree:
        tree = tree_ravel(solution)[1](v) if raveled else v
        result = Hessian().linearize(penalty, solution, hparams, *args).mv(tree)
        return tree_ravel(result)[0] if raveled else result

    return product


def solve_with(
    solver: AbstractLinearSolver,
    operator: AbstractLinearOperator,
    rhs: Tree,
    initial: Tree | None,
    precondition: Preconditioning | None,
    *,
    transpose: bool = False,
    penalty: Callable[[Tree], Tree] | None = None,
) -> tuple[Tree, SolveInfo]:
    """`solver.solve`, from `initial` when it fits, with the adjoint's kept preconditioner (its
    build's products counted in `num_steps`; `penalty`: the penalty's Hessian product, for a
    scaled one) unless the right-hand side is vmapped."""
    if precondition is not None and unbatched(rhs):
        apply, setup = precondition(operator, penalty)
        solver = dataclasses.replace(solver, preconditioner=apply)
        solved, info = solver.solve(operator, rhs, usable(initial, rhs), transpose=transpose)
        return solved, dataclasses.replace(info, num_steps=info.num_steps + setup)
    return solver.solve(operator, rhs, usable(initial, rhs), transpose=transpose)


def implicit_reverse(
    adjoint: PassConfig,
    condition: AbstractOptimalityCondition,
    solution: Tree,
    hparams: Tree,
    args: tuple[Any, ...],
    cotangent: Tree,
    initial: Tree | None,
    *,
    selected: Sequence[bool],
    precondition: Preconditioning | None = None,
) -> tuple[list[Any], Tree, SolveInfo]:
    r"""The reverse pass: `(-B^T v, v, info)` with $A^\top v = \bar w$ (`cotangent`).

    `v` is returned in the solver's layout (a raveled vector or a leaf list where the built-in
    conditions allow), which is also the layout of `initial`, the starting guess (used only if
    it fits). A pure function of its tensors: eager calls and `torch.compile` run this code
    (`precondition`, the adjoint's kept preconditioner, only eagerly).
    """
    problem = Linearised.at(adjoint, condition, solution, hparams, args, cotangent, selected)
    solver = adjoint.solver_for(condition)
    penalty = penalty_hessian(condition, solution, hparams, args, problem.rhs)
    solved, info = solve_with(
        solver,
        problem.operator,
        problem.rhs,
        initial,
        precondition,
        transpose=True,
        penalty=penalty,
    )
    products = problem.cross(tree_map(torch.neg, solved))
    if adjoint.reduction is None and adjoint.inner_rtol is not None:  # else not measured
        norm, scale = problem.optimality()
        info = dataclasses.replace(info, optimality_norm=norm, optimality_scale=scale)
    return products, solved, info


def _identity(value: Any) -> Any:
    return value


def given_cotangent(solution: Tree, hparams: Tree, cotangent: Tree) -> tuple[Tree, None]:
    """The cotangent of the decorator's reverse pass: given, nothing carried."""
    return cotangent, None


def fused_reverse(
    adjoint: PassConfig,
    condition: AbstractOptimalityCondition,
    cotangent_of: Callable[[Tree, Tree, Any], tuple[Tree, Any]],
    solution: Tree,
    hparams: Tree,
    args: tuple[Any, ...],
    extra: Any,
    initial: Tree | None,
    *,
    selected: Sequence[bool],
    precondition: Preconditioning | None = None,
) -> tuple[Any, list[Any], Tree, SolveInfo]:
    """`cotangent_of` then `implicit_reverse`: one function for eager calls and for one graph."""
    cotangent, carried = cotangent_of(solution, hparams, extra)
    if not torch.compiler.is_compiling():  # a compiled graph cannot raise; its check does
        check_finite(
            cotangent,
            "dL_V/dw",
            "the outer loss's gradient with respect to the inner "
            "solution is not finite: check the outer loss at this solution.",
        )
    products, solved, info = implicit_reverse(
        adjoint,
        condition,
        solution,
        hparams,
        args,
        cotangent,
        initial,
        selected=selected,
        precondition=precondition,
    )
    return carried, products, solved, info


def implicit_forward(
    adjoint: PassConfig,
    condition: AbstractOptimalityCondition,
    solution: Tree,
    hparams: Tree,
    args: tuple[Any, ...],
    tangents: Sequence[torch.Tensor | None],
    initial: Tree | None,
    precondition: Preconditioning | None = None,
) -> tuple[Tree, SolveInfo]:
    r"""The forward pass: $\dot w$ with $A\dot w = -B\dot\lambda$, and the solve's info."""
    selected = [t is not None for t in tangents]
    rhs = mixed_product(condition, solution, hparams, args, selected, tangents=list(tangents))
    rhs = tree_map(torch.neg, rhs)
    reduction = adjoint.reduction
    if reduction is not None:
        rhs = reduction.mean(rhs)

    def linearize(*batch: Any) -> AbstractLinearOperator:
        operator = condition.linearize(adjoint.curvature, solution, hparams, *batch)
        if reduction is not None:
            operator = reduction.operator(operator)
        return damp(operator, adjoint.damping)

    operator = ResamplingOperator(linearize(*args), linearize)
    penalty = penalty_hessian(condition, solution, hparams, args, rhs)
    solver = adjoint.solver_for(condition)
    return solve_with(solver, operator, rhs, initial, precondition, penalty=penalty)
