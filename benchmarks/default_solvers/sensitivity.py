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
import warnings

import torch
from torch.func import grad

import implicitfn
from implicitfn.compare.problems import _classifier_problem, train_to_optimum

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from study import adam_point, metrics, ravel  # noqa: E402

RTOLS = (1e-3, 3e-4, 1e-4, 1e-5)
MAX_STEPS = 5000


def problem(seed, dtype):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))
    return _classifier_problem("mlp1k", net, 1e-3, dtype, torch.device("cpu"), 0)


def dense(p64, w64):
    h, args = p64.hparams, p64.inner_args
    _, unravel = implicitfn.tree_ravel(w64)
    dw, dh = grad(p64.outer_loss, argnums=(0, 1))(w64, h, *p64.outer_args)
    b, direct = ravel(dw), ravel(dh)
    c = ravel(
        implicitfn.cross_vjp(
            implicitfn.stationarity(p64.train_loss), unravel(torch.ones_like(b)), w64, h, *args
        )[0]
    )
    out = {}
    for curv in ("Hessian", "GaussNewton"):
        m = (
            getattr(implicitfn, curv)()
            .linearize(p64.train_loss, w64, h, *args)
            .as_matrix(chunk_size=64)
        )
        out[curv] = 0.5 * (m + m.T)
    ev = torch.linalg.eigvalsh(out["Hessian"])
    eye = torch.eye(b.numel(), dtype=torch.float64)
    g = {
        name: direct - c * torch.linalg.solve(m, b)
        for name, m in (
            ("oracle", out["Hessian"]),
            ("gn", out["GaussNewton"]),
            ("damped1e-4", out["Hessian"] + 1e-4 * eye),
            ("damped1e-6", out["Hessian"] + 1e-6 * eye),
        )
    }
    return ev, g, float(implicitfn.tree_norm(grad(p64.train_loss)(w64, h, *args)))


def minres(problem, params, rtol, oracle):
    adjoint = implicitfn.ImplicitAdjoint(
        solver=implicitfn.MINRES(max_steps=MAX_STEPS, rtol=rtol),
        curvature=implicitfn.Hessian(),
        on_failure="warn",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g, info = implicitfn.hypergradient(
            problem.train_loss,
            problem.outer_loss,
            params,
            problem.hparams,
            inner_args=problem.inner_args,
            outer_args=problem.outer_args,
            adjoint=adjoint,
        )
    cos, err = metrics(ravel(g), oracle)
    return {
        "outcome": info.outcome_names()[0],
        "steps": int(info.num_steps),
        "relres": float(info.relative_residual),
        "relerr": err,
        "cosine": cos,
    }


def main():
    torch.set_num_threads(1)
    rows = []
    for seed in (0, 1, 2):
        for steps in (500, 1000, 2000, 5000):
            t = time.perf_counter()
            p32, p64 = problem(seed, torch.float32), problem(seed, torch.float64)
            w32 = adam_point(p32, steps=steps)
            w64 = w32.apply(lambda x: x.double())
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
    with open(os.path.join(HERE, "results", "sensitivity.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
