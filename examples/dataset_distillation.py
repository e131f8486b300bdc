"""Dataset distillation of digits: one learned 8x8 image per class (Lorraine et al. 2020, Fig. 5).

The hyperparameters are ten synthetic images, one per class, starting from random noise. The
inner problem trains a logistic regression on those ten images only; the outer loss is the
cross-entropy of that model on minibatches of 1000 real training digits. Afterwards a fresh
logistic regression is trained from scratch on the ten learned images and tested on the held-out
digits, beside the same model trained on one real image per class, on the ten class means, and
on all 1000 training images.

    python examples/dataset_distillation.py            # full run, about a minute
    python examples/dataset_distillation.py --fast     # CI smoke run
"""

from __future__ import annotations

import support
import torch
from matplotlib.figure import Figure

from implicitfn import hyperopt

DECAY = 1e-3  # fixed L2 penalty of the inner logistic regression: ten images are separable


def main():
    args = support.command_line(
        __doc__,
        "dataset_distillation.png",
        steps=(300, 10),
        inner_steps=20,
        hyper_lr=0.05,
        batch_size=200,
        scratch_steps=(2000, 200),
        seed=0,
    )
    splits = support.digits_splits({"train": 1000}, seed=args.seed)
    (x, y), (x_test, y_test) = splits["train"], splits["test"]
    apply, params = support.classifier(None, seed=args.seed)
    distilled = hyperopt.DistilledData(num_classes=support.NUM_CLASSES, per_class=1)

    def train_loss(params, hparams):  # no data argument: the training set is the hyperparameters
        inputs, targets = distilled.inputs(hparams), distilled.targets(hparams)
        return support.penalised_cross_entropy(apply, params, inputs, targets, DECAY)

    def distilled_accuracy(params, hparams):
        return support.accuracy(apply(params, distilled.inputs(hparams)), distilled.labels)

    loop = support.hyper_optimizer(
        apply,
        train_loss,
        args,
        cg_steps=100,
        cg_rtol=1e-4,
        inner_lr=0.05,
        train_metrics={"accuracy": distilled_accuracy},
    )
    noise = torch.rand(support.NUM_CLASSES, 64, generator=torch.Generator().manual_seed(args.seed))
    state = loop.init(
        params,
        distilled.init(noise),
        None,  # the training loss reads no batch
        hyperopt.Minibatches(x, y, batch_size=args.batch_size, seed=args.seed),
    )
    history = loop.run(state, outer_steps=args.steps, progress=args.progress)

    scratch = support.ScratchTraining(
        apply, params, (x_test, y_test), args.scratch_steps, DECAY, args.progress
    )
    classes = torch.arange(support.NUM_CLASSES)
    first_of_each_class = torch.stack([torch.nonzero(y == c)[0, 0] for c in classes])
    class_means = torch.stack([x[y == c].mean(dim=0) for c in classes])
    learned = state.hparams
    results = {
        "10 learned images (this example)": scratch.accuracy_on(
            distilled.inputs(learned), distilled.targets(learned), "learned images"
        ),
        "10 random noise images (the start)": scratch.accuracy_on(
            noise, distilled.targets(learned), "noise"
        ),
        "1 real image per class": scratch.accuracy_on(
            x[first_of_each_class], classes, "one real image per class"
        ),
        "10 class means": scratch.accuracy_on(class_means, classes, "class means"),
        "all 1000 training images": scratch.accuracy_on(x, y, "all training images"),
    }
    print(
        f"\nlogistic regression trained from scratch on ..., test accuracy ({len(x_test)} digits)"
    )
    for name, value in results.items():
        print(f"  {name:36s} {value:.3f}")
    learned_accuracy = results["10 learned images (this example)"]
    support.report_target(
        "test accuracy after training on the learned images", learned_accuracy, 0.93
    )

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    grid = figure.add_gridspec(2, 7)
    for c in range(support.NUM_CLASSES):
        axis = figure.add_subplot(grid[c // 5, c % 5])
        axis.imshow(distilled.inputs(learned)[c].reshape(8, 8), cmap="gray_r")
        axis.set_title(f"class {c}")
        axis.set_axis_off()
    curve = figure.add_subplot(grid[:, 5:])
    curve.plot(history["step"], history["val_accuracy"], label="real-data batch accuracy")
    curve.plot(history["step"], history["val_loss"], label="real-data batch cross-entropy")
    curve.set_xlabel("hyper step")
    curve.legend(fontsize="small")
    figure.suptitle(
        f"Learned images; a model trained on them alone: {learned_accuracy:.3f} test accuracy"
    )
    support.save_figure(figure, args.plot)


if __name__ == "__main__":
    main()
