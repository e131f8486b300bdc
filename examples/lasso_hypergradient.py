"""A penalty per feature for the Lasso, the elastic net and sparse logistic regression, tuned by hypergradient descent against scikit-learn's grid searches.

The inner problems are non-smooth, so their solutions are characterised by the
proximal-gradient condition `implicitfn.proximal_gradient(f, prox)`; the backward solve is
restricted to the nonzero coefficients (symmetric for the Lasso: CG). Each hyper step solves the
inner problem with FISTA (warm-started), then takes one Adam step on the log-strengths along
the hypergradient of the validation loss.

- Lasso and elastic net on scikit-learn's diabetes (10 features; validation: mean squared error),
  against `LassoCV` / `ElasticNetCV` searching one global strength (and the l1 ratio) on the same
  validation split;
- sparse logistic regression on breast_cancer (30 features; validation: log-loss), against
  `LogisticRegressionCV` with an L1 penalty.

Printed: the validation and test losses reached, the nonzero coefficients and the wall time of
each; the plot shows the validation loss along the hyper steps and the learned penalties.

    python examples/lasso_hypergradient.py            # full run, about 20 s
    python examples/lasso_hypergradient.py --fast     # CI smoke run
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
import warnings
from collections.abc import Callable

import numpy as np
import support
import torch
from matplotlib.figure import Figure
from sklearn.datasets import load_breast_cancer, load_diabetes
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import ElasticNetCV, LassoCV, LogisticRegressionCV
from sklearn.model_selection import PredefinedSplit
from tqdm.auto import tqdm

import implicitfn

F64 = torch.float64


@dataclasses.dataclass(frozen=True)
class Splits:
    """Standardised train / validation / test tensors (targets centred for regression)."""

    x: torch.Tensor
    y: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def splits(load, seed: int, regression: bool) -> Splits:
    """50% train, 25% validation, 25% test, standardised with the training statistics."""
    features, targets = load(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(features))
    parts = np.split(order, [len(order) // 2, 3 * len(order) // 4])
    mean, scale = features[parts[0]].mean(0), features[parts[0]].std(0)
    offset = targets[parts[0]].mean() if regression else 0.0
    tensors = []
    for part in parts:
        tensors.append(torch.tensor((features[part] - mean) / scale, dtype=F64))
        tensors.append(torch.tensor(targets[part] - offset, dtype=F64))
    return Splits(*tensors)


# -- the inner problems ------------------------------------------------------------------------


def squared_error(w, hparams, x, y):  # scikit-learn's Lasso objective, without the penalty
    return 0.5 * ((x @ w - y) ** 2).mean()


def mean_squared_error(w, hparams, x, y):
    return ((x @ w - y) ** 2).mean()


def logistic(w, hparams, x, y):  # the last coefficient is the (unpenalised) intercept
    return torch.nn.functional.binary_cross_entropy_with_logits(x @ w[:-1] + w[-1], y)


def squared_error_gradient(w, x, y):
    return x.T @ (x @ w - y) / len(y)


def logistic_gradient(w, x, y):
    residual = torch.sigmoid(x @ w[:-1] + w[-1]) - y
    return torch.cat([x.T @ residual, residual.sum()[None]]) / len(y)


def fista(problem, w, hparams, *, tol=1e-10, max_steps=50_000):
    """Minimise f + g by FISTA with adaptive restarts, from `w`, to a relative step of `tol`.

    The gradient of f is written out (`problem.gradient`): a tenth of the time of autograd on
    problems this small."""
    step, prox, data = problem.condition.step, problem.condition.prox, problem.data
    v, t = w, 1.0
    for _ in range(max_steps):
        w_next = prox(v - step * problem.gradient(v, data.x, data.y), step, hparams)
        if float((w_next - w).norm()) <= tol * max(1.0, float(w_next.norm())):
            return w_next
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        restart = float((v - w_next) @ (w_next - w)) > 0  # O'Donoghue and Candes (2015)
        v = w_next if restart else w_next + ((t - 1) / t_next) * (w_next - w)
        w, t = w_next, 1.0 if restart else t_next
    warnings.warn(f"FISTA stopped after {max_steps} steps", RuntimeWarning, stacklevel=2)
    return w_next


@dataclasses.dataclass(frozen=True)
class Problem:
    """One inner problem with its per-feature strengths, tuned on the validation loss."""

    name: str
    data: Splits
    condition: implicitfn.AbstractOptimalityCondition
    solver: implicitfn.AbstractLinearSolver
    hparams: dict[str, torch.Tensor]  # log-strengths, one per feature
    size: int  # number of coefficients
    loss: Callable  # the validation and test metric, (w, hparams, x, y) -> scalar
    gradient: Callable  # of the training loss f, (w, x, y) -> tensor


def regression_problem(name: str, data: Splits, elastic: bool, initial: float) -> Problem:
    p = data.x.shape[1]
    lipschitz = float(torch.linalg.eigvalsh(data.x.T @ data.x / len(data.y)).max())
    if elastic:  # l1 and l2 strengths per feature; the restricted system is not symmetric
        prox = implicitfn.prox_elastic_net(
            l1=lambda h: h["log_l1"].exp(), l2=lambda h: h["log_l2"].exp()
        )
        hparams = {"log_l1": torch.full((p,), math.log(initial), dtype=F64)}
        hparams["log_l2"] = torch.full((p,), math.log(initial), dtype=F64)
        solver = implicitfn.GMRES(rtol=1e-8)
    else:
        prox = implicitfn.prox_l1(lambda h: h["log_l1"].exp())
        hparams = {"log_l1": torch.full((p,), math.log(initial), dtype=F64)}
        solver = implicitfn.CG(rtol=1e-8)
    condition = implicitfn.proximal_gradient(squared_error, prox, step=1 / lipschitz)
    return Problem(
        name, data, condition, solver, hparams, p, mean_squared_error, squared_error_gradient
    )


def logistic_problem(data: Splits, initial: float) -> Problem:
    p = data.x.shape[1]
    lipschitz = float(torch.linalg.eigvalsh(data.x.T @ data.x / len(data.y)).max()) / 4 + 0.25

    def strengths(h):  # the intercept (last coefficient) is not penalised
        return torch.cat([h["log_l1"].exp(), torch.zeros(1, dtype=h["log_l1"].dtype)])

    condition = implicitfn.proximal_gradient(
        logistic, implicitfn.prox_l1(strengths), step=1 / lipschitz
    )
    hparams = {"log_l1": torch.full((p,), math.log(initial), dtype=F64)}
    solver = implicitfn.CG(rtol=1e-8)
    name = "sparse logistic (breast_cancer)"
    return Problem(name, data, condition, solver, hparams, p + 1, logistic, logistic_gradient)


def tune(problem: Problem, steps: int, lr: float, progress: bool) -> dict:
    """Hypergradient descent (Adam on the log-strengths); the history and the final model."""
    data = problem.data
    hparams = {k: v.clone().requires_grad_() for k, v in problem.hparams.items()}
    optimizer = torch.optim.Adam(list(hparams.values()), lr=lr)
    adjoint = implicitfn.ImplicitAdjoint(solver=problem.solver)
    w = torch.zeros(problem.size, dtype=F64)
    history = {"val": [], "steps": []}

    def outer(w, h):
        return problem.loss(w, h, data.x_val, data.y_val)

    start = time.perf_counter()
    for _ in tqdm(range(steps), desc=problem.name, disable=not progress, leave=False):
        current = {k: v.detach() for k, v in hparams.items()}
        w = fista(problem, w, current)
        gradient, info = implicitfn.hypergradient(
            problem.condition, outer, w, current, inner_args=(data.x, data.y), adjoint=adjoint
        )
        history["val"].append(float(outer(w, current)))
        history["steps"].append(int(info.num_steps))
        optimizer.zero_grad()
        for key, value in hparams.items():
            value.grad = gradient[key]
        optimizer.step()
    current = {k: v.detach() for k, v in hparams.items()}
    w = fista(problem, w, current)
    seconds = time.perf_counter() - start
    history["val"].append(float(outer(w, current)))
    return {
        "history": history,
        "seconds": seconds,
        "val": history["val"][-1],
        "test": float(problem.loss(w, current, data.x_test, data.y_test)),
        "nonzeros": int((w[: problem.hparams["log_l1"].numel()] != 0).sum()),
        "strengths": current["log_l1"].exp(),
    }


# -- the scikit-learn baselines ------------------------------------------------------------------


def l1_only() -> dict:
    """The arguments for an L1 penalty, across scikit-learn versions (1.8 moved it)."""
    parameters = inspect.signature(LogisticRegressionCV).parameters
    if "use_legacy_attributes" in parameters:
        return {"l1_ratios": [1.0], "use_legacy_attributes": False}
    return {"penalty": "l1"}


def grid_search(problem: Problem, fast: bool) -> dict:
    """scikit-learn's cross-validated grid search, on the same train/validation split."""
    data = problem.data
    x = np.concatenate([data.x.numpy(), data.x_val.numpy()])
    y = np.concatenate([data.y.numpy(), data.y_val.numpy()])
    fold = PredefinedSplit(np.r_[-np.ones(len(data.y)), np.zeros(len(data.y_val))])
    if "logistic" in problem.name:
        # liblinear is the fast L1 solver; it penalises the intercept like a weight, which a
        # large intercept_scaling makes negligible.
        model = LogisticRegressionCV(
            Cs=10 if fast else 30,
            solver="liblinear",
            intercept_scaling=100.0,
            cv=fold,
            scoring="neg_log_loss",
            max_iter=10_000,
            tol=1e-8,
            refit=False,
            **l1_only(),
        )
    elif "elastic" in problem.name:
        model = ElasticNetCV(
            l1_ratio=[0.1, 0.5, 0.9, 1.0] if fast else [0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99, 1.0],
            alphas=30 if fast else 100,
            cv=fold,
            fit_intercept=False,
            tol=1e-8,
        )
    else:
        model = LassoCV(alphas=30 if fast else 100, cv=fold, fit_intercept=False, tol=1e-8)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    seconds = time.perf_counter() - start
    # The chosen model refitted on the training split only, as the tuned one is, and scored.
    if "logistic" in problem.name:
        strength = 1 / (
            float(np.ravel(model.C_)[0]) * len(data.y)
        )  # C sum(loss) + |w|_1 = n C (mean loss + ...)
        hparams = {"log_l1": torch.full((data.x.shape[1],), math.log(strength), dtype=F64)}
    elif "elastic" in problem.name:
        l1 = model.alpha_ * model.l1_ratio_
        l2 = model.alpha_ * (1 - model.l1_ratio_)
        hparams = {
            "log_l1": torch.full((data.x.shape[1],), math.log(max(l1, 1e-12)), dtype=F64),
            "log_l2": torch.full((data.x.shape[1],), math.log(max(l2, 1e-12)), dtype=F64),
        }
    else:
        hparams = {"log_l1": torch.full((data.x.shape[1],), math.log(model.alpha_), dtype=F64)}
    w = fista(problem, torch.zeros(problem.size, dtype=F64), hparams)
    return {
        "seconds": seconds,
        "val": float(problem.loss(w, hparams, data.x_val, data.y_val)),
        "test": float(problem.loss(w, hparams, data.x_test, data.y_test)),
        "nonzeros": int((w[: data.x.shape[1]] != 0).sum()),
    }


def main():
    args = support.command_line(
        __doc__, "lasso_hypergradient.png", steps=(200, 12), hyper_lr=0.05, seed=0
    )
    diabetes = splits(load_diabetes, args.seed, regression=True)
    cancer = splits(load_breast_cancer, args.seed, regression=False)
    alpha_max = float((diabetes.x.T @ diabetes.y).abs().max()) / len(diabetes.y)
    problems = [
        regression_problem("Lasso (diabetes)", diabetes, elastic=False, initial=alpha_max / 100),
        regression_problem(
            "elastic net (diabetes)", diabetes, elastic=True, initial=alpha_max / 100
        ),
        logistic_problem(cancer, initial=1e-2),
    ]
    results = []
    for problem in problems:
        tuned = tune(problem, args.steps, args.hyper_lr, args.progress)
        baseline = grid_search(problem, args.fast)
        results.append((problem, tuned, baseline))

    print(
        f"\n{'problem':32s} {'method':36s} {'val loss':>9s} {'test loss':>9s} {'nonzeros':>8s} {'time':>7s}"
    )
    for problem, tuned, baseline in results:
        search = {"Lasso": "LassoCV", "elastic": "ElasticNetCV", "sparse": "LogisticRegressionCV"}
        grid = next(v for k, v in search.items() if problem.name.startswith(k))
        rows = (
            (f"{grid} (one strength)", baseline),
            (f"hypergradient ({args.steps} steps)", tuned),
        )
        for method, r in rows:
            print(
                f"{problem.name:32s} {method:36s} {r['val']:9.4f} {r['test']:9.4f} "
                f"{r['nonzeros']:8d} {r['seconds']:6.2f}s"
            )
        steps = tuned["history"]["steps"]
        print(f"{'':32s} backward solves: {min(steps)}-{max(steps)} products each")

    figure = Figure(figsize=(12, 6.5), layout="constrained")
    axes = figure.subplots(2, len(results))
    for column, (problem, tuned, baseline) in enumerate(results):
        axis = axes[0, column]
        axis.plot(tuned["history"]["val"], label="per-feature penalties (hypergradient)")
        axis.axhline(
            baseline["val"], color="C1", linestyle="--", label="grid search (one strength)"
        )
        axis.set_title(problem.name)
        axis.set_xlabel("hyper step")
        axis.set_ylabel("validation loss")
        axis.legend(fontsize="small")
        axis = axes[1, column]
        axis.bar(range(len(tuned["strengths"])), tuned["strengths"].numpy())
        axis.set_yscale("log")
        axis.set_xlabel("feature")
        axis.set_ylabel("learned l1 strength")
    support.save_figure(figure, args.plot)


if __name__ == "__main__":
    main()
