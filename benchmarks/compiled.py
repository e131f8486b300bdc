"""Eager vs compiled hypergradients (`compile=True`), with jaxopt under `jax.jit` as a peer.

For each problem (one penalty per weight on scikit-learn's digits, float32, at a trained optimum)
it times one hypergradient with the same fixed-step CG solve (`rtol=None`: exactly k steps) three
ways, interleaved in the same run: implicitfn eager, implicitfn compiled, and jaxopt's
`custom_root` + `solve_cg` under `jax.jit` (the same problem in `jax.numpy`). Compile times are
excluded from the per-call times and reported on their own, with the number of outer steps after
which compiling pays off (compile time / time saved per call). Accuracy: the relative error of
each hypergradient to an exact dense float64 reference (Hessian built column by column, solved
with LU), where the dense Hessian fits.

Run: `python benchmarks/compiled.py [--fast] [--threads 1] [--rounds 5] [--skip-1m]`. JAX is
optional (`pip install -e .[benchmarks]`); without it the jaxopt columns read "n/a" and a note
says so. By default inductor compiles into a fresh cache directory, so the compile time is the
cold one a user pays once; `--reuse-cache` (implied by `--fast`) uses the normal cache.
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
from collections.abc import Callable
from typing import Any

ARGS = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
ARGS.add_argument(
    "--fast", action="store_true", help="CI mode: logistic regression only, few repeats"
)
ARGS.add_argument("--threads", type=int, default=1, help="torch and XLA threads (default 1)")
ARGS.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
ARGS.add_argument("--repeats", type=int, default=5, help="calls per round (median taken)")
ARGS.add_argument("--skip-1m", action="store_true", help="leave out the 1.08M-parameter MLP")
ARGS.add_argument("--reuse-cache", action="store_true", help="keep inductor's on-disk cache")
ARGS.add_argument("--mode", default="default", help="torch.compile mode (default: 'default')")


def configure_environment(args: argparse.Namespace) -> None:
    """Threads and caches are set before torch and jax are imported."""
    if not (args.reuse_cache or args.fast):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="implicitfn-inductor-")
    if args.threads == 1:
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # Compile in this process: a pool of compile workers would still be starting (importing
    # torch) while the timed calls run, on a machine with few cores.
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


if __name__ == "__main__":
    configure_environment(ARGS.parse_args())

import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from tensordict import TensorDict  # noqa: E402

import implicitfn  # noqa: E402
from implicitfn.compare import Problem, make_problem, train_to_optimum  # noqa: E402

try:
    import jax
    import jax.numpy as jnp
    import jaxopt

    jax.config.update("jax_enable_x64", False)
    JAX_NOTE = f"jax {jax.__version__} (jaxopt {getattr(jaxopt, '__version__', 'installed')})"
except ImportError:  # the peer is optional
    jax = jnp = jaxopt = None
    JAX_NOTE = "JAX/jaxopt not installed: jaxopt columns skipped (pip install -e .[benchmarks])"


# ---------------------------------------------------------------------------------------------
# Problems


@dataclasses.dataclass
class Case:
    name: str
    steps: int
    problem: Problem  # float32, params at the optimum
    reference: torch.Tensor | None  # exact hypergradient, raveled, float64
    gradient_norm: float


def digits_problem(name: str, network: torch.nn.Module, penalty: float) -> Problem:
    """The compare command's classifier problem for any network (float32, seed 0)."""
    images, labels = load_digits(return_X_y=True)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    x = torch.as_tensor(images / 16.0, dtype=torch.float32)[order]
    y = torch.as_tensor(labels, dtype=torch.int64)[order]
    apply, params = implicitfn.functional_model(network)
    hparams = params.apply(lambda p: torch.full_like(p, math.log(penalty)))

    def penalty_fn(p, h, x, y):
        return 0.5 * implicitfn.tree_vdot(h.exp(), p * p)

    def cross_entropy(outputs, h, x, y):
        return torch.nn.functional.cross_entropy(outputs, y)

    def outer_loss(p, h, x, y):
        return torch.nn.functional.cross_entropy(apply(p, x), y)

    train_loss = implicitfn.CompositeLoss(lambda p, h, x, y: apply(p, x), cross_entropy, penalty_fn)
    return Problem(
        name, train_loss, outer_loss, params, hparams, (x[:1000], y[:1000]), (x[1000:], y[1000:])
    )


def as_float32(problem: Problem, params: Any) -> Problem:
    def cast(tree):
        return tree.apply(lambda t: t.float()) if isinstance(tree, TensorDict) else tree

    return dataclasses.replace(
        problem,
        params=cast(params),
        hparams=cast(problem.hparams),
        inner_args=tuple(t.float() if t.is_floating_point() else t for t in problem.inner_args),
        outer_args=tuple(t.float() if t.is_floating_point() else t for t in problem.outer_args),
    )


def leaf_keys(tree: TensorDict) -> list[Any]:
    return sorted(tree.keys(include_nested=True, leaves_only=True))


def ravel(tree: TensorDict) -> torch.Tensor:
    """All leaves in one vector, in sorted-key order (the order the jax columns use too)."""
    return torch.cat([tree.get(k).reshape(-1) for k in leaf_keys(tree)])


def dense_reference(problem: Problem, params: Any, chunk: int = 256) -> torch.Tensor:
    """The exact hypergradient: Hessian columns by vmapped products, then an LU solve (float64)."""
    hparams, inner = problem.hparams, problem.inner_args
    hessian = implicitfn.Hessian().linearize(problem.train_loss, params, hparams, *inner)
    flat, unravel = implicitfn.tree_ravel(params)

    def product(vector):
        return implicitfn.tree_ravel(hessian.mv(unravel(vector)))[0]

    columns = []
    for first in range(0, flat.numel(), chunk):
        basis = torch.eye(flat.numel(), dtype=flat.dtype)[first : first + chunk]
        columns.append(torch.func.vmap(product)(basis))
    matrix = torch.cat(columns)
    matrix = 0.5 * (matrix + matrix.T)
    outer_grad = torch.func.grad(problem.outer_loss, argnums=(0, 1))
    direct_w, direct_h = outer_grad(params, hparams, *problem.outer_args)
    adjoint = unravel(torch.linalg.solve(matrix, implicitfn.tree_ravel(direct_w)[0]))
    cross, _ = implicitfn.cross_vjp(
        implicitfn.stationarity(problem.train_loss), adjoint, params, hparams, *inner
    )
    return ravel(direct_h) - ravel(cross)


def build_cases(args: argparse.Namespace) -> list[Case]:
    cases = []
    names = [("logreg", 10)] if args.fast else [("logreg", 10), ("mlp", 20)]
    for name, steps in names:
        problem64 = make_problem(name, dtype=torch.float64)
        params, gradient_norm = train_to_optimum(problem64)
        reference = dense_reference(problem64, params)
        cases.append(Case(name, steps, as_float32(problem64, params), reference, gradient_norm))
    if not (args.fast or args.skip_1m):
        torch.manual_seed(0)
        network = torch.nn.Sequential(
            torch.nn.Linear(64, 1000), torch.nn.Tanh(), torch.nn.Linear(1000, 1000),
            torch.nn.Tanh(), torch.nn.Linear(1000, 10),
        )  # fmt: skip
        # A stronger penalty (1e-2) keeps the Hessian positive definite after a short L-BFGS run
        # (the dense reference, 1.08M^2 entries, does not fit: accuracy is checked peer to peer).
        problem = digits_problem("mlp-1m", network, penalty=1e-2)
        params, gradient_norm = short_training(problem, iterations=60)
        cases.append(
            Case("mlp-1m", 10, dataclasses.replace(problem, params=params), None, gradient_norm)
        )
    return cases


def short_training(problem: Problem, iterations: int) -> tuple[Any, float]:
    flat, unravel = implicitfn.tree_ravel(problem.params)
    flat = flat.detach().clone().requires_grad_(True)
    lbfgs = torch.optim.LBFGS(
        [flat], max_iter=iterations, history_size=10, line_search_fn="strong_wolfe"
    )

    def closure():
        lbfgs.zero_grad()
        loss = problem.train_loss(unravel(flat), problem.hparams, *problem.inner_args)
        loss.backward()
        return loss

    lbfgs.step(closure)
    params = unravel(flat.detach())
    gradient = torch.func.grad(problem.train_loss)(params, problem.hparams, *problem.inner_args)
    return params, float(implicitfn.tree_norm(gradient))


# ---------------------------------------------------------------------------------------------
# The three contenders


def torch_hypergradient(case: Case, compile: Any) -> Callable[[], torch.Tensor]:
    p, solver = case.problem, implicitfn.CG(max_steps=case.steps, rtol=None)

    def run() -> torch.Tensor:
        grads, info = implicitfn.hypergradient(
            p.train_loss, p.outer_loss, p.params, p.hparams, inner_args=p.inner_args,
            outer_args=p.outer_args, solver=solver, compile=compile, on_failure="warn",
        )  # fmt: skip
        return ravel(grads)

    return run


def jax_hypergradient(case: Case) -> Callable[[], Any]:
    """jaxopt's implicit differentiation of the same problem, the whole hypergradient jitted."""
    p = case.problem
    keys = leaf_keys(p.params)
    layers = sorted({k[0] for k in keys if isinstance(k, tuple)}, key=int)

    def to_jax(tree):
        return {k: jnp.asarray(tree.get(k).numpy()) for k in keys}

    def predict(w, x):
        if not layers:  # logistic regression: a single Linear
            return x @ w["weight"].T + w["bias"]
        for i, layer in enumerate(layers):
            x = x @ w[(layer, "weight")].T + w[(layer, "bias")]
            x = jnp.tanh(x) if i < len(layers) - 1 else x
        return x

    def cross_entropy(logits, y):
        log_probs = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=1))

    def train_loss(w, h, x, y):
        penalty = sum(jnp.sum(jnp.exp(h[k]) * w[k] ** 2) for k in w)
        return cross_entropy(predict(w, x), y) + 0.5 * penalty

    def outer_loss(w, h, x, y):
        return cross_entropy(predict(w, x), y)

    def solve(matvec, b):
        return jaxopt.linear_solve.solve_cg(matvec, b, maxiter=case.steps, tol=0.0)

    @jaxopt.implicit_diff.custom_root(jax.grad(train_loss), solve=solve)
    def inner(w, h, x, y):  # the inner problem is already solved: return its solution
        return w

    @jax.jit
    def hypergradient(w, h, x, y, x_val, y_val):
        return jax.grad(lambda h: outer_loss(inner(w, h, x, y), h, x_val, y_val))(h)

    inputs = (to_jax(p.params), to_jax(p.hparams)) + tuple(
        jnp.asarray(t.numpy()) for t in (*p.inner_args, *p.outer_args)
    )

    def run():
        grads = jax.block_until_ready(hypergradient(*inputs))
        return grads, keys

    return run


def ravel_jax(result) -> torch.Tensor:
    grads, keys = result
    return torch.cat([torch.tensor(jax.device_get(grads[k])).reshape(-1) for k in keys])


# ---------------------------------------------------------------------------------------------
# Measurement


def first_call(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def relative_error(value: torch.Tensor, reference: torch.Tensor | None) -> float | None:
    if reference is None:
        return None
    value = value.double()
    return float(torch.linalg.vector_norm(value - reference) / torch.linalg.vector_norm(reference))


def measure(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    row: dict[str, Any] = {"problem": case.name, "n": case.problem.num_params, "steps": case.steps}
    eager = torch_hypergradient(case, False)
    compiled = torch_hypergradient(case, implicitfn.Compile(mode=args.mode))
    eager_value, eager_first = first_call(eager)
    compiled_value, compiled_first = first_call(compiled)
    contenders = {"eager": eager, "compiled": compiled}
    values = {"eager": eager_value, "compiled": compiled_value}
    if jax is not None:
        peer = jax_hypergradient(case)
        jax_value, jax_first = first_call(peer)
        contenders["jax"] = peer
        values["jax"] = ravel_jax(jax_value)
    rounds: dict[str, list[float]] = {name: [] for name in contenders}
    repeats = args.repeats if eager_first < 0.5 else 1  # seconds per call: fewer repeats
    for fn in contenders.values():  # warm-up: caches, allocator, lazy initialisation
        median_time(fn, repeats)
    for _ in range(args.rounds):  # interleaved: load changes hit every contender alike
        for name, fn in contenders.items():
            rounds[name].append(median_time(fn, repeats))
    times = {name: statistics.median(ts) for name, ts in rounds.items()}
    row.update({f"{name}_s": t for name, t in times.items()})
    row["eager/compiled"] = statistics.median(
        [e / c for e, c in zip(rounds["eager"], rounds["compiled"], strict=True)]
    )
    row["compile_s"] = max(compiled_first - times["compiled"], 0.0)
    saved = times["eager"] - times["compiled"]
    row["break_even"] = math.ceil(row["compile_s"] / saved) if saved > 0 else None
    if jax is not None:
        row["compiled/jax"] = statistics.median(
            [c / j for c, j in zip(rounds["compiled"], rounds["jax"], strict=True)]
        )
        row["jax_compile_s"] = max(jax_first - times["jax"], 0.0)
    for name, value in values.items():
        row[f"{name}_error"] = relative_error(value, case.reference)
    row["compiled_vs_eager"] = float(
        torch.linalg.vector_norm(values["compiled"] - values["eager"])
        / torch.linalg.vector_norm(values["eager"])
    )
    if jax is not None:
        row["jax_vs_eager"] = float(
            torch.linalg.vector_norm(values["jax"] - values["eager"])
            / torch.linalg.vector_norm(values["eager"])
        )
    row["gradient_norm"] = case.gradient_norm
    return row


def fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    header = (
        f"{'problem':8s} {'params':>9s} {'CG':>4s} {'eager':>9s} {'compiled':>9s} {'eager/':>8s} "
        f"{'compile':>8s} {'break':>6s} {'jaxopt':>9s} {'compiled/':>9s} {'jax':>7s} "
        f"{'error':>8s} {'error':>8s} {'error':>8s}"
    )
    units = (
        f"{'':8s} {'':>9s} {'k':>4s} {'ms':>9s} {'ms':>9s} {'compiled':>8s} {'s':>8s} "
        f"{'even':>6s} {'jit ms':>9s} {'jaxopt':>9s} {'jit s':>7s} {'eager':>8s} "
        f"{'compiled':>8s} {'jaxopt':>8s}"
    )
    print(header)
    print(units)
    for r in rows:
        print(
            f"{r['problem']:8s} {r['n']:9,d} {r['steps']:4d} {r['eager_s'] * 1e3:9.2f} "
            f"{r['compiled_s'] * 1e3:9.2f} {r['eager/compiled']:8.2f} {r['compile_s']:8.1f} "
            f"{fmt(r['break_even'], 'd'):>6s} "
            f"{fmt(r.get('jax_s') and r['jax_s'] * 1e3, '9.2f'):>9s} "
            f"{fmt(r.get('compiled/jax'), '9.2f'):>9s} {fmt(r.get('jax_compile_s'), '7.1f'):>7s} "
            f"{fmt(r['eager_error'], '8.1e'):>8s} {fmt(r['compiled_error'], '8.1e'):>8s} "
            f"{fmt(r.get('jax_error'), '8.1e'):>8s}"
        )
    print()
    for r in rows:
        jax_part = "" if "jax_vs_eager" not in r else f", jaxopt vs eager {r['jax_vs_eager']:.1e}"
        print(
            f"{r['problem']}: |grad L_T| at the point {r['gradient_norm']:.1e}; relative "
            f"difference compiled vs eager {r['compiled_vs_eager']:.1e}{jax_part}"
        )
    print(
        "\nerror: relative error to the exact dense float64 hypergradient (n/a: too large to "
        "build); break even: outer steps after which compiling has paid for itself."
    )
    if jax is None:
        print(f"NOTE: {JAX_NOTE}")


def main() -> None:
    args = ARGS.parse_args()
    torch.set_num_threads(args.threads)
    if args.fast:
        args.rounds, args.repeats = min(args.rounds, 3), min(args.repeats, 3)
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default (may be warm)")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} torch thread(s), XLA_FLAGS="
        f"{os.environ.get('XLA_FLAGS', '')!r}; {JAX_NOTE}\ninductor cache: {cache}; "
        f"compile mode {args.mode!r}; float32; times: median of {args.rounds} interleaved "
        f"rounds of {args.repeats} calls\n"
    )
    rows = []
    for case in build_cases(args):
        rows.append(measure(case, args))
        print(f"  measured {case.name}", file=sys.stderr, flush=True)
    print_table(rows, args)


if __name__ == "__main__":
    main()
