"""A non-symmetric condition with a known answer, for GMRES's defaults.

F(w, h, x, y) = D * grad_w L_T(w, h, x, y), D a fixed positive diagonal (exp(U(-1, 1)) per
weight: a preconditioned-gradient condition). dF/dw = D H is not symmetric, yet the implicit
hypergradient equals the Hessian one (D cancels), so the dense float64 oracle of study.py applies.
GMRES with restart 20 / 50 / 200, rtol 1e-3 / 1e-4 / 1e-5, max_steps 2000, float32 and float64.

    .venv/bin/python benchmarks/default_solvers/nonsym.py
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch.func import grad

import implicitfn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from study import measure, points, setup, write_jsonl  # noqa: E402


def condition_for(problem, scale):
    gradient = grad(problem.train_loss)

    def F(w, h, x, y):
        return gradient(w, h, x, y) * scale

    return implicitfn.root(F)


def main():
    torch.set_num_threads(1)
    out = []
    for name in ("logreg", "mlp1k"):
        p32, w32, p64, w64, _ = points(name)
        oracle = setup(p64, w64)[2]
        gen = torch.Generator().manual_seed(3)
        scale64 = w64.apply(
            lambda t, gen=gen: torch.exp(
                torch.rand(t.shape, generator=gen, dtype=torch.float64) * 2 - 1
            )
        )
        for dtype, prob, params in (("float32", p32, w32), ("float64", p64, w64)):
            scale = scale64.apply(lambda t, dtype=dtype: t.to(getattr(torch, dtype)))
            cond = condition_for(prob, scale)
            for restart in (20, 50, 200):
                for rtol in (1e-3, 1e-4, 1e-5):
                    adjoint = implicitfn.ImplicitAdjoint(
                        solver=implicitfn.GMRES(max_steps=2000, restart=restart, rtol=rtol),
                        on_failure="warn",
                    )
                    row = {
                        "problem": name,
                        "dtype": dtype,
                        "restart": restart,
                        "rtol": rtol,
                        **measure(prob, params, adjoint, oracle, cond),
                    }
                    out.append(row)
                    print(json.dumps(row), flush=True)
    write_jsonl("nonsym.jsonl", out)


if __name__ == "__main__":
    main()
