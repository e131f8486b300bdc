"""Eager vs compiled hypergradients (`compile=True`), with jaxopt under `jax.jit` as a peer.

For each problem (one penalty per weight on scikit-learn's digits, float32, at a trained optimum)
it times one hypergradient with the same fixed-step CG solve (`rtol=0`: exactly k steps) three
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
`--matmul-share` also reports the time of the matrix-product kernels inside a compiled call
(torch.profiler; CPU kernels), beside jaxopt's whole call.

`--device cuda[:index]` runs the two implicitfn columns on a GPU (the float64 training and the
dense reference stay on the CPU; errors are computed there). JAX stays on the CPU whatever the
device (`JAX_PLATFORMS=cpu`, the CPU JAX of `.[benchmarks]`), so on a GPU the jaxopt columns
compare a GPU against a CPU.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import math
import os
import shutil
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
ARGS.add_argument(
    "--device",
    default="cpu",
    help="cpu (default) or cuda[:index] for implicitfn; jax (jaxopt) always runs on the CPU",
)
ARGS.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
ARGS.add_argument("--repeats", type=int, default=5, help="calls per round (median taken)")
ARGS.add_argument("--skip-1m", action="store_true", help="leave out the 1.08M-parameter MLP")
ARGS.add_argument(
    "--logreg-steps",
    type=lambda text: [int(k) for k in text.split(",")],
    default=[10],
    help="CG steps k for logistic regression, comma-separated (default 10; e.g. 5,10,20)",
)
ARGS.add_argument("--reuse-cache", action="store_true", help="keep inductor's on-disk cache")
ARGS.add_argument(
    "--compile-times",
    action="store_true",
    help="print where the compile time went (torch._dynamo's per-phase totals) at the end",
)
ARGS.add_argument(
    "--matmul-share",
    action="store_true",
    help="also report how much of a compiled call is spent in matrix-product kernels "
    "(torch.profiler, CPU kernels only)",
)
ARGS.add_argument(
    "--modes",
    type=lambda text: text.split(","),
    default=None,
    help="compile modes, comma-separated (e.g. default,reduce-overhead); "
    "default: default,reduce-overhead (--fast: default)",
)


def configure_environment(args: argparse.Namespace) -> None:
    """Threads and caches are set before torch and jax are imported."""
    if not (args.reuse_cache or args.fast):
        cache = tempfile.mkdtemp(prefix="implicitfn-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
    if args.threads == 1:
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
        # XLA's CPU runtime still runs work on a second core when one is idle (measured: CPU
        # time / wall time 1.9 with the flags above), so the process is pinned to one core:
        # every contender then gets exactly one.
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # Compile in this process: a pool of compile workers would still be starting (importing
    # torch) while the timed calls run, on a machine with few cores.
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


if __name__ == "__main__":
    configure_environment(ARGS.parse_args())

import _harness as H  # noqa: E402
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


def digits_problem(name: str, network: torch.nn.Module, penalty: float, device: str) -> Problem:
    """The compare command's classifier problem for any network (float32, seed 0), on `device`."""
    images, labels = load_digits(return_X_y=True)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    x = torch.as_tensor(images / 16.0, dtype=torch.float32)[order].to(device)
    y = torch.as_tensor(labels, dtype=torch.int64)[order].to(device)
    apply, params = implicitfn.functional_model(network.to(device))
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


def as_float32(problem: Problem, params: Any, device: str) -> Problem:
    """The problem in float32 at `params`, every tensor on `device`."""

    def tensor(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, torch.float32) if t.is_floating_point() else t.to(device)

    def cast(tree):
        # Leaf by leaf: TensorDict.to(device) would also set its device, changing its pytree spec.
        return tree.apply(tensor) if isinstance(tree, TensorDict) else tree

    return dataclasses.replace(
        problem,
        params=cast(params),
        hparams=cast(problem.hparams),
        inner_args=tuple(tensor(t) for t in problem.inner_args),
        outer_args=tuple(tensor(t) for t in problem.outer_args),
    )


def leaf_keys(tree: TensorDict) -> list[Any]:
    return sorted(tree.keys(include_nested=True, leaves_only=True))


def ravel(tree: TensorDict) -> torch.Tensor:
    """All leaves in one vector, in sorted-key order (the order the jax columns use too)."""
    return torch.cat([tree.get(k).reshape(-1) for k in leaf_keys(tree)])


def dense_reference(problem: Problem, params: Any, chunk: int = 256) -> torch.Tensor:
    """The exact hypergradient: Hessian columns by vmapped products, then an LU solve (float64)."""
    hparams, inner = problem.hparams, problem.inner_args
    matrix = H.dense_hessian(problem, params, chunk)
    unravel = implicitfn.tree_ravel(params)[1]
    outer_grad = torch.func.grad(problem.outer_loss, argnums=(0, 1))
    direct_w, direct_h = outer_grad(params, hparams, *problem.outer_args)
    adjoint = unravel(torch.linalg.solve(matrix, implicitfn.tree_ravel(direct_w)[0]))
    cross, _ = implicitfn.cross_vjp(
        implicitfn.stationarity(problem.train_loss), adjoint, params, hparams, *inner
    )
    return ravel(direct_h) - ravel(cross)


def build_cases(args: argparse.Namespace) -> list[Case]:
    cases = []
    names = (
        [("logreg", args.logreg_steps)]
        if args.fast
        else [("logreg", args.logreg_steps), ("mlp", [20])]
    )
    for name, budgets in names:
        problem64 = make_problem(name, dtype=torch.float64)
        params, gradient_norm = train_to_optimum(problem64)
        reference = dense_reference(problem64, params)
        problem32 = as_float32(problem64, params, args.device)
        cases += [Case(name, k, problem32, reference, gradient_norm) for k in budgets]
    if not (args.fast or args.skip_1m):
        torch.manual_seed(0)
        network = torch.nn.Sequential(
            torch.nn.Linear(64, 1000), torch.nn.Tanh(), torch.nn.Linear(1000, 1000),
            torch.nn.Tanh(), torch.nn.Linear(1000, 10),
        )  # fmt: skip
        # A stronger penalty (1e-2) keeps the Hessian positive definite after a short L-BFGS run
        # (the dense reference, 1.08M^2 entries, does not fit: accuracy is checked peer to peer).
        problem = digits_problem("mlp-1m", network, penalty=1e-2, device=args.device)
        params, gradient_norm = H.minimise_lbfgs(
            problem, problem.params, max_iter=60, history_size=10, line_search_fn="strong_wolfe"
        )
        cases.append(
            Case("mlp-1m", 10, dataclasses.replace(problem, params=params), None, gradient_norm)
        )
    return cases


# ---------------------------------------------------------------------------------------------
# The three contenders


def torch_hypergradient(case: Case, compile: Any) -> Callable[[], torch.Tensor]:
    p, solver = case.problem, implicitfn.CG(max_steps=case.steps, rtol=0)
    # One adjoint for all calls: it owns the compiled graphs, as in an outer loop.
    adjoint = implicitfn.ImplicitAdjoint(solver=solver, compile=compile, on_failure="warn")

    def run() -> torch.Tensor:
        grads, info = implicitfn.hypergradient(
            p.train_loss, p.outer_loss, p.params, p.hparams, inner_args=p.inner_args,
            outer_args=p.outer_args, adjoint=adjoint,
        )  # fmt: skip
        return ravel(grads)

    return run


def jax_hypergradient(case: Case) -> Callable[[], Any]:
    """jaxopt's implicit differentiation of the same problem, the whole hypergradient jitted."""
    p = case.problem
    keys = leaf_keys(p.params)
    layers = sorted({k[0] for k in keys if isinstance(k, tuple)}, key=int)

    def to_jax(tree):  # jax runs on the CPU: the inputs are copied there
        return {k: jnp.asarray(tree.get(k).cpu().numpy()) for k in keys}

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
        jnp.asarray(t.cpu().numpy()) for t in (*p.inner_args, *p.outer_args)
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
    H.synchronize()
    start = time.perf_counter()
    result = fn()
    H.synchronize()
    return result, time.perf_counter() - start


def relative_error(value: torch.Tensor, reference: torch.Tensor | None) -> float | None:
    if reference is None:
        return None
    value = value.double()
    return float(torch.linalg.vector_norm(value - reference) / torch.linalg.vector_norm(reference))


def difference(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(value - reference) / torch.linalg.vector_norm(reference))


def measure(case: Case, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per compile mode; eager and jaxopt are timed in the same interleaved rounds."""
    contenders = {"eager": torch_hypergradient(case, False)}
    for mode in args.modes:
        contenders[mode] = torch_hypergradient(case, implicitfn.Compile(mode=mode))
    if jax is not None:
        contenders["jax"] = jax_hypergradient(case)
    firsts, values = {}, {}
    for name, fn in contenders.items():  # the first call compiles
        value, firsts[name] = first_call(fn)
        values[name] = ravel_jax(value) if name == "jax" else value.cpu()  # compared on the CPU
    repeats = args.repeats if firsts["eager"] < 0.5 else 1  # seconds per call: fewer repeats
    for fn in contenders.values():  # warm-up: caches, allocator, lazy initialisation
        H.median_time(fn, repeats)
    rounds: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):  # interleaved: load changes hit every contender alike
        for name, fn in contenders.items():
            rounds[name].append(H.median_time(fn, repeats))
    times = {name: statistics.median(ts) for name, ts in rounds.items()}
    rows = []
    for mode in args.modes:
        row: dict[str, Any] = {"problem": case.name, "n": case.problem.num_params}
        row.update(steps=case.steps, mode=mode, gradient_norm=case.gradient_norm)
        row.update(eager_s=times["eager"], compiled_s=times[mode])
        row["eager/compiled"] = H.paired_ratio(rounds["eager"], rounds[mode])
        row["compile_s"] = max(firsts[mode] - times[mode], 0.0)
        saved = times["eager"] - times[mode]
        row["break_even"] = math.ceil(row["compile_s"] / saved) if saved > 0 else None
        row["eager_error"] = relative_error(values["eager"], case.reference)
        row["compiled_error"] = relative_error(values[mode], case.reference)
        row["compiled_vs_eager"] = difference(values[mode], values["eager"])
        if jax is not None:
            row.update(jax_s=times["jax"], jax_compile_s=max(firsts["jax"] - times["jax"], 0.0))
            row["compiled/jax"] = H.paired_ratio(rounds[mode], rounds["jax"])
            row["jax_error"] = relative_error(values["jax"], case.reference)
            row["jax_vs_eager"] = difference(values["jax"], values["eager"])
        if args.matmul_share:
            row["matmuls"], row["matmul_s"] = matmul_share(contenders[mode])
        rows.append(row)
    return rows


def matmul_share(fn: Callable[[], Any], calls: int = 20) -> tuple[float, float]:
    """`(matrix products per call, their seconds per call)` from torch.profiler: the kernels'
    own time, which no compiler around them removes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(calls):
            fn()
    products = [e for e in profiler.key_averages() if e.key in ("aten::addmm", "aten::mm")]
    count = sum(e.count for e in products) / calls
    return count, sum(e.self_cpu_time_total for e in products) * 1e-6 / calls


def one_product_times(rows: int = 1000, inner: int = 64, out: int = 10) -> str:
    """One matrix product of the logistic regression's shapes, in torch both ways round (this
    thread count) and in jax under `jax.jit` as `x @ w.T`: microseconds per call."""
    x, w = torch.randn(rows, inner), torch.randn(out, inner)
    x_t = x.T.contiguous()
    times = {
        "torch x @ w.T": H.median_time(lambda: x @ w.T, 2000, warm_up=True),
        "torch w @ x.T": H.median_time(lambda: w @ x_t, 2000, warm_up=True),
    }
    if jax is not None:
        xj, wj = jnp.asarray(x.numpy()), jnp.asarray(w.numpy())
        forward = jax.jit(lambda a, b: a @ b.T)
        times["jax x @ w.T"] = H.median_time(
            lambda: forward(xj, wj).block_until_ready(), 2000, warm_up=True
        )
    shape = f"({rows} x {inner}) by ({inner} x {out})"
    return f"one product {shape}: " + ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in times.items())


def fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_table(rows: list[dict[str, Any]]) -> None:
    columns = [  # (title, unit, width, cell)
        ("problem", "", 8, lambda r: r["problem"]),
        ("params", "", 9, lambda r: f"{r['n']:,d}"),
        ("CG", "k", 3, lambda r: str(r["steps"])),
        ("mode", "", 15, lambda r: r["mode"]),
        ("eager", "ms", 8, lambda r: f"{r['eager_s'] * 1e3:.2f}"),
        ("compiled", "ms", 8, lambda r: f"{r['compiled_s'] * 1e3:.2f}"),
        ("eager/", "compiled", 8, lambda r: f"{r['eager/compiled']:.2f}"),
        ("compile", "s", 7, lambda r: f"{r['compile_s']:.1f}"),
        ("break", "even", 6, lambda r: fmt(r["break_even"], "d")),
        ("jaxopt", "ms", 8, lambda r: fmt(r.get("jax_s") and r["jax_s"] * 1e3, ".2f")),
        ("compiled/", "jaxopt", 9, lambda r: fmt(r.get("compiled/jax"), ".2f")),
        ("jax jit", "s", 7, lambda r: fmt(r.get("jax_compile_s"), ".1f")),
        ("error", "eager", 8, lambda r: fmt(r["eager_error"], ".1e")),
        ("error", "compiled", 8, lambda r: fmt(r["compiled_error"], ".1e")),
        ("error", "jaxopt", 8, lambda r: fmt(r.get("jax_error"), ".1e")),
    ]
    for line in (0, 1):
        print(
            " ".join(
                f"{c[line]:<{c[2]}s}" if i < 2 else f"{c[line]:>{c[2]}s}"
                for i, c in enumerate(columns)
            )
        )
    for r in rows:
        print(
            " ".join(
                f"{c[3](r):<{c[2]}s}" if i < 2 else f"{c[3](r):>{c[2]}s}"
                for i, c in enumerate(columns)
            )
        )
    print()
    for r in rows:
        peer = "" if "jax_vs_eager" not in r else f", jaxopt vs eager {r['jax_vs_eager']:.1e}"
        print(
            f"{r['problem']} ({r['mode']}): |grad L_T| at the point {r['gradient_norm']:.1e}; "
            f"relative difference compiled vs eager {r['compiled_vs_eager']:.1e}{peer}"
        )
    for r in rows:
        if "matmuls" in r:
            peer = "" if "jax_s" not in r else f"; jaxopt's whole call: {r['jax_s'] * 1e3:.2f} ms"
            print(
                f"{r['problem']} k={r['steps']} ({r['mode']}): {r['matmuls']:.0f} matrix products "
                f"(addmm/mm) per compiled call take {r['matmul_s'] * 1e3:.2f} ms of its "
                f"{r['compiled_s'] * 1e3:.2f} ms{peer}"
            )
    print(
        "\nerror: relative error to the exact dense float64 hypergradient (n/a: too large to "
        "build); break even: outer steps after which compiling has paid for itself "
        "(compile / (eager - compiled))."
    )
    if jax is None:
        print(f"NOTE: {JAX_NOTE}")


def main() -> None:
    args = ARGS.parse_args()
    H.check_device(ARGS, args.device)
    torch.set_num_threads(args.threads)
    if args.fast:
        args.rounds, args.repeats = min(args.rounds, 3), min(args.repeats, 3)
    if args.modes is None:
        args.modes = ["default"] if args.fast else ["default", "reduce-overhead"]
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default (may be warm)")
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "all"
    where = "" if args.device == "cpu" else f", implicitfn on {args.device} (jax on the CPU)"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} torch thread(s), CPU cores "
        f"{cores}, XLA_FLAGS="
        f"{os.environ.get('XLA_FLAGS', '')!r}; {JAX_NOTE}\ninductor cache: {cache}; "
        f"compile modes {args.modes}; float32{where}; times: median of {args.rounds} "
        f"interleaved rounds of {args.repeats} calls\n"
    )
    rows = []
    for case in build_cases(args):
        rows.extend(measure(case, args))
        print(f"  measured {case.name}", file=sys.stderr, flush=True)
    print_table(rows)
    if args.matmul_share:
        print(one_product_times())
    if args.compile_times:
        # Summed over every compiled graph of the run: tracing (dynamo), the backend (AOT
        # autograd + inductor; on a warm cache mostly loading the cached kernels, and inductor
        # probing the CPU's vector instruction sets once per process).
        print("\n" + torch._dynamo.utils.compile_times(repr="str", aggregate=True))


if __name__ == "__main__":
    main()
