"""Measurements behind docs/solvers-advanced.md: what preconditioning, warm starts, automatic
step sizes and the new solvers buy, in operator products (and seconds where it matters).

Run: `python benchmarks/solvers_extra.py` (about a minute on one CPU thread; `--fast` for less).
All timings use one thread (`torch.set_num_threads(1)`); products are what `SolveInfo.num_steps`
reports, so they include the probes of `preconditioner="jacobi"` and the power iteration of
`alpha="auto"`. `--device cuda[:index]` runs the same problems (built on the CPU, then moved)
on a GPU, still in float64.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from tensordict import TensorDict

import implicitfn

# The harness's CUDA-aware timer sync; importing it must not change this script's warning
# filters (the harness silences solver warnings).
with warnings.catch_warnings():
    from _harness import check_device, synchronize

F64 = torch.float64


def spd(size: int, condition: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=F64))[0]
    return (
        q * torch.logspace(0, float(torch.log10(torch.tensor(condition))), size, dtype=F64)
    ) @ q.T


def matrix_operator(matrix: torch.Tensor, tags=("symmetric", "positive_semidefinite")):
    return implicitfn.FunctionLinearOperator(
        lambda v: matrix @ v,
        torch.zeros(matrix.shape[0], dtype=matrix.dtype, device=matrix.device),
        tags=set(tags),
    )


def relative_error(x, reference) -> float:
    x, reference = implicitfn.tree_ravel(x)[0], implicitfn.tree_ravel(reference)[0]
    return float((x - reference).norm() / reference.norm())


# --- problems built on the public API --------------------------------------------------------


def logistic_loss(params, hparams, x, y):
    logits = x @ params["w"] + params["b"]
    data = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
    return data + 0.5 * (hparams["log_penalty"].exp() * params["w"] ** 2).sum()


def logistic_data(n, d, seed, scales=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=F64)
    if scales is not None:
        x = x * scales
    y = (x @ torch.randn(d, generator=gen, dtype=F64) > 0).to(F64)
    return x, y


def logistic_hessian(device: str, d=30, scaled=True):
    """The Hessian operator of a logistic regression at its minimum (features badly scaled).

    The minimum: 25 Newton steps from zero on the raveled weights (dense Hessian, exact solves).
    """
    scales = torch.logspace(-1, 1, d, dtype=F64) if scaled else None
    x, y = (t.to(device) for t in logistic_data(400, d, 0, scales))
    hparams = TensorDict({"log_penalty": torch.full((d,), -3.0, dtype=F64, device=device)})
    start = TensorDict(
        {
            "w": torch.zeros(d, dtype=F64, device=device),
            "b": torch.zeros((), dtype=F64, device=device),
        }
    )
    flat, unravel = implicitfn.tree_ravel(start)

    def loss(flat):
        return logistic_loss(unravel(flat), hparams, x, y)

    for _ in range(25):
        flat = flat - torch.linalg.solve(
            torch.func.hessian(loss)(flat), torch.func.grad(loss)(flat)
        )
    params = unravel(flat)
    operator = implicitfn.Hessian().linearize(logistic_loss, params, hparams, x, y)
    return operator, TensorDict(
        {
            "w": torch.ones(d, dtype=F64, device=device),
            "b": torch.ones((), dtype=F64, device=device),
        }
    )


def mlp_hessian(device: str, width=32, n=256, seed=0):
    """An MLP's exact Hessian at an approximate minimum: symmetric and indefinite."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(8, width), torch.nn.Tanh(), torch.nn.Linear(width, 1)
    ).double()
    apply, params = implicitfn.functional_model(net.to(device))
    x = torch.randn(n, 8, dtype=F64).to(device)  # drawn on the CPU: the same problem anywhere
    y = torch.sin(x.sum(1, keepdim=True))

    def loss(p, h, x, y):
        return ((apply(p, x) - y) ** 2).mean() + 0.5 * h * sum(
            (leaf**2).sum() for leaf in p.values(True, True)
        )

    decay = torch.tensor(1e-4, dtype=F64, device=device)
    optimiser_params = params.clone()
    for _ in range(500):
        grads = torch.func.grad(loss)(optimiser_params, decay, x, y)
        optimiser_params = optimiser_params - 0.1 * grads
    operator = implicitfn.Hessian().linearize(loss, optimiser_params, decay, x, y)
    return operator, grads.apply(lambda g: torch.randn(g.shape, dtype=g.dtype).to(g.device))


# --- measurements ----------------------------------------------------------------------------


def preconditioning(device: str) -> None:
    print("## CG preconditioning: products to rtol=1e-8 (probes included)")
    root = torch.logspace(0, 2, 200, dtype=F64)
    problems = {
        "diagonal, entries 1..1e4 (n=200)": torch.diag(root**2),
        "D^1/2 S D^1/2, cond(S)=10, D 1..1e4 (n=200)": root[:, None]
        * spd(200, 10.0, 0)
        * root[None, :],
    }
    for name, matrix in problems.items():
        matrix = matrix.to(device)
        operator = matrix_operator(matrix)
        rhs = torch.randn(200, dtype=F64, generator=torch.Generator().manual_seed(1)).to(device)
        diagonal = torch.diagonal(matrix)
        row = []
        for label, solver in (
            ("none", implicitfn.CG(max_steps=2000, rtol=1e-8)),
            (
                "jacobi probes=1",
                implicitfn.CG(max_steps=2000, rtol=1e-8, preconditioner="jacobi", probes=1),
            ),
            ("jacobi probes=10", implicitfn.CG(max_steps=2000, rtol=1e-8, preconditioner="jacobi")),
            (
                "jacobi probes=50",
                implicitfn.CG(max_steps=2000, rtol=1e-8, preconditioner="jacobi", probes=50),
            ),
            (
                "exact diagonal",
                implicitfn.CG(
                    max_steps=2000, rtol=1e-8, preconditioner=lambda r, d=diagonal: r / d
                ),
            ),
        ):
            _, info = solver.solve(operator, rhs)
            row.append(
                f"{label}: {int(info.num_steps)}{'' if bool(info.successful) else ' (not successful)'}"
            )
        print(f"- {name}: " + "; ".join(row))
    operator, rhs = logistic_hessian(device)
    row = []
    for label, solver in (
        ("none", implicitfn.CG(max_steps=2000, rtol=1e-8)),
        ("jacobi probes=10", implicitfn.CG(max_steps=2000, rtol=1e-8, preconditioner="jacobi")),
    ):
        _, info = solver.solve(operator, rhs)
        row.append(
            f"{label}: {int(info.num_steps)}{'' if bool(info.successful) else ' (not successful)'}"
        )
    print("- logistic regression Hessian, 31 params, feature scales 0.1..10: " + "; ".join(row))


def warm_start(outer_steps: int, device: str) -> None:
    print(
        f"\n## Warm start: backward-solve products over {outer_steps} outer steps "
        "(the first excluded)"
    )
    gen = torch.Generator().manual_seed(5)
    d = 40
    x, y = torch.randn(80, d, generator=gen, dtype=F64), torch.randn(80, generator=gen, dtype=F64)
    x_val, y_val = (
        torch.randn(80, d, generator=gen, dtype=F64),
        torch.randn(80, generator=gen, dtype=F64),
    )
    x, y, x_val, y_val = (t.to(device) for t in (x, y, x_val, y_val))

    def ridge_loss(params, hparams, x, y):
        return (
            0.5 * ((x @ params["w"] - y) ** 2).sum()
            + 0.5 * (hparams["log_penalty"].exp() * params["w"] ** 2).sum()
        )

    def run(solver, warm, learning_rate):
        infos = []

        @implicitfn.implicit_diff(
            implicitfn.stationarity(ridge_loss),
            adjoint=implicitfn.ImplicitAdjoint(
                solver=solver, warm_start=warm, callback=infos.append
            ),
        )
        def inner(params, hparams, x, y):
            matrix = x.T @ x + torch.diag(hparams["log_penalty"].exp())
            return {"w": torch.linalg.solve(matrix, x.T @ y)}

        log_penalty = torch.zeros(d, dtype=F64, device=device)
        for _ in range(outer_steps):
            leaf = log_penalty.clone().requires_grad_()
            w = inner({"w": torch.zeros(d, dtype=F64, device=device)}, {"log_penalty": leaf}, x, y)
            (0.5 * ((x_val @ w["w"] - y_val) ** 2).mean()).backward()
            log_penalty = log_penalty - learning_rate * leaf.grad
        return [int(info.num_steps) for info in infos], log_penalty

    for label, solver in (
        ("CG rtol=1e-6", implicitfn.CG(max_steps=500, rtol=1e-6)),
        ("MINRES rtol=1e-6", implicitfn.MINRES(max_steps=500, rtol=1e-6)),
        ("GMRES rtol=1e-6", implicitfn.GMRES(max_steps=500, rtol=1e-6)),
        (
            "FixedPoint auto rtol=1e-6",
            implicitfn.FixedPoint(max_steps=20000, alpha="auto", rtol=1e-6),
        ),
    ):
        for learning_rate in (0.3, 3.0):
            cold, end_cold = run(solver, False, learning_rate)
            warm, end_warm = run(solver, True, learning_rate)
            saved = 1 - sum(warm[1:]) / sum(cold[1:])
            print(
                f"- {label}, outer lr {learning_rate}: cold {sum(cold[1:])} "
                f"({sum(cold[1:]) / (len(cold) - 1):.1f}/step), warm {sum(warm[1:])} "
                f"({sum(warm[1:]) / (len(warm) - 1):.1f}/step): {100 * saved:.0f}% saved; "
                f"final hparams differ by {float((end_cold - end_warm).abs().max()):.1e}"
            )


def automatic_step(device: str) -> None:
    print("\n## Automatic alpha (lambda_max from 10 power-iteration products), 100 Neumann terms")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(80, 40, generator=gen, dtype=F64).to(device)
    problems = {
        "logistic Hessian": logistic_hessian(device, scaled=False),
        "ridge Hessian X^T X + I (80x40)": (
            matrix_operator(x.T @ x + torch.eye(40, dtype=F64, device=device)),
            torch.ones(40, dtype=F64, device=device),
        ),
    }
    for name, (operator, rhs) in problems.items():
        reference, _ = implicitfn.Dense().solve(operator, rhs)
        lam_max = float(torch.linalg.eigvalsh(operator.as_matrix()).max())
        cells = []
        for alpha in (1.0, "auto"):
            solution, info = implicitfn.Neumann(max_steps=100, alpha=alpha).solve(operator, rhs)
            cells.append(
                f"alpha={alpha}: outcome={info.outcome_names()[0]}, relative error "
                f"{relative_error(solution, reference):.1e}, {int(info.num_steps)} products"
            )
        print(f"- {name} (lambda_max={lam_max:.3g}): " + "; ".join(cells))


def equal_cost(budgets: tuple[int, ...], device: str) -> None:
    print("\n## Accuracy at equal products: relative error of the adjoint against Dense")
    hessian, rhs = mlp_hessian(device)
    problems = {
        "logistic (31 params, scaled features)": logistic_hessian(device),
        "MLP 8-32-1 Hessian + 0.1 I (321 params, SPD)": (implicitfn.damp(hessian, 0.1), rhs),
        "MLP 8-32-1 Hessian + 0.04 I (4 negative eigenvalues)": (
            implicitfn.damp(hessian, 0.04),
            rhs,
        ),
    }
    for name, (operator, rhs) in problems.items():
        reference, _ = implicitfn.Dense().solve(operator, rhs)
        eigenvalues = torch.linalg.eigvalsh(operator.as_matrix())
        print(
            f"- {name}: eigenvalues in "
            f"[{float(eigenvalues.min()):.2e}, {float(eigenvalues.max()):.2e}]"
        )
        for k in budgets:
            cells = []
            for label, solver in (
                ("CG", implicitfn.CG(max_steps=k, rtol=0)),
                (
                    "CG-jacobi",
                    implicitfn.CG(max_steps=max(k - 10, 1), rtol=0, preconditioner="jacobi"),
                ),
                ("MINRES", implicitfn.MINRES(max_steps=k, rtol=0)),
                ("GMRES", implicitfn.GMRES(max_steps=k, restart=k, rtol=0)),
                ("Neumann-auto", implicitfn.Neumann(max_steps=max(k - 10, 1), alpha="auto")),
                ("Nystrom", implicitfn.Nystrom(rank=k, damping=float(eigenvalues.abs().min()))),
            ):
                solution, info = solver.solve(operator, rhs)
                flag = "" if not bool(info.failed) else "*"
                cells.append(f"{label} {relative_error(solution, reference):.1e}{flag}")
            print(f"  - {k} products: " + ", ".join(cells))
    print("  (* = the solve reported a failed outcome)")


def nystrom_wall_clock(rhs_count: int, device: str) -> None:
    print(f"\n## Nystrom vs CG under vmap over {rhs_count} right-hand sides (MLP Hessian, seconds)")
    hessian, rhs = mlp_hessian(device, width=64)
    operator = implicitfn.damp(hessian, 0.1)
    flat, unravel = implicitfn.tree_ravel(rhs)
    batch = torch.randn(rhs_count, flat.numel(), dtype=F64).to(device)
    for label, solver in (
        ("CG max_steps=20", implicitfn.CG(max_steps=20, rtol=0)),
        ("Nystrom rank=20", implicitfn.Nystrom(rank=20, damping=1e-2)),
    ):
        synchronize()
        start = time.perf_counter()
        torch.func.vmap(
            lambda b, s=solver: implicitfn.tree_ravel(s.solve(operator, unravel(b))[0])[0]
        )(batch)
        synchronize()
        print(f"- {label}: {time.perf_counter() - start:.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fast", action="store_true", help="fewer outer steps and budgets")
    parser.add_argument(
        "--device", default="cpu", help="cpu (default) or cuda[:index]; float64 either way"
    )
    args = parser.parse_args()
    device = check_device(parser, args.device)
    torch.set_num_threads(1)
    where = "" if device == "cpu" else f", on {device}"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, float64{where}\n")
    preconditioning(device)
    warm_start(5 if args.fast else 20, device)
    automatic_step(device)
    equal_cost((10,) if args.fast else (10, 20, 40), device)
    nystrom_wall_clock(4 if args.fast else 16, device)


if __name__ == "__main__":
    main()
