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
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from implicitfn import _compile
from implicitfn._curvature import AbstractCurvature, Hessian
from implicitfn._distributed import DataParallel, data_parallel
from implicitfn._linear_solve import CG, GMRES, MINRES, AbstractLinearSolver
from implicitfn._linear_solve._nystrom import (
    NystromPreconditioner,
    ReusedPreconditioner,
    check_reusable,
)
from implicitfn._optimality import (
    AbstractOptimalityCondition,
    with_same_draws,
)
from implicitfn._passes import (
    Linearised,
    fused_reverse,
    given_cotangent,
    implicit_forward,
    penalty_of,
    unbatched,
)
from implicitfn._solution import (
    ImplicitSolveError,
    ImplicitSolveWarning,
    InnerSolutionWarning,
    Outcome,
    SolveInfo,
    all_finite,
    concrete,
    warn_at_caller,
)
from implicitfn._tree import (
    Tree,
    leaves,
    tree_map,
)

__all__ = ["AbstractAdjoint", "ImplicitAdjoint"]

OnFailure = Literal["raise", "warn"]


# The solver each structure calls for when none is given, with a budget and tolerance chosen
# by hypergradient accuracy against dense float64 oracles, not by residual
# (benchmarks/default_solvers, summarised on the "How to choose a solver" page): MINRES at
# rtol 1e-4 stayed within 2% on every MLP point measured (1e-3 gave 16-27%), and needed up to
# 1216 steps in float32 on a 1.2k-parameter MLP; CG at 1e-4 within 0.4% on PSD operators;
# GMRES needs a long restart on an indefinite Jacobian (restart 50 stalled at 40% error).
DEFAULT_SOLVERS: dict[str, AbstractLinearSolver] = {
    "positive_semidefinite": CG(max_steps=1000, rtol=1e-4),
    "symmetric": MINRES(max_steps=2000, rtol=1e-4),
    "general": GMRES(max_steps=2000, restart=200, rtol=1e-4),
}


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

    - `solver`: the linear solver, or `None` (default) for the one that fits the operator's
      declared structure (see `solver_for`): [`CG`][implicitfn.CG] where it is positive
      semidefinite (Gauss-Newton, `stationarity(loss, convex=True)`),
      [`MINRES`][implicitfn.MINRES] for a symmetric one that may be indefinite (the exact
      Hessian of a network), [`GMRES`][implicitfn.GMRES] for a non-symmetric one
      (`fixed_point`, `root`). A given solver's declared capabilities are checked against the
      condition: one that needs a symmetric operator is refused for a `fixed_point` condition.
    - `curvature`: [`Hessian`][implicitfn.Hessian]`()` (exact; default),
      [`GaussNewton`][implicitfn.GaussNewton]`()` or your own
      [`AbstractCurvature`][implicitfn.AbstractCurvature] (with `stationarity` only).
    - `damping`: $\mu \ge 0$; solve with $A + \mu I$.
    - `on_failure`: `"raise"` (default) or `"warn"` when a solve fails.
    - `callback`: called with the [`SolveInfo`][implicitfn.SolveInfo] of every solve.
    - `warm_start`: start each solve from the last successful solution of the same system
      instead of zero (one extra product; direct solvers ignore it; solves under `vmap` neither
      use nor update it).
    - `preconditioner`: a [`NystromPreconditioner`][implicitfn.NystromPreconditioner] that the
      adjoint builds at its first solve and reuses across calls, rebuilding it when the solves
      grow longer; needs a solver that `accepts_preconditioner` ([`CG`][implicitfn.CG]). With
      `warm_start=True` this is the cheapest way to many hypergradients along an outer loop
      (see the "Performance" page).
    - `distributed`: data parallelism over `torch.distributed`: `False`, `True` (default process
      group) or a `ProcessGroup`; see the "Distributed" page.
    - `inner_rtol`: warn ([`InnerSolutionWarning`][implicitfn.InnerSolutionWarning]) when the
      point the inner solver returned is far from satisfying the condition:
      $\lVert F(w^*, \lambda)\rVert >$ `inner_rtol` $\cdot\lVert A w^*\rVert$ (default 0.1).
      Both norms are in the `SolveInfo`; measuring them costs one product, and a condition that
      does not depend on the parameters at all ($A = 0$, the `net(x)` mistake) raises an error
      that says so. `None` measures nothing (one product fewer per backward pass). Where the optimum is exactly $w^* = 0$
      with $F(0) = 0$ the ratio is about 1 however accurate the inner solve: pass `None` there.
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

    solver: AbstractLinearSolver | None = None
    curvature: AbstractCurvature = Hessian()
    damping: float = 0.0
    on_failure: OnFailure = "raise"
    callback: Callable[[SolveInfo], Any] | None = None
    warm_start: bool = False
    preconditioner: NystromPreconditioner | None = None
    distributed: Any = False
    compile: Any = False
    inner_rtol: float | None = 0.1
    _state: _AdjointState = dataclasses.field(
        init=False,
        repr=False,
        compare=False,
        default=None,  # type: ignore[assignment]
    )

    def __post_init__(self) -> None:
        if self.solver is not None and not isinstance(self.solver, AbstractLinearSolver):
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
        if self.inner_rtol is not None and (
            isinstance(self.inner_rtol, bool)
            or not isinstance(self.inner_rtol, (int, float))
            or not self.inner_rtol > 0
        ):
            raise ValueError(
                f"inner_rtol: expected a float > 0 or None (no check), got {self.inner_rtol!r}."
            )
        reduction = data_parallel(self.distributed)
        options = _compile.as_compile(self.compile)
        check_reusable(self.preconditioner, self.solver, options is not None, reduction is not None)
        if options is not None and (self.solver is None or not self.solver.fixed_steps):
            raise ValueError(
                f"compile: needs a solver that runs a fixed number of steps (one graph), got "
                f"{self.solver!r}; use e.g. implicitfn.CG(max_steps=10, rtol=0), or compile=False."
            )
        if options is not None and reduction is not None:
            raise ValueError(
                "compile: cannot be combined with distributed=...: every product is all-reduced "
                "between ranks, outside any graph; use one or the other."
            )
        state = _AdjointState(reduction, options, self.warm_start, self.preconditioner)
        object.__setattr__(self, "_state", state)

    # -- what the decorator calls --------------------------------------------------------------

    def check(self, condition: AbstractOptimalityCondition) -> None:
        if not isinstance(condition, AbstractOptimalityCondition):
            raise TypeError(
                f"condition: expected an optimality condition, got {type(condition).__name__}; "
                "wrap a training loss with implicitfn.stationarity(loss), a map with "
                "implicitfn.fixed_point(T) or a residual with implicitfn.root(F)."
            )
        if self.solver_for(condition).needs_symmetric and not condition.symmetric:
            raise ValueError(
                f"adjoint.solver: {type(self.solver).__name__} needs a symmetric operator, but "
                f"{type(condition).__name__} has a non-symmetric Jacobian; use implicitfn.GMRES(), "
                "implicitfn.FixedPoint() or implicitfn.Dense(), or declare root(F, symmetric=True) "
                "if dF/dw really is symmetric."
            )
        condition.check_curvature(self.curvature)
        if (
            self.preconditioner is not None
            and not self.solver_for(condition).accepts_preconditioner
        ):
            raise ValueError(
                f"preconditioner: needs a solver that accepts one, but the default for "
                f"{type(condition).__name__} with {type(self.curvature).__name__} is "
                f"{self.solver_for(condition)!r} (the operator may be indefinite); pass "
                "solver=implicitfn.CG(...) if it is positive definite at your solutions, or use "
                "curvature=implicitfn.GaussNewton()."
            )
        if self.preconditioner is not None and self.preconditioner.scaling == "penalty":
            if penalty_of(condition) is None:
                raise ValueError(
                    "preconditioner: scaling='penalty' needs the training loss as "
                    "stationarity(implicitfn.CompositeLoss(predict=..., output_loss=..., "
                    f"penalty=...)) with a penalty, got {type(condition).__name__}; state the "
                    "penalty (e.g. the weight decay) that way, or use scaling=None."
                )

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
        if result is _compile.NOT_COMPILED:  # eagerly, every evaluation sees the same draws
            same = with_same_draws(condition)
            result = fused_reverse(
                self, same, cotangent_of, *trees, selected=selected, precondition=state.reused
            )
        carried, products, solution_v, info = result
        state.remember("reverse", solution_v, info)
        self.report(info, solution_v, condition)
        if state.reduction is not None:
            products = state.reduction.input_gradients(products, len(leaves(hparams)))
        return carried, products, info

    def forward(self, condition, solution, hparams, args, tangents):
        state = self._state
        initial = state.initial("forward")
        same = with_same_draws(condition)
        direction, info = implicit_forward(
            self, same, solution, hparams, tuple(args), tangents, initial, state.reused
        )
        state.remember("forward", direction, info)
        self.report(info, direction, condition)
        return direction

    @property
    def reduction(self) -> DataParallel | None:
        """The data-parallel averaging over ranks, or None without `distributed=`."""
        return self._state.reduction

    def solver_for(self, condition: AbstractOptimalityCondition) -> AbstractLinearSolver:
        """The solver for `condition`: the one given, else the one its structure calls for.

        ```python
        >>> import implicitfn
        >>> adjoint = implicitfn.ImplicitAdjoint()
        >>> net_loss = lambda w, h, x: (w.tanh() * x).sum() + h * (w ** 2).sum()
        >>> type(adjoint.solver_for(implicitfn.stationarity(net_loss))).__name__
        'MINRES'
        >>> type(adjoint.solver_for(implicitfn.stationarity(net_loss, convex=True))).__name__
        'CG'
        >>> type(adjoint.solver_for(implicitfn.fixed_point(lambda w, h: 0.5 * w + h))).__name__
        'GMRES'
        ```
        """
        if self.solver is not None:
            return self.solver
        if condition.positive_semidefinite(self.curvature):
            return DEFAULT_SOLVERS["positive_semidefinite"]
        if condition.symmetric:
            return DEFAULT_SOLVERS["symmetric"]
        return DEFAULT_SOLVERS["general"]

    def with_rtol(self, rtol: float) -> ImplicitAdjoint:
        """This adjoint with its solver's `rtol` replaced, sharing what it keeps between calls
        (warm start, preconditioner): for a tolerance that changes along an outer loop.

        ```python
        >>> import implicitfn
        >>> implicitfn.ImplicitAdjoint(solver=implicitfn.CG(rtol=1e-2)).with_rtol(0.1).solver.rtol
        0.1
        ```
        """
        if self.solver is None or self.compile:
            raise ValueError(f"with_rtol: needs a given solver and no compile; got {self!r}.")
        copy = dataclasses.replace(self, solver=dataclasses.replace(self.solver, rtol=rtol))
        object.__setattr__(copy, "_state", self._state)
        return copy

    def mean_over_ranks(self, tree: Tree) -> Tree:
        reduction = self._state.reduction
        return tree if reduction is None else reduction.mean(tree)

    @property
    def compiled_functions(self) -> _compile.CompiledFunctions | None:
        return self._state.compiled

    @property
    def preconditioner_builds(self) -> int:
        """How many times the kept `preconditioner` was built (0 without one)."""
        return 0 if self._state.reused is None else self._state.reused.builds

    @property
    def compile_fallbacks(self) -> dict[str, str]:
        """What this adjoint runs eagerly although compiling was asked for, and why."""
        compiled = self._state.compiled
        return {} if compiled is None else dict(compiled.fallbacks)

    # -- shared by both passes -----------------------------------------------------------------

    def report(
        self, info: SolveInfo, solution: Tree, condition: AbstractOptimalityCondition
    ) -> None:
        """Call the callback; check the point the inner solver returned; raise or warn when the
        solve failed; always raise on NaN/Inf."""
        if self.callback is not None:
            self.callback(info.concrete())
        self._check_point(info, condition)
        if not bool(concrete(info.failed).any()):  # judged: its solution and residual are finite
            return
        finite = all_finite(solution)
        names = sorted(set(info.outcome_names()) - {Outcome.SUCCESSFUL.name.lower()})
        where = self._where(condition)
        message = f"The implicit backward solve failed: {info} ({where}). {_advice(names)}"
        if finite:  # NaN/Inf is never handed back, whatever on_failure says
            message += " Pass on_failure='warn' to continue with the approximate gradient."
        if self.on_failure == "raise" or not finite:
            raise ImplicitSolveError(message, info.concrete())
        warn_at_caller(message, ImplicitSolveWarning)

    def _where(self, condition: AbstractOptimalityCondition) -> str:
        """What the messages name: condition, curvature and solver (built only for a message)."""
        return (
            f"condition {type(condition).__name__}, curvature {type(self.curvature).__name__}, "
            f"solver {self.solver_for(condition)!r}"
        )

    def _check_point(self, info: SolveInfo, condition: AbstractOptimalityCondition) -> None:
        """Raise when F does not depend on the parameters; warn when the inner solver returned a
        point far from satisfying the condition (the theorem's premise)."""
        if info.optimality_scale is None:
            return
        norm, scale = concrete(info.optimality_norm), concrete(info.optimality_scale)
        where = functools.partial(self._where, condition)
        if bool((scale == 0).any()) and bool(torch.isfinite(norm).all()):
            raise ValueError(
                f"The optimality condition does not depend on the parameters at the solution "
                f"(dF/dw = 0; {where()}): the parameters the inner solver returns never reach the "
                "training loss. The usual cause: calling the module, net(x), instead of its "
                "functional form, apply(params, x) with apply, params = "
                "implicitfn.functional_model(net)."
            )
        if not bool(torch.isfinite(norm).all()):
            raise ImplicitSolveError(
                f"The optimality condition is NaN/Inf at the solution ({where()}): check the "
                "training loss at these parameters, hyperparameters and data."
            )
        relative = norm / torch.clamp(scale, min=torch.finfo(scale.dtype).tiny)
        worst = float(relative.max())
        if self.inner_rtol is not None and worst > self.inner_rtol:
            warn_at_caller(
                f"The inner solution is far from optimal: ||F(w*, lambda)|| = "
                f"{float(norm.max()):.2e} is {worst:.1e} of ||A w*|| (inner_rtol="
                f"{self.inner_rtol:g}; {where()}). The implicit function theorem assumes F = 0 "
                "there, so the hypergradient is biased by about that much: solve the inner "
                "problem more accurately (more steps, a tighter tolerance).",
                InnerSolutionWarning,
            )

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
        problem = Linearised.at(self, condition, solution, hparams, args, cotangent, selected)
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
        self,
        reduction: DataParallel | None,
        options: _compile.Compile | None,
        warm_start: bool,
        preconditioner: NystromPreconditioner | None,
    ) -> None:
        self.reduction = reduction
        self.compiled = None if options is None else _compile.CompiledFunctions(options)
        self.warm_start = warm_start
        self.reused = None if preconditioner is None else ReusedPreconditioner(preconditioner)
        self._last: dict[str, Tree] = {}

    def initial(self, kind: str) -> Tree | None:
        return self._last.get(kind) if self.warm_start else None

    def remember(self, kind: str, solution: Tree, info: SolveInfo) -> None:
        if not unbatched(solution):
            return  # a solution with a vmap batch dimension belongs to that batch
        if self.reused is not None:
            self.reused.observe(int(concrete(info.num_steps)), bool(concrete(info.failed)))
        if not self.warm_start:
            return
        if bool(concrete(info.successful).all()):
            self._last[kind] = tree_map(lambda t: concrete(t).clone(), solution)
