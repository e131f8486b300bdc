from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch

from implicitfn._linear_solve._base import (
    AbstractLinearSolver,
    check_positive_int,
    check_tolerances,
    initial_residual,
    step_count,
)
from implicitfn._linear_solve._estimates import (
    apply_to_columns,
    check_seed,
    flat_matvec,
    random_matrix,
)
from implicitfn._operator import AbstractLinearOperator
from implicitfn._solution import Outcome
from implicitfn._tree import Tree, tree_add, tree_ravel

_SKETCHES = ("gaussian", "columns")


class Sketch(NamedTuple):
    r"""The state of Nystrom: $\hat A = U \operatorname{diag}(\lambda) U^\top$, raveled."""

    operator: AbstractLinearOperator
    basis: torch.Tensor  # U, (n, r) with orthonormal columns
    eigenvalues: torch.Tensor  # lambda
    complete: bool  # r = n: the sketch is exact


def low_rank_factors(
    operator: AbstractLinearOperator,
    rank: int,
    sketch: str,
    seed: int,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    r"""`(U, lambda, complete)` of the rank-`rank` Nyström approximation
    $\hat A = U \operatorname{diag}(\lambda) U^\top$ of the raveled operator (of $SAS$ with
    $S = \operatorname{diag}(\text{scale})$ if given), from one vmapped call of `rank` products;
    `complete` when the rank reaches the size (then $\hat A = A$)."""
    matvec, template, _ = flat_matvec(operator)
    if scale is not None:
        matvec = _scaled(matvec, scale)
    size = template.numel()
    rank = min(rank, size)
    omega = random_matrix(sketch, size, rank, seed, template.dtype, template.device)
    if sketch == "gaussian":
        omega = torch.linalg.qr(omega)[0]
    sketched = apply_to_columns(matvec, omega)  # Y = A Omega
    # NaN/Inf products would make the factorisations raise; the residual reports them.
    sketched = torch.where(torch.isfinite(sketched), sketched, 0.0)
    core = omega.T @ sketched
    core = 0.5 * (core + core.T)
    # A_hat = Y core^+ Y^T = Q (R core^+ R^T) Q^T = (Q V) diag(lam) (Q V)^T.
    q, r = torch.linalg.qr(sketched)
    small = r @ torch.linalg.pinv(core, hermitian=True) @ r.T
    eigenvalues, vectors = torch.linalg.eigh(0.5 * (small + small.T))
    return q @ vectors, eigenvalues, rank == size


def _scaled(
    matvec: Callable[[torch.Tensor], torch.Tensor], scale: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    r"""The product $v \mapsto SASv$ with $S = \operatorname{diag}(\text{scale})$."""
    return lambda vector: scale * matvec(scale * vector)


@dataclasses.dataclass(frozen=True)
class Nystrom(AbstractLinearSolver):
    r"""Nyström approximation of the inverse curvature (Hataya & Yamada, AISTATS 2023).

    With a sketch $\Omega \in \mathbb R^{n\times r}$ and $Y = A\Omega$ (the $r$ products are one
    vmapped call), the rank-$r$ Nyström approximation is
    $\hat A = Y (\Omega^\top Y)^{+} Y^\top$; the solver returns
    $x = (\hat A + \rho I)^{-1} b$, inverted through the Woodbury identity: with
    $\hat A = U \Lambda U^\top$ ($U$ orthonormal, $n\times r$),
    $x = U(\Lambda + \rho I)^{-1}U^\top b + \rho^{-1}(b - UU^\top b)$.
    Cost: $r$ products and $O(nr^2)$ work, once, in `init` (the sketch and its
    eigendecomposition); each right-hand side then costs $O(nr)$ and one product for the
    measured residual. No iteration, so no step size to tune, and the same sketch serves a whole
    vmapped batch of right-hand sides and the solve with $A^\top = A$.

    $\hat A$ captures the top of the spectrum; the rest is replaced by $\rho$, so choose $\rho$
    at least about the size of the eigenvalues the sketch misses (and of its error
    $\lVert A - \hat A\rVert$): a $\rho$ far below them inflates those directions by their
    ratio, which shows as a residual above $\lVert b\rVert$ (`Outcome.DIVERGED`), and a $\rho$
    far above shrinks the
    whole solution. A sketch of rank $r$ reliably captures somewhat fewer than $r$ top
    eigenvalues: oversample by a few. With $r \ge n$ the sketch is exact and
    $x = (A + \rho I)^{-1} b$. Meant for symmetric positive semidefinite $A$ (a Gauss-Newton
    matrix, or a Hessian near a minimum).

    The parameters are handled as one raveled vector, so all leaves must share a dtype. The
    rank is its budget: with the default `rtol=0, atol=0` a residual below $\lVert b\rVert$ is
    `MAX_STEPS_REACHED` and not a failure, as for [`Neumann`][implicitfn.Neumann]; with a
    tolerance it is judged as every solver.

    **Arguments:**

    - `rank`: $r$, the number of sketch columns (products); clipped to $n$.
    - `damping`: $\rho > 0$.
    - `sketch`: `"gaussian"` (orthonormalised Gaussian columns: captures the top eigenvectors
      best) or `"columns"` (distinct random columns of the identity, so $Y$ holds $r$ columns of
      $A$, as in Hataya & Yamada).
    - `seed`: the seed of the sketch: the same seed gives the same result, in a loop or a vmap.
    - `rtol`, `atol`: the tolerance the measured residual is judged by (default: none).

    With `initial` $x_0$ it returns $x_0 + (\hat A + \rho I)^{-1}(b - A x_0)$ (one more product).

    ```python
    >>> import torch, implicitfn
    >>> M = torch.diag(torch.tensor([100.0, 10.0, 1.0, 1e-3, 1e-3], dtype=torch.float64))
    >>> op = implicitfn.FunctionLinearOperator(lambda v: M @ v, torch.zeros(5, dtype=M.dtype),
    ...                                       tags={"symmetric", "positive_semidefinite"})
    >>> b = torch.ones(5, dtype=M.dtype)
    >>> x, info = implicitfn.Nystrom(rank=5, damping=1e-3).solve(op, b)
    >>> torch.allclose(x, 1 / (torch.diagonal(M) + 1e-3))      # full rank: exact damped solve
    True
    >>> x, info = implicitfn.Nystrom(rank=3, damping=0.1).solve(op, b)   # top 3 + damping
    >>> info.outcome_names(), bool(info.failed), int(info.num_steps)
    (['max_steps_reached'], False, 3)
    ```
    """

    rank: int = 10
    damping: float = 1e-2
    sketch: Literal["gaussian", "columns"] = "gaussian"
    seed: int = 0
    rtol: float = 0.0
    atol: float = 0.0
    needs_symmetric = True
    needs_positive_definite = True
    residual_growth_is_divergence = True

    def __post_init__(self) -> None:
        check_positive_int(self.rank, "rank")
        if (
            isinstance(self.damping, bool)
            or not isinstance(self.damping, (int, float))
            or not self.damping > 0
        ):
            raise ValueError(
                f"damping: expected a float > 0 (the Woodbury inverse needs rho > 0), got "
                f"{self.damping!r}."
            )
        if self.sketch not in _SKETCHES:
            raise ValueError(f"sketch: expected one of {_SKETCHES}, got {self.sketch!r}.")
        check_seed(self.seed)
        check_tolerances(self)

    @property
    def fixed_steps(self) -> bool:
        return True

    def init(self, operator) -> Sketch:
        r"""The sketch $Y = A\Omega$ and the eigendecomposition of $\hat A$ (`rank` products)."""
        basis, eigenvalues, complete = low_rank_factors(operator, self.rank, self.sketch, self.seed)
        return Sketch(operator, basis, eigenvalues, complete)

    def compute(self, state: Sketch, vector, initial):
        x, r, products = initial_residual(state.operator, vector, initial)
        rhs, unravel = tree_ravel(r)
        coefficients = state.basis.T @ rhs
        correction = state.basis @ (coefficients / (state.eigenvalues + self.damping))
        if not state.complete:  # else the complement is empty: rounding must not be divided by rho
            correction = correction + (rhs - state.basis @ coefficients) / self.damping
        steps = step_count(state.basis.shape[1] + products, vector)
        return tree_add(x, unravel(correction)), None, Outcome.SUCCESSFUL, steps


@dataclasses.dataclass(frozen=True)
class NystromPreconditioner:
    r"""A randomized Nyström preconditioner for [`CG`][implicitfn.CG], built once and reused
    across the solves of an outer loop (Frangella, Tropp & Udell, SIAM J. Matrix Anal. Appl. 2023).

    Pass it as `ImplicitAdjoint(solver=CG(...), preconditioner=NystromPreconditioner(...))`.
    At the first solve the adjoint sketches the operator with `rank` products (one vmapped call)
    into $\hat A = U\operatorname{diag}(\lambda)U^\top$ and preconditions CG with
    $$P^{-1} = \lambda_r\, U\operatorname{diag}(\lambda)^{-1}U^\top + (I - UU^\top),$$
    which maps the top $r$ eigenvalues to about the $r$-th, $\lambda_r$: CG then converges like on
    a matrix with condition number $\lambda_r / \lambda_{\min}$ instead of
    $\lambda_{\max}/\lambda_{\min}$. Between outer steps $A$ moves (new $w^*$, new $\lambda$), but
    $P^{-1}$ stays symmetric positive definite, so CG still converges to the right answer; the
    only cost of a stale preconditioner is more steps. The adjoint therefore keeps it and adds
    up, solve after solve, the steps each one takes beyond the first solve after the build; when
    that excess reaches the cost of a build (`rank` products), or a solve fails, it rebuilds the
    preconditioner at the next solve. This is the rent-or-buy rule: it never spends more than
    twice what the best rebuilding schedule in hindsight would, with nothing to tune. The `rank`
    products of a build are counted in that solve's `num_steps`.

    Sketched eigenvalues at or below $10^{-8}\lambda_1$ (rank deficiency, or an indefinite
    Hessian) are dropped. Solves under `vmap` neither use nor update it.

    A penalty per weight (one decay per weight, the paper's setting) puts a diagonal into $A$
    that spans orders of magnitude once the decays move apart, and a low-rank sketch cannot
    undo a spread-out diagonal. `scaling="penalty"` scales it away first: with $D$ the diagonal
    of the penalty's Hessian and $S = D^{-1/2}$, it sketches $SAS$ and preconditions with
    $S P^{-1} S$. With a penalty $\tfrac12\sum_i e^{h_i} w_i^2$, $SAS = I + S A_{\text{data}} S$,
    and the sketch removes the top of the second term. This pays where the data's curvature
    has a low effective rank (networks, few examples per weight) and loses where it is full
    rank and some decays are tiny: try it on a few steps first. Measured along 30 outer steps
    (`benchmarks/amortised.py --spread 2`, log-decays starting spread by a standard deviation
    of 2): tuning the 9,610 decays of a 64-128-10 MLP took 56,615 products with CG from zero,
    16,156 with a warm-started rank-50 sketch, 1,662 with `scaling="penalty"` as well; a
    deblurring problem (full-rank data curvature) took 4.5x more products with it than CG from
    zero. With equal decays $S$ is a multiple of $I$ and CG takes the same steps as without it.
    $D$ is $z \odot \nabla^2_w\mathrm{penalty}\,z$ for one Rademacher probe $z$: exact for a
    penalty that acts on each weight separately (weight decay in any form), an estimate for
    others; it costs one product of the penalty alone. Weights the penalty does not touch take
    $|z \odot Az|$ instead, one product of $A$ (counted).

    **Arguments:**

    - `rank`: $r$, the products of one build; clipped to the number of parameters.
    - `sketch`, `seed`: as in [`Nystrom`][implicitfn.Nystrom].
    - `scaling`: `None`, or `"penalty"` to scale by the penalty's diagonal first (needs the
      training loss as [`CompositeLoss`][implicitfn.CompositeLoss] with a `penalty`).

    ```python
    >>> import torch, implicitfn
    >>> _ = torch.manual_seed(0)
    >>> X = torch.randn(200, 50, dtype=torch.float64) * torch.logspace(0, 2, 50, dtype=torch.float64)
    >>> y = torch.randn(200, dtype=torch.float64)
    >>> inner = lambda w, lam: 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * lam * (w ** 2).sum()
    >>> outer = lambda w, lam: ((X[:20] @ w - y[:20]) ** 2).mean()
    >>> def steps(adjoint):
    ...     counts = []
    ...     for lam in (1e-2, 1.1e-2, 1.2e-2):
    ...         lam = torch.tensor(lam, dtype=torch.float64)
    ...         w = torch.linalg.solve(X.T @ X / 200 + lam * torch.eye(50, dtype=X.dtype), X.T @ y / 200)
    ...         _, info = implicitfn.hypergradient(inner, outer, w, lam, adjoint=adjoint)
    ...         counts.append(int(info.num_steps))
    ...     return counts
    >>> cg = implicitfn.CG(max_steps=500, rtol=1e-8)
    >>> plain = steps(implicitfn.ImplicitAdjoint(solver=cg, inner_rtol=None))
    >>> reused = steps(implicitfn.ImplicitAdjoint(
    ...     solver=cg, inner_rtol=None, preconditioner=implicitfn.NystromPreconditioner(rank=30)))
    >>> plain, reused        # the first reused count includes the 30 products of the build
    ([146, 146, 146], [69, 39, 39])
    ```
    """

    rank: int = 50
    sketch: Literal["gaussian", "columns"] = "gaussian"
    seed: int = 0
    scaling: Literal["penalty"] | None = None

    def __post_init__(self) -> None:
        check_positive_int(self.rank, "rank")
        if self.sketch not in _SKETCHES:
            raise ValueError(f"sketch: expected one of {_SKETCHES}, got {self.sketch!r}.")
        check_seed(self.seed)
        if self.scaling not in (None, "penalty"):
            raise ValueError(f"scaling: expected None or 'penalty', got {self.scaling!r}.")

    def build(
        self,
        operator: AbstractLinearOperator,
        penalty: Callable[[Tree], Tree] | None = None,
    ) -> tuple[Callable[[Tree], Tree], int]:
        r"""`(r -> P^{-1} r, products spent)` for `operator`: `rank` products (one vmapped call),
        and with `scaling="penalty"` the penalty's Hessian product `penalty` (in the operator's
        layout) once, and at most one more product of the operator."""
        scale, products = None, 0
        if self.scaling == "penalty":
            if penalty is None:
                raise ValueError(
                    "scaling='penalty': this solve has no penalty to scale by; state it as "
                    "implicitfn.CompositeLoss(..., penalty=...), or use scaling=None."
                )
            scale, products = self._penalty_scale(operator, penalty)
        basis, eigenvalues, _ = low_rank_factors(operator, self.rank, self.sketch, self.seed, scale)
        products += basis.shape[1]
        kept = eigenvalues > 1e-8 * eigenvalues.max().clamp(min=0)
        basis, eigenvalues = basis[:, kept], eigenvalues[kept]
        # P^{-1} = S (I + U diag(shrink) U^T) S, S = diag(scale) or I; with nothing positive
        # sketched U has no columns, and the scaling (if any) is all that is left.
        shrink = eigenvalues.min() / eigenvalues - 1.0 if eigenvalues.numel() else eigenvalues

        def apply(r: Tree) -> Tree:
            flat, unravel = tree_ravel(r)
            if scale is not None:
                flat = scale * flat
            flat = flat + basis @ (shrink * (basis.T @ flat))
            return unravel(flat if scale is None else scale * flat)

        return apply, products

    def _penalty_scale(
        self, operator: AbstractLinearOperator, penalty: Callable[[Tree], Tree]
    ) -> tuple[torch.Tensor | None, int]:
        """`(D^{-1/2} raveled or None, products of the operator spent)`."""
        matvec, template, unravel = flat_matvec(operator)
        probe = random_matrix(
            "rademacher", template.numel(), 1, self.seed, template.dtype, template.device
        )[:, 0]
        diagonal = (probe * tree_ravel(penalty(unravel(probe)))[0]).abs()
        products = 0
        untouched = diagonal == 0
        if bool(untouched.any()):  # weights without a penalty: A's own diagonal, one probe
            diagonal = torch.where(untouched, (probe * matvec(probe)).abs(), diagonal)
            products = 1
        top = diagonal.max()
        if not bool(torch.isfinite(top)) or not bool(top > 0):
            return None, products  # nothing to scale by
        return torch.clamp(diagonal, min=1e-12 * top).rsqrt(), products


def check_reusable(preconditioner: Any, solver: Any, compiling: bool, distributed: bool) -> None:
    """Raise unless `ImplicitAdjoint(preconditioner=...)` can keep it with this configuration."""
    if preconditioner is None:
        return
    if not isinstance(preconditioner, NystromPreconditioner):
        raise TypeError(
            "preconditioner: expected implicitfn.NystromPreconditioner(...), got "
            f"{type(preconditioner).__name__}; a fixed callable r -> M^-1 r goes to the solver "
            "instead: CG(preconditioner=...)."
        )
    if solver is not None and (not solver.accepts_preconditioner or solver.preconditioner):
        raise ValueError(
            f"preconditioner: needs a solver that accepts one and has none of its own, got "
            f"{solver!r}; use e.g. implicitfn.CG(max_steps=1000, rtol=1e-4)."
        )
    if compiling or distributed:
        raise ValueError(
            "preconditioner: a reused preconditioner is kept between eager calls, so it cannot "
            "be combined with compile=... or distributed=...; drop one of them."
        )


class ReusedPreconditioner:
    """One adjoint's preconditioner across its solves: built at the first, rebuilt once the
    steps the later solves took beyond the first one after the build add up to a build's cost."""

    def __init__(self, config: NystromPreconditioner) -> None:
        self.config = config
        self.builds = 0
        self._apply: Callable[[Tree], Tree] | None = None
        self._cost = 0  # products of the last build
        self._setup = 0  # products spent building in the current solve
        self._baseline: int | None = None
        self._excess = 0

    def __call__(
        self, operator: AbstractLinearOperator, penalty: Callable[[Tree], Tree] | None = None
    ) -> tuple[Callable[[Tree], Tree], int]:
        """`(apply, products spent now)`: the kept preconditioner, or a new one (`penalty`:
        the penalty's Hessian product, used by `scaling="penalty"`)."""
        self._setup = 0
        if self._apply is None:
            self._apply, self._cost = self.config.build(operator, penalty)
            self._setup, self._baseline, self._excess = self._cost, None, 0
            self.builds += 1
        return self._apply, self._setup

    def observe(self, num_steps: int, failed: bool) -> None:
        """Decide from the last solve whether the next one rebuilds."""
        steps = num_steps - self._setup
        if failed:
            self._apply = None
        elif self._baseline is None:
            self._baseline = steps
        else:
            self._excess += max(steps - self._baseline, 0)
            if self._excess >= self._cost:
                self._apply = None
