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

    loop = support.hyper_optimizer(
        apply,
        train_loss,
        args,
        cg_steps=args.cg_steps,  # truncated, as in the paper
        curvature=implicitfn.GaussNewton(),
    )
    hparams = TensorDict(decay=decay.init(params))
    state = loop.init(
        params, hparams, hyperopt.Minibatches(x, y), hyperopt.Minibatches(x_val, y_val)
    )

    def test_metrics(state):
        with torch.no_grad():
            logits = apply(state.params, x_test)
        return {
            "accuracy": float(support.accuracy(logits, y_test)),
            "loss": float(F.cross_entropy(logits, y_test)),
        }

    evaluate_on_test, test = support.record_every(args.eval_every, args.steps, test_metrics)
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
        __doc__,
        "overfit_validation.png",
        steps=(200, 4),
        inner_steps=(20, 5),
        cg_steps=(20, 5),
        hyper_lr=0.1,
        initial_decay=1e-3,
        hidden=50,
        eval_every=(10, 2),
        seed=0,
    )
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
    panels = {"accuracy": "accuracy", "loss": "cross-entropy"}  # metric: title
    for row, (name, history, test) in enumerate(results):
        model_name, decay_name = name.split(", ")
        style = "-" if "per_weight" in name else "--"
        for axis, (metric, title) in zip(axes[row // 2], panels.items(), strict=True):
            validation = history[f"val_{metric}"]
            axis.plot(
                history["step"], validation, style, color="C0", label=f"validation, {decay_name}"
            )
            axis.plot(test["step"], test[metric], style, color="C1", label=f"test, {decay_name}")
            axis.set_title(f"{model_name}: {title}")
    for axis in axes.flat:
        axis.set_xlabel("hyper step")
        axis.legend(fontsize="small")
    support.save_figure(figure, args.plot)


if __name__ == "__main__":
    main()
