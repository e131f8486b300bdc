"""Dataset distillation on real MNIST: ten learned 28x28 images (Lorraine et al. 2020, Sec. 5.3).

The hyperparameters are ten synthetic 28x28 images, one per class (7840 pixels), starting from
uniform noise. The inner problem trains a logistic regression (784 -> 10, fixed L2 penalty) on
those ten images alone, as in the paper; the outer loss is its cross-entropy on minibatches of
4000 real MNIST training digits (`support.mnist_splits`). Afterwards a fresh logistic regression
is trained from scratch on the ten learned images and tested on the 1000 held-out digits, beside
the same model trained on ten random real images (one per class, several draws), on the ten
class-mean images, and on all 4000 training images.

    python examples/paper/dataset_distillation.py            # full run, about a minute of CPU
    python examples/paper/dataset_distillation.py --fast     # CI smoke run

Prints the test accuracy of each training set, saves the learned images
(outputs/paper/dataset_distillation.png) and the numbers (outputs/paper/dataset_distillation.json).
"""

from __future__ import annotations

import functools
import pathlib
import statistics
import sys
import warnings

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

import implicitfn
from implicitfn import hyperopt

# Run as a script from the repository root: make the shared helpers in examples/ importable.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import support  # noqa: E402

PIXELS = 28 * 28


def logistic_regression():
    """784 -> 10, initialised at zero (so every training from scratch starts at the same point)."""
    module = torch.nn.Linear(PIXELS, support.NUM_CLASSES)
    torch.nn.init.zeros_(module.weight)
    torch.nn.init.zeros_(module.bias)
    return implicitfn.functional_model(module)


def main():
    args = support.command_line(
        __doc__,
        "paper/dataset_distillation.png",
        steps=(300, 15),
        inner_steps=(100, 20),  # enough for the inner model to be near its optimum
        cg_steps=30,
        inner_lr=0.05,
        hyper_lr=0.01,
        batch_size=500,
        scratch_steps=(1000, 100),
        random_draws=(20, 3),
        decay=1e-3,  # fixed L2 penalty of the logistic regression: ten images are separable
        seed=0,
        json=pathlib.Path("outputs/paper/dataset_distillation.json"),
    )
    splits = support.mnist_splits({"train": 4000}, seed=args.seed)
    (x, y), (x_test, y_test) = splits["train"], splits["test"]
    apply, params = logistic_regression()
    distilled = hyperopt.DistilledData(num_classes=support.NUM_CLASSES, per_class=1)

    def train_loss(params, hparams):  # no data argument: the training set is the hyperparameters
        inputs, targets = distilled.inputs(hparams), distilled.targets(hparams)
        return support.penalised_cross_entropy(apply, params, inputs, targets, args.decay)

    def distilled_accuracy(params, hparams):
        return support.accuracy(apply(params, distilled.inputs(hparams)), distilled.labels)

    def real_loss(params, hparams, x, y):
        return F.cross_entropy(apply(params, x), y)

    def real_accuracy(params, hparams, x, y):
        return support.accuracy(apply(params, x), y)

    loop = hyperopt.HyperOptimizer(
        train_loss=train_loss,
        val_loss=real_loss,
        inner_optimizer=functools.partial(torch.optim.Adam, lr=args.inner_lr),
        outer_optimizer=functools.partial(torch.optim.Adam, lr=args.hyper_lr),
        inner_steps=args.inner_steps,
        adjoint=implicitfn.ImplicitAdjoint(
            solver=implicitfn.CG(max_steps=args.cg_steps, rtol=1e-3),
            inner_rtol=None,  # T inner steps per hyper step: approximate by design
            # CG often ends a little above 1e-3 (at its step limit, or stagnating in float32):
            # go on with that approximate hypergradient, as the paper does with a truncated
            # Neumann series, and count these solves below.
            on_failure="warn",
        ),
        train_metrics={"accuracy": distilled_accuracy},
        val_metrics={"accuracy": real_accuracy},
    )
    noise = torch.rand(
        support.NUM_CLASSES, PIXELS, generator=torch.Generator().manual_seed(args.seed)
    )
    hparams = distilled.init(noise)
    state = loop.init(
        params,
        hparams,
        None,  # the training loss reads no batch
        hyperopt.Minibatches(x, y, batch_size=args.batch_size, seed=args.seed),
    )
    with warnings.catch_warnings():  # counted from the history below instead of one per step
        warnings.simplefilter("ignore", implicitfn.ImplicitSolveWarning)
        history = loop.run(state, outer_steps=args.steps, progress=args.progress)
    learned = distilled.inputs(state.hparams)

    scratch = support.ScratchTraining(
        apply, params, (x_test, y_test), args.scratch_steps, args.decay, args.progress
    )
    classes = torch.arange(support.NUM_CLASSES)
    draws = torch.Generator().manual_seed(args.seed + 1)

    def random_real_images():
        """One real training image per class, drawn at random."""
        chosen = [torch.nonzero(y == c)[:, 0] for c in classes]
        return torch.stack([x[i[torch.randint(len(i), (1,), generator=draws)]][0] for i in chosen])

    random_real = [
        scratch.accuracy_on(random_real_images(), classes, f"random real images {k + 1}")
        for k in range(args.random_draws)
    ]
    class_means = torch.stack([x[y == c].mean(dim=0) for c in classes])
    results = {
        "10 learned images": scratch.accuracy_on(learned, classes, "learned images"),
        "10 random real images (mean of draws)": statistics.mean(random_real),
        "10 class-mean images": scratch.accuracy_on(class_means, classes, "class means"),
        "10 noise images (the start)": scratch.accuracy_on(noise, classes, "noise"),
        "all 4000 training images": scratch.accuracy_on(x, y, "all training images"),
    }
    spread = statistics.stdev(random_real) if len(random_real) > 1 else 0.0
    residuals, flags = history["relative_residual"], history["solve_failed"]
    failed = [r for r, bad in zip(residuals, flags, strict=True) if bad]
    hyperparameter_count = implicitfn.tree_ravel(hparams)[0].numel()

    print(
        f"\n{hyperparameter_count} hyperparameters (pixels). Logistic regression trained from "
        f"scratch on ..., test accuracy ({len(x_test)} MNIST digits):"
    )
    for name, value in results.items():
        print(f"  {name:40s} {value:.3f}")
    print(
        f"random real images over {len(random_real)} draws: {statistics.mean(random_real):.3f} "
        f"+- {spread:.3f} (min {min(random_real):.3f}, max {max(random_real):.3f})"
    )

    gradient_norm = statistics.median(history["inner_gradient_norm"])
    print(f"median gradient norm of the inner loss when differentiated: {gradient_norm:.2g}")
    print(
        f"backward solves flagged failed: {len(failed)} of {len(history)}"
        + (f" (relative residuals {min(failed):.1e} to {max(failed):.1e})" if failed else "")
    )

    support.write_json(
        args.json,
        {
            "command": " ".join(["python", *sys.argv]),
            "model": f"logistic regression 784 -> 10, L2 penalty {args.decay}",
            "hyperparameters": hyperparameter_count,
            "hyper_steps": args.steps,
            "training_images": len(x),
            "test_images": len(x_test),
            "test_accuracy": results,
            "random_real_per_draw": random_real,
            "random_real_std": spread,
            "failed_solves": len(failed),
            "per_hyper_step": {
                key: history[key] for key in ("val_loss", "val_accuracy", "relative_residual")
            },
        },
    )

    figure = Figure(figsize=(12, 4.6), layout="constrained")
    grid = figure.add_gridspec(2, 8)
    for c in range(support.NUM_CLASSES):
        axis = figure.add_subplot(grid[c // 5, c % 5])
        axis.imshow(learned[c].reshape(28, 28), cmap="gray_r")  # own grey scale per image
        axis.set_title(f"class {c}", fontsize="small")
        axis.set_axis_off()
    curve = figure.add_subplot(grid[:, 5:])
    curve.plot(history["step"], history["val_accuracy"], label="real-batch accuracy")
    curve.plot(history["step"], history["val_loss"], label="real-batch cross-entropy")
    curve.set_xlabel("hyper step")
    curve.legend(fontsize="small")
    figure.suptitle(
        f"Ten learned MNIST images; logistic regression trained on them alone: "
        f"{results['10 learned images']:.3f} test accuracy "
        f"(random real: {statistics.mean(random_real):.3f}, class means: "
        f"{results['10 class-mean images']:.3f})"
    )
    support.save_figure(figure, args.plot)


if __name__ == "__main__":
    main()
