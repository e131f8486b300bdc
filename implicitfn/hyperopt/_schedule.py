"""Tolerance schedules for the backward solves of a hyper-optimisation run."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class GeometricTolerance:
    r"""A schedule `step -> rtol` falling geometrically from `start` at step 1 to `end` at step `steps`,
    then staying at `end`: $\mathrm{rtol}_k = \mathrm{start}\,(\mathrm{end}/\mathrm{start})^{\min(k-1,\,s-1)/(s-1)}$.

    For [`HyperOptimizer(tolerance_schedule=...)`][implicitfn.hyperopt.HyperOptimizer]: early
    hypergradients only need the right direction roughly, later ones more accurately (HOAG,
    Pedregosa 2016, lets the tolerance fall with the outer iterations so that the errors sum to
    a finite amount).

    **Arguments:**

    - `start`, `end`: the first and the last relative tolerance ($0 <$ `end` $\le$ `start`).
    - `steps`: the hyper step from which `end` holds ($\ge 1$).

    ```python
    >>> from implicitfn import hyperopt
    >>> schedule = hyperopt.GeometricTolerance(start=1e-1, end=1e-3, steps=3)
    >>> [round(schedule(k), 6) for k in (1, 2, 3, 10)]
    [0.1, 0.01, 0.001, 0.001]
    ```
    """

    start: float
    end: float
    steps: int

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}: expected a number > 0, got {value!r}.")
        if self.end > self.start:
            raise ValueError(f"end: expected <= start ({self.start}), got {self.end}.")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps: expected an int >= 1, got {self.steps!r}.")

    def __call__(self, step: int) -> float:
        if step >= self.steps:
            return float(self.end)
        fraction = max(step - 1, 0) / (self.steps - 1)
        return float(self.start * math.exp(fraction * math.log(self.end / self.start)))
