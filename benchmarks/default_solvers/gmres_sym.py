"""GMRES with a long restart vs MINRES on the symmetric indefinite Hessian of the 1.2k MLP:
is MINRES's step count (loss of Lanczos orthogonality, worst in float32) the price of its
short recurrence?   .venv/bin/python benchmarks/default_solvers/gmres_sym.py"""

import json
import os
import sys

import torch

import implicitfn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from study import measure, points, setup, write_jsonl  # noqa: E402


def main():
    torch.set_num_threads(1)
    p32, w32, p64, w64, _ = points("mlp1k")
    oracle = setup(p64, w64)[2]
    rows = []
    for dtype, prob, params in (("float32", p32, w32), ("float64", p64, w64)):
        for label, solver in (
            ("MINRES", implicitfn.MINRES(max_steps=2000, rtol=1e-4)),
            ("GMRES(200)", implicitfn.GMRES(max_steps=2000, restart=200, rtol=1e-4)),
            ("GMRES(500)", implicitfn.GMRES(max_steps=2000, restart=500, rtol=1e-4)),
        ):
            adjoint = implicitfn.ImplicitAdjoint(solver=solver, on_failure="warn")
            row = {
                "dtype": dtype,
                "solver": label,
                "rtol": 1e-4,
                **measure(prob, params, adjoint, oracle),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_jsonl("gmres_sym.jsonl", rows)


if __name__ == "__main__":
    main()
