"""implicitfn against torchopt's implicit differentiation and against unrolling, on the problems of
`implicitfn compare` (logistic regression, 650 weights and hyperparameters; a 64-128-10 MLP,
9,610), in float32 at the inner optimum, against the exact hypergradient (dense, float64).

1. Equal solver and steps: the hypergradient's time and the cosine it reaches, for
   - torchopt: `torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=...)` with
     `optimality = torch.func.grad(train_loss)` (its documented pattern), parameters and
     hyperparameters as tuples of tensors, and `linear_solve.solve_cg(maxiter=k, rtol=0)` or
     `solve_inv(ns=True, maxiter=k, alpha=a)`;
   - implicitfn: `implicit_diff` around the same "inner solver" (it returns w*), with the
     problem's own TensorDict losses, and again with torchopt's plain-tensor losses (so the
     difference between the two libraries is the library, not the loss code);
   - unrolling: reverse mode through k + 1 differentiable SGD steps from w* with step a
     (equal to the Neumann series with k terms after the first: Lorraine et al., 2020).
   `a = 1/lambda_max` of the training Hessian for every series. Speed-ups are medians of
   same-round ratios (see `_harness.py`).
2. Time to reach cosine >= 0.99 with the exact hypergradient: for each method, the smallest
   number of steps on a grid that reaches it, then that configuration timed.

Run:
    python benchmarks/peers.py            # both problems (the MLP's reference: minutes, once)
    python benchmarks/peers.py --fast     # logistic regression, few rounds: CI, < 30 s
"""

from __future__ import annotations

import argparse
import sys

import _harness as H
import torch
import torchopt
from tqdm import tqdm

import implicitfn

GRID = (1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 100, 150, 200, 300, 500)
TARGET = 0.99


def equal_steps(setup: H.Setup, steps: int, rounds: int, bar: tqdm) -> list[str]:
    """Rows of the equal-solver-and-steps table (markdown)."""
    alpha = 1.0 / setup.eigenvalue_max
    cg = implicitfn.CG(max_steps=steps, rtol=0)
    # torchopt's Neumann series with maxiter=k sums k + 1 terms, as implicitfn's max_steps=k + 1.
    neumann = implicitfn.Neumann(max_steps=steps + 1, alpha=alpha)
    gn = implicitfn.GaussNewton()
    solve_cg = torchopt.linear_solve.solve_cg(maxiter=steps, rtol=0.0)
    solve_ns = torchopt.linear_solve.solve_inv(ns=True, maxiter=steps, alpha=alpha)
    # name -> (function, the torchopt row it is compared with)
    methods = {
        "torchopt CG": (H.torchopt_custom_root(setup, solve_cg), "torchopt CG"),
        "implicitfn CG": (H.implicitfn_decorated(setup, cg), "torchopt CG"),
        "implicitfn CG, torchopt's loss code": (
            H.implicitfn_decorated(setup, cg, plain=True),
            "torchopt CG",
        ),
        "implicitfn CG, `hypergradient()`": (H.implicitfn_function(setup, cg), "torchopt CG"),
        "implicitfn CG, Gauss-Newton": (H.implicitfn_decorated(setup, cg, gn), "torchopt CG"),
        "torchopt Neumann": (H.torchopt_custom_root(setup, solve_ns), "torchopt Neumann"),
        "implicitfn Neumann": (H.implicitfn_decorated(setup, neumann), "torchopt Neumann"),
        "implicitfn Neumann, torchopt's loss code": (
            H.implicitfn_decorated(setup, neumann, plain=True),
            "torchopt Neumann",
        ),
        f"unrolled SGD, {steps + 1} steps": (H.unrolled(setup, steps + 1, alpha), "torchopt CG"),
    }
    functions = {name: fn for name, (fn, _) in methods.items()}
    cosines = {name: setup.cosine(fn()) for name, fn in functions.items()}
    times = H.interleaved(functions, rounds, bar)
    rows = [
        "| method | median (ms) | min (ms) | speed-up vs torchopt, same solver | cosine |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, (_, baseline) in methods.items():
        ratio = H.paired_ratio(times[baseline], times[name])
        rows.append(
            f"| {name} | {H.median(times[name]) * 1e3:.2f} | {min(times[name]) * 1e3:.2f} | "
            f"{ratio:.2f} (vs {baseline}) | {cosines[name]:.4f} |"
        )
    return rows


def families(setup: H.Setup) -> dict[str, tuple[str, callable]]:
    """Method families for the time-to-accuracy search: name -> (library, steps -> function)."""
    alpha = 1.0 / setup.eigenvalue_max
    hessian, gn = implicitfn.Hessian(), implicitfn.GaussNewton()

    def cg(curvature, **fields):
        return lambda k: H.implicitfn_decorated(
            setup, implicitfn.CG(max_steps=k, rtol=0, **fields), curvature
        )

    solve = torchopt.linear_solve
    return {
        "torchopt CG": ("torchopt", lambda k: H.torchopt_custom_root(
            setup, solve.solve_cg(maxiter=k, rtol=0.0))),
        "torchopt normal CG (its default)": ("torchopt", lambda k: H.torchopt_custom_root(
            setup, solve.solve_normal_cg(maxiter=k, rtol=0.0))),
        "torchopt Neumann": ("torchopt", lambda k: H.torchopt_custom_root(
            setup, solve.solve_inv(ns=True, maxiter=k, alpha=alpha))),
        "unrolled SGD": ("unrolled", lambda k: H.unrolled(setup, k + 1, alpha)),
        "implicitfn CG": ("implicitfn", cg(hessian)),
        "implicitfn CG, Gauss-Newton": ("implicitfn", cg(gn)),
        "implicitfn CG, Jacobi (4 probes)": ("implicitfn", cg(
            hessian, preconditioner="jacobi", probes=4)),
        "implicitfn CG, Gauss-Newton, Jacobi (4 probes)": ("implicitfn", cg(
            gn, preconditioner="jacobi", probes=4)),
        "implicitfn Neumann": ("implicitfn", lambda k: H.implicitfn_decorated(
            setup, implicitfn.Neumann(max_steps=k + 1, alpha=alpha))),  # k + 1 terms, as torchopt
    }  # fmt: skip


def time_to_accuracy(setup: H.Setup, grid: tuple[int, ...], rounds: int, bar: tqdm) -> list[str]:
    found: dict[str, tuple[int, float]] = {}
    missed: dict[str, tuple[int, float]] = {}
    table = families(setup)
    for name, (library, make) in table.items():
        best = (0, -1.0)
        for k in grid:
            if library == "unrolled" and k > 200:  # memory grows with k: a graph per step
                break
            cosine = setup.cosine(make(k)())
            best = (k, cosine)
            if cosine >= TARGET:
                found[name] = best
                break
        if name not in found:
            missed[name] = best
        bar.update()
    functions = {name: table[name][1](k) for name, (k, _) in found.items()}
    times = H.interleaved(functions, rounds, bar) if functions else {}
    rows = [
        f"| method | steps to cosine >= {TARGET} | cosine | median time (ms) | min (ms) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in table:
        if name in found:
            k, cosine = found[name]
            rows.append(
                f"| {name} | {k} | {cosine:.4f} | {H.median(times[name]) * 1e3:.1f} | "
                f"{min(times[name]) * 1e3:.1f} |"
            )
        else:
            k, cosine = missed[name]
            rows.append(f"| {name} | not within {k} | {cosine:.4f} at {k} | – | – |")
    best = {}
    for library in ("torchopt", "implicitfn"):
        candidates = [n for n in found if table[n][0] == library]
        if candidates:
            best[library] = min(candidates, key=lambda n: H.median(times[n]))
    if len(best) == 2:
        t, i = best["torchopt"], best["implicitfn"]
        rows.append("")
        rows.append(
            f"Fastest to cosine >= {TARGET}: torchopt's *{t}* {H.median(times[t]) * 1e3:.1f} ms, "
            f"implicitfn's *{i}* {H.median(times[i]) * 1e3:.1f} ms: implicitfn takes "
            f"**{H.paired_ratio(times[i], times[t]):.2f}x** torchopt's time (same-round ratio)."
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="logreg only, few rounds (CI)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:index]")
    parser.add_argument("--steps", type=int, default=10, help="k of the equal-steps table")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per table")
    parser.add_argument("--problems", nargs="+", default=["logreg", "mlp"])
    args = parser.parse_args()
    H.check_device(parser, args.device)
    torch.set_num_threads(args.threads)
    problems = ["logreg"] if args.fast else args.problems
    rounds = 3 if args.fast else args.rounds
    grid = tuple(k for k in GRID if k <= 100) if args.fast else GRID
    print(f"# implicitfn vs torchopt vs unrolling\n\nMachine: {H.machine(args.threads)}\n")
    for name in problems:
        setup = H.load(name, progress=H.stderr_progress, device=args.device)
        total = 2 * rounds + len(families(setup))
        with tqdm(total=total, desc=name, file=sys.stderr, mininterval=1.0) as bar:
            print(
                f"## {name}: {setup.num_params} weights and hyperparameters; Hessian eigenvalues "
                f"{setup.eigenvalue_min:.2e} .. {setup.eigenvalue_max:.2f} (condition "
                f"{setup.eigenvalue_max / setup.eigenvalue_min:.1e}); |grad L_T(w*)| = "
                f"{setup.gradient_norm:.1e}\n"
            )
            print(f"### Equal solver and steps (k = {args.steps}), {rounds} rounds\n")
            print("\n".join(equal_steps(setup, args.steps, rounds, bar)) + "\n")
            print(f"### Time to cosine >= {TARGET}, {rounds} rounds\n")
            print("\n".join(time_to_accuracy(setup, grid, rounds, bar)) + "\n", flush=True)


if __name__ == "__main__":
    main()
