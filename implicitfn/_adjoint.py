r"""How to differentiate through a solution: one adjoint object, one reverse pass, one forward pass.

An adjoint is configuration (a frozen dataclass that validates itself) plus the state it owns
across calls: the warm-start memory and the compiled graphs. [`implicit_diff`][implicitfn.implicit_diff],
[`hypergradient`][implicitfn.hypergradient] and `hyperopt.HyperOptimizer` all take one.

At an inner solution $w^*$ with $F(w^*, \lambda) = 0$, $A = \partial F/\partial w$ and
$B = \partial F/\partial(\lambda, \mathrm{args})$, the implicit reverse pass solves
$A^\top v = \bar w$ and returns $-B^\top v$; the forward pass solves $A\dot w = -B\dot\lambda$.
The unrolled adjoint differentiates $k$ steps of $w \leftarrow w - \eta F(w, \lambda)$ from $w^*$.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.utils._pytree as pytree

from implicitfn import _compile
from implicitfn._curvature import AbstractCurvature, Hessian
from implicitfn._distributed import DataParallel, data_parallel
from implicitfn._linear_solve import CG, AbstractLinearSolver
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
    linearize_reverse,
    mixed_product,
    on_leaves,
)
from implicitfn._solution import (
    ImplicitSolveError,
    ImplicitSolveWarning,
    Outcome,
    SolveInfo,
    all_finite,
    concrete,
)
from implicitfn._tree import (
    Tree,
    can_ravel,
    leaves,
    ravel_leaves,
    same_structure,
    tree_map,
    unravel_leaves,
)

__all__ = ["AbstractAdjoint", "ImplicitAdjoint"]

OnFailure = Literal["raise", "warn"]


class AbstractAdjoint(abc.ABC):
    r"""How [`implicit_diff`][implicitfn.implicit_diff] and [`hypergradient`][implicitfn.hypergradient]
    differentiate through an inner solution.

    Two are built in: [`ImplicitAdjoint`][implicitfn.ImplicitAdjoint] (the implicit function
    theorem: one linear solve) and [`UnrolledAdjoint`][implicitfn.UnrolledAdjoint] (reverse mode
    through unrolled steps from the solution). A subclass implements `check`, `reverse` and
    `forward`; the decorator calls them with the condition, the solution and the inputs.

    ```python
    >>> import implicitfn
    >>> isinstance(implicitfn.ImplicitAdjoint(), implicitfn.AbstractAdjoint)
    True
    ```
    """

    @abc.abstractmethod
    def check(self, condition: AbstractOptimalityCondition) -> None:
        """Raise, before any computing, when this adjoint cannot serve `condition`."""

    @abc.abstractmethod
    def reverse(
        self,
        condition: AbstractOptimalityCondition,
        solution: Tree,
        hparams: Tree,
        args: Sequence[Any],
        cotangent: Tree,
        selected: Sequence[bool],
    ) -> tuple[list[Any], SolveInfo | None]:
        r"""`(products, info)`: the cotangents of the leaves of `(hparams, tuple(args))` that
        `selected` marks (None elsewhere), given the cotangent $\bar w$ of the solution."""

    @abc.abstractmethod
    def forward(
        self,
        condition: AbstractOptimalityCondition,
        solution: Tree,
        hparams: Tree,
        args: Sequence[Any],
        tangents: Sequence[torch.Tensor | None],
    ) -> Tree:
        r"""The tangent $\dot w$ of the solution, given tangents for the leaves of
        `(hparams, tuple(args))` (None where there is none)."""

    def reverse_from(
        self,
        condition: AbstractOptimalityCondition,
        solution: Tree,
        hparams: Tree,
        args: Sequence[Any],
        cotangent_of: Callable[[Tree, Tree, Any], tuple[Tree, Any]],
        extra: Any,
        selected: Sequence[bool],
    ) -> tuple[Any, list[Any], SolveInfo | None]:
        """`(carried, products, info)`: the reverse pass for the cotangent that
        `cotangent_of(solution, hparams, extra) -> (cotangent, carried)` computes.

        [`hypergradient`][implicitfn.hypergradient] passes the outer gradient here, so that an
        adjoint may fuse it with its reverse pass (the implicit adjoint compiles both into one
        graph). By default: compute the cotangent, then `reverse`.
        """
        cotangent, carried = cotangent_of(solution, hparams, extra)
        products, info = self.reverse(condition, solution, hparams, args, cotangent, selected)
        return carried, products, info

    def prepare(self) -> None:
        """Called before each inner solve: raise when something outside (a process group) is
        not ready. Nothing by default."""
        return None

    def mean_over_ranks(self, tree: Tree) -> Tree:
        """`tree` averaged over data-parallel ranks; itself without data parallelism."""
        return tree

    @property
    def compiled_functions(self) -> _compile.CompiledFunctions | None:
        """The compiled graphs this adjoint owns, or None when it does not compile."""
        return None


@dataclasses.dataclass(frozen=True)
class ImplicitAdjoint(AbstractAdjoint):
    r"""Differentiate through the solution by the implicit function theorem.

    Reverse mode solves $A^\top v = \bar w$ with `solver` and returns $-B^\top v$; forward mode
    solves $A\dot w = -B\dot\lambda$. $A$ is built with `curvature` and damped by `damping`.
    Every solve reports a [`SolveInfo`][implicitfn.SolveInfo]; an outcome the solver was not
    asked to accept (see `SolveInfo.failed`) raises [`ImplicitSolveError`][implicitfn.ImplicitSolveError]
    or warns, and NaN/Inf always raises.

    The object also owns what is kept between calls: the last solutions (with `warm_start`)
    and the compiled graphs (with `compile`). Give each problem its own adjoint.

    **Arguments:**

    - `solver`: the linear solver (default [`CG`][implicitfn.CG]`()`). Its declared
      capabilities are checked against the condition: a solver that needs a symmetric operator
      is refused for a [`fixed_point`][implicitfn.fixed_point] or [`root`][implicitfn.root]
      condition.
    - `curvature`: [`Hessian`][implicitfn.Hessian]`()` (exact; default),
      [`GaussNewton`][implicitfn.GaussNewton]`()` or your own
      [`AbstractCurvature`][implicitfn.AbstractCurvature] (with `stationarity` only).
    - `damping`: $\mu \ge 0$; solve with $A + \mu I$.
    - `on_failure`: `"raise"` (default) or `"warn"` when a solve fails.
    - `callback`: called with the [`SolveInfo`][implicitfn.SolveInfo] of every solve.
    - `warm_start`: start each solve from the last successful solution of the same system
      instead of zero (one extra product; direct solvers ignore it; solves under `vmap` neither
      use nor update it).
    - `distributed`: data parallelism over `torch.distributed`: `False`, `True` (default process
      group) or a `ProcessGroup`; see the "Distributed" page.
    - `compile`: `False`, `True`, a mode string or [`Compile`][implicitfn.Compile]`(...)`: the
      reverse pass as one `torch.compile` graph. Needs a solver with `fixed_steps` (e.g.
      `CG(max_steps=10, rtol=0)`); not with `distributed`.

    ```python
    >>> import torch, implicitfn
    >>> adjoint = implicitfn.ImplicitAdjoint(solver=implicitfn.MINRES(max_steps=50), damping=1e-4)
    >>> inner = lambda w, lam: 0.5 * ((w - 1.0) ** 2).sum() + 0.5 * lam * (w ** 2).sum()
    >>> outer = lambda w, lam: (w ** 2).sum()
    >>> lam = torch.tensor(1.0, dtype=torch.float64)
    >>> g, info = implicitfn.hypergradient(inner, outer, torch.full((2,), 0.5, dtype=torch.float64),
    ...                                    lam, adjoint=adjoint)
    >>> round(float(g), 3), info.outcome_names()
    (-0.5, ['successful'])
    >>> implicitfn.implicit_diff(implicitfn.fixed_point(lambda w, h: 0.5 * w + h),
    ...                          adjoint=implicitfn.ImplicitAdjoint(solver=implicitfn.CG()))
    Traceback (most recent call last):
    ...
    ValueError: adjoint.solver: CG needs a symmetric operator, but FixedPointCondition has a non-symmetric Jacobian; use implicitfn.GMRES(), implicitfn.FixedPoint() or implicitfn.Dense(), or declare root(F, symmetric=True) if dF/dw really is symmetric.
    ```
    """

    solver: AbstractLinearSolver = CG()
    curvature: AbstractCurvature = Hessian()
    damping: float = 0.0
    on_failure: OnFailure = "raise"
    callback: Callable[[SolveInfo], Any] | None = None
    warm_start: bool = False
    distributed: Any = False
    compile: Any = False
    _state: _AdjointState = dataclasses.field(
        init=False,
        repr=False,
        compare=False,
        default=None,  # type: ignore[assignment]
    )

    def __post_init__(self) -> None:
        if not isinstance(self.solver, AbstractLinearSolver):
            raise TypeError(
                f"solver: expected an implicitfn linear solver such as implicitfn.CG(), got "
                f"{type(self.solver).__name__}."
            )
        if not isinstance(self.curvature, AbstractCurvature):
            raise TypeError(
                f"curvature: expected implicitfn.Hessian(), implicitfn.GaussNewton() or an "
                f"AbstractCurvature, got {type(self.curvature).__name__}."
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
        if not isinstance(self.warm_start, bool):
            raise TypeError(f"warm_start: expected a bool, got {type(self.warm_start).__name__}.")
        reduction = data_parallel(self.distributed)
        options = _compile.as_compile(self.compile)
        if options is not None and not self.solver.fixed_steps:
            raise ValueError(
                f"compile: needs a solver that runs a fixed number of steps (one graph), got "
                f"{self.solver!r}; use e.g. implicitfn.CG(max_steps=10, rtol=0), or compile=False."
            )
        if options is not None and reduction is not None:
            raise ValueError(
                "compile: cannot be combined with distributed=...: every product is all-reduced "
                "between ranks, outside any graph; use one or the other."
            )
        object.__setattr__(self, "_state", _AdjointState(reduction, options, self.warm_start))

    # -- what the decorator calls --------------------------------------------------------------

    def check(self, condition: AbstractOptimalityCondition) -> None:
        if not isinstance(condition, AbstractOptimalityCondition):
            raise TypeError(
                f"condition: expected an optimality condition, got {type(condition).__name__}; "
                "wrap a training loss with implicitfn.stationarity(loss), a map with "
                "implicitfn.fixed_point(T) or a residual with implicitfn.root(F)."
            )
        if self.solver.needs_symmetric and not condition.symmetric:
            raise ValueError(
                f"adjoint.solver: {type(self.solver).__name__} needs a symmetric operator, but "
                f"{type(condition).__name__} has a non-symmetric Jacobian; use implicitfn.GMRES(), "
                "implicitfn.FixedPoint() or implicitfn.Dense(), or declare root(F, symmetric=True) "
                "if dF/dw really is symmetric."
            )
        condition.check_curvature(self.curvature)

    def prepare(self) -> None:
        """Raise before any computing when the process group cannot be used."""
        if self._state.reduction is not None:
            self._state.reduction.check()

    def reverse(self, condition, solution, hparams, args, cotangent, selected):
        _, products, info = self.reverse_from(
            condition, solution, hparams, args, given_cotangent, cotangent, selected
        )
        return products, info

    def reverse_from(self, condition, solution, hparams, args, cotangent_of, extra, selected):
        state = self._state
        trees = (solution, hparams, tuple(args), extra, state.initial("reverse"))
        fused = functools.partial(fused_reverse, self, condition, cotangent_of, selected=selected)
        result = _compile.NOT_COMPILED
        if state.compiled is not None:
            result = state.compiled.call(
                ("reverse", condition, cotangent_of, tuple(selected)),
                "the reverse pass",
                lambda: fused,
                trees,
                functools.partial(self._accept_reverse, condition, cotangent_of, selected),
            )
        if result is _compile.NOT_COMPILED:
            result = fused(*trees)
        carried, products, solution_v, info = result
        self.report(info, solution_v, condition)
        state.remember("reverse", solution_v, info)
        if state.reduction is not None:
            products = state.reduction.input_gradients(products, len(leaves(hparams)))
        return carried, products, info

    def forward(self, condition, solution, hparams, args, tangents):
        state = self._state
        initial = state.initial("forward")
        direction, info = implicit_forward(
            self, condition, solution, hparams, tuple(args), tangents, initial
        )
        self.report(info, direction, condition)
        state.remember("forward", direction, info)
        return direction

    def mean_over_ranks(self, tree: Tree) -> Tree:
        reduction = self._state.reduction
        return tree if reduction is None else reduction.mean(tree)

    @property
    def compiled_functions(self) -> _compile.CompiledFunctions | None:
        return self._state.compiled

    @property
    def compile_fallbacks(self) -> dict[str, str]:
        """What this adjoint runs eagerly although compiling was asked for, and why."""
        compiled = self._state.compiled
        return {} if compiled is None else dict(compiled.fallbacks)

    # -- shared by both passes -----------------------------------------------------------------

    def report(
        self, info: SolveInfo, solution: Tree, condition: AbstractOptimalityCondition
    ) -> None:
        """Call the callback; raise or warn when the solve failed; always raise on NaN/Inf."""
        if self.callback is not None:
            self.callback(info.concrete())
        failed = bool(concrete(info.failed).any())
        finite = all_finite(solution)
        if not failed and finite:
            return
        names = sorted(set(info.outcome_names()) - {Outcome.SUCCESSFUL.name.lower()})
        message = (
            f"The implicit backward solve failed: {info} (condition "
            f"{type(condition).__name__}, curvature {type(self.curvature).__name__}, solver "
            f"{self.solver!r}). {_advice(names)} Pass on_failure='warn' to continue with the "
            "approximate gradient."
        )
        if self.on_failure == "raise" or not finite:
            raise ImplicitSolveError(message, info.concrete())
        warnings.warn(message, ImplicitSolveWarning, stacklevel=6)

    def _accept_reverse(self, condition, cotangent_of, selected, output, trees) -> str | None:
        """Accept a compiled reverse pass by what the solve guarantees, measured eagerly: its
        solution's residual is as good as the solver reported, and its mixed product is
        $-B^\\top v$ at that solution. (An element-wise comparison with an eager run is the
        wrong test: truncated solves amplify rounding differences.) A fused outer gradient is
        a direct computation: it is compared element-wise."""
        carried, products, solution_v, info = output
        solution, hparams, args, extra, _ = trees
        cotangent, expected_carried = cotangent_of(solution, hparams, extra)
        if expected_carried is not None:
            mismatch = _mismatch(leaves(carried), leaves(expected_carried))
            if mismatch is not None:
                return f"outer gradient: {mismatch}"
        problem = _Linearised.at(self, condition, solution, hparams, args, cotangent, selected)
        residual = problem.residual_norm(solution_v)
        reported = concrete(info.residual_norm)
        slack = 1e-3 * float(concrete(info.rhs_norm)) + math.sqrt(torch.finfo(reported.dtype).eps)
        if not float(residual) <= 2 * float(reported) + slack:
            return f"residual {float(residual):.2e} where the solver reported {float(reported):.2e}"
        expected = problem.cross(tree_map(torch.neg, solution_v))
        return _mismatch(products, expected)


def _advice(outcomes: list[str]) -> str:
    """The one or two fixes that fit what went wrong."""
    fixes = {
        "max_steps_reached": "Allow more steps (max_steps=...) or a looser rtol, precondition, "
        "or ask for a fixed number of steps with rtol=0.",
        "diverged": "The iteration diverged: use alpha='auto' or a smaller alpha for "
        "Neumann/FixedPoint, or a Krylov solver (CG, MINRES, GMRES).",
        "negative_curvature": "The Hessian is not positive definite here: use "
        "implicitfn.MINRES(), curvature=implicitfn.GaussNewton(), or damping=... .",
        "breakdown": "The method broke down: try another solver (GMRES with a larger restart, "
        "Dense for small problems) or damping=... .",
        "singular": "The Jacobian is singular: add damping=... or check that the condition "
        "depends on the parameters.",
        "nonfinite": "NaN/Inf appeared: check the data, the hyperparameters and the inner "
        "solution for NaN/Inf.",
        "stagnated": "The tolerance is below what this dtype reaches at this conditioning: use "
        "float64, damping=... or a preconditioner, or a looser rtol.",
    }
    return " ".join(fixes[name] for name in outcomes if name in fixes)


def _mismatch(actual: Any, expected: Any) -> str | None:
    r"""Why two lists of tensors differ beyond $\varepsilon^{1/3}$ in relative norm, or None."""
    squared_error, squared_norm, eps = 0.0, 0.0, 0.0
    for a, e in zip(actual, expected, strict=True):
        if e is None or a is None:
            if (a is None) != (e is None):
                return "a gradient is missing"
            continue
        eps = max(eps, torch.finfo(e.dtype).eps)
        a, e = a.detach().double(), e.detach().double()
        if not torch.isfinite(a).all():
            return "NaN/Inf"
        squared_error += float(((a - e) ** 2).sum())
        squared_norm += float((e**2).sum())
    if squared_error > eps ** (2 / 3) * squared_norm:
        return f"off by {math.sqrt(squared_error / max(squared_norm, 1e-300)):.1e} (relative)"
    return None


class _AdjointState:
    """What an adjoint keeps between calls: its last solutions and its compiled graphs."""

    def __init__(
        self, reduction: DataParallel | None, options: _compile.Compile | None, warm_start: bool
    ) -> None:
        self.reduction = reduction
        self.compiled = None if options is None else _compile.CompiledFunctions(options)
        self.warm_start = warm_start
        self._last: dict[str, Tree] = {}

    def initial(self, kind: str) -> Tree | None:
        return self._last.get(kind) if self.warm_start else None

    def remember(self, kind: str, solution: Tree, info: SolveInfo) -> None:
        if not self.warm_start or not _unbatched(solution):
            return  # a solution with a vmap batch dimension belongs to that batch
        if bool(concrete(info.successful).all()):
            self._last[kind] = tree_map(lambda t: concrete(t).clone(), solution)


def _unbatched(tree: Tree) -> bool:
    """No leaf carries a hidden vmap batch dimension."""
    return all(concrete(leaf).shape == leaf.shape for leaf in leaves(tree))


def _usable(initial: Tree | None, rhs: Tree) -> Tree | None:
    """A remembered solution when it fits the system being solved now (shape, dtype, device)."""
    if initial is None or not _unbatched(rhs) or not same_structure(initial, rhs):
        return None
    pairs = zip(leaves(initial), leaves(rhs), strict=True)
    if any(a.dtype != b.dtype or a.device != b.device for a, b in pairs):
        return None
    return initial


# ---------------------------------------------------------------------------------------------
# The passes, each written once. The compiled path traces these same functions.


@dataclasses.dataclass
class _Linearised:
    """The condition linearised at a point, in the layout the solver works in.

    The built-in conditions are rewritten on leaf lists (`on_leaves`) and, when the leaves
    share a dtype and device, the system is solved on one raveled vector: every solver step is
    then a few single-tensor kernels instead of a walk over a TensorDict.
    """

    operator: AbstractLinearOperator  # A (damped, averaged over ranks), possibly raveled
    cross: Callable[[Tree], list[Any]]  # u -> B^T u over the selected leaves
    rhs: Tree  # the cotangent in the solver's layout

    @classmethod
    def at(
        cls,
        adjoint: ImplicitAdjoint,
        condition: AbstractOptimalityCondition,
        solution: Tree,
        hparams: Tree,
        args: Sequence[Any],
        cotangent: Tree,
        selected: Sequence[bool],
    ) -> _Linearised:
        reduction, curvature = adjoint._state.reduction, adjoint.curvature
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

        def finish(operator: AbstractLinearOperator) -> AbstractLinearOperator:
            if reduction is not None:
                operator = reduction.operator(operator)
            return damp(operator, adjoint.damping)

        def jacobian(*batch: Any) -> AbstractLinearOperator:
            operator = condition.linearize(curvature, params, hparams, *batch)
            return operator if shapes is None else RaveledOperator(operator, shapes, rhs)

        def linearize(*batch: Any) -> AbstractLinearOperator:
            return finish(jacobian(*batch))

        if shapes is not None and curvature.linearizes_jointly:
            # One linearisation of F in (w, lambda) serves A^T u and B^T u (exact Jacobian).
            transpose_product, cross = linearize_reverse(condition, params, hparams, args, selected)
            tags = {SYMMETRIC} if condition.symmetric else set()
            forward = transpose_product if condition.symmetric else jacobian(*args).mv
            operator = finish(FunctionLinearOperator(forward, rhs, transpose_product, tags))
        else:
            operator = linearize(*args)

            def cross(u: Tree) -> list[Any]:
                u = u if shapes is None else unravel_leaves(u, shapes)
                return mixed_product(condition, params, hparams, args, selected, cotangent=u)

        return cls(ResamplingOperator(operator, linearize), cross, rhs)

    def residual_norm(self, solution: Tree) -> torch.Tensor:
        r"""$\lVert A^\top v - \bar w\rVert$ for `solution` in the solver's layout."""
        image = self.operator.transpose().mv(solution)
        difference = [a - b for a, b in zip(leaves(image), leaves(self.rhs), strict=True)]
        return torch.linalg.vector_norm(torch.cat([d.reshape(-1) for d in difference]))


def implicit_reverse(
    adjoint: ImplicitAdjoint,
    condition: AbstractOptimalityCondition,
    solution: Tree,
    hparams: Tree,
    args: tuple[Any, ...],
    cotangent: Tree,
    initial: Tree | None,
    *,
    selected: Sequence[bool],
) -> tuple[list[Any], Tree, SolveInfo]:
    r"""The reverse pass: `(-B^T v, v, info)` with $A^\top v = \bar w$ (`cotangent`).

    `v` is returned in the solver's layout (a raveled vector or a leaf list where the built-in
    conditions allow), which is also the layout of `initial`, the starting guess (used only if
    it fits). A pure function of its tensors: eager calls and `torch.compile` run this code.
    """
    problem = _Linearised.at(adjoint, condition, solution, hparams, args, cotangent, selected)
    start = _usable(initial, problem.rhs)
    solved, info = adjoint.solver.solve(problem.operator, problem.rhs, start, transpose=True)
    products = problem.cross(tree_map(torch.neg, solved))
    return products, solved, info


def given_cotangent(solution: Tree, hparams: Tree, cotangent: Tree) -> tuple[Tree, None]:
    """The cotangent of the decorator's reverse pass: given, nothing carried."""
    return cotangent, None


def fused_reverse(
    adjoint: ImplicitAdjoint,
    condition: AbstractOptimalityCondition,
    cotangent_of: Callable[[Tree, Tree, Any], tuple[Tree, Any]],
    solution: Tree,
    hparams: Tree,
    args: tuple[Any, ...],
    extra: Any,
    initial: Tree | None,
    *,
    selected: Sequence[bool],
) -> tuple[Any, list[Any], Tree, SolveInfo]:
    """`cotangent_of` then `implicit_reverse`: one function for eager calls and for one graph."""
    cotangent, carried = cotangent_of(solution, hparams, extra)
    products, solved, info = implicit_reverse(
        adjoint, condition, solution, hparams, args, cotangent, initial, selected=selected
    )
    return carried, products, solved, info


def implicit_forward(
    adjoint: ImplicitAdjoint,
    condition: AbstractOptimalityCondition,
    solution: Tree,
    hparams: Tree,
    args: tuple[Any, ...],
    tangents: Sequence[torch.Tensor | None],
    initial: Tree | None,
) -> tuple[Tree, SolveInfo]:
    r"""The forward pass: $\dot w$ with $A\dot w = -B\dot\lambda$, and the solve's info."""
    selected = [t is not None for t in tangents]
    rhs = mixed_product(condition, solution, hparams, args, selected, tangents=list(tangents))
    rhs = tree_map(torch.neg, rhs)
    reduction = adjoint._state.reduction
    if reduction is not None:
        rhs = reduction.mean(rhs)

    def linearize(*batch: Any) -> AbstractLinearOperator:
        operator = condition.linearize(adjoint.curvature, solution, hparams, *batch)
        if reduction is not None:
            operator = reduction.operator(operator)
        return damp(operator, adjoint.damping)

    operator = ResamplingOperator(linearize(*args), linearize)
    return adjoint.solver.solve(operator, rhs, _usable(initial, rhs))
