"""Eager overhead: implicitfn's hypergradient against the least work the same answer needs.

The floor is the hypergradient written by hand in plain autograd on tuples of tensors: the
outer gradient, one gradient of the training loss with `create_graph=True` (in w and lambda),
k conjugate-gradient steps whose products go back through that retained graph, and the mixed
product $B^\\top v$ through the same graph: 2 gradients + k + 1 products, no checks, no
reports. implicitfn adds one product (the measured residual that judges the solve), its input
checks and its bookkeeping; "floor+r" is the floor with that product, so that `x floor+r`
is the library's own overhead; torchopt (`custom_root` + `solve_cg`) is timed alongside. Every
method runs exactly k CG steps (`rtol=0`) on the same problem and point; the answers are
compared. Times are medians over interleaved rounds, ratios are medians of same-round ratios
(`_harness.py`); one torch thread unless `--threads`.

    python benchmarks/overhead.py                # logreg and mlp, k = 5, 10, 20
    python benchmarks/overhead.py --fast         # logreg, k = 10, few rounds (CI)
"""

from __future__ import annotations

import argparse
import warnings

import _harness as H
import torch
import torchopt

import implicitfn

warnings.filterwarnings("ignore", category=FutureWarning, module=r"torchopt\.")


def floor(setup: H.Setup, steps: int, measure_residual: bool = False):
    """The hypergradient by hand: 2 gradients + `steps` + 1 products through one graph, and
    with `measure_residual` one more product for the true residual |b - A v| that implicitfn
    judges every solve by (the same maths as implicitfn, still without checks or reports)."""
    x, y = setup.inner_args
    x_val, y_val = setup.outer_args

    def run():
        params = tuple(t.detach().requires_grad_() for t in setup.params_tuple)
        meta = tuple(t.detach().requires_grad_() for t in setup.hparams_tuple)
        rhs = torch.autograd.grad(setup.outer_loss(params, x_val, y_val), params)
        gradient = torch.autograd.grad(
            setup.train_loss(params, meta, x, y), params, create_graph=True
        )

        def product(v):
            return torch.autograd.grad(gradient, params, v, retain_graph=True)

        def dot(a, b):
            return sum((p * q).sum() for p, q in zip(a, b, strict=True))

        v = tuple(torch.zeros_like(t) for t in rhs)
        r = p = rhs
        rr = dot(r, r)
        for _ in range(steps):
            ap = product(p)
            alpha = rr / dot(p, ap)
            v = tuple(a + alpha * b for a, b in zip(v, p, strict=True))
            r = tuple(a - alpha * b for a, b in zip(r, ap, strict=True))
            rr, previous = dot(r, r), rr
            p = tuple(a + (rr / previous) * b for a, b in zip(r, p, strict=True))
        if measure_residual:
            residual = tuple(a - b for a, b in zip(rhs, product(v), strict=True))
            float(dot(residual, residual))  # read, as implicitfn reads it to judge the solve
        return tuple(-g for g in torch.autograd.grad(gradient, meta, v))

    return run


def implicitfn_plain(setup: H.Setup, solver: implicitfn.CG):
    """`implicitfn.hypergradient` on the floor's plain-tensor losses (params and hparams as
    dicts of tensors), one adjoint for all calls, no inner-solution check: the same maths and
    the same loss code as the floor, so the difference is the library."""
    names = setup.names
    params = dict(zip(names, setup.params_tuple, strict=True))
    hparams = dict(zip(names, setup.hparams_tuple, strict=True))
    adjoint = implicitfn.ImplicitAdjoint(solver=solver, inner_rtol=None)

    def train(p, h, x, y):
        return setup.train_loss(tuple(p.values()), tuple(h.values()), x, y)

    def outer(p, h, x, y):
        return setup.outer_loss(tuple(p.values()), x, y)

    def run():
        return implicitfn.hypergradient(
            train,
            outer,
            params,
            hparams,
            inner_args=setup.inner_args,
            outer_args=setup.outer_args,
            adjoint=adjoint,
        )[0]

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:index]")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    H.check_device(parser, args.device)
    torch.set_num_threads(args.threads)
    print(H.machine(args.threads))
    problems, budgets = (["logreg"], [10]) if args.fast else (["logreg", "mlp"], [5, 10, 20])
    rounds = 5 if args.fast else args.rounds
    print(
        f"\n{'problem':<8}{'k':>4}{'floor ms':>10}{'floor+r':>10}{'implicitfn':>12}{'x floor':>9}"
        f"{'x floor+r':>11}{'torchopt':>10}{'x floor':>9}{'max rel. diff':>15}"
    )
    for name in problems:
        setup = H.load(name, progress=H.stderr_progress, device=args.device)
        for k in budgets:
            solver = implicitfn.CG(max_steps=k, rtol=0)
            methods = {
                "floor": floor(setup, k),
                "floor+r": floor(setup, k, measure_residual=True),
                "implicitfn": implicitfn_plain(setup, solver),
                "torchopt": H.torchopt_custom_root(
                    setup, torchopt.linear_solve.solve_cg(maxiter=k, rtol=0.0)
                ),
            }
            answers = {
                n: torch.cat([t.reshape(-1) for t in torch.utils._pytree.tree_leaves(fn())])
                for n, fn in methods.items()
            }
            diff = max(
                float((a - answers["floor"]).norm() / answers["floor"].norm())
                for a in answers.values()
            )
            times = H.interleaved(methods, rounds)
            base = times["floor"]
            print(
                f"{name:<8}{k:>4}{H.median(base) * 1e3:>10.2f}"
                f"{H.median(times['floor+r']) * 1e3:>10.2f}"
                f"{H.median(times['implicitfn']) * 1e3:>10.2f}ms"
                f"{H.paired_ratio(times['implicitfn'], base):>8.2f}x"
                f"{H.paired_ratio(times['implicitfn'], times['floor+r']):>10.2f}x"
                f"{H.median(times['torchopt']) * 1e3:>8.2f}ms"
                f"{H.paired_ratio(times['torchopt'], base):>8.2f}x{diff:>15.1e}"
            )


if __name__ == "__main__":
    main()
