"""How robust is the 1.2k-MLP finding? Vary the Adam run (init seed, number of steps) and report,
per point: the Hessian's negative / near-zero eigenvalues, how far the dense IFT answer moves
under small perturbations (damping 1e-4, Gauss-Newton, the tight optimum nearby), and what
MINRES (exact Hessian) needs in rtol and steps to be within 10% / 1% of the dense answer.

    .venv/bin/python benchmarks/default_solvers/sensitivity.py
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import torch
from torch.func import grad

import implicitfn
from implicitfn.compare import train_to_optimum

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from study import (  # noqa: E402
    adjoint_system,
    dense_curvature,
    measure,
    metrics,
    mlp1k_points,
    write_jsonl,
)

RTOLS = (1e-3, 3e-4, 1e-4, 1e-5)
MAX_STEPS = 5000


def dense(p64, w64):
    b, hypergrad = adjoint_system(p64, w64)
    hessian, gauss_newton = (dense_curvature(curv, p64, w64) for curv in ("Hessian", "GaussNewton"))
    ev = torch.linalg.eigvalsh(hessian)
    eye = torch.eye(b.numel(), dtype=torch.float64)
    g = {
        name: hypergrad(torch.linalg.solve(m, b))
        for name, m in (
            ("oracle", hessian),
            ("gn", gauss_newton),
            ("damped1e-4", hessian + 1e-4 * eye),
            ("damped1e-6", hessian + 1e-6 * eye),
        )
    }
    gradient = grad(p64.train_loss)(w64, p64.hparams, *p64.inner_args)
    return ev, g, float(implicitfn.tree_norm(gradient))


def minres(problem, params, rtol, oracle):
    adjoint = implicitfn.ImplicitAdjoint(
        solver=implicitfn.MINRES(max_steps=MAX_STEPS, rtol=rtol),
        curvature=implicitfn.Hessian(),
        on_failure="warn",
    )
    return measure(problem, params, adjoint, oracle)


def main():
    torch.set_num_threads(1)
    rows = []
    for seed in (0, 1, 2):
        for steps in (500, 1000, 2000, 5000):
            t = time.perf_counter()
            p32, w32, p64, w64 = mlp1k_points(seed, steps)
            ev, g, gnorm = dense(p64, w64)
            oracle = g["oracle"]
            row = {
                "seed": seed,
                "adam_steps": steps,
                "grad_norm": gnorm,
                "num_negative": int((ev < 0).sum()),
                "eig_min": float(ev[0]),
                "eig_smallest_abs": float(ev.abs().min()),
                "eig_max": float(ev[-1]),
            }
            for name in ("gn", "damped1e-4", "damped1e-6"):
                row[f"dense_{name}_err"] = metrics(g[name], oracle)[1]
            # the tight optimum reached from this point: how much the oracle itself moves
            tight, tight_norm = train_to_optimum(dataclasses.replace(p64, params=w64))
            ev_t, g_t, _ = dense(p64, tight)
            row.update(
                tight_grad_norm=tight_norm,
                tight_num_negative=int((ev_t < 0).sum()),
                tight_eig_min=float(ev_t[0]),
                tight_oracle_vs_adam_oracle_err=metrics(g_t["oracle"], oracle)[1],
                tight_oracle_vs_adam_oracle_cos=metrics(g_t["oracle"], oracle)[0],
                tight_gn_err=metrics(g_t["gn"], g_t["oracle"])[1],
            )
            for dtype, prob, params in (("float32", p32, w32), ("float64", p64, w64)):
                for rtol in RTOLS:
                    row[f"minres_{dtype}_{rtol:g}"] = minres(prob, params, rtol, oracle)
            row["time_s"] = time.perf_counter() - t
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_jsonl("sensitivity.jsonl", rows)


if __name__ == "__main__":
    main()
