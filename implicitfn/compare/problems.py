"""The bilevel problems the comparison runs on, and the inner training that solves them tightly.

Built-in problems tune one penalty per weight (a log-penalty, $\\lambda_i = e^{h_i}$) of a
classifier of scikit-learn's digits (8x8 images, 10 classes), trained with mean cross-entropy;
the outer objective is the cross-entropy on held-out digits.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree
from sklearn.datasets import load_digits
from tensordict import TensorDict, TensorDictBase
from torch.func import grad

import implicitfn

__all__ = ["Problem", "make_problem", "problem_names", "train_to_optimum"]

TRAIN_SIZE = 1000
MAX_NEWTON_STEPS = 50
BATCH_SIZE = 100


@dataclasses.dataclass(frozen=True)
class Problem:
    r"""A bilevel problem: training loss $L_T(w, \lambda)$, validation loss $L_V(w, \lambda)$, data.

    **Arguments:**

    - `name`: a short name used in reports.
    - `train_loss`: `(params, hparams, *inner_args) -> scalar`. A
      [`CompositeLoss`][implicitfn.CompositeLoss] also enables the Gauss-Newton curvature.
    - `outer_loss`: `(params, hparams, *outer_args) -> scalar`.
    - `params`: where inner training starts (TensorDict, dict or tensor).
    - `hparams`: $\lambda$, the point at which the hypergradient is compared.
    - `inner_args`, `outer_args`: the data of the two losses.
    - `batches`: minibatches of `inner_args` (a tuple of argument tuples), for solvers that
      draw one batch per step ([`StochasticNeumann`][implicitfn.StochasticNeumann]); empty to
      leave those solvers out.
    - `description`: one line for the report.

    ```python
    >>> import torch, implicitfn
    >>> from implicitfn.compare import Problem
    >>> x, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    >>> def squared_error(p, h, x, y):
    ...     return 0.5 * ((x @ p - y) ** 2).mean()
    >>> def train_loss(p, h, x, y):
    ...     return squared_error(p, h, x, y) + 0.5 * (h.exp() * p ** 2).sum()
    >>> ridge = Problem("ridge", train_loss, squared_error, params=torch.zeros(3, dtype=x.dtype),
    ...                 hparams=torch.zeros(3, dtype=x.dtype), inner_args=(x, y), outer_args=(x, y))
    >>> ridge.num_params, ridge.num_hparams
    (3, 3)
    ```
    """

    name: str
    train_loss: Callable[..., torch.Tensor]
    outer_loss: Callable[..., torch.Tensor]
    params: Any
    hparams: Any
    inner_args: tuple[Any, ...] = ()
    outer_args: tuple[Any, ...] = ()
    batches: tuple[tuple[Any, ...], ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"name: expected a non-empty str, got {self.name!r}.")
        for field in ("train_loss", "outer_loss"):
            if not callable(getattr(self, field)):
                raise TypeError(f"{field}: expected a callable (params, hparams, *args) -> scalar.")
        for field in ("params", "hparams"):
            tree = getattr(self, field)
            if not isinstance(tree, (torch.Tensor, dict, TensorDictBase)) or not all(
                isinstance(leaf, torch.Tensor) and leaf.is_floating_point()
                for leaf in pytree.tree_leaves(tree)
            ):
                raise TypeError(
                    f"{field}: expected a TensorDict, dict or tensor of floating-point tensors, "
                    f"got {type(tree).__name__}."
                )
        for field in ("inner_args", "outer_args", "batches"):
            if not isinstance(getattr(self, field), tuple):
                raise TypeError(
                    f"{field}: expected a tuple, got {type(getattr(self, field)).__name__}."
                )

    @property
    def num_params(self) -> int:
        """The number of inner parameters $n$ (the size of the linear system)."""
        return implicitfn.tree_ravel(self.params)[0].numel()

    @property
    def num_hparams(self) -> int:
        """The number of hyperparameters."""
        return implicitfn.tree_ravel(self.hparams)[0].numel()

    def hypergradient(
        self,
        params: Any,
        adjoint: implicitfn.AbstractAdjoint,
        condition: implicitfn.AbstractOptimalityCondition | None = None,
    ) -> tuple[Any, implicitfn.SolveInfo | None]:
        """[`implicitfn.hypergradient`][implicitfn.hypergradient] of this problem at the inner
        solution `params`: its hyperparameters, losses and data, differentiated by `adjoint`.

        **Arguments:**

        - `params`: the inner solution $w^*$ (e.g. from
          [`train_to_optimum`][implicitfn.compare.train_to_optimum]).
        - `adjoint`: how to differentiate, e.g. an [`ImplicitAdjoint`][implicitfn.ImplicitAdjoint].
        - `condition`: the optimality condition $w^*$ satisfies; `None` (default) for the
          stationarity of `train_loss`.

        **Returns:** `(hypergradient, info)`, as `implicitfn.hypergradient` returns them.

        ```python
        >>> import torch, implicitfn
        >>> from implicitfn.compare import Problem
        >>> quadratic = Problem("quadratic", lambda p, h: ((p - h) ** 2).sum(), lambda p, h: p.sum(),
        ...                     torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
        >>> g, info = quadratic.hypergradient(quadratic.hparams, implicitfn.ImplicitAdjoint())
        >>> # w* = h, so dL_V/dh = 1
        >>> torch.allclose(g, torch.ones(2, dtype=torch.float64)), info.outcome_names()[0]
        (True, 'successful')
        ```
        """
        return implicitfn.hypergradient(
            self.train_loss if condition is None else condition,
            self.outer_loss,
            params,
            self.hparams,
            inner_args=self.inner_args,
            outer_args=self.outer_args,
            adjoint=adjoint,
        )


def train_to_optimum(problem: Problem) -> tuple[Any, float]:
    r"""Minimise the training loss tightly: L-BFGS, then Newton steps with [`CG`][implicitfn.CG].

    L-BFGS gets close cheaply; Newton's method (exact Hessian products, each step solved by CG,
    Levenberg-Marquardt damping while the Hessian is not yet positive definite) then converges
    quadratically, down to $\lVert\nabla_w L_T\rVert \le \varepsilon^{3/4}$ of the dtype (about
    $10^{-12}$ in float64) or at most 50 Newton steps. The implicit function theorem holds at a
    stationary point: the reference hypergradient is only as good as this optimum.

    **Arguments:**

    - `problem`: a [`Problem`][implicitfn.compare.Problem].

    **Returns:** `(params_star, gradient_norm)`: the optimum (a new tree like `problem.params`)
    and $\lVert\nabla_w L_T\rVert$ there.

    ```python
    >>> import torch
    >>> from implicitfn.compare import Problem, train_to_optimum
    >>> quadratic = Problem("quadratic", lambda p, h: ((p - h) ** 2).sum(), lambda p, h: p.sum(),
    ...                     torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    >>> params, gradient_norm = train_to_optimum(quadratic)
    >>> params, gradient_norm < 1e-12
    (tensor([1., 1.], dtype=torch.float64), True)
    ```
    """
    train_gradient = grad(problem.train_loss)
    hparams, args = problem.hparams, problem.inner_args
    start, unravel = implicitfn.tree_ravel(problem.params)
    flat = start.detach().clone().requires_grad_(True)
    lbfgs = torch.optim.LBFGS(
        [flat],
        lr=1.0,
        max_iter=5000,
        tolerance_grad=1e-6,
        tolerance_change=0.0,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        lbfgs.zero_grad()
        loss = problem.train_loss(unravel(flat), hparams, *args)
        loss.backward()
        return loss

    lbfgs.step(closure)
    params = unravel(flat.detach())
    loss = float(problem.train_loss(params, hparams, *args))
    gradient = train_gradient(params, hparams, *args)
    gradient_norm = float(implicitfn.tree_norm(gradient))
    finfo = torch.finfo(start.dtype)
    # Levenberg-Marquardt damping: where the Hessian is not yet positive definite (a network
    # short of its minimum) a damped step still descends; once steps succeed it decays to 0
    # and the last steps are plain Newton steps, which converge quadratically.
    damping = 1e-3
    for _ in range(MAX_NEWTON_STEPS):
        if gradient_norm <= finfo.eps**0.75:
            break
        hessian = implicitfn.Hessian().linearize(problem.train_loss, params, hparams, *args)
        # Inexact Newton: solve loosely far from the optimum, tightly near it.
        solver = implicitfn.CG(max_steps=5 * start.numel(), rtol=min(0.1, gradient_norm**0.5))
        step, _ = solver.solve(implicitfn.damp(hessian, damping), gradient)
        candidate = implicitfn.tree_axpy(-1.0, step, params)
        candidate_loss = float(problem.train_loss(candidate, hparams, *args))
        # Near the optimum the loss changes by less than its round-off: allow for that.
        if candidate_loss <= loss + 100 * finfo.eps * abs(loss):
            params, loss = candidate, candidate_loss
            gradient = train_gradient(params, hparams, *args)
            gradient_norm = float(implicitfn.tree_norm(gradient))
            damping = damping / 10 if damping > 1e-12 else 0.0
        else:
            damping = max(10 * damping, 1e-6)
    return params, gradient_norm


def _digits(dtype: torch.dtype, device: torch.device, seed: int) -> tuple[torch.Tensor, ...]:
    """Digits scaled to [0, 1], split at random (seeded) into training and validation sets."""
    images, labels = load_digits(return_X_y=True)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    x = torch.as_tensor(images / 16.0, dtype=dtype)[order].to(device)
    y = torch.as_tensor(labels, dtype=torch.int64)[order].to(device)
    return x[:TRAIN_SIZE], y[:TRAIN_SIZE], x[TRAIN_SIZE:], y[TRAIN_SIZE:]


def _classifier_problem(
    name: str,
    network: torch.nn.Module,
    initial_penalty: float,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
) -> Problem:
    apply, params = implicitfn.functional_model(network.to(device=device, dtype=dtype))
    x, y, x_val, y_val = _digits(dtype, device, seed)
    log_penalty = params.apply(lambda p: torch.full_like(p, math.log(initial_penalty)))

    def penalty(p: TensorDict, h: TensorDict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * implicitfn.tree_vdot(h.exp(), p * p)

    def cross_entropy(outputs: torch.Tensor, h: TensorDict, x: torch.Tensor, y: torch.Tensor):
        return torch.nn.functional.cross_entropy(outputs, y)

    train_loss = implicitfn.CompositeLoss(
        predict=lambda p, h, x, y: apply(p, x),
        output_loss=cross_entropy,
        penalty=penalty,
    )

    def outer_loss(p: TensorDict, h: TensorDict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(apply(p, x), y)

    batches = tuple(zip(x.split(BATCH_SIZE), y.split(BATCH_SIZE), strict=True))
    architecture = " -> ".join(
        type(m).__name__ for m in network.modules() if not list(m.children())
    )
    return Problem(
        name=name,
        train_loss=train_loss,
        outer_loss=outer_loss,
        params=params,
        hparams=log_penalty,
        inner_args=(x, y),
        outer_args=(x_val, y_val),
        batches=batches,
        description=(
            f"{architecture} on digits ({len(y)} train / {len(y_val)} validation), mean "
            f"cross-entropy + 0.5 * sum_i exp(h_i) w_i^2, one penalty per weight, "
            f"exp(h) = {initial_penalty:g}"
        ),
    )


def _mlp(hidden: int) -> Callable[[], torch.nn.Module]:
    return lambda: torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10)
    )


# Built-in problems: name -> (network, the penalty every weight starts with). The penalties are
# small enough that the data shapes the curvature (condition numbers ~ 5e2 to 5e4, which
# separates the solvers within 50 products); the networks need 1e-2 to have a clear minimum
# that L-BFGS + Newton find in seconds.
_BUILT_IN: dict[str, tuple[Callable[[], torch.nn.Module], float]] = {
    "logreg": (lambda: torch.nn.Linear(64, 10), 1e-3),  # 650 parameters and penalties
    "mlp-small": (_mlp(32), 1e-2),  # 2,410
    "mlp": (_mlp(128), 1e-2),  # 9,610
}


def problem_names() -> list[str]:
    """The names of the built-in problems, for `make_problem` and `--problem`.

    - `logreg`: multinomial logistic regression, 650 parameters and as many penalties. Convex;
      the Gauss-Newton matrix equals the Hessian (the model is linear in its weights).
    - `mlp-small`: a 64-32-10 tanh network, 2,410 parameters and penalties. Non-convex: the
      Gauss-Newton matrix differs from the Hessian.
    - `mlp`: a 64-128-10 tanh network, 9,610 parameters and penalties (the dense reference
      takes minutes).

    ```python
    >>> from implicitfn.compare import problem_names
    >>> problem_names()
    ['logreg', 'mlp-small', 'mlp']
    ```
    """
    return list(_BUILT_IN)


def make_problem(
    name: str,
    *,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Problem:
    """Build a built-in problem (see [`problem_names`][implicitfn.compare.problem_names]).

    **Arguments:**

    - `name`: one of `problem_names()`.
    - `dtype`: `torch.float64` (default: the reference is then exact to about $10^{-12}$) or
      `torch.float32`.
    - `device`: where the data and parameters live.
    - `seed`: seeds the training/validation split and the network's initial weights; the same
      seed gives the same problem. The global random state is left as it was.

    **Returns:** a [`Problem`][implicitfn.compare.Problem].

    ```python
    >>> from implicitfn.compare import make_problem
    >>> problem = make_problem("logreg")
    >>> problem.num_params, problem.num_hparams, len(problem.batches)
    (650, 650, 10)
    ```
    """
    if name not in _BUILT_IN:
        raise ValueError(f"problem: unknown name {name!r}; choose one of {problem_names()}.")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype: expected torch.float32 or torch.float64, got {dtype}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}.")
    build_network, initial_penalty = _BUILT_IN[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = build_network()
    return _classifier_problem(name, network, initial_penalty, dtype, torch.device(device), seed)
