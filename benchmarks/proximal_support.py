"""Support restriction for proximal-gradient conditions: what it buys on a sparse Lasso.

The measurement behind docs/proximal.md. A Lasso with one penalty per feature,
$\\min_w \\frac{1}{2n}\\lVert Xw - y\\rVert^2 + \\sum_j \\alpha_j |w_j|$, on AR(1)-correlated
features, with a few percent of nonzeros at the solution; the hypergradient of a validation
loss with respect to all $\\alpha_j$. Compared:

- `fixed_point(T)`: the plain fixed-point condition with a hand-written soft-threshold step
  $T(w) = \\mathrm{soft}(w - \\eta\\nabla f, \\eta\\alpha)$ (what a user writes without this
  feature), solved with GMRES, FixedPoint and Dense;
- `proximal_gradient(f, prox_l1())` restricted to the support (the default), with CG, GMRES,
  FixedPoint and Dense, and without restriction (`restrict=False`) with GMRES.

Every solve runs to the relative residual 1e-8 with a generous step budget; the error is
against the closed form on the support, $w_S = (X_S^\\top X_S)^{-1}(X_S^\\top y -
n\\,\\alpha_S \\odot \\mathrm{sign}\\, w_S)$, differentiated by autograd. Times are medians over
interleaved rounds, one thread.

Two problems: features correlated 0.6 with 3.5% nonzeros, and 0.9 with about 10% (an
ill-conditioned support, where restarted GMRES struggles).

Run: `python benchmarks/proximal_support.py` (a few minutes), `--fast` for a smaller problem,
`--device cuda[:index]` on a GPU (the data and the solves move there, still in float64; the
support comes from scikit-learn on the CPU).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from sklearn.linear_model import Lasso

import implicitfn

# The harness's CUDA-aware timer sync; importing it must not change this script's warning
# filters (the harness silences solver warnings, which this script shows).
with warnings.catch_warnings():
    from _harness import check_device, synchronize

F64 = torch.float64


def lasso_problem(
    n: int, p: int, nonzeros: int, rho: float, seed: int, alpha_ratio: float, device: str
):
    """Data, the exact Lasso solution (support from coordinate descent, values from the closed
    form on it, optimality checked) and the per-feature strengths: built on the CPU, returned
    on `device`."""
    gen = torch.Generator().manual_seed(seed)

    def features(rows: int) -> torch.Tensor:
        z = torch.randn(rows, p, generator=gen, dtype=F64)
        x = z.clone()
        for j in range(1, p):  # AR(1) across features: corr(x_j, x_k) = rho^|j-k|
            x[:, j] = rho * x[:, j - 1] + (1 - rho**2) ** 0.5 * z[:, j]
        return x

    truth = torch.zeros(p, dtype=F64)
    truth[torch.randperm(p, generator=gen)[:nonzeros]] = torch.randn(
        nonzeros, generator=gen, dtype=F64
    )
    x, x_val = features(n), features(n // 2)
    y = x @ truth + 0.5 * torch.randn(n, generator=gen, dtype=F64)
    y_val = x_val @ truth + 0.5 * torch.randn(n // 2, generator=gen, dtype=F64)
    alpha = alpha_ratio * float((x.T @ y).abs().max()) / n
    strengths = torch.full((p,), alpha, dtype=F64)
    fit = Lasso(alpha=alpha, fit_intercept=False, tol=1e-12, max_iter=100_000)
    w = torch.tensor(fit.fit(x.numpy(), y.numpy()).coef_, dtype=F64)
    support = w != 0
    w = closed_form(x, y, strengths, support, torch.sign(w)).detach()
    gradient = x.T @ (x @ w - y) / n
    assert torch.all(gradient[~support].abs() < strengths[~support]), "not a Lasso solution"
    assert torch.allclose(gradient[support], -strengths[support] * torch.sign(w[support]))
    return tuple(t.to(device) for t in (x, y, x_val, y_val, strengths, w))


def closed_form(x, y, strengths, support, signs):
    """The Lasso solution with this support and these signs, as a function of the strengths."""
    n = x.shape[0]
    xs = x[:, support]
    ws = torch.linalg.solve(xs.T @ xs / n, xs.T @ y / n - strengths[support] * signs[support])
    return torch.zeros(x.shape[1], dtype=x.dtype, device=x.device).index_put(
        (support.nonzero()[:, 0],), ws
    )


def compare(n, p, nonzeros, rho, alpha_ratio, rounds, dense, device) -> None:
    """Print the table for one Lasso problem."""
    x, y, x_val, y_val, strengths, w = lasso_problem(n, p, nonzeros, rho, 0, alpha_ratio, device)
    support = w != 0
    size = int(support.sum())
    where = "" if device == "cpu" else f", on {device}"
    print(
        f"\nLasso n={n}, p={p}, feature correlation {rho}: {size} nonzeros ({100 * size / p:.1f}%)"
        f"{where}"
    )

    def f(w, alpha, x, y):
        return 0.5 * ((x @ w - y) ** 2).sum() / len(y)

    def outer(w, alpha):
        return 0.5 * ((x_val @ w - y_val) ** 2).mean()

    lipschitz = float(torch.linalg.eigvalsh(x.T @ x / n).max())
    step = 1 / lipschitz

    def soft_threshold_step(w, alpha, x, y):
        z = w - step * torch.func.grad(f)(w, alpha, x, y)
        return torch.sign(z) * torch.relu(z.abs() - step * alpha)

    variable = strengths.clone().requires_grad_()
    reference = closed_form(x, y, variable, support, torch.sign(w))
    (reference,) = torch.autograd.grad(outer(reference, None), variable)

    plain = implicitfn.fixed_point(soft_threshold_step)
    restricted = implicitfn.proximal_gradient(f, implicitfn.prox_l1(), step=step)
    unrestricted = implicitfn.proximal_gradient(f, implicitfn.prox_l1(), step=step, restrict=False)
    budget = {"rtol": 1e-8, "max_steps": 20_000}
    contenders = {
        "fixed_point(T), GMRES(restart=20)": (plain, implicitfn.GMRES(**budget)),
        "fixed_point(T), GMRES(restart=200)": (plain, implicitfn.GMRES(restart=200, **budget)),
        "fixed_point(T), FixedPoint": (plain, implicitfn.FixedPoint(**budget)),
        "fixed_point(T), Dense": (plain, implicitfn.Dense(rtol=1e-8)),
        "proximal_gradient, restrict=False, GMRES(restart=20)": (
            unrestricted,
            implicitfn.GMRES(**budget),
        ),
        "proximal_gradient (restricted), GMRES(restart=20)": (
            restricted,
            implicitfn.GMRES(**budget),
        ),
        "proximal_gradient (restricted), FixedPoint": (restricted, implicitfn.FixedPoint(**budget)),
        "proximal_gradient (restricted), Dense": (restricted, implicitfn.Dense(rtol=1e-8)),
        "proximal_gradient (restricted), CG": (restricted, implicitfn.CG(**budget)),
    }
    if not dense:  # too slow to be worth timing here: Dense (the LU) and FixedPoint (it stalls)
        contenders = {
            k: v for k, v in contenders.items() if "Dense" not in k and "FixedPoint" not in k
        }
    calls, results = {}, {}
    for name, (condition, solver) in contenders.items():
        adjoint = implicitfn.ImplicitAdjoint(solver=solver, on_failure="warn")

        def call(condition=condition, adjoint=adjoint):
            return implicitfn.hypergradient(
                condition, outer, w, strengths, inner_args=(x, y), adjoint=adjoint
            )

        calls[name] = call
        gradient, info = call()  # warm-up, and the numbers reported
        error = float((gradient - reference).norm() / reference.norm())
        results[name] = (int(info.num_steps), error, info.outcome_names()[0])
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):  # rotate the order each round
        for name in names[r % len(names) :] + names[: r % len(names)]:
            synchronize()
            start = time.perf_counter()
            calls[name]()
            synchronize()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["fixed_point(T), GMRES(restart=20)"])
    print(f"{'condition, solver':54s} {'products':>8s} {'time':>9s} {'speed-up':>8s} {'error':>8s}")
    for name in names:
        steps, error, outcome = results[name]
        seconds = statistics.median(times[name])
        note = "" if outcome == "successful" else f"  ({outcome})"
        print(
            f"{name:54s} {steps:8d} {seconds * 1e3:7.0f}ms {base / seconds:7.1f}x {error:8.1e}{note}"
        )
    if dense:
        print(f"(Dense reports n={p} products; the restricted operator computes only the {size}")
        print(f" support columns, in one vmapped product, but the LU is still {p}x{p}.)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a small problem, for CI")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--device", default="cpu", help="cpu (default) or cuda[:index]; float64 either way"
    )
    args = parser.parse_args()
    device = check_device(parser, args.device)
    torch.set_num_threads(1)
    if args.fast:
        compare(200, 1000, 20, 0.6, 0.08, args.rounds, dense=True, device=device)
        return
    compare(400, 4000, 80, 0.6, 0.08, args.rounds, dense=True, device=device)
    # strongly correlated
    compare(400, 4000, 200, 0.9, 0.01, args.rounds, dense=False, device=device)


if __name__ == "__main__":
    main()
