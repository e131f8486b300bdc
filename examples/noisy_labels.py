"""Learning one weight per training example to ignore corrupted labels.

1000 training digits, half of them relabelled to a wrong class at random, and 200 clean
validation digits. Each training example gets a loss weight sigmoid(r_i), learned by
hypergradient descent on the validation loss (1000 hyperparameters) while a logistic regression
trains on the weighted loss. The weights learn to separate clean from corrupted examples (ROC
AUC), and the model beats the same model trained on the noisy set without weights.

    python examples/noisy_labels.py            # full run, about a minute
    python examples/noisy_labels.py --fast     # CI smoke run
"""

from __future__ import annotations

import support
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score
from tensordict import TensorDict

from implicitfn import hyperopt

DECAY = 1e-3  # a fixed, small L2 penalty keeps the inner problem strictly convex


def corrupt(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Relabel `fraction` of the examples to a uniformly drawn *wrong* class."""
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(labels), generator=gen)[: int(fraction * len(labels))]
    noisy = labels.clone()
    shift = torch.randint(1, support.NUM_CLASSES, (len(chosen),), generator=gen)
    noisy[chosen] = (labels[chosen] + shift) % support.NUM_CLASSES
    return noisy


def main():
    args = support.command_line(
        __doc__,
        "noisy_labels.png",
        steps=(300, 20),
        inner_steps=20,
        hyper_lr=0.1,
        batch_size=250,
        noise=0.5,
        scratch_steps=(1000, 200),
        eval_every=(10, 5),
        seed=0,
    )
    splits = support.digits_splits({"train": 1000, "val": 200}, seed=args.seed)
    (x, y_true), (x_val, y_val), (x_test, y_test) = splits["train"], splits["val"], splits["test"]
    y = corrupt(y_true, args.noise, seed=args.seed + 1)
    clean = (y == y_true).numpy()
    apply, params = support.classifier(None, seed=args.seed)
    weights = hyperopt.ExampleWeights(num_examples=len(x), initial=0.5)

    def train_loss(params, hparams, x, y, indices):
        losses = F.cross_entropy(apply(params, x), y, reduction="none")
        weighted = weights.weighted_mean(hparams["weights"], losses, indices)
        return weighted + support.l2_penalty(params, DECAY)

    loop = support.hyper_optimizer(apply, train_loss, args, cg_steps=30)
    state = loop.init(
        params,
        TensorDict(weights=weights.init()),
        hyperopt.Minibatches(x, y, batch_size=args.batch_size, indices=True, seed=args.seed),
        hyperopt.Minibatches(x_val, y_val),
    )

    def test_metrics(state):
        learned = weights.weights(state.hparams["weights"])
        return {
            "test_accuracy": support.test_accuracy(apply, state.params, x_test, y_test),
            "auc": roc_auc_score(clean, learned.numpy()),
        }

    evaluate, progress = support.record_every(args.eval_every, args.steps, test_metrics)
    loop.run(state, outer_steps=args.steps, callbacks=[evaluate], progress=args.progress)

    scratch = support.ScratchTraining(
        apply, params, (x_test, y_test), args.scratch_steps, DECAY, args.progress
    )
    learned = weights.weights(state.hparams["weights"])
    mask = torch.from_numpy(clean)
    ours = "learned example weights (this example)"
    results = {
        ours: progress["test_accuracy"][-1],
        "no weights, all noisy labels": scratch.accuracy_on(x, y, "noisy baseline"),
        "oracle: only the clean half": scratch.accuracy_on(x[mask], y[mask], "clean oracle"),
    }
    corrupted = f"{int(args.noise * 100)}% of {len(x)} training labels corrupted"
    print(f"\n{corrupted}; test accuracy ({len(x_test)} digits):")
    for name, value in results.items():
        print(f"  {name:40s} {value:.3f}")
    clean_mean, corrupted_mean = learned[mask].mean(), learned[~mask].mean()
    print(f"mean learned weight: clean {clean_mean:.3f}, corrupted {corrupted_mean:.3f}")
    support.report_target("test accuracy with learned weights", results[ours], 0.92)
    support.report_target("ROC AUC of the weights for 'label is clean'", progress["auc"][-1], 0.95)

    figure = Figure(figsize=(11, 3.8), layout="constrained")
    histogram, curve = figure.subplots(1, 2)
    bins = torch.linspace(0, 1, 41).numpy()
    histogram.hist(learned[mask].numpy(), bins=bins, alpha=0.7, label="clean label")
    histogram.hist(learned[~mask].numpy(), bins=bins, alpha=0.7, label="corrupted label")
    histogram.set_xlabel("learned weight sigmoid(r_i)")
    histogram.set_ylabel("training examples")
    histogram.legend()
    curve.plot(progress["step"], progress["test_accuracy"], label="test accuracy")
    curve.plot(progress["step"], progress["auc"], label="ROC AUC of the weights")
    curve.axhline(
        results["no weights, all noisy labels"],
        color="gray",
        linestyle="--",
        label="test accuracy without weights",
    )
    curve.set_xlabel("hyper step")
    curve.legend(fontsize="small")
    support.save_figure(figure, args.plot)


if __name__ == "__main__":
    main()
