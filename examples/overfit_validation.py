"""Overfitting a small validation set with one weight decay per weight (Lorraine et al. 2020, Fig. 4).

50 training and 50 validation digits. A logistic regression and an MLP are trained with a
learned L2 penalty, either one strength per weight (as many hyperparameters as parameters) or
one global strength (the baseline). Hypergradient descent on the validation loss drives the
validation accuracy to 100% with per-weight decay, while the test accuracy barely moves: with
that many hyperparameters the validation set is fitted like a training set.

    python examples/overfit_validation.py            # full run, a few minutes
    python examples/overfit_validation.py --fast     # CI smoke run
"""

from __future__ import annotations

import functools
import statistics

import support
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from tensordict import TensorDict

import implicitfn
from implicitfn import hyperopt


def run(hidden, granularity, splits, args):
    """Hyper-optimise one weight decay family for one model; record test metrics on the way."""
    (x, y), (x_val, y_val), (x_test, y_test) = splits["train"], splits["val"], splits["test"]
    apply, params = support.classifier(hidden, seed=args.seed)
    decay = hyperopt.WeightDecay(granularity, "log", initial=args.initial_decay)

    # Cross-entropy of a model plus a penalty: stating the split gives the Gauss-Newton
    # curvature, positive semidefinite even for the (non-convex) MLP.
    train_loss = implicitfn.CompositeLoss(
        predict=lambda params, hparams, x, y: apply(params, x),
        output_loss=lambda logits, hparams, x, y: F.cross_entropy(logits, y),
        penalty=lambda params, hparams, x, y: decay.penalty(hparams["decay"], params),
    )

    def val_loss(params, hparams, x, y):
        return F.cross_entropy(apply(params, x), y)

    def accuracy(params, hparams, x, y):
        return support.accuracy(apply(params, x), y)

    loop = hyperopt.HyperOptimizer(
        train_loss=train_loss,
        val_loss=val_loss,
        inner_optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
        outer_optimizer=functools.partial(torch.optim.Adam, lr=args.hyper_lr),
        inner_steps=args.inner_steps,
        solver=implicitfn.CG(max_steps=args.cg_steps, rtol=None),  # truncated, as in the paper
        curvature=implicitfn.GaussNewton(),
        train_metrics={"accuracy": accuracy},
        val_metrics={"accuracy": accuracy},
    )
    hparams = TensorDict(decay=decay.init(params))
    state = loop.init(
        params, hparams, hyperopt.Minibatches(x, y), hyperopt.Minibatches(x_val, y_val)
    )
    test = {"step": [], "accuracy": [], "loss": []}

    def evaluate_on_test(state, record):
        if record["step"] in (1, args.steps) or record["step"] % args.eval_every == 0:
            with torch.no_grad():
                logits = apply(state.params, x_test)
            test["step"].append(record["step"])
            test["accuracy"].append(float(support.accuracy(logits, y_test)))
            test["loss"].append(float(F.cross_entropy(logits, y_test)))

    name = f"{'MLP' if hidden else 'logistic regression'}, {granularity} decay"
    count = {
        k: implicitfn.tree_ravel(v)[0].numel()
        for k, v in (("hparams", hparams), ("params", params))
    }
    print(f"== {name}: {count['hparams']} hyperparameters, {count['params']} parameters")
    history = loop.run(
        state, outer_steps=args.steps, callbacks=[evaluate_on_test], progress=args.progress
    )
    return name, history, test


def main():
    args = support.command_line(
        __doc__.splitlines()[0],
        "overfit_validation.png",
        steps=200,
        inner_steps=20,
        cg_steps=20,
        hyper_lr=0.1,
        initial_decay=1e-3,
        hidden=50,
        eval_every=10,
        seed=0,
    )
    if args.fast:
        args.steps, args.inner_steps, args.cg_steps, args.eval_every = 4, 5, 5, 2
    splits = support.digits_splits({"train": 50, "val": 50}, seed=args.seed)
    results = [
        run(hidden, granularity, splits, args)
        for hidden in (None, args.hidden)
        for granularity in ("per_weight", "global")
    ]

    def change(values):
        return f"{values[0]:.3f} -> {values[-1]:.3f}"

    print("\nfrom the first hyper step to the last:")
    columns = ("val accuracy", "test accuracy", "val loss", "test loss")
    print(f"{'model, decay':37s}" + "".join(f"{c:>16s}" for c in columns) + "  median residual")
    for name, history, test in results:
        cells = (history["val_accuracy"], test["accuracy"], history["val_loss"], test["loss"])
        residual = statistics.median(history["relative_residual"])
        print(f"{name:37s}" + "".join(f"{change(c):>16s}" for c in cells) + f"  {residual:15.2g}")

    figure = Figure(figsize=(11, 7), layout="constrained")
    axes = figure.subplots(2, 2)
    for row, (name, history, test) in enumerate(results):
        model_row = axes[row // 2]
        style = "-" if "per_weight" in name else "--"
        decay_name = name.split(", ")[1]
        model_row[0].plot(
            history["step"],
            history["val_accuracy"],
            style,
            color="C0",
            label=f"validation, {decay_name}",
        )
        model_row[0].plot(
            test["step"], test["accuracy"], style, color="C1", label=f"test, {decay_name}"
        )
        model_row[1].plot(
            history["step"],
            history["val_loss"],
            style,
            color="C0",
            label=f"validation, {decay_name}",
        )
        model_row[1].plot(
            test["step"], test["loss"], style, color="C1", label=f"test, {decay_name}"
        )
        model_row[0].set_title(f"{name.split(',')[0]}: accuracy")
        model_row[1].set_title(f"{name.split(',')[0]}: cross-entropy")
    for axis in axes.flat:
        axis.set_xlabel("hyper step")
        axis.legend(fontsize="small")
    figure.savefig(args.plot, dpi=120)
    print(f"\nplot saved to {args.plot}")


if __name__ == "__main__":
    main()
