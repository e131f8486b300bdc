"""Shared pieces of the benchmarks (not a benchmark itself).

- Timing: every compared method runs once per *round*, in a rotating order, so that load from
  other processes on a shared machine hits all of them alike; a ratio is the median over rounds
  of the ratio *within* a round (paired), and times are medians (with the minimum shown).
  `median_time` times one function alone (`hessian_modes.py`, and `compiled.py` within rounds).
- Problems: the `logreg` and `mlp` problems of `implicitfn compare` (scikit-learn digits, one
  weight-decay hyperparameter per weight), trained tightly in float64 and run in float32, with
  the exact hypergradient from a dense Cholesky solve in float64 (cached on disk: it takes
  minutes for the MLP).
- Devices: the benchmarks take `--device` (cpu, or cuda[:index]; `before_after.py` excepted),
  checked by `check_device` before any work; the timers synchronise CUDA (`synchronize`).
- Peers: the same problem written for torchopt (`torchopt.diff.implicit.custom_root` on tuples
  of tensors, as its documentation does it) and for plain reverse-mode unrolling.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

import implicitfn
from implicitfn.compare import make_problem, train_to_optimum

# The device check of `implicitfn compare --device` (private there; reused, not copied).
from implicitfn.compare.cli import _device as _check_device

# torchopt 0.7.3 calls the deprecated `functorch.vjp` on every backward pass; the warning is
# not about this benchmark (and printing it would cost time inside the timed region).
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torchopt\.")
warnings.filterwarnings("ignore", category=implicitfn.ImplicitSolveWarning)

CACHE = os.path.join(tempfile.gettempdir(), "implicitfn-benchmarks")


def machine(threads: int) -> str:
    """One line about where the numbers come from."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {os.cpu_count()} cores, load average {load:.1f}; torch {torch.__version__}, "
        f"{threads} torch thread(s)"
    )


def check_device(parser: argparse.ArgumentParser, device: str) -> str:
    """`device` when it names a usable torch device (cpu, or cuda[:index] with CUDA present);
    otherwise a usage error through `parser` (exit status 2) that names `--device` and the fix,
    before any work is done."""
    try:
        _check_device(device)
    except ValueError as error:
        parser.error(str(error))
    return device


# ---------------------------------------------------------------------------------------------
# Timing


def synchronize() -> None:
    """Wait for queued GPU work, so that a timer stops when the work is done (no-op on a CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved(
    methods: dict[str, Callable[[], Any]], rounds: int, progress: Any = None
) -> dict[str, list[float]]:
    """Wall times of every method over `rounds` rounds, after one untimed warm-up call each.

    Each round calls every method once; the order rotates from round to round.
    """
    for fn in methods.values():
        fn()
    names = list(methods)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize()
            start = time.perf_counter()
            methods[name]()
            synchronize()
            times[name].append(time.perf_counter() - start)
        if progress is not None:
            progress.update()
    return times


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def median_time(fn: Callable[[], Any], repeats: int, *, warm_up: bool = False) -> float:
    """Median wall time of `fn()` over `repeats` calls (after one untimed call if `warm_up`)."""
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of numerator / denominator measured in the same round."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


# ---------------------------------------------------------------------------------------------
# Problems


@dataclasses.dataclass
class Setup:
    """A comparison problem at its inner optimum, in float32, in every library's form."""

    name: str
    problem: Any  # implicitfn.compare.Problem in float32 (TensorDict losses)
    params: Any  # w*, TensorDict, float32
    hparams: Any  # lambda (log-penalties), TensorDict, float32
    names: list[str]  # leaf names, in pytree order (the order of every tuple below)
    params_tuple: tuple[torch.Tensor, ...]
    hparams_tuple: tuple[torch.Tensor, ...]
    reference: torch.Tensor  # exact hypergradient (float64, raveled in pytree order)
    eigenvalue_max: float  # of the training-loss Hessian at w*
    eigenvalue_min: float
    gradient_norm: float  # of the training loss at w* (float64)

    @property
    def inner_args(self) -> tuple[Any, ...]:
        return self.problem.inner_args

    @property
    def outer_args(self) -> tuple[Any, ...]:
        return self.problem.outer_args

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.params_tuple)

    def cosine(self, hypergradient: Any) -> float:
        """Cosine between a hypergradient (tree or tuple in pytree order) and the reference."""
        flat = torch.cat([t.reshape(-1) for t in pytree.tree_leaves(hypergradient)])
        return float(F.cosine_similarity(flat.double().cpu(), self.reference, dim=0))

    # -- the plain-tensor losses torchopt and the unrolled loop use (same maths as `problem`) --

    def logits(self, params: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
        p = dict(zip(self.names, params, strict=True))
        if self.name == "logreg":
            return F.linear(x, p["weight"], p["bias"])
        hidden = torch.tanh(F.linear(x, p["0.weight"], p["0.bias"]))
        return F.linear(hidden, p["2.weight"], p["2.bias"])

    def train_loss(self, params, hparams, x, y) -> torch.Tensor:
        penalty = sum((h.exp() * w * w).sum() for w, h in zip(params, hparams, strict=True))
        return F.cross_entropy(self.logits(params, x), y) + 0.5 * penalty

    def outer_loss(self, params, x, y) -> torch.Tensor:
        return F.cross_entropy(self.logits(params, x), y)


def _names(tree: Any) -> list[str]:
    flat, _ = pytree.tree_flatten_with_path(tree)
    return [".".join(str(getattr(k, "key", k)) for k in path) for path, _ in flat]


def load(
    name: str, *, progress: Callable[[str], None] = lambda _: None, device: str = "cpu"
) -> Setup:
    """The problem `name` at its inner optimum, with its exact hypergradient (cached; computed
    on the CPU in float64), its data and parameters on `device`."""
    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, f"{name}-{torch.__version__}.pt")
    exact = make_problem(name, dtype=torch.float64)
    if os.path.exists(path):
        cached = torch.load(path, weights_only=False)
    else:
        progress("training to the optimum (float64)")
        params, gradient_norm = train_to_optimum(exact)
        progress("dense reference (float64, cached for next time)")
        matrix = dense_hessian(exact, params)
        for _ in range(3):
            if not bool(torch.linalg.cholesky_ex(matrix)[1]):
                break
            # Not a strict minimum yet (the MLP: L-BFGS + Newton stop at |grad| ~ 1e-5 with an
            # indefinite Hessian); polish it: minutes, once.
            progress("Hessian indefinite: polishing w* with L-BFGS (minutes, once)")
            params, gradient_norm = _polish(exact, params)
            matrix = dense_hessian(exact, params)
        cached = dict(
            params=implicitfn.tree_ravel(params)[0],
            gradient_norm=gradient_norm,
            **_reference(exact, params, matrix),
        )
        torch.save(cached, path)
    unravel = implicitfn.tree_ravel(exact.params)[1]
    problem = make_problem(name, dtype=torch.float32, device=device)
    params = unravel(cached["params"]).apply(lambda t: t.float().to(device))
    hparams = problem.hparams
    names = _names(params)
    setup = Setup(
        name=name,
        problem=problem,
        params=params,
        hparams=hparams,
        names=names,
        params_tuple=tuple(pytree.tree_leaves(params)),
        hparams_tuple=tuple(pytree.tree_leaves(hparams)),
        reference=cached["reference"],
        eigenvalue_max=cached["eigenvalue_max"],
        eigenvalue_min=cached["eigenvalue_min"],
        gradient_norm=cached["gradient_norm"],
    )
    # The plain losses must be the problem's losses, written differently.
    x, y = setup.inner_args
    a = float(problem.train_loss(params, hparams, x, y))
    b = float(setup.train_loss(setup.params_tuple, setup.hparams_tuple, x, y))
    assert math.isclose(a, b, rel_tol=1e-5), (a, b)
    return setup


def minimise_lbfgs(problem: Any, params: Any, **options: Any) -> tuple[Any, float]:
    """L-BFGS on the training loss of `problem` from `params`, on the raveled weights.

    `options` go to `torch.optim.LBFGS`; one `step` runs `max_iter` iterations at most.

    **Returns:** `(params, gradient_norm)`: the point reached and the norm of the training
    loss's gradient there.
    """
    start, unravel = implicitfn.tree_ravel(params)
    flat = start.detach().clone().requires_grad_(True)
    lbfgs = torch.optim.LBFGS([flat], **options)

    def closure() -> torch.Tensor:
        lbfgs.zero_grad()
        loss = problem.train_loss(unravel(flat), problem.hparams, *problem.inner_args)
        loss.backward()
        return loss

    lbfgs.step(closure)
    params = unravel(flat.detach())
    gradient = torch.func.grad(problem.train_loss)(params, problem.hparams, *problem.inner_args)
    return params, float(implicitfn.tree_norm(gradient))


def _polish(problem: Any, params: Any) -> tuple[Any, float]:
    """More L-BFGS from `params` (the MLP: 12,580 iterations to |grad| = 3e-8, 6 minutes)."""
    return minimise_lbfgs(
        problem, params, lr=1.0, max_iter=30000, tolerance_grad=1e-11, tolerance_change=0.0,
        history_size=100, line_search_fn="strong_wolfe",
    )  # fmt: skip


def dense_hessian(problem: Any, params: Any, chunk: int = 128) -> torch.Tensor:
    """The training loss's Hessian at `params`, formed by vmapped products (symmetrised)."""
    hparams, args = problem.hparams, problem.inner_args
    hessian = implicitfn.Hessian().linearize(problem.train_loss, params, hparams, *args)
    matrix = hessian.as_matrix(chunk_size=chunk)
    return 0.5 * (matrix + matrix.T)


def _reference(problem: Any, params: Any, matrix: torch.Tensor) -> dict[str, Any]:
    """Exact hypergradient from a Cholesky solve with the dense Hessian; its extreme eigenvalues."""
    hparams, args = problem.hparams, problem.inner_args
    unravel = implicitfn.tree_ravel(params)[1]
    direct_w, direct_h = torch.func.grad(problem.outer_loss, argnums=(0, 1))(
        params, hparams, *problem.outer_args
    )
    rhs = implicitfn.tree_ravel(direct_w)[0]
    factor, failed = torch.linalg.cholesky_ex(matrix)
    if bool(failed):  # not a strict minimum: the theorem still holds if A is invertible
        print("  [warning: the Hessian at w* is indefinite; LU solve]", file=sys.stderr)
        adjoint = torch.linalg.solve(matrix, rhs)
    else:
        adjoint = torch.cholesky_solve(rhs[:, None], factor)[:, 0]
    condition = implicitfn.stationarity(problem.train_loss)
    implicit, _ = implicitfn.cross_vjp(condition, unravel(-adjoint), params, hparams, *args)
    reference = implicitfn.tree_ravel(implicitfn.tree_axpy(1.0, direct_h, implicit))[0]
    generator = torch.Generator().manual_seed(0)
    vector = torch.randn(rhs.numel(), generator=generator, dtype=rhs.dtype)
    inverse = vector.clone()
    for _ in range(100):  # power iteration on A and on A^{-1}
        vector = matrix @ vector
        vector /= vector.norm()
        if bool(failed):
            inverse = torch.linalg.solve(matrix, inverse)
        else:
            inverse = torch.cholesky_solve(inverse[:, None], factor)[:, 0]
        inverse /= inverse.norm()
    top = float(vector @ matrix @ vector)
    bottom = float(inverse @ matrix @ inverse)
    return dict(reference=reference, eigenvalue_max=top, eigenvalue_min=bottom)


# ---------------------------------------------------------------------------------------------
# The methods, each a function of nothing that returns a hypergradient


def implicitfn_decorated(
    setup: Setup, solver: Any, curvature: Any = None, *, plain: bool = False
) -> Callable[[], Any]:
    """`implicit_diff` around an inner solver that returns w*, then `autograd.grad` of L_V.

    The same flow as torchopt's `custom_root` below. `plain=True` uses torchopt's plain-tensor
    losses (params in a dict) instead of the problem's TensorDict ones.
    """
    curvature = curvature or implicitfn.Hessian()
    x, y = setup.inner_args
    x_val, y_val = setup.outer_args
    if plain:
        names = setup.names
        params = dict(zip(names, setup.params_tuple, strict=True))
        hparams = dict(zip(names, setup.hparams_tuple, strict=True))

        def train(p, h, x, y):
            return setup.train_loss(tuple(p.values()), tuple(h.values()), x, y)

        def outer(p, h, x, y):
            return setup.outer_loss(tuple(p.values()), x, y)

        condition = implicitfn.stationarity(train)
    else:
        params, hparams = setup.params, setup.hparams
        condition = implicitfn.stationarity(setup.problem.train_loss)
        outer = setup.problem.outer_loss

    @implicitfn.implicit_diff(
        condition,
        adjoint=implicitfn.ImplicitAdjoint(solver=solver, curvature=curvature, on_failure="warn"),
    )
    def inner(params, hparams, x, y):
        return params  # the inner solver already ran: w* is given

    def run() -> tuple[torch.Tensor, ...]:
        leaves = [t.detach().requires_grad_() for t in pytree.tree_leaves(hparams)]
        h = pytree.tree_unflatten(leaves, pytree.tree_structure(hparams))
        solution = inner(params, h, x, y)
        return torch.autograd.grad(outer(solution, h, x_val, y_val), leaves)

    return run


def implicitfn_function(setup: Setup, solver: Any, curvature: Any = None) -> Callable[[], Any]:
    """`implicitfn.hypergradient` (no decorator) on the problem's own losses."""
    curvature = curvature or implicitfn.Hessian()

    def run() -> Any:
        return implicitfn.hypergradient(
            setup.problem.train_loss,
            setup.problem.outer_loss,
            setup.params,
            setup.hparams,
            inner_args=setup.inner_args,
            outer_args=setup.outer_args,
            adjoint=implicitfn.ImplicitAdjoint(
                solver=solver, curvature=curvature, on_failure="warn"
            ),
        )[0]

    return run


def torchopt_custom_root(setup: Setup, solve: Any) -> Callable[[], Any]:
    """torchopt's implicit differentiation as its documentation writes it.

    `optimality` is the gradient of the training loss (`torch.func.grad`), the decorated inner
    solver returns w*, and `solve` is one of `torchopt.linear_solve.solve_cg(...)`,
    `solve_inv(ns=True, ...)` or `solve_normal_cg(...)`.
    """
    import torchopt

    x, y = setup.inner_args
    x_val, y_val = setup.outer_args
    solution = setup.params_tuple

    def optimality(params, meta_params, x, y):
        return torch.func.grad(setup.train_loss)(params, meta_params, x, y)

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
    def inner(params, meta_params, x, y):
        return solution

    def run() -> tuple[torch.Tensor, ...]:
        meta = tuple(t.detach().requires_grad_() for t in setup.hparams_tuple)
        params = inner(solution, meta, x, y)
        return torch.autograd.grad(setup.outer_loss(params, x_val, y_val), meta)

    return run


def unrolled(setup: Setup, steps: int, learning_rate: float) -> Callable[[], Any]:
    """Reverse mode through `steps` differentiable SGD steps from w* (truncated back-propagation)."""
    x, y = setup.inner_args
    x_val, y_val = setup.outer_args

    def run() -> tuple[torch.Tensor, ...]:
        meta = tuple(t.detach().requires_grad_() for t in setup.hparams_tuple)
        params = tuple(t.detach().requires_grad_() for t in setup.params_tuple)
        for _ in range(steps):
            loss = setup.train_loss(params, meta, x, y)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            params = tuple(p - learning_rate * g for p, g in zip(params, grads, strict=True))
        return torch.autograd.grad(setup.outer_loss(params, x_val, y_val), meta)

    return run


def stderr_progress(message: str) -> None:
    print(f"  [{message}]", file=sys.stderr, flush=True)
