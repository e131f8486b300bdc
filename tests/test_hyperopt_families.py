"""Hyperparameter families: hypergradients against finite differences, composition, bad input.

Each inner problem is convex (a linear classifier with L2 decay), solved to machine precision by
Newton's method in float64, so central differences of the validation loss at the re-solved
optimum are an independent reference for the implicit hypergradient.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from tensordict import TensorDict

import implicitfn
from implicitfn import hyperopt

DTYPE = torch.float64
CLASSES, FEATURES = 3, 4
SOLVER = implicitfn.CG(max_steps=200, rtol=1e-12)


def newton(loss, params, hparams, *args, max_steps=30):
    """The minimiser of a smooth strictly convex `loss` over `params`, to machine precision."""
    flat, unravel = implicitfn.tree_ravel(params)
    hparams = pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, hparams)

    def of_flat(v):
        return loss(unravel(v), hparams, *args)

    for _ in range(max_steps):
        gradient = torch.func.grad(of_flat)(flat)
        if gradient.norm() < 1e-14:
            break
        # The vectorised autograd Hessian is ~40x faster than torch.func.hessian here.
        hessian = torch.autograd.functional.hessian(of_flat, flat, vectorize=True)
        flat = flat - torch.linalg.solve(hessian, gradient)
    return unravel(flat.detach())


def assert_matches_finite_differences(train_loss, val_loss, params, hparams, train_args, val_args):
    """The implicit hypergradient against central differences along random directions."""
    w_star = newton(train_loss, params, hparams, *train_args)
    hypergradient, info = implicitfn.hypergradient(
        train_loss,
        val_loss,
        w_star,
        hparams,
        inner_args=train_args,
        outer_args=val_args,
        adjoint=implicitfn.ImplicitAdjoint(solver=SOLVER),
    )
    assert bool(info.successful)
    eps = 1e-5
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        direction = pytree.tree_map(
            lambda t: torch.randn(t.shape, generator=gen, dtype=DTYPE), hparams
        )

        def val_at(step, direction):
            moved = implicitfn.tree_axpy(step, direction, hparams)
            return val_loss(newton(train_loss, w_star, moved, *train_args), moved, *val_args)

        numeric = (val_at(eps, direction) - val_at(-eps, direction)) / (2 * eps)
        analytic = implicitfn.tree_vdot(hypergradient, direction)
        torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-8)
    return hypergradient


def classification_data(n, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=gen, dtype=DTYPE)
    y = torch.randint(CLASSES, (n,), generator=gen)
    return x, y


def linear_params():
    return TensorDict(
        weight=torch.zeros(CLASSES, FEATURES, dtype=DTYPE), bias=torch.zeros(CLASSES, dtype=DTYPE)
    )


def logits(params, x):
    return x @ params["weight"].T + params["bias"]


def cross_entropy(params, hparams, x, y):
    return F.cross_entropy(logits(params, x), y)


@pytest.mark.parametrize("granularity", ["global", "per_tensor", "per_weight"])
@pytest.mark.parametrize("parametrization", ["log", "softplus"])
def test_weight_decay_hypergradient(granularity, parametrization):
    decay = hyperopt.WeightDecay(granularity, parametrization, initial=0.05)

    def train_loss(params, hparams, x, y):
        return cross_entropy(params, hparams, x, y) + decay.penalty(hparams["decay"], params)

    params = linear_params()
    hparams = TensorDict(decay=decay.init(params))
    # Perturb the strengths so that per-tensor / per-weight gradients differ from each other.
    hparams = hparams.apply(lambda t: t + 0.3 * torch.randn(t.shape, dtype=DTYPE))
    assert_matches_finite_differences(
        train_loss,
        cross_entropy,
        params,
        hparams,
        classification_data(20, 1),
        classification_data(15, 2),
    )


def test_weight_decay_strengths_and_structure():
    params = {"a": torch.ones(2, 3), "b": torch.ones(4)}
    for parametrization in ("log", "softplus"):
        decay = hyperopt.WeightDecay("per_weight", parametrization, initial=0.3)
        strengths = decay.strength(decay.init(params))
        torch.testing.assert_close(strengths["a"], torch.full((2, 3), 0.3))
    per_tensor = hyperopt.WeightDecay("per_tensor", initial=2.0)
    raw = per_tensor.init(params)
    assert raw["a"].shape == () and raw["b"].shape == ()
    torch.testing.assert_close(per_tensor.penalty(raw, params), torch.tensor(0.5 * 2.0 * 10))
    with pytest.raises(ValueError, match="does not fit a 'per_weight' decay"):
        hyperopt.WeightDecay("per_weight").penalty(raw, params)
    with pytest.raises(ValueError, match="'global' weight decay takes one 0-dim tensor"):
        hyperopt.WeightDecay("global").penalty(raw, params)
    with pytest.raises(ValueError, match="granularity"):
        hyperopt.WeightDecay("per_layer")
    with pytest.raises(ValueError, match="parametrization"):
        hyperopt.WeightDecay(parametrization="square")
    with pytest.raises(ValueError, match="initial"):
        hyperopt.WeightDecay(initial=0.0)
    with pytest.raises(TypeError, match="params"):
        hyperopt.WeightDecay().init({"a": torch.ones(2, dtype=torch.int64)})


def test_example_weights_hypergradient():
    x, y = classification_data(12, 3)
    weights = hyperopt.ExampleWeights(num_examples=12, initial=0.7)
    decay = hyperopt.WeightDecay("global", initial=0.1)

    def train_loss(params, hparams, x, y, indices):
        losses = F.cross_entropy(logits(params, x), y, reduction="none")
        return weights.weighted_mean(hparams["weights"], losses, indices) + decay.penalty(
            hparams["decay"], params
        )

    params = linear_params()
    hparams = TensorDict(weights=weights.init(dtype=DTYPE), decay=decay.init(params))
    hparams["weights"] = hparams["weights"] + torch.linspace(-1, 1, 12, dtype=DTYPE)
    # A batch of 8 of the 12 examples: the other weights get exactly zero hypergradient.
    batch = torch.tensor([0, 2, 3, 5, 7, 8, 10, 11])
    gradient = assert_matches_finite_differences(
        train_loss,
        cross_entropy,
        params,
        hparams,
        (x[batch], y[batch], batch),
        classification_data(15, 4),
    )
    assert torch.all(gradient["weights"][[1, 4, 6, 9]] == 0)
    assert torch.all(gradient["weights"][batch] != 0)


def test_example_weights_checks():
    weights = hyperopt.ExampleWeights(num_examples=3)
    torch.testing.assert_close(weights.weights(weights.init()), torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="reduction='none'"):
        weights.weighted_mean(weights.init(), torch.ones(()), torch.zeros(1, dtype=torch.int64))
    with pytest.raises(TypeError, match="indices"):
        weights.weighted_mean(weights.init(), torch.ones(2), torch.zeros(2))
    with pytest.raises(ValueError, match="raw: expected shape"):
        weights.weighted_mean(torch.zeros(4), torch.ones(2), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="initial"):
        hyperopt.ExampleWeights(3, initial=1.0)
    with pytest.raises(ValueError, match="num_examples"):
        hyperopt.ExampleWeights(0)


class NoisyAffine(torch.nn.Module):
    """A small augmentation network: a perturbation from the input and per-example noise."""

    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Linear(FEATURES + 2, FEATURES, dtype=DTYPE)

    def forward(self, x, noise):
        return torch.tanh(self.mix(torch.cat([x, noise], dim=-1)))


def test_learned_augmentation_hypergradient():
    torch.manual_seed(0)
    augmentation = hyperopt.LearnedAugmentation(NoisyAffine())
    decay = hyperopt.WeightDecay("global", initial=0.1)

    def train_loss(params, hparams, x, y, noise):
        augmented = augmentation.augment(hparams["augmentation"], x, noise)
        inputs, labels = torch.cat([x, augmented]), torch.cat([y, y])
        return cross_entropy(params, hparams, inputs, labels) + decay.penalty(
            hparams["decay"], params
        )

    params = linear_params()
    hparams = TensorDict(augmentation=augmentation.init(), decay=decay.init(params))
    x, y = classification_data(16, 5)
    noise = torch.randn(16, 2, dtype=DTYPE)
    assert_matches_finite_differences(
        train_loss, cross_entropy, params, hparams, (x, y, noise), classification_data(15, 6)
    )


def test_learned_augmentation_checks():
    class WrongShape(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.layer(x)

    augmentation = hyperopt.LearnedAugmentation(WrongShape())
    raw = augmentation.init()
    assert set(raw.keys(include_nested=True, leaves_only=True)) == {
        ("layer", "weight"),
        ("layer", "bias"),
    }
    with pytest.raises(ValueError, match="perturbation shaped like its input"):
        augmentation.augment(raw, torch.ones(5, 3))
    with pytest.raises(TypeError, match="network"):
        hyperopt.LearnedAugmentation(lambda x: x)
    with pytest.raises(ValueError, match="no parameters"):
        hyperopt.LearnedAugmentation(torch.nn.ReLU())


@pytest.mark.parametrize("learn_labels", [False, True])
def test_dataset_distillation_hypergradient(learn_labels):
    distilled = hyperopt.DistilledData(num_classes=CLASSES, per_class=2, learn_labels=learn_labels)
    decay = hyperopt.WeightDecay("global", initial=0.1)

    def train_loss(params, hparams):
        data = hparams["distilled"]
        predictions = logits(params, distilled.inputs(data))
        return F.cross_entropy(predictions, distilled.targets(data)) + decay.penalty(
            hparams["decay"], params
        )

    gen = torch.Generator().manual_seed(7)
    params = linear_params()
    hparams = TensorDict(
        distilled=distilled.init(torch.randn(6, FEATURES, generator=gen, dtype=DTYPE)),
        decay=decay.init(params),
    )
    assert_matches_finite_differences(
        train_loss, cross_entropy, params, hparams, (), classification_data(15, 8)
    )


def test_distilled_inputs_through_args_get_the_same_gradient():
    """Distilled inputs as data arguments of a decorated solver: gradients reach the raw values."""
    distilled = hyperopt.DistilledData(num_classes=CLASSES, per_class=1)
    decay = hyperopt.WeightDecay("global", initial=0.1)
    decay_raw = decay.init(linear_params())

    def train_loss(params, decay_raw, inputs, targets):
        return F.cross_entropy(logits(params, inputs), targets) + decay.penalty(decay_raw, params)

    @implicitfn.implicit_diff(
        implicitfn.stationarity(train_loss), adjoint=implicitfn.ImplicitAdjoint(solver=SOLVER)
    )
    def train(params, decay_raw, inputs, targets):
        return newton(train_loss, params, decay_raw, inputs, targets)

    x_val, y_val = classification_data(15, 9)
    raw = distilled.init(torch.randn(3, FEATURES, dtype=DTYPE)).apply(lambda t: t.requires_grad_())
    w_star = train(linear_params(), decay_raw, distilled.inputs(raw), distilled.targets(raw))
    cross_entropy(w_star, None, x_val, y_val).backward()

    def through_hparams(params, hparams):
        return train_loss(params, decay_raw, distilled.inputs(hparams), distilled.targets(hparams))

    expected, _ = implicitfn.hypergradient(
        through_hparams,
        lambda p, h: cross_entropy(p, h, x_val, y_val),
        w_star.detach(),
        raw.detach(),
        adjoint=implicitfn.ImplicitAdjoint(solver=SOLVER),
    )
    torch.testing.assert_close(raw["inputs"].grad, expected["inputs"])


def test_distilled_data_checks():
    distilled = hyperopt.DistilledData(num_classes=2, per_class=2)
    raw = distilled.init(torch.zeros(4, 3))
    assert distilled.labels.tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(distilled.targets(raw), F.one_hot(distilled.labels, 2).float())
    assert "label_logits" not in raw.keys()
    with pytest.raises(ValueError, match="expected 4"):
        distilled.init(torch.zeros(3, 3))
    with pytest.raises(TypeError, match="inputs"):
        distilled.init(torch.zeros(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least 2 classes"):
        hyperopt.DistilledData(num_classes=1)


def test_families_compose_in_one_hyperparameter_tree():
    """Weight decay, example weights and augmentation in one loss, optimised by the loop."""
    x, y = classification_data(24, 10)
    x_val, y_val = classification_data(20, 11)
    decay = hyperopt.WeightDecay("per_tensor", "softplus", initial=0.05)
    weights = hyperopt.ExampleWeights(num_examples=24, initial=0.8)
    augmentation = hyperopt.LearnedAugmentation(NoisyAffine())

    def train_loss(params, hparams, x, y, indices, noise):
        augmented = augmentation.augment(hparams["augmentation"], x, noise)
        losses = F.cross_entropy(logits(params, augmented), y, reduction="none")
        return weights.weighted_mean(hparams["weights"], losses, indices) + decay.penalty(
            hparams["decay"], params
        )

    params = linear_params()
    hparams = TensorDict(
        decay=decay.init(params),
        weights=weights.init(dtype=DTYPE),
        augmentation=augmentation.init(),
    )
    loop = hyperopt.HyperOptimizer(
        train_loss=train_loss,
        val_loss=cross_entropy,
        inner_optimizer=lambda t: torch.optim.SGD(t, lr=0.5),
        outer_optimizer=lambda t: torch.optim.Adam(t, lr=0.05),
        inner_steps=10,
        adjoint=implicitfn.ImplicitAdjoint(
            solver=implicitfn.CG(max_steps=20, rtol=0), inner_rtol=None
        ),
    )
    state = loop.init(
        params,
        hparams,
        hyperopt.Minibatches(x, y, batch_size=12, indices=True, noise_shape=(2,)),
        hyperopt.Minibatches(x_val, y_val),
    )
    history = loop.run(state, outer_steps=6, progress=False)
    assert history["val_loss"][-1] < history["val_loss"][0]
    moved = (state.hparams - hparams).abs().apply(lambda t: t.max().reshape(1))
    assert all(bool(v > 0) for v in moved.values(include_nested=True, leaves_only=True))
