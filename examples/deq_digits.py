"""A small deep-equilibrium classifier on scikit-learn digits, trained with three backward passes: implicit (GMRES), Jacobian-free (Identity) and unrolled.

The hidden state is the equilibrium z* = tanh(W z* + U x + b), found by Anderson acceleration
(written below); the logits are a linear readout of z*. `W` is rescaled after every step to a
spectral norm of at most `--max-norm` (< 1), so the map is a contraction and z* is unique.
The equilibrium is differentiated through `implicitfn.fixed_point(T)` with:

- `implicit`: `ImplicitAdjoint(solver=GMRES())`, the exact gradient (up to the solve's tolerance);
- `jacobian-free`: `ImplicitAdjoint(solver=Identity())`, the one-step / Jacobian-free backward
  of DEQs (Fung et al. 2022): I - dT/dz is replaced by I, no solve at all. Its `SolveInfo`
  reports the relative residual ||(dT/dz)^T g|| / ||g||, the size of what it drops;
- `unrolled`: `UnrolledAdjoint(steps=K, learning_rate=1)`, back-propagation through K
  iterations z <- T(z) replayed from z*.

Each method trains its own copy of the same initial model. Printed: test accuracy, time per
step, the cosine between each method's gradient (of W, U, b) and the implicit one at a few
points of the implicit run, and the Identity solve's relative residual. The plot (and a JSON of
the numbers next to it) goes under outputs/.

    python examples/deq_digits.py            # full run, about a minute
    python examples/deq_digits.py --fast     # CI smoke run
"""

from __future__ import annotations

import json
import time

import support
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm.auto import tqdm

import implicitfn

METHODS = ("implicit", "jacobian-free", "unrolled")


def equilibrium_map(z, hparams, x):
    """T(z) = tanh(z W^T + x U^T + b), for a batch of hidden states z (n, d)."""
    return torch.tanh(z @ hparams["W"].T + x @ hparams["U"].T + hparams["b"])


def anderson(hparams, x, *, memory=5, tol=1e-6, max_steps=200):
    """Anderson acceleration of z <- T(z) from z = 0, on the whole batch as one vector.

    Stops when ||T(z) - z|| <= tol ||T(z)||. Returns (z, steps).
    """
    z = torch.zeros(x.shape[0], hparams["W"].shape[0], dtype=x.dtype)
    iterates, residuals = [], []
    for step in range(1, max_steps + 1):
        tz = equilibrium_map(z, hparams, x)
        residual = tz - z
        if residual.norm() <= tol * tz.norm():
            return tz, step
        iterates.append(tz.flatten())
        residuals.append(residual.flatten())
        iterates, residuals = iterates[-memory:], residuals[-memory:]
        if len(residuals) == 1:
            z = tz
            continue
        # min ||sum_i a_i r_i|| subject to sum a_i = 1, through differences of residuals.
        r = torch.stack(residuals, dim=1)
        dr = r[:, 1:] - r[:, :-1]
        gamma = torch.linalg.lstsq(dr, r[:, -1:]).solution
        g = torch.stack(iterates, dim=1)
        z = (g[:, -1:] - (g[:, 1:] - g[:, :-1]) @ gamma).reshape(z.shape)
    return equilibrium_map(z, hparams, x), max_steps


def forward_solver(z0, hparams, x):
    """The inner solver that `implicit_diff` wraps: the equilibrium (`z0` only gives the shape)."""
    return anderson(hparams, x)[0]


def initial_model(hidden: int, max_norm: float, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(hidden, hidden, generator=generator) / hidden**0.5
    w = w * (0.5 * max_norm / torch.linalg.matrix_norm(w, ord=2))
    return {
        "W": w,
        "U": torch.randn(hidden, 64, generator=generator) / 8.0,
        "b": torch.zeros(hidden),
        "V": torch.randn(support.NUM_CLASSES, hidden, generator=generator) / hidden**0.5,
        "c": torch.zeros(support.NUM_CLASSES),
    }


def adjoints(args) -> dict[str, implicitfn.AbstractAdjoint]:
    return {
        "implicit": implicitfn.ImplicitAdjoint(solver=implicitfn.GMRES(rtol=1e-6, max_steps=200)),
        "jacobian-free": implicitfn.ImplicitAdjoint(solver=implicitfn.Identity()),
        "unrolled": implicitfn.UnrolledAdjoint(steps=args.unroll, learning_rate=1.0),
    }


class DEQ:
    """The classifier under one backward pass; `infos` collects the SolveInfo of each solve."""

    def __init__(self, adjoint):
        self.infos: list[implicitfn.SolveInfo] = []
        if isinstance(adjoint, implicitfn.ImplicitAdjoint):
            adjoint = implicitfn.ImplicitAdjoint(
                solver=adjoint.solver, callback=self.infos.append, inner_rtol=1e-3
            )
        condition = implicitfn.fixed_point(equilibrium_map)
        self.equilibrium = implicitfn.implicit_diff(condition, adjoint=adjoint)(forward_solver)

    def loss(self, model, x, y):
        deq = {k: model[k] for k in ("W", "U", "b")}
        z = self.equilibrium(torch.zeros(x.shape[0], model["W"].shape[0]), deq, x)
        logits = z @ model["V"].T + model["c"]
        return F.cross_entropy(logits, y), logits

    def gradient(self, model, x, y) -> dict[str, torch.Tensor]:
        leaves = {k: v.detach().requires_grad_() for k, v in model.items()}
        loss, _ = self.loss(leaves, x, y)
        return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))


def cosine(a: dict, b: dict, keys=("W", "U", "b")) -> float:
    u = torch.cat([a[k].flatten() for k in keys])
    v = torch.cat([b[k].flatten() for k in keys])
    return float(u @ v / (u.norm() * v.norm()))


def train(name, deq, model, data, args, probes=None):
    """Adam on the cross-entropy; returns the trained model and its history."""
    x, y = data["train"]
    model = {k: v.clone().requires_grad_() for k, v in model.items()}
    optimizer = torch.optim.Adam(model.values(), lr=args.lr)
    history = {"step": [], "loss": [], "seconds": []}
    probe_steps = set(torch.linspace(0, args.steps - 1, args.probes).round().int().tolist())
    for step in tqdm(range(args.steps), desc=name, disable=not args.progress, leave=False):
        if probes is not None and step in probe_steps:
            probes(step, {k: v.detach() for k, v in model.items()})
        start = time.perf_counter()
        optimizer.zero_grad()
        loss, _ = deq.loss(model, x, y)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # keep T a contraction: ||W||_2 <= max_norm
            norm = torch.linalg.matrix_norm(model["W"], ord=2)
            model["W"].mul_(torch.clamp(args.max_norm / norm, max=1.0))
        history["seconds"].append(time.perf_counter() - start)
        history["step"].append(step)
        history["loss"].append(float(loss.detach()))
    return {k: v.detach() for k, v in model.items()}, history


def test_accuracy(model, data) -> float:
    x, y = data["test"]
    with torch.no_grad():
        z = forward_solver(None, model, x)
        return float(support.accuracy(z @ model["V"].T + model["c"], y))


def main() -> None:
    args = support.command_line(
        __doc__,
        "deq_digits.png",
        steps=(300, 30),
        train_size=(1000, 300),
        hidden=(64, 32),
        unroll=5,
        max_norm=0.9,
        lr=1e-2,
        probes=(5, 3),
        seed=0,
    )
    data = support.digits_splits({"train": args.train_size}, seed=args.seed)
    model0 = initial_model(args.hidden, args.max_norm, args.seed)
    deqs = {name: DEQ(adjoint) for name, adjoint in adjoints(args).items()}

    # Cosines against the implicit gradient, at a few points of the implicit run (the same
    # parameters for all three methods), and the Identity solve's measured relative residual.
    comparisons = {
        "step": [],
        "jacobian-free": [],
        "unrolled": [],
        "identity_relative_residual": [],
    }

    def probe(step, model):
        grads = {name: deq.gradient(model, *data["train"]) for name, deq in deqs.items()}
        comparisons["step"].append(step)
        for name in ("jacobian-free", "unrolled"):
            comparisons[name].append(cosine(grads[name], grads["implicit"]))
        info = deqs["jacobian-free"].infos[-1]
        comparisons["identity_relative_residual"].append(float(info.relative_residual))

    results, histories = {}, {}
    for name, deq in deqs.items():
        trained, history = train(
            name, deq, model0, data, args, probe if name == "implicit" else None
        )
        histories[name] = history
        steady = history["seconds"][1:] or history["seconds"]
        results[name] = {
            "test_accuracy": test_accuracy(trained, data),
            "final_train_loss": history["loss"][-1],
            "ms_per_step": 1e3 * sorted(steady)[len(steady) // 2],
        }
        if deq.infos:
            results[name]["median_relative_residual"] = float(
                torch.tensor([float(i.relative_residual) for i in deq.infos]).median()
            )
            results[name]["median_backward_products"] = float(
                torch.tensor([float(i.num_steps) for i in deq.infos]).median()
            )

    print(f"\n{'method':<15}{'test acc':>10}{'train loss':>12}{'ms/step':>10}{'rel. residual':>15}")
    for name, r in results.items():
        residual = r.get("median_relative_residual")
        shown = f"{residual:.2e}" if residual is not None else "-"
        print(
            f"{name:<15}{r['test_accuracy']:>10.3f}{r['final_train_loss']:>12.4f}"
            f"{r['ms_per_step']:>10.1f}{shown:>15}"
        )
    print(
        f"\ncosine of the gradient (W, U, b) with the implicit one (unrolled: K = {args.unroll}):"
    )
    print(f"{'step':>6}{'jacobian-free':>15}{'unrolled':>10}{'Identity rel. residual':>24}")
    for i, step in enumerate(comparisons["step"]):
        print(
            f"{step:>6}{comparisons['jacobian-free'][i]:>15.4f}{comparisons['unrolled'][i]:>10.4f}"
            f"{comparisons['identity_relative_residual'][i]:>24.3f}"
        )

    figure = Figure(figsize=(11, 4), layout="constrained")
    left, right = figure.subplots(1, 2)
    for name in METHODS:
        left.plot(histories[name]["step"], histories[name]["loss"], label=name)
    left.set(xlabel="step", ylabel="training cross-entropy", yscale="log", title="training")
    left.legend()
    for name in ("jacobian-free", "unrolled"):
        right.plot(comparisons["step"], comparisons[name], "o-", label=name)
    right.plot(
        comparisons["step"],
        comparisons["identity_relative_residual"],
        "k--",
        label="Identity relative residual",
    )
    right.set(xlabel="step of the implicit run", title="cosine with the implicit gradient")
    right.legend()
    support.save_figure(figure, args.plot)
    numbers = args.plot.with_suffix(".json")
    arguments = {k: v for k, v in vars(args).items() if k != "plot"}
    numbers.write_text(
        json.dumps({"args": arguments, "results": results, "cosines": comparisons}, indent=2)
    )
    print(f"numbers saved to {numbers}")


if __name__ == "__main__":
    main()
