"""Learned data augmentation on real MNIST with a small CNN (Lorraine et al. 2020, Sec. 5.4).

Part 1, the paper's experiment scaled down: a small CNN is trained on only 200 MNIST digits
(`support.mnist_splits`), on each digit and on one augmented copy of it. The augmentation
x + g(x, noise) is a small residual conv net g (three 3x3 convolutions, the last one initialised
at zero so that it starts as the identity; the paper used a U-Net) whose 2,913 weights are the
hyperparameters, learned by hypergradient descent on 200 validation digits. The CNN is then
retrained from scratch with the learned augmentation and tested on the 4,600 other digits,
beside the same training with no augmentation, with a fixed hand-chosen augmentation (random
rotations of 10 degrees std and shifts of 2 pixels std), and with no augmentation on the
training + validation digits (the learned augmentation has seen the validation digits through
its hypergradients); the CNN trained jointly with the augmentation network, which is what the
paper reports, is tested too. Repeated over several seeds (split, initialisations, noise).

Part 2, against black-box search: one scalar, the strength of the hand-chosen augmentation
(1 = the fixed one above), tuned on seed 0's split by (a) hypergradient descent, (b) Optuna TPE
and (c) random search, at equal CPU time (one thread: the wall-clock each would take on a core
of its own). A search trial trains the CNN from scratch with one
strength and returns the validation loss; the hypergradient run trains the CNN and the strength
together, then retrains from scratch with the strength it reached, so that its last point is
the same objective as a trial.

    python examples/paper/learned_augmentation.py            # full run, about 5.5 minutes of CPU
    python examples/paper/learned_augmentation.py --fast     # CI smoke run

Prints the test accuracy of each arm per seed (mean +- std, min-max) and the best validation
loss of each search method against CPU seconds; saves a figure
(outputs/paper/learned_augmentation.png) and the numbers (outputs/paper/learned_augmentation.json).
"""

from __future__ import annotations

import functools
import math
import pathlib
import statistics
import sys
import types

import optuna
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from tensordict import TensorDict

import implicitfn
from implicitfn import hyperopt

# Run as a script from the repository root: make the shared helpers in examples/ importable.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import support  # noqa: E402

DECAY = 1e-4  # fixed L2 penalty of the classifier
SIDE = 28
NOISE_CHANNELS = 2  # noise images given to the augmentation network beside the digit
ROTATION_STD = math.radians(10.0)  # the hand-chosen augmentation at strength 1
SHIFT_STD = 2.0 * 2.0 / SIDE  # 2 pixels, in affine_grid's [-1, 1] coordinates
STRENGTH_RANGE = (0.01, 10.0)  # searched by Optuna, log-uniform


@functools.cache
def splits_of(seed: int, size: int):
    """`size` training and `size` validation digits, the rest for testing (loaded once)."""
    return support.mnist_splits({"train": size, "val": size}, seed=seed)


def small_cnn(seed: int):
    """Two strided 5x5 convolutions (8 and 16 channels) and a linear layer: 11,274 weights."""
    torch.manual_seed(seed)
    module = torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, SIDE, SIDE)),
        torch.nn.Conv2d(1, 8, 5, stride=2, padding=2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 5, stride=2, padding=2),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 7 * 7, support.NUM_CLASSES),
    )
    return implicitfn.functional_model(module)


class AugmentationNetwork(torch.nn.Module):
    """g(x, noise): a perturbation of the flattened digit, from the digit and noise images."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Conv2d(1 + NOISE_CHANNELS, width, 3, padding=1),
            torch.nn.Tanh(),
            torch.nn.Conv2d(width, width, 3, padding=1),
            torch.nn.Tanh(),
            torch.nn.Conv2d(width, 1, 3, padding=1),
        )
        last = self.layers[-1]
        torch.nn.init.zeros_(last.weight)  # starts as the identity augmentation
        torch.nn.init.zeros_(last.bias)

    def forward(self, x, noise):
        images = torch.cat([x.reshape(-1, 1, SIDE, SIDE), noise], dim=1)
        return self.layers(images).flatten(1)


def affine_augment(x: torch.Tensor, strength, noise: torch.Tensor) -> torch.Tensor:
    """Rotate each flattened digit by `strength` * 10 degrees * noise[:, 0] and shift it by
    `strength` * 2 pixels * noise[:, 1:3] (bilinear, zero padding). Differentiable in
    `strength`, so that a hypergradient can tune it."""
    angle = strength * ROTATION_STD * noise[:, 0]
    shift = strength * SHIFT_STD * noise[:, 1:3]
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], dim=-1), torch.stack([sin, cos, shift[:, 1]], -1)],
        dim=1,
    )
    images = x.reshape(-1, 1, SIDE, SIDE)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False).flatten(1)


def with_copies(apply, augmented):
    """The training loss on the original batch and one augmented copy of it: `augmented(hparams,
    x, noise)` makes the copy. A CompositeLoss, so that Gauss-Newton curvature applies."""
    return implicitfn.CompositeLoss(
        predict=lambda params, hparams, x, y, noise: apply(
            params, torch.cat([x, augmented(hparams, x, noise)])
        ),
        output_loss=lambda logits, hparams, x, y, noise: F.cross_entropy(logits, torch.cat([y, y])),
        penalty=lambda params, hparams, *batch: support.l2_penalty(params, DECAY),
    )


def hyper_loop(apply, train_loss, args, hyper_lr: float):
    """The examples' `HyperOptimizer` (support.hyper_optimizer) with this script's settings."""
    settings = types.SimpleNamespace(inner_steps=args.inner_steps, hyper_lr=hyper_lr)
    return support.hyper_optimizer(
        apply,
        train_loss,
        settings,
        cg_steps=args.cg_steps,  # truncated, as in the paper
        inner_lr=args.inner_lr,
        curvature=implicitfn.GaussNewton(),  # the CNN's Hessian is indefinite; Gauss-Newton is not
    )


class Trainer:
    """Trainings of the CNN from scratch on one split: full-batch Adam from the seed's
    initialisation, on the training digits and one augmented copy drawn afresh at every step
    (the noise generator restarts at the same seed for every training)."""

    def __init__(self, splits, seed: int, args):
        (self.x, self.y), (self.x_val, self.y_val) = splits["train"], splits["val"]
        self.apply, self.params = small_cnn(seed)
        self.seed = seed
        self.scratch = support.ScratchTraining(
            self.apply, self.params, splits["test"], args.scratch_steps, DECAY, args.progress
        )

    def loss(self, augment, x=None, y=None):
        """`augment(x, noise)` -> augmented x, with noise of shape (len(x), 3, 28, 28)."""
        x = self.x if x is None else x
        y = self.y if y is None else y
        generator = torch.Generator().manual_seed(self.seed)

        def on_original_and_augmented(params):
            noise = torch.randn(len(x), 3, SIDE, SIDE, generator=generator)
            inputs, targets = torch.cat([x, augment(x, noise)]), torch.cat([y, y])
            return support.penalised_cross_entropy(self.apply, params, inputs, targets, DECAY)

        return on_original_and_augmented

    def test_accuracy(self, augment, description, x=None, y=None) -> float:
        return self.scratch.accuracy(self.loss(augment, x, y), description)

    def val_loss(self, params) -> float:
        with torch.no_grad():
            return float(F.cross_entropy(self.apply(params, self.x_val), self.y_val))

    def val_loss_after(self, augment, steps: int) -> float:
        """The search objective: validation loss after `steps` steps of training from scratch."""
        short = support.ScratchTraining(
            self.apply, self.params, (self.x_val, self.y_val), steps, DECAY, progress=False
        )
        return self.val_loss(short.train(self.loss(augment), "trial"))


def strength_augment(strength: float):
    """The hand-chosen augmentation at a fixed strength, as `augment(x, noise)`."""
    # One standard-normal triple per digit, read from the noise images the training draws.
    return lambda x, noise: affine_augment(x, strength, noise[:, :, 0, 0])


def learn_augmentation_network(trainer: Trainer, seed: int, args):
    """Part 1: learn the augmentation network's weights by hypergradient descent."""
    torch.manual_seed(seed)
    augmentation = hyperopt.LearnedAugmentation(AugmentationNetwork())
    train_loss = with_copies(
        trainer.apply, lambda hparams, x, noise: augmentation.augment(hparams["net"], x, noise)
    )
    loop = hyper_loop(trainer.apply, train_loss, args, args.hyper_lr)
    hparams = TensorDict(net=augmentation.init())
    state = loop.init(
        trainer.params,
        hparams,
        hyperopt.Minibatches(
            trainer.x,
            trainer.y,
            batch_size=args.batch_size,
            noise_shape=(NOISE_CHANNELS, SIDE, SIDE),
            seed=seed,
        ),
        hyperopt.Minibatches(trainer.x_val, trainer.y_val, batch_size=args.batch_size, seed=seed),
    )
    loop.run(state, outer_steps=args.steps, progress=args.progress)
    learned = state.hparams["net"]
    joint = support.test_accuracy(trainer.apply, state.params, *trainer.scratch.test)

    def augment(x, noise):
        with torch.no_grad():
            return augmentation.augment(learned, x, noise[:, :NOISE_CHANNELS])

    count = implicitfn.tree_ravel(hparams)[0].numel()
    return augment, count, joint


def one_seed(seed: int, args):
    splits = splits_of(seed, args.train_size)
    trainer = Trainer(splits, seed, args)
    learned, count, joint = learn_augmentation_network(trainer, seed, args)
    x_both = torch.cat([trainer.x, trainer.x_val])
    y_both = torch.cat([trainer.y, trainer.y_val])
    results = {
        "no augmentation": trainer.test_accuracy(lambda x, noise: x, "no augmentation"),
        "hand-chosen: rotations + shifts": trainer.test_accuracy(
            strength_augment(1.0), "hand-chosen"
        ),
        "learned augmentation network": trainer.test_accuracy(learned, "learned"),
        # The paper reports the network trained alongside the hyperparameters; its training
        # (minibatches, warm-started) differs from the retrainings here, so it is shown apart.
        "learned, the CNN trained jointly with it": joint,
        "no augmentation, train + val digits": trainer.test_accuracy(
            lambda x, noise: x, "train + val", x_both, y_both
        ),
    }
    noise = torch.randn(4, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))
    first = trainer.x[:1].expand(4, -1)
    samples = {
        "original": trainer.x[0],
        "hand-chosen": strength_augment(1.0)(first[:1], noise[:1])[0],
        **{f"learned #{k + 1}": image for k, image in enumerate(learned(first, noise))},
    }
    perturbation = float(
        (learned(trainer.x, torch.randn(len(trainer.x), 3, SIDE, SIDE)) - trainer.x).abs().mean()
    )
    print(f"seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in results.items()))
    print(f"  mean |learned perturbation| per pixel: {perturbation:.3f} (pixels lie in [0, 1])")
    return results, samples, count, perturbation


def tune_strength_by_hypergradient(trainer: Trainer, args):
    """Part 2 (a): the strength and the CNN trained together; returns (curve, strength)."""
    train_loss = with_copies(
        trainer.apply,
        lambda hparams, x, noise: affine_augment(x, hparams["log_strength"].exp(), noise),
    )
    loop = hyper_loop(trainer.apply, train_loss, args, args.strength_lr)
    stopwatch = support.CpuStopwatch()
    state = loop.init(
        trainer.params,
        TensorDict(log_strength=torch.tensor(math.log(args.initial_strength))),
        hyperopt.Minibatches(
            trainer.x, trainer.y, batch_size=args.batch_size, noise_shape=(3,), seed=0
        ),
        hyperopt.Minibatches(trainer.x_val, trainer.y_val, batch_size=args.batch_size, seed=0),
    )
    curve = {"seconds": [], "val_loss": [], "strength": []}

    def record(state, record):  # the jointly trained CNN on the whole validation set
        curve["seconds"].append(stopwatch.elapsed())
        with stopwatch.paused():
            curve["val_loss"].append(trainer.val_loss(state.params))
        curve["strength"].append(float(state.hparams["log_strength"].exp()))

    loop.run(state, outer_steps=args.strength_steps, callbacks=[record], progress=args.progress)
    strength = curve["strength"][-1]
    # The same objective as a search trial, so that the methods end on comparable numbers.
    retrained = trainer.val_loss_after(strength_augment(strength), args.trial_steps)
    curve["seconds"].append(stopwatch.elapsed())
    curve["val_loss"].append(retrained)
    curve["strength"].append(strength)
    return curve, strength


def search_strength(trainer: Trainer, sampler, budget: float, args):
    """Part 2 (b, c): Optuna with `sampler` until `budget` CPU seconds are spent (the trial
    running then finishes); returns (curve, strength)."""
    curve = {"seconds": [], "val_loss": [], "strength": []}
    stopwatch = support.CpuStopwatch()

    def objective(trial):
        strength = trial.suggest_float("strength", *STRENGTH_RANGE, log=True)
        value = trainer.val_loss_after(strength_augment(strength), args.trial_steps)
        curve["seconds"].append(stopwatch.elapsed())
        curve["val_loss"].append(value)
        curve["strength"].append(strength)
        return value

    def stop_when_spent(study, trial):
        if stopwatch.elapsed() >= budget:
            study.stop()

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=sampler)
    study.optimize(objective, callbacks=[stop_when_spent], show_progress_bar=args.progress)
    return curve, study.best_params["strength"]


def best_so_far(values):
    return [min(values[: k + 1]) for k in range(len(values))]


def compare_with_search(args):
    """Part 2 on seed 0's split: hypergradient vs TPE vs random search at equal wall-clock."""
    splits = splits_of(0, args.train_size)
    trainer = Trainer(splits, 0, args)
    curves, strengths = {}, {}
    print("\n== tuning the augmentation strength: hypergradient")
    curves["hypergradient"], strengths["hypergradient"] = tune_strength_by_hypergradient(
        trainer, args
    )
    budget = curves["hypergradient"]["seconds"][-1]
    for name, sampler in (
        # Same seed: TPE's first 5 (random) trials are random search's first 5.
        ("Optuna TPE", optuna.samplers.TPESampler(n_startup_trials=5, seed=0)),
        ("random search", optuna.samplers.RandomSampler(seed=0)),
    ):
        print(f"== tuning the augmentation strength: {name}, {budget:.1f} CPU s")
        curves[name], strengths[name] = search_strength(trainer, sampler, budget, args)
    summary = {}
    for name, curve in curves.items():
        tested = trainer.test_accuracy(
            strength_augment(strengths[name]), f"test with {name}'s strength"
        )
        summary[name] = {
            "strength": strengths[name],
            "best_val_loss": min(curve["val_loss"]) if name != "hypergradient" else None,
            "final_val_loss_retrained": curve["val_loss"][-1] if name == "hypergradient" else None,
            "evaluations": len(curve["val_loss"]),
            "seconds": curve["seconds"][-1],
            "test_accuracy": tested,
            "curve": curve,
        }
    print(f"\naugmentation strength tuned on seed 0 ({budget:.1f} CPU s each; 1 = hand-chosen):")
    for name, s in summary.items():
        value = s["final_val_loss_retrained"] or s["best_val_loss"]
        print(
            f"  {name:14s} strength {s['strength']:.3f}, val loss {value:.4f} "
            f"({s['evaluations']} evaluations), test accuracy {s['test_accuracy']:.3f}"
        )
    return summary


def main():
    args = support.command_line(
        __doc__,
        "paper/learned_augmentation.png",
        seeds=(3, 1),
        train_size=200,
        steps=(80, 2),
        inner_steps=(10, 2),
        cg_steps=(10, 2),
        batch_size=100,
        inner_lr=3e-3,
        hyper_lr=3e-3,
        scratch_steps=(400, 10),
        strength_steps=(60, 2),
        strength_lr=0.1,
        initial_strength=0.2,
        trial_steps=(200, 5),
        json=pathlib.Path("outputs/paper/learned_augmentation.json"),
    )
    per_seed, perturbations = [], []
    for seed in range(args.seeds):
        print(f"== seed {seed}")
        results, samples, count, perturbation = one_seed(seed, args)
        per_seed.append(results)
        perturbations.append(perturbation)

    names = list(per_seed[0])
    summary = {}
    print(
        f"\ntest accuracy over {args.seeds} seeds ({args.train_size} training digits; "
        "mean +- std, min-max)"
    )
    for name in names:
        values = [r[name] for r in per_seed]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        summary[name] = {
            "per_seed": values,
            "mean": statistics.mean(values),
            "std": spread,
            "min": min(values),
            "max": max(values),
        }
        print(
            f"  {name:40s} {statistics.mean(values):.3f} +- {spread:.3f}  "
            f"({min(values):.3f}-{max(values):.3f})"
        )
    search = compare_with_search(args)

    support.write_json(
        args.json,
        {
            "command": " ".join(["python", *sys.argv]),
            "training_digits": args.train_size,
            "validation_digits": args.train_size,
            "augmentation_hyperparameters": count,
            "test_accuracy": summary,
            "mean_abs_learned_perturbation_per_seed": perturbations,
            "strength_search": search,
        },
    )

    figure = Figure(figsize=(14, 4.6), layout="constrained")
    grid = figure.add_gridspec(2, 9)
    bars = figure.add_subplot(grid[:, :3])
    for i, name in enumerate(names):
        values = summary[name]["per_seed"]
        bars.bar(i, summary[name]["mean"], color=f"C{i}", alpha=0.6)
        bars.scatter([i] * len(values), values, color="black", s=12, zorder=3)
    bars.set_xticks(
        range(len(names)),
        [
            "none",
            "hand-\nchosen",
            "learned\n(retrained)",
            "learned\n(joint CNN)",
            "none,\ntrain+val",
        ],
        fontsize="small",
    )
    bars.set_ylim(min(summary[n]["min"] for n in names) - 0.03, 1.0)
    bars.set_ylabel("test accuracy (dots: seeds)")
    for k, (title, image) in enumerate(samples.items()):  # the last seed's first digit
        axis = figure.add_subplot(grid[k // 3, 3 + k % 3])
        axis.imshow(image.reshape(SIDE, SIDE), cmap="gray_r")
        axis.set_title(f"{title}\n[{image.min():.1f}, {image.max():.1f}]", fontsize="small")
        axis.set_axis_off()
    race = figure.add_subplot(grid[:, 6:])
    for k, (name, s) in enumerate(search.items()):
        curve = s["curve"]
        if name == "hypergradient":  # the jointly trained CNN, then the retraining (a star)
            race.plot(
                curve["seconds"][:-1], curve["val_loss"][:-1], ".-", color=f"C{k}", label=name
            )
            race.plot(curve["seconds"][-1], curve["val_loss"][-1], "*", color=f"C{k}", ms=12)
        else:
            shown = best_so_far(curve["val_loss"])
            race.step(curve["seconds"], shown, where="post", color=f"C{k}", label=name)
            race.scatter(curve["seconds"], curve["val_loss"], color=f"C{k}", s=12)
    race.set_xlabel("CPU seconds (one thread)")
    race.set_ylabel("validation loss (dots: trials; star: retrained)")
    race.set_ylim(0, min(2.0, race.get_ylim()[1]))
    race.set_title("tuning the augmentation strength (seed 0)", fontsize="small")
    race.legend(fontsize="small")
    support.save_figure(figure, args.plot)


if __name__ == "__main__":
    main()
