"""What the loop records at each hyper step, and a plot of it."""

from __future__ import annotations

import math
import os
from typing import Any

__all__ = ["History"]


class History:
    r"""The records of a hyper-optimisation run, one dict per hyper step.

    Each record has `step`, `train_loss` and `val_loss` (at the inner parameters reached, on the
    step's training and validation batches), `train_<name>` / `val_<name>` for the metrics of the
    [`HyperOptimizer`][implicitfn.hyperopt.HyperOptimizer], `inner_gradient_norm`
    ($\lVert\nabla_w L_T\rVert$: how far the inner problem is from stationarity, the implicit
    function theorem's premise), `hypergradient_norm`, and the backward solve's
    `relative_residual`, `outcome` (its name), `solve_failed` and `solve_steps`, and the inner
    solution's `relative_optimality` (see
    [`SolveInfo`][implicitfn.SolveInfo]; absent with an unrolled adjoint).
    Records hold plain Python numbers, so a history is saved with the run.

    ```python
    >>> from implicitfn import hyperopt
    >>> history = hyperopt.History([{"step": 1, "val_loss": 0.5}, {"step": 2, "val_loss": 0.25}])
    >>> history["val_loss"], len(history)
    ([0.5, 0.25], 2)
    ```
    """

    def __init__(self, records: list[dict[str, Any]] | None = None):
        self.records: list[dict[str, Any]] = [dict(r) for r in records or []]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: str) -> list[Any]:
        """The column `key` across all records."""
        if self.records and key not in self.records[-1]:
            raise KeyError(f"{key!r}: not recorded; available: {sorted(self.records[-1])}.")
        return [record[key] for record in self.records]

    def append(self, record: dict[str, Any]) -> None:
        """Add one record (copied)."""
        self.records.append(dict(record))

    def plot(self, path: str | os.PathLike | None = None):
        """Plot losses, metrics, hypergradient norm and the backward solve's residual.

        Uses `matplotlib.figure.Figure` directly (no pyplot state, no display needed).

        **Arguments:**

        - `path`: where to save the figure (format from the extension); `None` to only return it.

        **Returns:** the `matplotlib.figure.Figure`.

        ```python
        >>> from implicitfn import hyperopt
        >>> history = hyperopt.History([
        ...     {"step": 1, "train_loss": 1.0, "val_loss": 2.0, "hypergradient_norm": 1.0,
        ...      "relative_residual": 1e-6, "solve_failed": False},
        ...     {"step": 2, "train_loss": 0.5, "val_loss": 1.5, "hypergradient_norm": 0.5,
        ...      "relative_residual": 1e-5, "solve_failed": False}])
        >>> len(history.plot().axes)
        3
        ```
        """
        from matplotlib.figure import Figure

        if not self.records:
            raise ValueError("History.plot: nothing recorded yet; run some hyper steps first.")
        keys = self.records[-1].keys()
        metrics = {k.split("_", 1)[1] for k in keys if k.startswith(("train_", "val_"))} - {"loss"}
        panels = [("loss", ["train_loss", "val_loss"], False)]
        panels += [(m, [f"train_{m}", f"val_{m}"], False) for m in sorted(metrics)]
        panels += [("hypergradient norm", ["hypergradient_norm"], True)]
        panels += [("backward solve: relative residual", ["relative_residual"], True)]
        figure = Figure(figsize=(4.0 * len(panels), 3.2), layout="constrained")
        steps = self["step"]
        for axis, (title, columns, log_scale) in zip(
            figure.subplots(1, len(panels), squeeze=False)[0], panels, strict=True
        ):
            for column in columns:
                if column in keys:
                    axis.plot(steps, self[column], label=column)
            if title.startswith("backward") and "solve_failed" in keys:
                failed = [
                    (s, r)
                    for s, r, bad in zip(steps, self[columns[0]], self["solve_failed"], strict=True)
                    if bad
                ]
                if failed:
                    axis.scatter(
                        *zip(*failed, strict=True), color="red", zorder=3, label="solve failed"
                    )
            values = [v for c in columns if c in keys for v in self[c]]
            if log_scale and all(v > 0 and math.isfinite(v) for v in values):
                axis.set_yscale("log")
            axis.set_title(title)
            axis.set_xlabel("hyper step")
            axis.legend(fontsize="small")
        if path is not None:
            figure.savefig(path, dpi=120)
        return figure

    def state_dict(self) -> list[dict[str, Any]]:
        """The records as a list of dicts of plain numbers (copied), for checkpoints."""
        return [dict(r) for r in self.records]
