"""Learning a data-augmentation network as a hyperparameter, compared honestly with baselines.

A small MLP classifier is trained on only 100 digits, on each example and on one augmented copy
of it. The augmentation x + g(x, noise) is produced by a small network g whose weights are the
hyperparameters, learned by hypergradient descent on a separate validation set of 100 digits.
Afterwards the classifier is retrained from scratch with the learned augmentation and tested,
beside the same training without augmentation, with a hand-made augmentation (random one-pixel
shifts plus pixel noise), and, because the learned augmentation has seen the validation set
through its hypergradients, plain training on training + validation digits together. Repeated
over several seeds (data split, initialisations and noise).

    python examples/learned_augmentation.py            # full run, a few minutes
    python examples/learned_augmentation.py --fast     # CI smoke run
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

DECAY = 1e-3  # fixed L2 penalty of the classifier
NOISE_DIM = 16


class AugmentationNetwork(torch.nn.Module):
    """g(x, noise): a perturbation of the 64 pixels; the last layer starts at zero (identity)."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.hidden = torch.nn.Linear(64 + NOISE_DIM, hidden)
        self.out = torch.nn.Linear(hidden, 64)
        torch.nn.init.zeros_(self.out.weight)
        torch.nn.init.zeros_(self.out.bias)

    def forward(self, x, noise):
        return self.out(torch.tanh(self.hidden(torch.cat([x, noise], dim=-1))))


def shift_and_jitter(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The hand-made augmentation: a random shift by up to one pixel, plus pixel noise."""
    padded = F.pad(x.reshape(-1, 1, 8, 8), (1, 1, 1, 1))
    crops = F.unfold(padded, kernel_size=8)  # (N, 64, 9): the nine shifted copies
    choice = torch.randint(9, (len(x),), generator=generator)
    shifted = crops[torch.arange(len(x)), :, choice]
    return shifted + 0.05 * torch.randn(shifted.shape, generator=generator)


def one_seed(seed: int, args) -> tuple[dict[str, float], torch.Tensor]:
    splits = support.digits_splits({"train": 100, "val": 100}, seed=seed)
    (x, y), (x_val, y_val), (x_test, y_test) = splits["train"], splits["val"], splits["test"]
    apply, params = support.classifier(args.hidden, seed=seed)
    torch.manual_seed(seed)
    augmentation = hyperopt.LearnedAugmentation(AugmentationNetwork())

    # The noise is part of the batch: every evaluation of the loss in a hyper step sees the same.
    train_loss = implicitfn.CompositeLoss(
        predict=lambda params, hparams, x, y, noise: apply(
            params, torch.cat([x, augmentation.augment(hparams["augmentation"], x, noise)])
        ),
        output_loss=lambda logits, hparams, x, y, noise: F.cross_entropy(logits, torch.cat([y, y])),
        penalty=lambda params, hparams, *batch: support.l2_penalty(params, DECAY),
    )

    loop = support.hyper_optimizer(
        apply,
        train_loss,
        args,
        cg_steps=20,
        curvature=implicitfn.GaussNewton(),  # the MLP's Hessian is indefinite; Gauss-Newton is not
    )
    state = loop.init(
        params,
        TensorDict(augmentation=augmentation.init()),
        hyperopt.Minibatches(x, y, batch_size=50, noise_shape=(NOISE_DIM,), seed=seed),
        hyperopt.Minibatches(x_val, y_val),
    )
    loop.run(state, outer_steps=args.steps, progress=args.progress)
    learned = state.hparams["augmentation"]
    generator = torch.Generator().manual_seed(seed)

    scratch = support.ScratchTraining(
        apply, params, (x_test, y_test), args.scratch_steps, DECAY, args.progress
    )

    def trained_with(augmented, description, x=x, y=y):
        """Test accuracy after training on `x` and `augmented()`, a copy drawn at every step."""

        def on_original_and_augmented(params):
            inputs, targets = torch.cat([x, augmented()]), torch.cat([y, y])
            return support.penalised_cross_entropy(apply, params, inputs, targets, DECAY)

        return scratch.accuracy(on_original_and_augmented, description)

    def learned_copy():
        noise = torch.randn(len(x), NOISE_DIM, generator=generator)
        return augmentation.augment(learned, x, noise).detach()

    x_both, y_both = torch.cat([x, x_val]), torch.cat([y, y_val])
    results = {
        "no augmentation": trained_with(lambda: x, "no augmentation"),
        "hand-made: shifts + noise": trained_with(
            lambda: shift_and_jitter(x, generator), "hand-made"
        ),
        "learned augmentation": trained_with(learned_copy, "learned"),
        "no augmentation, train + val data": trained_with(
            lambda: x_both, "train + val", x_both, y_both
        ),
    }
    perturbation = (learned_copy() - x).abs().mean()
    print(f"mean |learned perturbation| per pixel: {perturbation:.2f} (pixels lie in [0, 1])")
    first = x[:1].expand(4, -1)
    learned_samples = augmentation.augment(
        learned, first, torch.randn(4, NOISE_DIM, generator=generator)
    )
    samples = {
        "original": x[0],
        "hand-made": shift_and_jitter(x[:1], generator)[0],
        **{f"learned #{k + 1}": image for k, image in enumerate(learned_samples.detach())},
    }
    return results, samples


def main():
    args = support.command_line(
        __doc__,
        "learned_augmentation.png",
        seeds=(5, 2),
        steps=(150, 3),
        inner_steps=(20, 5),
        hyper_lr=0.01,
        hidden=64,
        scratch_steps=(1000, 50),
    )
    per_seed = []
    for seed in range(args.seeds):
        print(f"== seed {seed}")
        results, samples = one_seed(seed, args)
        per_seed.append(results)

    names = list(per_seed[0])
    print(
        f"\ntest accuracy over {args.seeds} seeds (100 training digits; mean +- std, then per seed)"
    )
    for name in names:
        values = [r[name] for r in per_seed]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(
            f"  {name:36s} {statistics.mean(values):.3f} +- {spread:.3f}   "
            + " ".join(f"{v:.3f}" for v in values)
        )
    for baseline in names:
        if baseline != "learned augmentation":
            gains = [r["learned augmentation"] - r[baseline] for r in per_seed]
            wins = sum(g > 0 for g in gains)
            print(
                f"learned minus {baseline + ':':36s} {statistics.mean(gains):+.3f} "
                f"(learned better in {wins}/{len(gains)} seeds)"
            )

    figure = Figure(figsize=(11, 4.4), layout="constrained")
    grid = figure.add_gridspec(2, 6)
    bars = figure.add_subplot(grid[:, :3])
    for i, name in enumerate(names):
        values = [r[name] for r in per_seed]
        bars.bar(i, statistics.mean(values), color=f"C{i}", alpha=0.6)
        bars.scatter([i] * len(values), values, color="black", s=12, zorder=3)
    bars.set_xticks(
        range(len(names)),
        [n.replace(", ", ",\n").replace(": ", ":\n") for n in names],
        fontsize="small",
    )
    bars.set_ylim(min(r[n] for r in per_seed for n in names) - 0.05, 1.0)
    bars.set_ylabel("test accuracy (dots: seeds)")
    for k, (title, image) in enumerate(samples.items()):  # the last seed's first digit
        axis = figure.add_subplot(grid[k // 3, 3 + k % 3])
        axis.imshow(image.reshape(8, 8), cmap="gray_r")  # own grey scale: values leave [0, 1]
        axis.set_title(f"{title}\n[{image.min():.1f}, {image.max():.1f}]", fontsize="small")
        axis.set_axis_off()
    support.save_figure(figure, args.plot)


if __name__ == "__main__":
    main()
