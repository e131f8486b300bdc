"""The decision tables from results/*.json: the claims of issue 16 and the defaults.

.venv/bin/python benchmarks/default_solvers/analyze.py
"""

import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
RTOLS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)


def load():
    out = {}
    for path in sorted(glob.glob(os.path.join(HERE, "results", "*.json"))):
        with open(path) as f:
            r = json.load(f)
        out[r["problem"]] = r
    return out


def claim_table(results):
    print(
        "### Trace (float64, dense operator): largest rtol whose first-hit iterate meets the target"
    )
    print("| problem | operator | target | CG rtol (steps) | MINRES rtol (steps) | CG/MINRES |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        for curv in ("Hessian", "GaussNewton"):
            ref = "vs_oracle" if curv == "Hessian" else "vs_own_dense"
            for target in ("cos>=0.999", "err<=10%", "err<=1%"):
                cg = r["traces"][f"CG|{curv}"]
                mr = r["traces"][f"MINRES|{curv}"]
                a, b = cg[ref][target], mr[ref][target]
                ratio = (
                    (a["rtol_needed"] / b["rtol_needed"])
                    if a["rtol_needed"] and b["rtol_needed"]
                    else None
                )
                cgs = (
                    f"{a['rtol_needed']:.1e} ({a['steps']})"
                    if a["rtol_needed"]
                    else f"never ({cg['stop'] or 'no'})"
                )
                mrs = f"{b['rtol_needed']:.1e} ({b['steps']})" if b["rtol_needed"] else "never"
                label = curv + ("" if curv == "Hessian" else " (vs dense GN answer)")
                print(
                    f"| {name} | {label} | {target} | {cgs} | {mrs} | {'-' if ratio is None else f'{ratio:.1f}'} |"
                )
    print()


def loosest_ok(cells, bound):
    """The loosest grid rtol from which every tighter rtol has relerr <= bound, with its steps."""
    best = None
    for rtol in reversed(RTOLS):
        row = cells.get(rtol)
        if row is None or row["relerr"] is None or row["relerr"] > bound:
            break
        best = (rtol, row["steps"], row["outcome"])
    return best


def grid_table(results):
    print(
        "### Library grid: loosest rtol (and its steps/outcome) from which all tighter rtols give "
        "relative error <= 10% / <= 1% vs the dense oracle (max_steps 2000)"
    )
    print(
        "| problem | dtype | curvature | damping | CG 10% | CG 1% | MINRES 10% | MINRES 1% | GMRES 10% | GMRES 1% |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        groups = {}
        for row in r["rows"]:
            groups.setdefault(
                (row["dtype"], row["curvature"], row["damping_label"]), {}
            ).setdefault(row["solver"], {})[row["rtol"]] = row
        for (dtype, curv, damp), solvers in groups.items():
            cells = []
            for solver in ("CG", "MINRES", "GMRES"):
                for bound in (0.1, 0.01):
                    ok = loosest_ok(solvers.get(solver, {}), bound)
                    if ok is None:
                        rows = solvers.get(solver, {})
                        errs = [x["relerr"] for x in rows.values() if x["relerr"] is not None]
                        cells.append(f"none (best {min(errs):.2f})" if errs else "none")
                    else:
                        cells.append(f"{ok[0]:.0e} ({ok[1]} {ok[2][:4]})")
            print(f"| {name} | {dtype} | {curv} | {damp} | " + " | ".join(cells) + " |")
    print()


def defaults_table(results, candidates):
    print("### Candidate defaults (from the grid, damping 0)")
    print(
        "| candidate | problem | dtype | outcome | steps | relres | rel. error | cosine | time s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for solver, curv, rtol in candidates:
        for name, r in results.items():
            for row in r["rows"]:
                if (row["solver"], row["curvature"], row["rtol"], row["damping_label"]) == (
                    solver,
                    curv,
                    rtol,
                    "0",
                ):
                    err = "-" if row["relerr"] is None else f"{row['relerr']:.3f}"
                    cos = "-" if row["cosine"] is None else f"{row['cosine']:.4f}"
                    rr = "-" if row["relres"] is None else f"{row['relres']:.1e}"
                    print(
                        f"| {solver}+{curv} rtol {rtol:g} | {name} | {row['dtype']} | {row['outcome']} | "
                        f"{row['steps']} | {rr} | {err} | {cos} | {row['time_s']:.2f} |"
                    )
    print()


def main():
    results = load()
    claim_table(results)
    grid_table(results)
    defaults_table(
        results,
        [
            ("MINRES", "Hessian", 1e-3),
            ("MINRES", "Hessian", 1e-4),
            ("CG", "Hessian", 1e-4),
            ("CG", "GaussNewton", 1e-4),
            ("GMRES", "Hessian", 1e-4),
        ],
    )


if __name__ == "__main__":
    main()


def jsonl(name):
    path = os.path.join(HERE, "results", name)
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def extras():
    rows = jsonl("sensitivity.jsonl")
    if rows:
        print(
            "### 1.2k MLP, 12 Adam points (seed x steps): MINRES + exact Hessian, max_steps 5000; "
            "cells: steps / relative error vs that point's dense answer"
        )
        print(
            "| seed | Adam steps | #neg eig | min eig | min abs eig | dense GN err | dense mu=1e-4 err | dense mu=1e-6 err "
            "| oracle moves to tight optimum (err, cos) | f32 1e-3 | f32 3e-4 | f32 1e-4 | f64 1e-3 | f64 3e-4 | f64 1e-4 |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            cells = []
            for dt in ("float32", "float64"):
                for t in (1e-3, 3e-4, 1e-4):
                    c = r[f"minres_{dt}_{t:g}"]
                    cells.append(
                        f"{'' if c['outcome'] == 'successful' else c['outcome'][:4] + ' '}{c['steps']} / {c['relerr']:.3f}"
                    )
            print(
                f"| {r['seed']} | {r['adam_steps']} | {r['num_negative']} | {r['eig_min']:.1e} | {r['eig_smallest_abs']:.1e} | "
                f"{r['dense_gn_err']:.2f} | {r['dense_damped1e-4_err']:.2f} | {r['dense_damped1e-6_err']:.3f} | "
                f"{r['tight_oracle_vs_adam_oracle_err']:.2f}, {r['tight_oracle_vs_adam_oracle_cos']:.2f} | "
                + " | ".join(cells)
                + " |"
            )
        for dt in ("float32", "float64"):
            for t in (1e-3, 3e-4, 1e-4, 1e-5):
                cs = [r[f"minres_{dt}_{t:g}"] for r in rows]
                steps = sorted(c["steps"] for c in cs)
                print(
                    f"- {dt} rtol {t:g}: max error {max(c['relerr'] for c in cs):.3f}, steps median {steps[len(steps) // 2]} max {steps[-1]}, "
                    f"within 1000/2000/4000 steps: {sum(s <= 1000 for s in steps)}/{sum(s <= 2000 for s in steps)}/{sum(s <= 4000 for s in steps)} of {len(steps)}"
                )
        print()
    rows = jsonl("nonsym.jsonl")
    if rows:
        print(
            "### Non-symmetric condition root(D * grad L), GMRES, max_steps 2000 (cells: outcome steps / rel. error)"
        )
        print("| problem | dtype | restart | rtol 1e-3 | rtol 1e-4 | rtol 1e-5 |")
        print("|---|---|---|---|---|---|")
        groups = {}
        for r in rows:
            groups.setdefault((r["problem"], r["dtype"], r["restart"]), {})[r["rtol"]] = r
        for key, cells in groups.items():
            print(
                f"| {key[0]} | {key[1]} | {key[2]} | "
                + " | ".join(
                    f"{cells[t]['outcome'][:4]} {cells[t]['steps']} / {cells[t]['relerr']:.3f}"
                    for t in (1e-3, 1e-4, 1e-5)
                )
                + " |"
            )
        print()
    rows = jsonl("gmres_sym.jsonl")
    if rows:
        print("### 1.2k MLP exact Hessian, rtol 1e-4: MINRES vs GMRES with a long restart")
        print("| dtype | solver | outcome | products | rel. error | time s |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['dtype']} | {r['solver']} | {r['outcome']} | {r['steps']} | {r['relerr']:.4f} | {r['time_s']:.2f} |"
            )
        print()


extras()
