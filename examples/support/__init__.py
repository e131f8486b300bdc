"""Helpers shared by the examples: digits splits, small models, training from scratch, CLI.

The examples put `examples/` on `sys.path` by being run as scripts, so `import support` works.
"""

from __future__ import annotations

import argparse
import pathlib

import torch
from sklearn.datasets import load_digits
from tqdm.auto import tqdm

import implicitfn

NUM_CLASSES = 10


def digits_splits(sizes: dict[str, int], seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Disjoint random splits of scikit-learn's digits (1797 images of 8x8, pixels in [0, 1]).

    `sizes` maps split names to sizes, in order; the remaining images form the `"test"` split.
    """
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32) / 16.0
    y = torch.tensor(labels)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    if sum(sizes.values()) >= len(x):
        raise ValueError(f"sizes: {sum(sizes.values())} images requested, digits has {len(x)}.")
    splits, start = {}, 0
    for name, size in sizes.items():
        chosen = order[start : start + size]
        splits[name] = (x[chosen], y[chosen])
        start += size
    splits["test"] = (x[order[start:]], y[order[start:]])
    return splits


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


def train_from_scratch(loss, params, steps: int, lr: float, description: str, progress: bool):
    """Full-batch Adam on `loss(params)` from `params` (copied): the reference trainings."""
    params = params.clone()
    tensors = list(params.values(include_nested=True, leaves_only=True))
    for tensor in tensors:
        tensor.requires_grad_(True)
    optimizer = torch.optim.Adam(tensors, lr=lr)
    for _ in tqdm(range(steps), desc=description, disable=not progress, leave=False):
        optimizer.zero_grad()
        loss(params).backward()
        optimizer.step()
    return params.detach()


def l2_penalty(params, strength: float = 1e-3) -> torch.Tensor:
    """A fixed L2 penalty, strength / 2 times the sum of squares of all parameters."""
    return 0.5 * strength * sum((p**2).sum() for p in params.values(True, True))


def report_target(name: str, value: float, target: float) -> None:
    """Print a result against the target the issue sets for it."""
    print(f"{name}: {value:.3f}, target >= {target} -> {'met' if value >= target else 'NOT met'}")


def command_line(description: str, default_plot: str, **defaults) -> argparse.Namespace:
    """`--fast` (CI), `--plot PATH`, `--no-progress`, plus `--NAME` for every default given."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--fast", action="store_true", help="a few steps, for CI")
    parser.add_argument(
        "--plot",
        type=pathlib.Path,
        default=pathlib.Path("outputs") / default_plot,
        help="where to save the figure (default: %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    for name, value in defaults.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    args.progress = not args.no_progress
    torch.set_num_threads(1)  # small models: one thread is fastest and fair on shared machines
    return args
