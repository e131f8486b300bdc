"""Issue 16, "Defaults that work on a non-convex network": measure solver x curvature x damping x
rtol x dtype against a dense float64 implicit-function-theorem oracle, on three digits problems.

    .venv/bin/python benchmarks/default_solvers/study.py            # everything
    .venv/bin/python benchmarks/default_solvers/study.py --problems mlp1k logreg     # a subset
    .venv/bin/python benchmarks/default_solvers/study.py --report-only               # tables from JSON

Writes benchmarks/default_solvers/results/<problem>.json and prints the tables (report.py formats them).

Problems
- mlp1k : 64-16-10 tanh MLP (1,210 params), one log weight decay per weight (exp(h)=1e-3),
          trained in float32 with full-batch Adam (lr 1e-2, 1000 steps) from a seeded init:
          *not* a tight optimum, the Hessian there has a few small negative eigenvalues.
- mlp   : implicitfn.compare "mlp" (64-128-10 tanh, 9,610 params), trained tightly by
          compare.train_to_optimum (L-BFGS + Newton, float64).
- logreg: implicitfn.compare "logreg" (650 params), train_to_optimum.

Oracle: dense float64 Hessian at the (float64 copy of the) point, symmetrised, solved by Cholesky
when positive definite, else LU (torch.linalg.solve); g* = dL_V/dh - B^T v.

Grid (through implicitfn.hypergradient, as a user calls it): solver in {CG, MINRES, GMRES(restart
50)}, curvature in {Hessian, GaussNewton}, damping in {0, 1e-4, 1e-3 * lambda_max(curvature)},
rtol in {1e-2 .. 1e-7}, max_steps 2000, dtype in {float32, float64}; on_failure="warn".
Rows whose looser-rtol run ended on an rtol-independent event (negative curvature, singular,
breakdown) or spent the whole budget are copied from that run (same Krylov path) and marked
`reused` -- pass --no-reuse to run them.

Traces (float64, dense operator, every iterate): CG (own, stops at p^T A p <= 0 like the
library's) and MINRES (scipy) on the undamped Hessian and Gauss-Newton; for each target
(cosine >= 0.999, relative error <= 10%, <= 1%) the largest rtol at which stopping at the first
iterate with true relative residual <= rtol meets the target, for every rtol below it as well.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

import numpy as np
import scipy.sparse.linalg as spla
import torch
from torch.func import grad

import implicitfn
from implicitfn.compare.problems import _classifier_problem, make_problem, train_to_optimum

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
SOLVERS = ("CG", "MINRES", "GMRES")
CURVATURES = ("Hessian", "GaussNewton")
RTOLS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
MAX_STEPS = 2000
RESTART = 50
TRACE_STEPS = 2000
CHUNK = 64
DENSE_GN_MAX = 3000
TARGETS = {
    "cos>=0.999": ("cosine", 0.999),
    "err<=10%": ("relerr", 0.10),
    "err<=1%": ("relerr", 0.01),
}
EXACT_PATH_EVENTS = {"negative_curvature", "singular", "breakdown"}


def log(*args):
    print(*args, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- problems and their points


def mlp1k_problem(dtype, seed=0):
    """The 64-16-10 tanh MLP on digits (the split of seed 0), its weights initialised from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))
    return _classifier_problem("mlp1k", net, 1e-3, dtype, torch.device("cpu"), 0)


def adam_point(problem, steps=1000, lr=1e-2):
    """Full-batch Adam in the problem's dtype: what a user does (not a tight optimum)."""
    flat, unravel = implicitfn.tree_ravel(problem.params)
    flat = flat.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([flat], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        problem.train_loss(unravel(flat), problem.hparams, *problem.inner_args).backward()
        optimizer.step()
    return unravel(flat.detach())


def mlp1k_points(seed=0, steps=1000):
    """(problem32, params32, problem64, params64) of the 1.2k MLP initialised from `seed`: the
    point `steps` of float32 Adam reach, and its float64 copy."""
    p32, p64 = mlp1k_problem(torch.float32, seed), mlp1k_problem(torch.float64, seed)
    w32 = adam_point(p32, steps=steps)
    return p32, w32, p64, w32.apply(lambda t: t.double())


def points(name):
    """(problem32, params32, problem64, params64, how)"""
    if name == "mlp1k":
        return (*mlp1k_points(), "Adam float32, lr 1e-2, 1000 full-batch steps")
    p32, p64 = make_problem(name, dtype=torch.float32), make_problem(name, dtype=torch.float64)
    w64, _ = train_to_optimum(p64)
    return p32, w64.apply(lambda t: t.float()), p64, w64, "compare.train_to_optimum (float64)"


# ---------------------------------------------------------------- dense float64 facts and oracle


def ravel(tree):
    return implicitfn.tree_ravel(tree)[0].detach().to(torch.float64)


def eigen_facts(matrix, factor, positive_definite):
    n = matrix.shape[0]
    if n <= 3000:
        ev = torch.linalg.eigvalsh(matrix)
        return {
            "lambda_max": float(ev[-1]),
            "num_negative": int((ev < 0).sum()),
            "smallest": [float(x) for x in ev[:8]],
            "smallest_abs": float(ev.abs().min()),
            "method": "eigvalsh",
        }
    a = matrix.numpy()
    op = spla.LinearOperator((n, n), matvec=lambda v: a @ v, dtype=np.float64)
    lam_max = float(spla.eigsh(op, k=1, which="LA", return_eigenvectors=False, tol=1e-8)[0])
    if positive_definite:

        def inv(v):
            v = torch.as_tensor(np.asarray(v).reshape(-1), dtype=torch.float64)
            return torch.cholesky_solve(v[:, None], factor)[:, 0].numpy()

        opinv = spla.LinearOperator((n, n), matvec=inv, dtype=np.float64)
        small = np.sort(
            spla.eigsh(op, k=8, sigma=0.0, OPinv=opinv, which="LM", return_eigenvectors=False)
        )
        return {
            "lambda_max": lam_max,
            "num_negative": 0,
            "smallest": small.tolist(),
            "smallest_abs": float(np.abs(small).min()),
            "method": "Cholesky ok (PD); eigsh shift-invert at 0",
        }
    small = np.sort(spla.eigsh(op, k=8, which="SA", return_eigenvectors=False, maxiter=20000))
    return {
        "lambda_max": lam_max,
        "num_negative": None,
        "smallest": small.tolist(),
        "smallest_abs": None,
        "method": "Cholesky failed; eigsh SA",
    }


def dense_solve(matrix, rhs):
    factor, failed = torch.linalg.cholesky_ex(matrix)
    if not bool(failed):
        return torch.cholesky_solve(rhs[:, None], factor)[:, 0], factor, True
    return torch.linalg.solve(matrix, rhs), None, False


def metrics(g, ref):
    """(cosine, relative error) of the raveled hypergradient `g` against the reference `ref`."""
    g = g.to(torch.float64)
    return (
        float(torch.nn.functional.cosine_similarity(g, ref, dim=0)),
        float(torch.linalg.vector_norm(g - ref) / torch.linalg.vector_norm(ref)),
    )


def operator_of(curv, p64, w64):
    return getattr(implicitfn, curv)().linearize(p64.train_loss, w64, p64.hparams, *p64.inner_args)


def flat_matvec(op, w64):
    _, unravel = implicitfn.tree_ravel(w64)
    return lambda v: ravel(op.mv(unravel(v)))


def dense_curvature(curv, p64, w64):
    """The curvature `curv` at the float64 point as a dense matrix, symmetrised (round-off)."""
    m = operator_of(curv, p64, w64).as_matrix(chunk_size=CHUNK)
    return 0.5 * (m + m.T)


def adjoint_system(p64, w64):
    """(b, hypergrad) at the float64 point: the raveled right-hand side b = dL_V/dw of the
    adjoint system, and v -> dL_V/dh - B^T v, for one v (n,) or a stack of them (k, n)."""
    h, args = p64.hparams, p64.inner_args
    _, unravel = implicitfn.tree_ravel(w64)
    direct_w, direct_h = grad(p64.outer_loss, argnums=(0, 1))(w64, h, *p64.outer_args)
    b, direct = ravel(direct_w), ravel(direct_h)
    condition = implicitfn.stationarity(p64.train_loss)
    # B^T v is diagonal here (penalty 0.5 sum exp(h_i) w_i^2): B^T v = c * v with c = B^T 1.
    c = ravel(implicitfn.cross_vjp(condition, unravel(torch.ones_like(b)), w64, h, *args)[0])
    probe = torch.randn(b.numel(), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = ravel(implicitfn.cross_vjp(condition, unravel(probe), w64, h, *args)[0])
    assert torch.allclose(exact, c * probe, rtol=1e-10, atol=1e-14), "B is not diagonal"

    def hypergrad(v):
        return direct - c * v

    return b, hypergrad


def setup(p64, w64):
    """The oracle (dense Hessian), dense or tight-iterative answers per curvature and damping,
    eigen facts. Gauss-Newton is formed densely only for n <= DENSE_GN_MAX; above, its answers
    come from float64 CG at rtol 1e-11 (vmapping the Gauss-Newton product over 9.6k basis
    vectors took > 10 min)."""
    t0 = time.perf_counter()
    _, unravel = implicitfn.tree_ravel(w64)
    b, hypergrad = adjoint_system(p64, w64)
    n = b.numel()
    grad_norm = float(implicitfn.tree_norm(grad(p64.train_loss)(w64, p64.hparams, *p64.inner_args)))
    solutions, facts, dense = {}, {}, {}
    for curv in CURVATURES:
        t = time.perf_counter()
        if curv == "Hessian" or n <= DENSE_GN_MAX:
            m = dense_curvature(curv, p64, w64)
            v, factor, pd = dense_solve(m, b)
            facts[curv] = {"positive_definite": pd, "form_s": time.perf_counter() - t}
            facts[curv].update(eigen_facts(m, factor, pd))
            facts[curv]["dense_relres"] = float(torch.linalg.vector_norm(m @ v - b) / b.norm())
            eye = torch.eye(n, dtype=m.dtype)
            solve = lambda mu, m=m, eye=eye: dense_solve(m + mu * eye, b)[0]  # noqa: E731
        else:
            op = operator_of(curv, p64, w64)
            mv = flat_matvec(op, w64)
            lam = float(
                spla.eigsh(
                    spla.LinearOperator(
                        (n, n),
                        matvec=lambda v, mv=mv: mv(
                            torch.as_tensor(np.asarray(v).reshape(-1))
                        ).numpy(),
                        dtype=np.float64,
                    ),
                    k=1,
                    which="LA",
                    return_eigenvectors=False,
                    tol=1e-6,
                )[0]
            )
            facts[curv] = {
                "positive_definite": True,
                "lambda_max": lam,
                "num_negative": 0,
                "smallest": [],
                "smallest_abs": None,
                "method": "PSD by construction; lambda_max by eigsh on products; answers by CG rtol 1e-11",
            }

            def solve(mu, op=op):
                x, info = implicitfn.CG(max_steps=50000, rtol=1e-11).solve(
                    implicitfn.damp(op, mu), unravel(b)
                )
                return ravel(x)

            v = solve(0.0)
            facts[curv]["dense_relres"] = float(torch.linalg.vector_norm(mv(v) - b) / b.norm())
            facts[curv]["form_s"] = time.perf_counter() - t
        solutions[curv] = (solve, v)
        log(f"  {curv}: {facts[curv]}")
    oracle = hypergrad(solutions["Hessian"][1])
    for curv in CURVATURES:
        solve, v = solutions[curv]
        lam = facts[curv]["lambda_max"]
        facts[curv]["dampings"] = [0.0, 1e-4, 1e-3 * lam]
        for mu in facts[curv]["dampings"]:
            vm = v if mu == 0 else solve(mu)
            cos, err = metrics(hypergrad(vm), oracle)
            dense[f"{curv}|{mu:.6g}"] = {"cosine": cos, "relerr": err}
    own = {curv: hypergrad(solutions[curv][1]) for curv in CURVATURES}
    info = {
        "inner_grad_norm": grad_norm,
        "oracle_norm": float(oracle.norm()),
        "rhs_norm": float(b.norm()),
        "setup_s": time.perf_counter() - t0,
    }
    return b, hypergrad, oracle, own, facts, dense, info


# ---------------------------------------------------------------- per-iterate traces (float64)


def cg_trace(mv, b, steps):
    x, r = torch.zeros_like(b), b.clone()
    p, rr = r.clone(), float(r @ r)
    xs, stop = [], None
    for k in range(steps):
        ap = mv(p)
        curv = float(p @ ap)
        if curv <= 0:
            stop = f"negative curvature at step {k + 1}"
            break
        alpha = rr / curv
        x = x + alpha * p
        r = r - alpha * ap
        xs.append(x)
        rr_new = float(r @ r)
        if math.sqrt(rr_new) <= 1e-13 * float(b.norm()):
            break
        p = r + (rr_new / rr) * p
        rr = rr_new
    return torch.stack(xs), stop


def minres_trace(mv, b, steps):
    xs = []
    n = b.numel()
    op = spla.LinearOperator(
        (n, n),
        matvec=lambda v: mv(torch.as_tensor(np.asarray(v).reshape(-1))).numpy(),
        dtype=np.float64,
    )
    spla.minres(op, b.numpy(), rtol=1e-13, maxiter=steps, callback=lambda xk: xs.append(xk.copy()))
    return torch.as_tensor(np.stack(xs)), None


def trace_summary(relres, g, ref):
    cos = torch.nn.functional.cosine_similarity(g, ref[None], dim=1)
    err = torch.linalg.vector_norm(g - ref[None], dim=1) / float(ref.norm())
    values = {"cosine": cos, "relerr": err}
    grid = np.logspace(0, -12, 241)
    out = {
        "steps": int(g.shape[0]),
        "final_relres": float(relres[-1]),
        "final_cos": float(cos[-1]),
        "final_relerr": float(err[-1]),
    }
    running_min = torch.cummin(relres, 0).values
    for label, (key, bound) in TARGETS.items():
        ok_iter = (values[key] >= bound) if key == "cosine" else (values[key] <= bound)
        # for rtol r: the first iterate with relres <= r; r is fine if it and all smaller grid r are
        largest_ok, first_steps = None, None
        for r in grid[::-1]:  # from tight to loose
            hit = torch.nonzero(running_min <= r)
            if len(hit) == 0:
                continue  # never reached: say nothing
            k = int(hit[0])
            if not bool(ok_iter[k]):
                break
            largest_ok, first_steps = float(r), k + 1
        out[label] = {"rtol_needed": largest_ok, "steps": first_steps}
    return out


def traces(p64, w64, b, hypergrad, oracle, own):
    result = {}
    for curv in CURVATURES:
        mv = flat_matvec(operator_of(curv, p64, w64), w64)
        for solver, fn in (("CG", cg_trace), ("MINRES", minres_trace)):
            t = time.perf_counter()
            xs, stop = fn(mv, b, TRACE_STEPS)
            relres = torch.stack([torch.linalg.vector_norm(b - mv(x)) for x in xs]) / b.norm()
            g = hypergrad(xs)
            result[f"{solver}|{curv}"] = {
                "stop": stop,
                "vs_oracle": trace_summary(relres, g, oracle),
                "vs_own_dense": trace_summary(relres, g, own[curv]),
                "time_s": time.perf_counter() - t,
            }
            log(f"  trace {solver} {curv}: {result[f'{solver}|{curv}']}")
    return result


# ---------------------------------------------------------------- the library grid


def make_solver(name, rtol):
    if name == "CG":
        return implicitfn.CG(max_steps=MAX_STEPS, rtol=rtol)
    if name == "MINRES":
        return implicitfn.MINRES(max_steps=MAX_STEPS, rtol=rtol)
    return implicitfn.GMRES(max_steps=MAX_STEPS, restart=RESTART, rtol=rtol)


def measure(problem, params, adjoint, oracle, condition=None):
    """One hypergradient as a user computes it (`problem.hypergradient`, warnings silenced; the
    adjoint should say on_failure="warn"), measured against the raveled `oracle`: the row
    {outcome, steps, relres, relerr, cosine, time_s} every script of this study records. A
    NaN/Inf (which always raises) gives a row with no errors and the exception's `message`."""
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            g, info = problem.hypergradient(params, adjoint, condition)
        except implicitfn.ImplicitSolveError as error:
            info = error.info
            return {
                "outcome": info.outcome_names()[0] if info is not None else "error",
                "steps": None if info is None else int(info.num_steps),
                "relres": None,
                "relerr": None,
                "cosine": None,
                "time_s": time.perf_counter() - t,
                "message": str(error)[:200],
            }
    seconds = time.perf_counter() - t
    cos, err = metrics(ravel(g), oracle)
    return {
        "outcome": info.outcome_names()[0],
        "steps": int(info.num_steps),
        "relres": float(info.relative_residual),
        "relerr": err,
        "cosine": cos,
        "time_s": seconds,
    }


def write_jsonl(name, rows):
    """results/<name>: one JSON object a line, as analyze.py reads them."""
    with open(os.path.join(RESULTS, name), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def run_one(problem, params, solver, curv, mu, oracle):
    adjoint = implicitfn.ImplicitAdjoint(
        solver=solver, curvature=getattr(implicitfn, curv)(), damping=mu, on_failure="warn"
    )
    return measure(problem, params, adjoint, oracle)


def grid(p32, w32, p64, w64, oracle, facts, reuse, budget_s):
    rows = []
    start = time.perf_counter()
    # damping 0 first (both dtypes, both curvatures): a spent budget cuts the damped runs.
    for mu_index in range(3):
        for dtype, problem, params in (("float32", p32, w32), ("float64", p64, w64)):
            for curv in CURVATURES:
                for mu in (facts[curv]["dampings"][mu_index],):
                    for solver_name in SOLVERS:
                        previous = None
                        for rtol in RTOLS:
                            key = dict(
                                dtype=dtype,
                                curvature=curv,
                                damping=mu,
                                damping_label=("0", "1e-4", "1e-3*lmax")[mu_index],
                                solver=solver_name,
                                rtol=rtol,
                            )
                            if (
                                reuse
                                and previous is not None
                                and (
                                    previous["outcome"] in EXACT_PATH_EVENTS
                                    or (
                                        previous["outcome"] == "max_steps_reached"
                                        and (previous["steps"] or 0) >= MAX_STEPS
                                    )
                                )
                            ):
                                row = {**previous, "reused": True, "time_s": 0.0}
                            else:
                                row = run_one(
                                    problem,
                                    params,
                                    make_solver(solver_name, rtol),
                                    curv,
                                    mu,
                                    oracle,
                                )
                                row["reused"] = False
                            rows.append({**key, **row})
                            previous = row
                            if time.perf_counter() - start > budget_s:
                                log(f"  grid budget {budget_s}s spent; stopping")
                                return rows
                    log(
                        f"  grid {dtype} {curv} mu={mu:.3g} done ({time.perf_counter() - start:.0f}s)"
                    )
    return rows


# ---------------------------------------------------------------- main


def study(name, reuse, budget_s, fresh):
    log(f"== {name}")
    t = time.perf_counter()
    p32, w32, p64, w64, how = points(name)
    train_s = time.perf_counter() - t
    cache = os.path.join(RESULTS, f"cache_{name}.pt")
    if os.path.exists(cache) and not fresh:
        saved = torch.load(cache, weights_only=False)
        assert torch.equal(ravel(w64), saved["w64"]), "the point changed; rerun with --fresh"
        oracle, facts, dense, info, tr = (
            saved[k] for k in ("oracle", "facts", "dense", "info", "traces")
        )
        log("  setup and traces from " + cache)
    else:
        b, hypergrad, oracle, own, facts, dense, info = setup(p64, w64)
        info.update(train_s=train_s, point=how, num_params=p64.num_params)
        tr = traces(p64, w64, b, hypergrad, oracle, own)
        torch.save(
            {
                "w64": ravel(w64),
                "oracle": oracle,
                "facts": facts,
                "dense": dense,
                "info": info,
                "traces": tr,
            },
            cache,
        )
    rows = grid(p32, w32, p64, w64, oracle, facts, reuse, budget_s)
    return {
        "problem": name,
        "info": info,
        "facts": facts,
        "dense": dense,
        "traces": tr,
        "rows": rows,
        "total_s": time.perf_counter() - t,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--problems", nargs="+", default=["mlp1k", "logreg", "mlp"])
    parser.add_argument("--no-reuse", action="store_true")
    parser.add_argument("--grid-budget-s", type=float, default=400.0)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--fresh", action="store_true", help="recompute the cached oracle and traces"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.makedirs(RESULTS, exist_ok=True)
    if not args.report_only:
        import subprocess

        commit = subprocess.run(
            [
                "git",
                "-C",
                os.path.dirname(os.path.dirname(implicitfn.__file__)),
                "rev-parse",
                "--short",
                "HEAD",
            ],
            capture_output=True,
            text=True,
        ).stdout.strip()
        for name in args.problems:
            result = study(name, not args.no_reuse, args.grid_budget_s, args.fresh)
            result["environment"] = {
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "implicitfn": implicitfn.__file__,
                "commit": commit,
            }
            with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
                json.dump(result, f, indent=1)
            log(f"== {name} done in {result['total_s']:.0f}s")
    import report

    report.main(RESULTS)


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
