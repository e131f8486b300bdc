"""How close are approximate hypergradients to the exact one? (Lorraine, Vicol & Duvenaud 2020,
Sec. 5.1 and Fig. 3), on the MNIST MLP with one weight decay per weight.

The paper compares inverse-Hessian approximations on a problem small enough for an exact
inverse, by the cosine similarity and the distance between approximate and true hypergradients
against the number of steps. Here the problem is the setting of `overfit_validation.py` (50
training and 50 validation MNIST digits, a 784-hidden-10 tanh MLP, one log-decay per weight at
its initial value 1e-3), with a narrower hidden layer so that the exact reference is affordable:
the inner problem is trained to a tight optimum and the Hessian there is formed densely and
solved by Cholesky in float64. At that point the hypergradient of the validation loss is
computed with the Neumann series (the paper's choice), CG, FixedPoint, the identity and
differentiation through k unrolled gradient steps from the optimum, with the exact Hessian and
with the Gauss-Newton matrix, for k = 1, 2, 5, 10, 20, 50, 100 products. All of this is the
public `implicitfn.compare` API (the engine of `python -m implicitfn compare`) run on a custom
`compare.Problem`.

    python examples/paper/inverse_approximations.py            # full run, about 2 minutes
    python examples/paper/inverse_approximations.py --fast     # CI smoke run, about 10 s

Prints the comparison table (cosine, relative error, products per method, curvature and k);
saves the figure (`--plot`) and the numbers (`--json`).
"""

from __future__ import annotations

import pathlib
import sys

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

import implicitfn
import implicitfn.compare as compare
from implicitfn import hyperopt

# Run as a script from the repository root: make `examples/` importable for `support`.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import support  # noqa: E402

METHODS = ("Neumann", "CG", "FixedPoint", "Unrolled", "Identity")  # as compare names them


def mnist_mlp_problem(args) -> compare.Problem:
    """The bilevel problem of `overfit_validation.py`, in float64, with `args.hidden` units."""
    splits = support.mnist_splits({"train": args.train_size, "val": args.val_size}, args.seed)
    (x, y), (x_val, y_val) = splits["train"], splits["val"]
    torch.manual_seed(args.seed)
    module = torch.nn.Sequential(
        torch.nn.Linear(784, args.hidden), torch.nn.Tanh(), torch.nn.Linear(args.hidden, 10)
    )
    # float64: the dense reference is then exact to about 1e-13.
    apply, params = implicitfn.functional_model(module.double())
    decay = hyperopt.WeightDecay("per_weight", "log", initial=args.decay)
    # A CompositeLoss states the model / loss / penalty split, which makes Gauss-Newton possible.
    train_loss = implicitfn.CompositeLoss(
        predict=lambda params, hparams, x, y: apply(params, x),
        output_loss=lambda logits, hparams, x, y: F.cross_entropy(logits, y),
        penalty=lambda params, hparams, x, y: decay.penalty(hparams, params),
    )

    def val_loss(params, hparams, x, y):
        return F.cross_entropy(apply(params, x), y)

    return compare.Problem(
        name=f"mnist-mlp-{args.hidden}",
        train_loss=train_loss,
        outer_loss=val_loss,
        params=params,
        hparams=decay.init(params),
        inner_args=(x.double(), y),
        outer_args=(x_val.double(), y_val),
        description=(
            f"784-{args.hidden}-10 tanh MLP on MNIST ({args.train_size} train / {args.val_size} "
            f"validation), cross-entropy + per-weight decay {args.decay:g} (log-parametrised)"
        ),
    )


def rows(comparison: compare.Comparison) -> list[dict]:
    """The JSON rows: method, curvature, k, products, cosine, relative error and residual."""
    return [
        {
            "method": record.method,
            "curvature": record.curvature,
            "k": record.steps,
            "products": record.num_steps,
            "cosine": record.cosine,
            "relative_error": record.relative_error,
            "relative_residual": record.relative_residual,
            "status": record.status,
        }
        for record in comparison.records
    ]


def plot(comparison: compare.Comparison, path: pathlib.Path) -> None:
    """Cosine and relative error against k, one line per method and curvature."""
    figure = Figure(figsize=(12, 4.2), layout="constrained")
    axes = figure.subplots(1, 2)
    budgets = comparison.config["steps"]

    def series(method, curvature):
        chosen = [r for r in comparison.records if (r.method, r.curvature) == (method, curvature)]
        if chosen and chosen[0].steps is None:  # no budget (Identity): a flat line
            chosen = chosen * len(budgets)
        return chosen

    # FixedPoint runs the same iteration as Neumann: drawn once when the numbers agree.
    same = all(
        abs(a.cosine - b.cosine) < 1e-9
        for curvature in ("Hessian", "GaussNewton")
        for a, b in zip(series("Neumann", curvature), series("FixedPoint", curvature), strict=True)
    )
    lines = [  # (method, curvature, label, style, color, marker)
        ("CG", "Hessian", "CG, Hessian", "-", "C1", "s"),
        ("CG", "GaussNewton", "CG, Gauss-Newton", "--", "C1", "s"),
        ("Neumann", "Hessian", "Neumann, Hessian", "-", "C0", "o"),
        ("Neumann", "GaussNewton", "Neumann, Gauss-Newton", "--", "C0", "o"),
        ("Unrolled", None, "unrolled from $w^*$", ":", "C3", "^"),
        ("Identity", "Hessian", "Identity ($A^{-1} = I$)", "-.", "C4", None),
    ]
    if same:
        lines = [
            (*line[:2], line[2].replace("Neumann", "Neumann = FixedPoint"), *line[3:])
            for line in lines
        ]
    else:
        lines += [
            ("FixedPoint", "Hessian", "FixedPoint, Hessian", "-", "C2", "x"),
            ("FixedPoint", "GaussNewton", "FixedPoint, Gauss-Newton", "--", "C2", "x"),
        ]
    for method, curvature, label, style, color, marker in lines:
        chosen = series(method, curvature)
        if not chosen or chosen[0].cosine is None:
            continue
        common = dict(color=color, marker=marker, markersize=4, label=label)
        axes[0].plot(budgets, [r.cosine for r in chosen], style, **common)
        axes[1].plot(budgets, [r.relative_error for r in chosen], style, **common)
    for axis in axes:
        axis.set_xscale("log")
        axis.set_xlabel("k (terms, CG steps or unrolled steps)")
    axes[0].set_ylabel("cosine similarity to the exact hypergradient")
    axes[1].set_ylabel(r"relative error $\|g - g^*\| / \|g^*\|$")
    axes[1].set_yscale("log")
    figure.legend(
        *axes[0].get_legend_handles_labels(), loc="outside right center", fontsize="small"
    )
    figure.suptitle(comparison.problem["description"], fontsize="small")
    support.save_figure(figure, path)


def main():
    args = support.command_line(
        __doc__,
        "paper/inverse_approximations.png",
        json=pathlib.Path("outputs/paper/inverse_approximations.json"),
        hidden=(8, 2),
        steps=("1,2,5,10,20,50,100", "1,10"),
        train_size=50,
        val_size=50,
        decay=1e-3,
        seed=0,
    )
    problem = mnist_mlp_problem(args)
    print(f"{problem.description}: {problem.num_params:,} weights and hyperparameters")
    config = compare.CompareConfig(
        steps=tuple(int(k) for k in args.steps.split(",")),
        solvers=METHODS,
        curvatures=("Hessian", "GaussNewton"),
        rtol=0.0,  # exactly k products each, as in the paper's fixed budgets
        alpha="auto",  # Neumann / FixedPoint step and unrolled learning rate: 1 / lambda_max
        repeats=1,  # timing is not the point here
        memory=False,
        progress=args.progress,
    )
    comparison = compare.run(problem, config)
    print(compare.format_table(comparison))
    plot(comparison, args.plot)
    support.write_json(
        args.json,
        {
            "experiment": "Lorraine et al. 2020, Sec. 5.1 / Fig. 3: approximate vs exact "
            "hypergradients",
            "setting": {k: v for k, v in vars(args).items() if k not in ("plot", "json")},
            "problem": comparison.problem,
            "reference": comparison.to_dict()["reference"],
            "environment": comparison.environment,
            "rows": rows(comparison),
        },
    )


if __name__ == "__main__":
    main()
