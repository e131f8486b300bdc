"""A box-constrained QP whose linear term is tuned by hypergradient descent to match a target solution, with the KKT condition and the projected-gradient condition.

Inner problem: w*(c) = argmin 1/2 w'Qw + c'w subject to 0 <= w <= 1, solved by warm-started
projected gradient and an exact solve on the free coordinates (a tiny active-set method), which
also gives the multipliers of the active bounds. Outer problem: 1/2 |w*(c) - w_target|^2, with
w_target the solution for a hidden c_true (some coordinates at a bound). Each hyper step takes
the hypergradient two ways:

- `implicitfn.kkt(f, inequality=g)` with g(w) = (-w, w - 1) <= 0, primal and dual variables in
  one dict (its Jacobian is not symmetric; solved densely here);
- `implicitfn.projected_gradient(f, implicitfn.projection_box(0, 1))` (restricted to the free
  coordinates, GMRES);

and steps along the KKT one. Printed: the largest relative difference between the two
hypergradients over the run, the time per hypergradient of each, and the outer loss reached.

    python examples/box_qp.py            # full run, a few seconds
    python examples/box_qp.py --fast     # CI smoke run
"""

from __future__ import annotations

import json
import time

import support
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

import implicitfn

F64 = torch.float64


def problem(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q, c_true, c_0): a well-conditioned SPD Q, the hidden linear term and the start (another
    draw: not c = 0, where w* = 0 has every bound active with multiplier 0, a degenerate point)."""
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, dtype=F64, generator=gen)
    q = m @ m.T / n + 0.5 * torch.eye(n, dtype=F64)
    c_true = 1.5 * torch.randn(n, dtype=F64, generator=gen)
    return q, c_true, 1.5 * torch.randn(n, dtype=F64, generator=gen)


def solve(q: torch.Tensor, c: torch.Tensor, w: torch.Tensor, steps: int):
    """Projected gradient from `w`, then the exact solution with that active set; returns
    `(w, mu)` with mu the multipliers of (-w <= 0, w - 1 <= 0)."""
    step = 1.0 / float(torch.linalg.eigvalsh(q).max())
    for _ in range(steps):
        w = (w - step * (q @ w + c)).clamp(0.0, 1.0)
    lower, upper = w <= 1e-10, w >= 1 - 1e-10
    free = ~(lower | upper)
    w = upper.to(F64)
    if free.any():
        w[free] = torch.linalg.solve(q[free][:, free], -(c[free] + q[free][:, ~free] @ w[~free]))
    gradient = q @ w + c
    mu = torch.cat([torch.where(lower, gradient, 0.0), torch.where(upper, -gradient, 0.0)])
    return w, mu.clamp(min=0.0)


def strict_complementarity(w: torch.Tensor, mu: torch.Tensor) -> float:
    """The smallest of: the multipliers of the active bounds and the distances of the free
    coordinates to the bounds. Positive: the KKT Jacobian is invertible (Q is SPD)."""
    n = len(w)
    active = torch.cat([w <= 0, w >= 1])
    free = ~(active[:n] | active[n:])
    values = torch.cat([mu[active], w[free], 1 - w[free]])
    return float(values.min()) if values.numel() else float("inf")


def main() -> None:
    args = support.command_line(
        __doc__, "box_qp.png", n=(60, 40), steps=(100, 40), inner_steps=200, lr=0.5, seed=0
    )
    q, c_true, c = problem(args.n, args.seed)
    w_target, _ = solve(q, c_true, torch.zeros(args.n, dtype=F64), 5000)

    def objective(w, h):
        return 0.5 * w @ q @ w + h["c"] @ w

    def outer(w, h):
        return 0.5 * ((w - w_target) ** 2).sum()

    kkt = implicitfn.kkt(objective, inequality=lambda w, h: torch.cat([-w, w - 1.0]))
    projected = implicitfn.projected_gradient(
        objective,
        implicitfn.projection_box(0.0, 1.0),
        step=1.0 / float(torch.linalg.eigvalsh(q).max()),
    )
    # The KKT system (3n unknowns) is badly scaled where a multiplier or a distance to a bound
    # is small: unrestarted GMRES needed ~10x the time of Dense here, so Dense for it.
    kkt_adjoint = implicitfn.ImplicitAdjoint(solver=implicitfn.Dense())
    adjoint = implicitfn.ImplicitAdjoint(solver=implicitfn.GMRES(rtol=1e-10, restart=args.n))

    hparams = {"c": c.clone()}
    w = torch.zeros(args.n, dtype=F64)
    times = {"kkt": [], "projected_gradient": []}
    losses, differences, margins = [], [], []
    for _ in tqdm(range(args.steps), desc="hyper steps", disable=not args.progress):
        w, mu = solve(q, hparams["c"], w, args.inner_steps)
        losses.append(float(outer(w, None)))
        margins.append(strict_complementarity(w, mu))
        start = time.perf_counter()
        g_kkt, _ = implicitfn.hypergradient(
            kkt,
            lambda p, h: outer(p["primal"], h),
            {"primal": w, "ineq": mu},
            hparams,
            adjoint=kkt_adjoint,
        )
        times["kkt"].append(time.perf_counter() - start)
        start = time.perf_counter()
        g_pg, _ = implicitfn.hypergradient(projected, outer, w, hparams, adjoint=adjoint)
        times["projected_gradient"].append(time.perf_counter() - start)
        scale = float(g_pg["c"].norm()) or 1.0
        differences.append(float((g_kkt["c"] - g_pg["c"]).norm()) / scale)
        hparams = {"c": hparams["c"] - args.lr * g_kkt["c"]}
    w, _ = solve(q, hparams["c"], w, args.inner_steps)
    losses.append(float(outer(w, None)))

    median = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
    active = int(((w_target <= 0) | (w_target >= 1)).sum())
    results = {
        "n": args.n,
        "active_bounds_at_target": active,
        "outer_loss_start": losses[0],
        "outer_loss_end": losses[-1],
        "max_relative_difference": max(differences),
        "min_strict_complementarity_margin": min(margins),
        "median_ms_per_hypergradient": median,
    }
    print(f"n = {args.n}, {active} of the target's coordinates at a bound")
    print(f"outer loss: {losses[0]:.3e} -> {losses[-1]:.3e} in {args.steps} hyper steps")
    print(f"KKT vs projected gradient: largest relative difference {max(differences):.1e}")
    print(f"smallest strict-complementarity margin along the run: {min(margins):.1e}")
    for name, ms in median.items():
        print(f"{name}: {ms:.2f} ms per hypergradient (median)")

    figure = Figure(figsize=(10, 4), layout="constrained")
    left, right = figure.subplots(1, 2)
    left.semilogy(losses)
    left.set(xlabel="hyper step", ylabel="1/2 |w*(c) - w_target|^2", title="outer loss")
    right.bar(list(median), list(median.values()))
    right.set(ylabel="ms per hypergradient (median)", title="time per hypergradient")
    support.save_figure(figure, args.plot)
    numbers = args.plot.with_suffix(".json")
    arguments = {k: v for k, v in vars(args).items() if k != "plot"}
    numbers.write_text(json.dumps({"args": arguments, "results": results}, indent=2))
    print(f"numbers saved to {numbers}")


if __name__ == "__main__":
    main()
