"""Tables from results/<problem>.json (written by study.py); also writes results/grid.csv."""

import csv
import glob
import json
import os
import sys

LETTER = {
    "successful": "S",
    "max_steps_reached": "M",
    "negative_curvature": "N",
    "stagnated": "T",
    "breakdown": "B",
    "singular": "Z",
    "nonfinite": "X",
    "diverged": "D",
    "error": "E",
}
RTOLS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)


def fmt(x, spec=".1e"):
    return "-" if x is None else format(x, spec)


def cell(row):
    o = LETTER.get(row["outcome"], "?")
    reused = "*" if row.get("reused") else ""
    if row["relerr"] is None:
        return f"{o}{row['steps']}{reused}"
    return (
        f"{o}{row['steps']}{reused} r{row['relres']:.0e} e{row['relerr']:.0e} c{row['cosine']:.4f}"
    )


def problem_report(result):
    out = []
    info, facts = result["info"], result["facts"]
    out.append(
        f"## {result['problem']}  (n={info['num_params']}, point: {info['point']}, "
        f"|grad L_T|={info['inner_grad_norm']:.2e}, |g*|={info['oracle_norm']:.3e}, "
        f"total {result['total_s']:.0f}s)"
    )
    for curv, f in facts.items():
        out.append(
            f"- {curv}: PD={f['positive_definite']} lambda_max={f['lambda_max']:.4g} "
            f"#neg={f['num_negative']} smallest={[float(f'{x:.3g}') for x in f['smallest'][:6]]} "
            f"({f['method']}); dense relres {f['dense_relres']:.1e}"
        )
    out.append(
        "- dense answer vs oracle (bias of curvature/damping alone): "
        + "; ".join(
            f"{k.replace('|', ' mu=')}: cos {v['cosine']:.5f} err {v['relerr']:.2e}"
            for k, v in result["dense"].items()
        )
    )
    out.append("")
    out.append(
        "Traces (float64 dense; rtol needed = largest rtol whose first-hit iterate, and "
        "every tighter one, meets the target; steps at that rtol):"
    )
    out.append(
        "| solver | curvature | stop | target | vs oracle: rtol needed (steps) | vs own dense: rtol needed (steps) |"
    )
    out.append("|---|---|---|---|---|---|")
    for key, t in result["traces"].items():
        solver, curv = key.split("|")
        for target in ("cos>=0.999", "err<=10%", "err<=1%"):
            a, b = t["vs_oracle"][target], t["vs_own_dense"][target]
            out.append(
                f"| {solver} | {curv} | {t['stop'] or t['vs_oracle']['steps']} | {target} | "
                f"{fmt(a['rtol_needed'], '.1e')} ({a['steps']}) | {fmt(b['rtol_needed'], '.1e')} ({b['steps']}) |"
            )
    out.append("")
    out.append(
        "Grid (cell: outcome letter + steps [* = copied from the looser rtol], r = relative "
        "residual, e = relative error vs oracle, c = cosine). S successful, M max_steps, "
        "N negative_curvature, T stagnated, B breakdown, Z singular."
    )
    out.append(
        "| dtype | curv | damping | solver | " + " | ".join(f"rtol {r:.0e}" for r in RTOLS) + " |"
    )
    out.append("|---|---|---|---|" + "---|" * len(RTOLS))
    groups = {}
    for row in result["rows"]:
        groups.setdefault(
            (row["dtype"], row["curvature"], row["damping_label"], row["solver"]), {}
        )[row["rtol"]] = row
    for (dtype, curv, damp, solver), cells in groups.items():
        out.append(
            f"| {dtype} | {curv} | {damp} | {solver} | "
            + " | ".join(cell(cells[r]) if r in cells else "" for r in RTOLS)
            + " |"
        )
    out.append("")
    return "\n".join(out)


def main(results_dir):
    files = sorted(glob.glob(os.path.join(results_dir, "*.json")))
    rows = []
    for path in files:
        with open(path) as f:
            result = json.load(f)
        print(problem_report(result))
        for row in result["rows"]:
            rows.append({"problem": result["problem"], **row})
    if rows:
        with open(os.path.join(results_dir, "grid.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main(
        sys.argv[1]
        if len(sys.argv) > 1
        else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    )
