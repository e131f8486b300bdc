"""implicit_diff and hypergradient: the implicit function theorem behind one autograd boundary.

At an inner solution $w^*$ with $F(w^*, \\lambda) = 0$, $A = \\partial F/\\partial w$ and
$B = \\partial F/\\partial \\lambda$, reverse mode needs $v = A^{-\\top} \\bar w$ and returns
$-B^\\top v$; forward mode returns $\\dot w = -A^{-1} B \\dot\\lambda$.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.utils._pytree as pytree
from torch.func import grad

from implicitfn import _compile
from implicitfn._curvature import AbstractCurvature, GaussNewton, Hessian, scalar_loss
from implicitfn._distributed import DataParallel, data_parallel
from implicitfn._linear_solve import CG, AbstractLinearSolver, ResamplingOperator
from implicitfn._operator import (
    SYMMETRIC,
    AbstractLinearOperator,
    FunctionLinearOperator,
    RaveledOperator,
    damp,
)
from implicitfn._optimality import (
    AbstractOptimalityCondition,
    linearize_reverse,
    mixed_product,
    on_leaves,
    plain_autograd,
    stationarity,
)
from implicitfn._solution import (
    ImplicitSolveError,
    ImplicitSolveWarning,
    SolveInfo,
    all_finite,
    concrete,
)
from implicitfn._tree import (
    Tree,
    can_ravel,
    describe,
    leaves,
    ravel_leaves,
    same_structure,
    tree_add,
    tree_map,
    unravel_leaves,
)

__all__ = ["hypergradient", "implicit_diff"]

OnFailure = Literal["raise", "warn"]


@dataclasses.dataclass(frozen=True)
class _Backward:
    """Everything the backward solve is configured with (checked once, at decoration)."""

    condition: AbstractOptimalityCondition
    solver: AbstractLinearSolver
    curvature: AbstractCurvature
    damping: float
    on_failure: OnFailure
    callback: Callable[[SolveInfo], Any] | None
    memory: _WarmStart | None = dataclasses.field(default=None, compare=False, repr=False)
    distributed: DataParallel | None = None  # average over ranks (data sharded across them)
    compile: _compile.Compile | None = None  # see _compile: what is compiled, and the fallback

    def __post_init__(self) -> None:
        if not isinstance(self.condition, AbstractOptimalityCondition):
            raise TypeError(
                f"condition: expected an optimality condition, got {type(self.condition).__name__}; "
                "wrap a training loss with implicitfn.stationarity(loss), a map with "
                "implicitfn.fixed_point(T) or a residual with implicitfn.root(F)."
            )
        if not isinstance(self.solver, AbstractLinearSolver):
            raise TypeError(
                f"solver: expected an implicitfn linear solver such as implicitfn.CG(), got "
                f"{type(self.solver).__name__}."
            )
        if not isinstance(self.curvature, AbstractCurvature):
            raise TypeError(
                f"curvature: expected implicitfn.Hessian() or implicitfn.GaussNewton(), got "
                f"{type(self.curvature).__name__}."
            )
        if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)):
            raise TypeError(f"damping: expected a float >= 0, got {type(self.damping).__name__}.")
        if not self.damping >= 0:
            raise ValueError(f"damping: must be >= 0 (got {self.damping}); use 0 for none.")
        if self.on_failure not in ("raise", "warn"):
            raise ValueError(f"on_failure: expected 'raise' or 'warn', got {self.on_failure!r}.")
        if self.callback is not None and not callable(self.callback):
            raise TypeError(
                f"callback: expected a callable(SolveInfo), got {type(self.callback).__name__}."
            )
        if self.solver.requires_symmetric and not self.condition.symmetric:
            raise ValueError(
                f"solver: {type(self.solver).__name__} needs a symmetric Jacobian, but "
                f"{type(self.condition).__name__} has a non-symmetric one; use "
                "implicitfn.FixedPoint(), implicitfn.Dense() or implicitfn.Identity(), or declare "
                "root(F, symmetric=True) if dF/dw really is symmetric."
            )
        self.condition.check_curvature(self.curvature)
        _compile.check(self.compile, self.solver, self.distributed is not None)

    def solve(
        self, params: Tree, hparams: Tree, args: Sequence[Any], rhs: Tree, *, transpose: bool
    ) -> Tree:
        """Solve $A^\\top v = $ `rhs` (or $A v = $ `rhs`), report, and check the outcome."""
        return self._solve(params, hparams, args, rhs, transpose=transpose)[0]

    def reverse(
        self, params: Tree, hparams: Tree, args: Sequence[Any], rhs: Tree, selected: list[bool]
    ) -> list[Any]:
        """The reverse pass: $-B^\\top v$ with $A^\\top v = $ `rhs`, for the `selected` leaves of
        `(hparams, args)` (None elsewhere), as `mixed_product` returns it."""
        fused = _compile.reverse(self, params, hparams, args, rhs, selected)  # compiled, or None
        if fused is not None:
            return fused
        adjoint, products = self._solve(
            params, hparams, args, rhs, transpose=True, selected=selected
        )
        if products is not None:
            return products
        negative = tree_map(torch.neg, adjoint)
        return _compile.cross_product(self, params, hparams, args, selected, negative)

    def _solve(
        self,
        params: Tree,
        hparams: Tree,
        args: Sequence[Any],
        rhs: Tree,
        *,
        transpose: bool,
        selected: list[bool] | None = None,
    ) -> tuple[Tree, list[Any] | None]:
        """`(solution, products)`: with `selected` (reverse mode), the eager path also returns
        $-B^\\top v$, from the same linearisation as the solve where the curvature allows."""
        if self.distributed is not None:  # then every vector a solver sees is the same on all ranks
            rhs = self.distributed.mean(rhs)
        condition, spec = self.condition, None
        flat = on_leaves(condition, pytree.tree_structure(params))
        if flat is not None and isinstance(self.curvature, (Hessian, GaussNewton)):
            condition, spec = flat, pytree.tree_structure(params)
            params, rhs = leaves(params), leaves(rhs)
        compiled = _compile.scope(self.compile, self.solver, self.distributed is not None)
        # Eagerly the solver iterates on one flat vector: a few single-tensor kernels per step.
        shapes = None
        if spec is not None and compiled is None and can_ravel([*params, *leaves(rhs)]):
            shapes = tuple(p.shape for p in params)
            rhs = ravel_leaves(rhs)
        # One linearisation for A^T u and B^T u (exact Hessian, reverse mode), on flat vectors.
        joint = None
        if (
            selected is not None
            and transpose
            and shapes is not None
            and type(self.curvature) is Hessian
            and self.curvature.mode == "reverse-over-reverse"
        ):
            joint = linearize_reverse(condition, params, hparams, args, selected)

        def finish(operator: AbstractLinearOperator, transposed: bool) -> AbstractLinearOperator:
            if shapes is not None and not transposed:
                operator = RaveledOperator(operator, shapes, rhs)
            if self.distributed is not None:  # each product averaged over ranks
                operator = self.distributed.operator(operator)
            operator = damp(operator, self.damping)
            return operator.transpose() if transpose and not transposed else operator

        def linearize(*batch: Any) -> AbstractLinearOperator:
            if compiled == "product":
                return finish(_compile.linearize(self, spec, params, hparams, batch), False)
            return finish(condition.linearize(self.curvature, params, hparams, *batch), False)

        if joint is not None:
            tags = {SYMMETRIC} if condition.symmetric else set()
            main = finish(FunctionLinearOperator(joint[0], rhs, tags=tags), True)  # flat, A^T
        else:
            main = None

        initial = None if self.memory is None else self.memory.initial(transpose, rhs)
        solved = None
        if compiled == "solve":  # None when it fell back to eager
            solved = _compile.solve(self, spec, transpose, params, hparams, args, rhs, initial)
        if solved is None:
            # The operator on other data is offered to every solver; StochasticNeumann uses it.
            operator = ResamplingOperator(linearize(*args) if main is None else main, linearize)
            solved = self.solver.solve(operator, rhs, initial)
        solution, info = solved
        self.report(info, solution)
        if self.memory is not None:
            self.memory.remember(transpose, solution, info)
        products = None
        if joint is not None:
            products = joint[1](torch.neg(solution))
        if shapes is not None:
            solution = unravel_leaves(solution, shapes)
        if products is None and selected is not None and compiled is None and spec is not None:
            negative = [torch.neg(t) for t in solution]
            products = mixed_product(condition, params, hparams, args, selected, cotangent=negative)
        return (solution if spec is None else pytree.tree_unflatten(solution, spec)), products

    def report(self, info: SolveInfo, solution: Tree) -> None:
        if self.callback is not None:
            self.callback(info.concrete())
        converged = bool(concrete(info.converged).all())
        finite = all_finite(solution)
        if converged and finite:
            return
        problem = "produced NaN/Inf" if not finite else "did not converge"
        message = (
            f"The implicit backward solve {problem} ({info}). Try more steps, "
            "damping=..., curvature=implicitfn.GaussNewton() for a non-convex loss, alpha='auto' "
            "or a smaller alpha for Neumann/FixedPoint, implicitfn.MINRES() for an indefinite "
            "Hessian, a tighter inner solve, or rtol=None for a deliberately "
            "truncated solve; pass on_failure='warn' to continue anyway."
        )
        if self.on_failure == "raise" or not finite:
            raise ImplicitSolveError(message, info.concrete())
        warnings.warn(message, ImplicitSolveWarning, stacklevel=4)


class _WarmStart:
    """The last converged solution of each system (reverse and forward) of one decorated function.

    With `warm_start=True` it is the next solve's `initial`. A solution with a vmap batch
    dimension is not kept (it belongs to that batch, not to the next call), and a right-hand side
    with one does not use it.
    """

    def __init__(self) -> None:
        self._last: dict[bool, Tree] = {}

    def initial(self, transpose: bool, rhs: Tree) -> Tree | None:
        last = self._last.get(transpose)
        if last is None or not _unbatched(rhs) or not same_structure(last, rhs):
            return None
        pairs = zip(leaves(last), leaves(rhs), strict=True)
        if any(a.dtype != b.dtype or a.device != b.device for a, b in pairs):
            return None
        return last

    def remember(self, transpose: bool, solution: Tree, info: SolveInfo) -> None:
        if _unbatched(solution) and bool(concrete(info.converged).all()):
            self._last[transpose] = tree_map(lambda t: concrete(t).clone(), solution)


def _unbatched(tree: Tree) -> bool:
    """No leaf carries a hidden vmap batch dimension."""
    return all(concrete(leaf).shape == leaf.shape for leaf in leaves(tree))


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How the flat tensors given to the autograd Function map back to user trees."""

    backward: _Backward
    solution_spec: pytree.TreeSpec
    inputs_spec: pytree.TreeSpec
    constants: tuple[Any, ...]  # inputs leaves; None where the leaf is a tensor passed to apply
    num_solution: int

    def rebuild(self, tensors: Sequence[torch.Tensor]) -> tuple[Tree, Tree, tuple[Any, ...]]:
        solution = pytree.tree_unflatten(list(tensors[: self.num_solution]), self.solution_spec)
        remaining = iter(tensors[self.num_solution :])
        flat = [next(remaining) if c is None else c for c in self.constants]
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
        products = layout.backward.reverse(solution, hparams, args, cotangent, selected)
        if layout.backward.distributed is not None:
            products = layout.backward.distributed.input_gradients(products, len(leaves(hparams)))
        input_grads = [g for g, c in zip(products, layout.constants, strict=True) if c is None]
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
        selected = _select(layout.constants, present)
        rhs = mixed_product(
            layout.backward.condition, solution, hparams, args, selected, tangents=full_tangents
        )
        direction = layout.backward.solve(
            solution, hparams, args, tree_map(torch.neg, rhs), transpose=False
        )
        return tuple(leaves(direction))


def _select(constants: Sequence[Any], flags: Sequence[bool]) -> list[bool]:
    """Spread flags over the tensor inputs to all leaves of (hparams, args)."""
    flags_iter = iter(flags)
    return [bool(next(flags_iter)) if c is None else False for c in constants]


def _scatter(constants: Sequence[Any], values: Sequence[Any]) -> list[Any]:
    values_iter = iter(values)
    return [next(values_iter) if c is None else None for c in constants]


def _check_tree(tree: Any, name: str, allow_empty: bool = False) -> None:
    if not isinstance(tree, (torch.Tensor, dict)) and not _is_tensordict(tree):
        raise TypeError(
            f"{name}: expected a TensorDict, a dict of tensors or a tensor, got "
            f"{type(tree).__name__}; wrap it, e.g. TensorDict({{'lam': value}}) or {{'lam': value}}."
        )
    flat = leaves(tree)
    if not flat and not allow_empty:
        raise ValueError(f"{name}: has no tensors; pass at least one.")
    for leaf in flat:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{name}: leaves must be tensors, got {type(leaf).__name__}.")
        if not leaf.is_floating_point():
            raise TypeError(
                f"{name}: leaves must be floating point, got {leaf.dtype}; convert with .float()."
            )


def _is_tensordict(tree: Any) -> bool:
    from tensordict import TensorDictBase

    return isinstance(tree, TensorDictBase)


def _check_args_finite(args: Sequence[Any]) -> None:
    for i, arg in enumerate(args):
        floating = [
            leaf
            for leaf in leaves(arg)
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()
        ]
        if floating and not all_finite(floating):
            raise ValueError(
                f"args[{i}]: contains NaN or Inf; clean the data before the inner solve."
            )


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


def _detached(tree: Any) -> Any:
    return tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, tree)


def implicit_diff(
    condition: AbstractOptimalityCondition,
    *,
    solver: AbstractLinearSolver = CG(),
    curvature: AbstractCurvature = Hessian(),
    damping: float = 0.0,
    on_failure: OnFailure = "raise",
    callback: Callable[[SolveInfo], Any] | None = None,
    warm_start: bool = False,
    distributed: bool | torch.distributed.ProcessGroup = False,
    compile: bool | str | _compile.Compile = False,
) -> Callable[[Callable[..., Tree]], Callable[..., Tree]]:
    r"""Give an inner solver implicit derivatives with respect to its hyperparameters and data.

    The decorated function `inner_solve(params, hparams, *args) -> params*` may be any solver (an
    SGD loop, L-BFGS, a closed form): it runs on detached inputs and its own autograd graph is
    not kept. Its result carries derivatives from the implicit function theorem at the returned
    point: with $A = \partial F/\partial w$ and $B = \partial F/\partial\lambda$ of the
    optimality condition $F(w^*, \lambda, \ldots) = 0$,
    $\frac{dw^*}{d\lambda} = -A^{-1}B$. Reverse mode solves $A^\top v = \bar w$ with `solver`,
    forward mode solves $A\,\dot w = -B\dot\lambda$. Gradients reach `hparams` and every
    floating-point tensor in `*args`; none reach the initial `params`.

    It works with `.backward()`, `torch.autograd.grad`, `torch.func.grad`, `vjp`, `jacrev`,
    `jvp`, `jacfwd` and `vmap` over batches of problems.

    **Arguments:**

    - `condition`: the optimality condition, e.g. [`stationarity`][implicitfn.stationarity]`(loss)`,
      [`fixed_point`][implicitfn.fixed_point]`(T)` or [`root`][implicitfn.root]`(F)`; it takes
      the same `(params, hparams, *args)` as the inner solver.
    - `solver`: the linear solver for the backward pass (default [`CG`][implicitfn.CG]`()`).
    - `curvature`: [`Hessian`][implicitfn.Hessian]`()` (exact; default) or
      [`GaussNewton`][implicitfn.GaussNewton]`()`.
    - `damping`: $\mu \ge 0$; solve with $A + \mu I$.
    - `on_failure`: `"raise"` (default) raises [`ImplicitSolveError`][implicitfn.ImplicitSolveError]
      when the solve does not converge; `"warn"` warns and returns the approximate gradient.
      NaN/Inf always raises.
    - `callback`: called with the [`SolveInfo`][implicitfn.SolveInfo] of every backward or
      forward solve (under `vmap`, its fields have the batch dimension).
    - `warm_start`: start each backward (and each forward) solve from the last converged solution
      of the same decorated function instead of zero. Across the outer steps of a
      hyperparameter loop the adjoint changes little, so an iterative solver needs fewer steps
      (one extra product to form the starting residual); direct solvers ignore it. Solves inside
      `torch.func.vmap` do not update it.
    - `distributed`: data parallelism over `torch.distributed`: `False` (default), `True` (the
      default process group) or a `torch.distributed.ProcessGroup`. With `*args` this rank's
      shard of the data and the losses the mean over ranks of the local losses, the cotangent,
      every operator product and the hyperparameters' mixed product are averaged over the
      ranks (all-reduce), so each rank gets the gradient of one process on all the data; an
      `*args` tensor gets this rank's block of it. The direct part
      $\partial L_V/\partial\lambda$ of your own validation loss stays local: average it with
      [`all_reduce_gradients`][implicitfn.all_reduce_gradients]. See the "Distributed" page.
    - `compile`: compile the backward pass with `torch.compile`: `False` (default), `True`, a
      mode such as `"reduce-overhead"`, or [`Compile`][implicitfn.Compile]`(...)`. With a
      fixed-step solver (e.g. `CG(max_steps=10, rtol=None)`) the whole solve is one compiled
      graph, otherwise each curvature product is; the mixed product is compiled too. Compiled
      once per problem shape and reused by later calls; anything that cannot be compiled runs
      eagerly after one [`CompileWarning`][implicitfn.CompileWarning]. Worth it over many outer
      steps: see the "Compiled hypergradients" page.

    **Returns:** a decorator.

    ```python
    >>> import torch, implicitfn
    >>> def train_loss(params, hparams, x, y):
    ...     residual = x @ params["w"] - y
    ...     return 0.5 * (residual ** 2).sum() + 0.5 * (hparams["decay"] * params["w"] ** 2).sum()
    >>> @implicitfn.implicit_diff(implicitfn.stationarity(train_loss), solver=implicitfn.CG())
    ... def ridge(params, hparams, x, y):            # closed form; any solver works
    ...     matrix = x.T @ x + torch.diag(hparams["decay"])
    ...     return {"w": torch.linalg.solve(matrix, x.T @ y)}
    >>> x, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    >>> hparams = {"decay": torch.ones(3, dtype=torch.float64, requires_grad=True)}
    >>> w = ridge({"w": torch.zeros(3, dtype=torch.float64)}, hparams, x, y)
    >>> (w["w"] ** 2).sum().backward()
    >>> hparams["decay"].grad.shape
    torch.Size([3])
    ```
    """
    backward = _Backward(
        condition,
        solver,
        curvature,
        damping,
        on_failure,
        callback,
        distributed=data_parallel(distributed),
        compile=_compile.as_compile(compile),
    )
    if not isinstance(warm_start, bool):
        raise TypeError(f"warm_start: expected a bool, got {type(warm_start).__name__}.")

    def decorator(inner_solve: Callable[..., Tree]) -> Callable[..., Tree]:
        if not callable(inner_solve):
            raise TypeError(
                f"implicit_diff decorates a function, got {type(inner_solve).__name__}."
            )
        # One memory per decorated function.
        configured = dataclasses.replace(backward, memory=_WarmStart()) if warm_start else backward

        @functools.wraps(inner_solve)
        def solve_with_implicit_derivatives(params: Tree, hparams: Tree, *args: Any) -> Tree:
            _check_tree(params, "params")
            _check_tree(hparams, "hparams", allow_empty=True)
            _check_args_finite(args)
            if configured.distributed is not None:
                configured.distributed.check()
            solution = inner_solve(_detached(params), _detached(hparams), *_detached(args))
            if not same_structure(solution, params) or isinstance(
                solution, torch.Tensor
            ) != isinstance(params, torch.Tensor):
                raise ValueError(
                    f"{inner_solve.__name__} returned {describe(solution)}, but params is "
                    f"{describe(params)}; the inner solver must return parameters with the same "
                    "keys and shapes as it was given."
                )
            _check_tree(solution, f"the value returned by {inner_solve.__name__}")
            if not all_finite(solution):
                raise ValueError(
                    f"{inner_solve.__name__} returned NaN/Inf parameters; the inner solve diverged "
                    "(lower its learning rate or check the data)."
                )
            return attach(configured, solution, hparams, args)

        return solve_with_implicit_derivatives

    return decorator


def attach(backward: _Backward, solution: Tree, hparams: Tree, args: Sequence[Any]) -> Tree:
    """Route `solution` through the autograd boundary so it depends on `hparams` and `args`."""
    solution_leaves, solution_spec = pytree.tree_flatten(_detached(solution))
    input_leaves, inputs_spec = pytree.tree_flatten((hparams, tuple(args)))
    constants = tuple(None if isinstance(x, torch.Tensor) else x for x in input_leaves)
    tensors = [x for x in input_leaves if isinstance(x, torch.Tensor)]
    layout = _Layout(backward, solution_spec, inputs_spec, constants, len(solution_leaves))
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
    solver: AbstractLinearSolver = CG(),
    curvature: AbstractCurvature = Hessian(),
    damping: float = 0.0,
    on_failure: OnFailure = "raise",
    distributed: bool | torch.distributed.ProcessGroup = False,
    compile: bool | str | _compile.Compile = False,
) -> tuple[Tree, SolveInfo]:
    r"""The hypergradient $\frac{dL_V}{d\lambda} = \frac{\partial L_V}{\partial\lambda} - B^\top v$, $A^\top v = \frac{\partial L_V}{\partial w}$, in one call.

    For people who do not want a decorator: give the inner solution and both losses.

    **Arguments:**

    - `inner`: the training loss `(params, hparams, *inner_args) -> scalar` (its stationarity
      is the condition) or any [`AbstractOptimalityCondition`][implicitfn.AbstractOptimalityCondition].
    - `outer_loss`: the validation objective `(params, hparams, *outer_args) -> scalar`.
    - `params`: the inner solution $w^*$.
    - `hparams`: the hyperparameters $\lambda$ (TensorDict, dict or tensor).
    - `inner_args`, `outer_args`: the extra arguments (e.g. training and validation batches).
    - `solver`, `curvature`, `damping`, `on_failure`: as in [`implicit_diff`][implicitfn.implicit_diff].
    - `distributed`: as in [`implicit_diff`][implicitfn.implicit_diff], with `inner_args` and
      `outer_args` this rank's shards; the returned hypergradient, direct part included, is
      the one of all the data, the same on every rank.
    - `compile`: as in [`implicit_diff`][implicitfn.implicit_diff]; the gradient of
      `outer_loss` is compiled too. Compiled artefacts are kept between calls, so an outer loop
      that passes the same functions and shapes compiles once.

    **Returns:** `(hypergradient, info)`: a tree with the structure of `hparams` and the
    [`SolveInfo`][implicitfn.SolveInfo] of the backward solve.

    ```python
    >>> import torch, implicitfn
    >>> inner = lambda w, lam: 0.5 * ((w - 1.0) ** 2).sum() + 0.5 * lam * (w ** 2).sum()
    >>> outer = lambda w, lam: (w ** 2).sum()
    >>> lam = torch.tensor(1.0, dtype=torch.float64)
    >>> w_star = torch.full((2,), 0.5, dtype=torch.float64)   # argmin: 1 / (1 + lam)
    >>> g, info = implicitfn.hypergradient(inner, outer, w_star, lam)
    >>> round(float(g), 6), bool(info.converged)                # d/dlam 2/(1+lam)^2 = -0.5
    (-0.5, True)
    ```
    """
    condition = inner if isinstance(inner, AbstractOptimalityCondition) else stationarity(inner)
    infos: list[SolveInfo] = []
    reduction = data_parallel(distributed)
    options = _compile.as_compile(compile)
    backward = _Backward(
        condition,
        solver,
        curvature,
        damping,
        on_failure,
        infos.append,
        distributed=reduction,
        compile=options,
    )
    _check_tree(params, "params")
    _check_tree(hparams, "hparams")
    if not callable(outer_loss):
        raise TypeError(f"outer_loss: expected a callable, got {type(outer_loss).__name__}.")
    _check_args_finite(tuple(inner_args))
    if reduction is not None:
        reduction.check()
    fused = _compile.hypergradient(
        backward, outer_loss, params, hparams, tuple(inner_args), tuple(outer_args)
    )  # the whole hypergradient compiled into one graph, or None
    if fused is not None:
        return fused

    def direct(p: Tree, h: Tree, a: tuple[Any, ...]) -> tuple[Tree, Tree]:
        if plain_autograd([*leaves(p), *leaves(h)]):  # eagerly, without functorch's wrapping
            return _autograd_gradient(scalar_loss(outer_loss, "outer_loss"), p, h, a)
        return grad(scalar_loss(outer_loss, "outer_loss"), argnums=(0, 1))(p, h, *a)

    outer = (params, hparams, tuple(outer_args))
    direct_w, direct_h = _compile.call(options, ("outer", outer_loss), direct, *outer)
    flat, spec = pytree.tree_flatten((hparams, tuple(inner_args)))
    selected = [i < len(leaves(hparams)) for i in range(len(flat))]
    products = backward.reverse(params, hparams, tuple(inner_args), direct_w, selected)
    implicit, _ = pytree.tree_unflatten(products, spec)
    total = tree_add(direct_h, implicit)
    # Direct and implicit parts averaged over ranks together: one all-reduce.
    return (total if reduction is None else reduction.mean(total)), infos[-1]
