"""Run the comparison: train, form the exact reference, then time and measure every method."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.func import grad
from tqdm.auto import tqdm

import implicitfn
from implicitfn.compare.methods import (
    CURVATURES,
    UNROLLED,
    Method,
    SweptFields,
    method_names,
    plan,
)
from implicitfn.compare.problems import Problem, train_to_optimum

__all__ = ["CompareConfig", "Comparison", "Record", "run"]

# Products per vmapped call while forming the dense reference: bounds its extra memory.
REFERENCE_CHUNK = 64
# Gradients timed after each timed run of a method; the fastest is that method's unit of time.
UNIT_SAMPLES = 3
# Stop repeating a method's timed runs once they took this long together (slow runs vary less).
TIMING_BUDGET_S = 2.0
MEMORY_METHOD = {
    "cpu": (
        "torch.profiler with profile_memory=True records every allocation and free of torch's "
        "CPU allocator with a time stamp; the peak of their running sum during the call is "
        "reported (tensors alive before the call are not counted, nor are Python objects). "
        "tracemalloc would miss it all: tensor memory bypasses Python's allocator."
    ),
    "cuda": "torch.cuda.max_memory_allocated() minus memory_allocated() before the call.",
}


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """What [`run`][implicitfn.compare.run] compares and how it measures.

    **Arguments:**

    - `steps`: the budgets $k$ to sweep: the `max_steps` or `rank` of each solver, and
      the number of unrolled steps. Solvers without a budget (`Dense`, `Identity`) run once.
    - `solvers`: names from [`method_names`][implicitfn.compare.method_names] (case does not
      matter); `None` for all of them.
    - `curvatures`: `"Hessian"` and/or `"GaussNewton"`.
    - `rtol`: the tolerance given to every solver with a budget (CG, MINRES, GMRES,
      FixedPoint, Neumann, Nyström, ...): each row's `outcome` then says whether its true
      residual met `rtol` within $k$ products; `0` asks every solver for exactly $k$ products.
    - `alpha`: the step of the series solvers (Neumann, FixedPoint, StochasticNeumann) and the
      learning rate of unrolling: `"auto"` lets each solver estimate $1/\\lambda_{\\max}$ itself
      (the products counted) and unrolls with $1/\\lambda_{\\max}$ of the reference Hessian; a
      number sets it for all.
    - `repeats`: timed runs per method, after one untimed warm-up run; the fastest counts.
      Methods whose timed runs already took 2 s together are not repeated further.
    - `memory`: measure peak memory (one more run per method, under the profiler on CPU).
    - `max_dense_params`: `Dense` forms the matrix in one vmap over all $n$ basis vectors
      (memory $\\propto n$ times a gradient's); above this $n$ it is skipped.
    - `progress`: show a progress bar on standard error.

    ```python
    >>> from implicitfn.compare import CompareConfig
    >>> CompareConfig(steps=(1, 10), solvers=("cg", "unrolled")).solvers
    ('CG', 'Unrolled')
    ```
    """

    steps: tuple[int, ...] = (1, 2, 5, 10, 20, 50)
    solvers: tuple[str, ...] | None = None
    curvatures: tuple[str, ...] = ("Hessian", "GaussNewton")
    rtol: float = 1e-6
    alpha: float | str = "auto"
    repeats: int = 5
    memory: bool = True
    max_dense_params: int = 4000
    progress: bool = True

    def __post_init__(self) -> None:
        steps = tuple(self.steps)
        if not steps or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in steps):
            raise ValueError(f"steps: expected positive ints, e.g. (1, 5, 20), got {self.steps!r}.")
        object.__setattr__(self, "steps", tuple(sorted(set(steps))))
        object.__setattr__(self, "solvers", _canonical("solvers", self.solvers, method_names()))
        object.__setattr__(
            self, "curvatures", _canonical("curvatures", self.curvatures, list(CURVATURES))
        )
        if (
            isinstance(self.rtol, bool)
            or not isinstance(self.rtol, (int, float))
            or not self.rtol >= 0
        ):
            raise ValueError(f"rtol: expected a float >= 0, got {self.rtol!r}.")
        if self.alpha != "auto" and (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, (int, float))
            or not self.alpha > 0
        ):
            raise ValueError(f"alpha: expected 'auto' or a float > 0, got {self.alpha!r}.")
        for name in ("repeats", "max_dense_params"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}.")


def _canonical(field: str, names: Any, valid: list[str]) -> tuple[str, ...]:
    """Map case-insensitive names (dashes ignored) to their canonical spelling."""
    if names is None:
        return tuple(valid)
    if isinstance(names, str) or not all(isinstance(name, str) for name in names):
        raise TypeError(
            f"{field}: expected a tuple of names such as {tuple(valid[:2])}, got {names!r}."
        )
    lookup = {_key(name): name for name in valid}
    unknown = [name for name in names if _key(name) not in lookup]
    if unknown or not names:
        raise ValueError(f"{field}: unknown name(s) {unknown}; choose from {valid}.")
    return tuple(dict.fromkeys(lookup[_key(name)] for name in names))


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


@dataclasses.dataclass(frozen=True)
class Record:
    """One method's result; `None` where a value does not apply (a skipped row, say).

    **Fields:**

    - `method`, `curvature`, `steps`: what ran; `steps` is the budget $k$ (`None`: no budget).
    - `solver`: the configured solver (its `repr`), or the unrolled call.
    - `status`: `"ok"` (the solve was successful, or ran the fixed budget it was asked for),
      `"failed"` (the solve's outcome is a failure: see `outcome`), `"nonfinite"` (NaN/Inf),
      `"skipped"` or `"error"` (an exception; `message` has it).
    - `cosine`, `relative_error`: $\\cos(g, g^*)$ and $\\lVert g - g^*\\rVert / \\lVert g^*\\rVert$
      against the reference $g^*$.
    - `outcome`, `relative_residual`, `relative_tolerance`, `num_steps`: from the solver's
      [`SolveInfo`][implicitfn.SolveInfo]: the [`Outcome`][implicitfn.Outcome] name, the
      measured true residual and the tolerance it was judged against, both relative to
      $\\lVert b\\rVert$, and the operator products it reports.
    - `time_s`, `time_grad_evals`: the fastest of `repeats` runs of the whole hypergradient
      call, in seconds and in units of one training-loss gradient (the fastest of those timed
      between the method's runs, so that the load of a shared machine weighs on both alike).
    - `peak_memory_bytes`: peak memory above what was allocated before the call.

    ```python
    >>> from implicitfn.compare import Record
    >>> Record("CG", "Hessian", 10, "CG(max_steps=10)", "ok", cosine=1.0).relative_error is None
    True
    ```
    """

    method: str
    curvature: str | None
    steps: int | None
    solver: str
    status: str
    cosine: float | None = None
    relative_error: float | None = None
    outcome: str | None = None
    relative_residual: float | None = None
    relative_tolerance: float | None = None
    num_steps: int | None = None
    time_s: float | None = None
    time_grad_evals: float | None = None
    peak_memory_bytes: int | None = None
    message: str = ""


@dataclasses.dataclass(frozen=True)
class Comparison:
    """What [`run`][implicitfn.compare.run] returns: setting, reference and a record per method.

    **Fields:**

    - `problem`: name, description, `num_params`, `num_hparams`.
    - `environment`: torch version, dtype, device, thread count, how memory was measured.
    - `config`: the [`CompareConfig`][implicitfn.compare.CompareConfig] as a dict.
    - `reference`: the inner optimum's gradient norm, the extreme eigenvalues and condition
      number of the Hessian, the dense solve's relative residual, the median time of one
      gradient (`grad_eval_s`; `time_grad_evals` uses one timed next to each method) and of the
      reference itself, and the unrolled learning rate.
    - `records`: the [`Record`][implicitfn.compare.Record]s in report order.

    `to_dict()` gives plain JSON-ready values (NaN and Inf become `None`).

    ```python
    >>> import torch
    >>> from implicitfn.compare import CompareConfig, Problem, run
    >>> problem = Problem("quadratic", lambda p, h: ((p - h) ** 2).sum() + (p ** 4).sum(),
    ...                   lambda p, h: p.sum(), torch.zeros(3, dtype=torch.float64),
    ...                   torch.ones(3, dtype=torch.float64))
    >>> comparison = run(problem, CompareConfig(steps=(2,), solvers=("CG",), repeats=1,
    ...                                         curvatures=("Hessian",), progress=False))
    >>> [(r.method, r.steps, r.status) for r in comparison.records]
    [('CG', 2, 'ok')]
    >>> sorted(comparison.to_dict())
    ['config', 'environment', 'problem', 'records', 'reference']
    ```
    """

    problem: dict[str, Any]
    environment: dict[str, Any]
    config: dict[str, Any]
    reference: dict[str, Any]
    records: tuple[Record, ...]

    def to_dict(self) -> dict[str, Any]:
        return _json_ready(dataclasses.asdict(self))


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run(problem: Problem, config: CompareConfig = CompareConfig()) -> Comparison:
    r"""Compare every selected method on `problem` against the exact hypergradient.

    1. Trains the inner problem tightly ([`train_to_optimum`][implicitfn.compare.train_to_optimum]).
    2. Forms the Hessian $A$ at $w^*$ densely (vmapped products in chunks) and solves
       $A v = \nabla_w L_V$ exactly: $g^* = \nabla_\lambda L_V - B^\top v$ is the reference.
    3. Runs each method (every solver × curvature × budget, and unrolling) through
       [`hypergradient`][implicitfn.hypergradient] /
       [`unrolled_hypergradient`][implicitfn.unrolled_hypergradient] with
       `on_failure="warn"`, and records accuracy, the solver's report, time and memory.
       A numerical failure is a row of the table; any other exception is recorded as
       `"error"` and the run goes on.

    **Arguments:**

    - `problem`: a [`Problem`][implicitfn.compare.Problem], e.g. from
      [`make_problem`][implicitfn.compare.make_problem].
    - `config`: a [`CompareConfig`][implicitfn.compare.CompareConfig].

    **Returns:** a [`Comparison`][implicitfn.compare.Comparison].

    ```python
    >>> from implicitfn.compare import CompareConfig, make_problem, run
    >>> config = CompareConfig(steps=(5, 50), solvers=("CG", "Neumann"), curvatures=("Hessian",),
    ...                        repeats=1, memory=False, progress=False)
    >>> comparison = run(make_problem("logreg"), config)
    >>> [(r.method, r.steps, r.relative_error < 0.01) for r in comparison.records]
    [('CG', 5, False), ('CG', 50, True), ('Neumann', 5, False), ('Neumann', 50, False)]
    ```
    """
    if not isinstance(problem, Problem):
        raise TypeError(
            f"problem: expected an implicitfn.compare.Problem (see make_problem), got "
            f"{type(problem).__name__}."
        )
    if not isinstance(config, CompareConfig):
        raise TypeError(f"config: expected a CompareConfig, got {type(config).__name__}.")
    device = implicitfn.tree_ravel(problem.params)[0].device
    swept = SweptFields(config.rtol, config.alpha, problem.batches)
    methods = plan(
        config.solvers,
        config.curvatures,
        config.steps,
        swept,
        gauss_newton_possible=isinstance(problem.train_loss, implicitfn.CompositeLoss),
        dense_possible=problem.num_params <= config.max_dense_params,
    )
    with tqdm(
        total=2 + len(methods),
        desc=problem.name,
        disable=not config.progress,
        file=sys.stderr,
        dynamic_ncols=True,
    ) as progress:
        progress.set_postfix_str("training the inner problem")
        params, gradient_norm = train_to_optimum(problem)
        progress.update()
        progress.set_postfix_str("dense reference")
        reference, facts = _reference(problem, params, device)
        progress.update()
        gradient = _gradient_of(problem, params)
        gradient()  # warm-up
        facts["grad_eval_s"] = statistics.median(_timed(gradient, device) for _ in range(15))
        eigenvalue_max = facts["hessian_eigenvalue_max"]
        learning_rate = 1.0 / eigenvalue_max if config.alpha == "auto" else float(config.alpha)
        facts.update(
            inner_gradient_norm=gradient_norm,
            # train_to_optimum aims lower; above sqrt(eps) w* is not a tight optimum.
            inner_converged=gradient_norm <= torch.finfo(reference.dtype).eps ** 0.5,
            unrolled_learning_rate=learning_rate,
        )
        records = []
        for method in methods:
            progress.set_postfix_str(_label(method))
            records.append(
                _measure(
                    problem,
                    params,
                    method,
                    reference,
                    learning_rate,
                    config,
                    device,
                    gradient,
                )
            )
            progress.update()
    return Comparison(
        problem={
            "name": problem.name,
            "description": problem.description,
            "num_params": problem.num_params,
            "num_hparams": problem.num_hparams,
        },
        environment={
            "torch": torch.__version__,
            "dtype": str(implicitfn.tree_ravel(problem.params)[0].dtype).removeprefix("torch."),
            "device": str(device),
            "threads": torch.get_num_threads(),
            "memory_method": MEMORY_METHOD.get(device.type, "not measured on this device"),
        },
        config=dataclasses.asdict(config),
        reference=facts,
        records=tuple(records),
    )


def _label(method: Method) -> str:
    parts = [method.name, method.curvature, None if method.steps is None else f"k={method.steps}"]
    return " ".join(part for part in parts if part)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reference(problem: Problem, params: Any, device: torch.device) -> tuple[torch.Tensor, dict]:
    """The exact hypergradient (raveled) from a dense solve with the Hessian, and facts about it."""
    _synchronize(device)
    start = time.perf_counter()
    hparams, inner_args = problem.hparams, problem.inner_args
    hessian = implicitfn.Hessian().linearize(problem.train_loss, params, hparams, *inner_args)
    _, unravel = implicitfn.tree_ravel(params)
    matrix = hessian.as_matrix(chunk_size=REFERENCE_CHUNK)
    size = matrix.shape[0]
    matrix = 0.5 * (matrix + matrix.T)  # symmetric in exact arithmetic; remove round-off
    direct_params, direct_hparams = grad(problem.outer_loss, argnums=(0, 1))(
        params, hparams, *problem.outer_args
    )
    rhs = implicitfn.tree_ravel(direct_params)[0]
    factor, failed = torch.linalg.cholesky_ex(matrix)
    positive_definite = not bool(failed)
    if positive_definite:  # a strict local minimum, as the implicit function theorem wants
        adjoint = torch.cholesky_solve(rhs[:, None], factor)[:, 0]
    else:
        adjoint = torch.linalg.solve(matrix, rhs)
    residual = float(
        torch.linalg.vector_norm(matrix @ adjoint - rhs) / torch.linalg.vector_norm(rhs)
    )
    condition = implicitfn.stationarity(problem.train_loss)
    implicit, _ = implicitfn.cross_vjp(condition, unravel(-adjoint), params, hparams, *inner_args)
    reference = implicitfn.tree_ravel(implicitfn.tree_axpy(1.0, direct_hparams, implicit))[0]
    if not torch.isfinite(reference).all():
        raise FloatingPointError(
            "the dense reference hypergradient has NaN/Inf; check the problem."
        )
    # Extreme eigenvalues by power iteration (on A, and on A^-1 through the Cholesky factor):
    # a full eigendecomposition would cost minutes at n ~ 10^4.
    largest = _top_eigenvalue(lambda v: matrix @ v, size, rhs)
    smallest = None
    if positive_definite:
        inverse = _top_eigenvalue(
            lambda v: torch.cholesky_solve(v[:, None], factor)[:, 0], size, rhs
        )
        smallest = 1.0 / inverse
    _synchronize(device)
    facts = {
        "time_s": time.perf_counter() - start,
        "dense_relative_residual": residual,
        "hessian_positive_definite": positive_definite,
        "hessian_eigenvalue_min": smallest,
        "hessian_eigenvalue_max": largest,
        "condition_number": None if smallest is None else largest / smallest,
        "reference_norm": float(torch.linalg.vector_norm(reference)),
    }
    return reference, facts


def _top_eigenvalue(
    apply: Callable[[torch.Tensor], torch.Tensor], size: int, like: torch.Tensor, steps: int = 200
) -> float:
    """The largest eigenvalue of a symmetric PSD map: Rayleigh quotient after power iteration."""
    start = torch.randn(size, generator=torch.Generator().manual_seed(0), dtype=like.dtype)
    vector = start.to(like.device)
    for _ in range(steps):
        image = apply(vector)
        vector = image / torch.linalg.vector_norm(image)
    return float(vector @ apply(vector))


def _gradient_of(problem: Problem, params: Any) -> Callable[[], Any]:
    """One training-loss gradient at `params`: the unit of cost."""
    train_gradient = grad(problem.train_loss)
    return lambda: train_gradient(params, problem.hparams, *problem.inner_args)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def _measure(
    problem: Problem,
    params: Any,
    method: Method,
    reference: torch.Tensor,
    learning_rate: float,
    config: CompareConfig,
    device: torch.device,
    gradient: Callable[[], Any],
) -> Record:
    base = dict(method=method.name, curvature=method.curvature, steps=method.steps)
    if method.name == UNROLLED:
        base["solver"] = (
            f"unrolled_hypergradient(steps={method.steps}, learning_rate={learning_rate:.4g})"
        )
    else:
        base["solver"] = repr(method.solver) if method.solver is not None else ""
    if method.skipped:
        return Record(**base, status="skipped", message=method.skipped)

    def compute() -> tuple[Any, implicitfn.SolveInfo | None]:
        if method.name == UNROLLED:
            result, _ = implicitfn.unrolled_hypergradient(
                problem.train_loss,
                problem.outer_loss,
                params,
                problem.hparams,
                steps=method.steps,
                learning_rate=learning_rate,
                inner_args=problem.inner_args,
                outer_args=problem.outer_args,
            )
            return result, None
        adjoint = implicitfn.ImplicitAdjoint(
            solver=method.solver, curvature=CURVATURES[method.curvature], on_failure="warn"
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", implicitfn.ImplicitSolveWarning)
            return problem.hypergradient(params, adjoint)

    try:
        result, info = compute()  # the warm-up: not timed
        samples: list[float] = []
        units: list[float] = []  # gradients timed between the runs: load weighs on both alike
        while len(samples) < config.repeats and sum(samples) < TIMING_BUDGET_S:
            samples.append(_timed(compute, device))
            units.append(min(_timed(gradient, device) for _ in range(UNIT_SAMPLES)))
        seconds, unit = min(samples), min(units)
        peak_memory = _peak_memory(compute, device) if config.memory else None
    except (implicitfn.ImplicitSolveError, FloatingPointError) as failure:  # NaN/Inf: data
        report = _solve_report(getattr(failure, "info", None))
        return Record(**base, status="nonfinite", **report, message=str(failure).split(". ")[0])
    except Exception as error:  # one failing method must not end the comparison
        return Record(**base, status="error", message=f"{type(error).__name__}: {error}")
    estimate = implicitfn.tree_ravel(result)[0]
    error = torch.linalg.vector_norm(estimate - reference) / torch.linalg.vector_norm(reference)
    cosine = torch.nn.functional.cosine_similarity(estimate, reference, dim=0)
    report = _solve_report(info)
    if not bool(torch.isfinite(estimate).all()):
        status = "nonfinite"
    elif info is not None and bool(info.failed):
        status = "failed"
    else:
        status = "ok"
    return Record(
        **base,
        status=status,
        cosine=float(cosine),
        relative_error=float(error),
        **report,
        time_s=seconds,
        time_grad_evals=seconds / unit,
        peak_memory_bytes=peak_memory,
    )


def _solve_report(info: implicitfn.SolveInfo | None) -> dict[str, Any]:
    if info is None:
        return {}
    rhs_norm = float(info.rhs_norm)
    return {
        "outcome": info.outcome_names()[0],
        "relative_residual": float(info.relative_residual),
        "relative_tolerance": float(info.tolerance) / rhs_norm if rhs_norm > 0 else 0.0,
        "num_steps": int(info.num_steps),
    }


def _peak_memory(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Peak bytes allocated by `fn` above what was allocated before it (see MEMORY_METHOD)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu":
        return None
    activities = [torch.profiler.ProfilerActivity.CPU]
    with (
        _quiet_stderr(),
        torch.profiler.profile(activities=activities, profile_memory=True) as prof,
    ):
        fn()
    # The raw events hold each allocation (+bytes) and free (-bytes); building the profiler's
    # operator tree (prof.events()) would cost far more than the call being measured.
    changes = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    running = peak = 0
    for _, change in changes:
        running += change
        peak = max(peak, running)
    return peak


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2: the profiler's C++ side logs every start and stop there."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
