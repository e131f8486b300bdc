"""The cost model of a hypergradient: one gradient, k curvature products and one mixed product.

For a k-step solver the whole `implicitfn.hypergradient` should cost about
    gradient + k * product + mixed,
each part measured alone with plain `torch.autograd` on the same losses (no library):
- gradient: of the validation loss with respect to (w, lambda), what the hypergradient starts with;
- product: one Hessian-vector product through a stored graph of the training gradient
  (`autograd.grad(g, w, v, retain_graph=True)` with `g = autograd.grad(L_T, w, create_graph=True)`:
  the classic reverse-over-reverse product, linearisation amortised), or one product of
  `implicitfn.GaussNewton().linearize(...)` (public API) for the Gauss-Newton rows; timed as
  10 products in a row, as a solver runs them, divided by 10;
- mixed: B^T u = d/d lambda <grad_w L_T, u> from scratch (a training gradient with its graph,
  then one backward pass to lambda): the mixed product has nothing to amortise over.
The overhead ratio is whole / (gradient + k * product + mixed); the target is <= 1.2. The
implicit solve's own linearisation is not a separate part: it is shared with the mixed product
(one linearisation for both), so it is paid once, inside "mixed".

Run:
    python benchmarks/cost_model.py           # logreg and mlp, k = 5, 10, 20
    python benchmarks/cost_model.py --fast    # logreg, k = 10, few rounds: CI, < 30 s
"""

from __future__ import annotations

import argparse
import sys

import _harness as H
import torch
import torch.utils._pytree as pytree
from tqdm import tqdm

import implicitfn

REPEAT = 10  # products per timed call: a product is timed as REPEAT of them, divided by REPEAT


def parts(setup: H.Setup) -> dict[str, object]:
    """The primitives, with the problem's own (TensorDict) losses and plain autograd."""
    problem = setup.problem
    x, y = setup.inner_args
    x_val, y_val = setup.outer_args
    spec_w = pytree.tree_structure(setup.params)
    spec_h = pytree.tree_structure(setup.hparams)

    def requiring(tree):
        leaves = [t.detach().requires_grad_() for t in pytree.tree_leaves(tree)]
        return leaves, pytree.tree_unflatten(leaves, pytree.tree_structure(tree))

    def gradient():
        w_leaves, w = requiring(setup.params)
        h_leaves, h = requiring(setup.hparams)
        loss = problem.outer_loss(w, h, x_val, y_val)
        return torch.autograd.grad(loss, w_leaves + h_leaves, allow_unused=True)

    w_leaves, w = requiring(setup.params)
    train_gradient = torch.autograd.grad(
        problem.train_loss(w, setup.hparams, x, y), w_leaves, create_graph=True
    )
    vector = [torch.randn_like(t) for t in w_leaves]

    def product():  # REPEAT products in a row, as a solver runs them (steadier to time)
        for _ in range(REPEAT):
            torch.autograd.grad(train_gradient, w_leaves, vector, retain_graph=True)

    def linearise():
        w_leaves, w = requiring(setup.params)
        return torch.autograd.grad(
            problem.train_loss(w, setup.hparams, x, y), w_leaves, create_graph=True
        )

    def mixed():
        w_leaves, w = requiring(setup.params)
        h_leaves, h = requiring(setup.hparams)
        g = torch.autograd.grad(problem.train_loss(w, h, x, y), w_leaves, create_graph=True)
        return torch.autograd.grad(g, h_leaves, vector)

    gauss_newton = implicitfn.GaussNewton().linearize(
        problem.train_loss, setup.params, setup.hparams, x, y
    )
    gn_vector = pytree.tree_unflatten(vector, spec_w)

    def gn_product():
        for _ in range(REPEAT):
            gauss_newton.mv(gn_vector)

    del spec_h
    return {
        "gradient": gradient,
        "linearise": linearise,
        "product": product,
        "GN product": gn_product,
        "mixed": mixed,
    }


def whole(setup: H.Setup, steps: int, curvature) -> object:
    return H.implicitfn_function(setup, implicitfn.CG(max_steps=steps, rtol=0), curvature)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="logreg, k = 10, few rounds (CI)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:index]")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--problems", nargs="+", default=["logreg", "mlp"])
    args = parser.parse_args()
    H.check_device(parser, args.device)
    torch.set_num_threads(args.threads)
    problems = ["logreg"] if args.fast else args.problems
    steps = [10] if args.fast else args.steps
    rounds = 5 if args.fast else args.rounds
    print(f"# Cost model of a hypergradient\n\nMachine: {H.machine(args.threads)}\n")
    for name in problems:
        setup = H.load(name, progress=H.stderr_progress, device=args.device)
        methods = dict(parts(setup))
        curvatures = {"Hessian": implicitfn.Hessian(), "Gauss-Newton": implicitfn.GaussNewton()}
        for k in steps:
            for label, curvature in curvatures.items():
                methods[f"whole {label} k={k}"] = whole(setup, k, curvature)
        with tqdm(total=rounds, desc=name, file=sys.stderr, mininterval=1.0) as bar:
            times = H.interleaved(methods, rounds, bar)
        for key in ("product", "GN product"):
            times[key] = [sample / REPEAT for sample in times[key]]
        t = {key: H.median(value) for key, value in times.items()}
        best = {key: min(value) for key, value in times.items()}
        print(f"## {name} ({setup.num_params} parameters), {rounds} rounds\n")
        print("| part | median (ms) | best (ms) | in gradients (best) |")
        print("| --- | ---: | ---: | ---: |")
        for key in ("gradient", "linearise", "product", "GN product", "mixed"):
            print(
                f"| {key} | {t[key] * 1e3:.3f} | {best[key] * 1e3:.3f} | "
                f"{best[key] / best['gradient']:.2f} |"
            )
        print()
        print(
            "| curvature | k | whole, best (ms) | gradient + k product + mixed, best (ms) | "
            "overhead ratio, best | overhead ratio, median of rounds |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for k in steps:
            for label in curvatures:
                key = "product" if label == "Hessian" else "GN product"
                model = best["gradient"] + k * best[key] + best["mixed"]
                whole_key = f"whole {label} k={k}"
                ratios = [  # the ratio within each round, then its median
                    w / (g + k * p + m)
                    for w, g, p, m in zip(
                        times[whole_key], times["gradient"], times[key], times["mixed"], strict=True
                    )
                ]
                print(
                    f"| {label} | {k} | {best[whole_key] * 1e3:.2f} | {model * 1e3:.2f} | "
                    f"**{best[whole_key] / model:.2f}** | {H.median(ratios):.2f} |"
                )
        print(flush=True)


if __name__ == "__main__":
    main()
