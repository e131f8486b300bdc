"""Minibatch streams and the loop's handling of iterables (docstring examples: test_docs.py)."""

from __future__ import annotations

import functools

import pytest
import torch

from implicitfn import hyperopt


def test_every_example_once_per_epoch_and_seeded():
    x = torch.arange(10.0)
    stream = hyperopt.Minibatches(x, batch_size=4, seed=3, indices=True)
    epoch = [next(stream) for _ in range(3)]  # 4 + 4 + 2
    assert [len(b[0]) for b in epoch] == [4, 4, 2]
    assert sorted(torch.cat([b[1] for b in epoch]).tolist()) == list(range(10))
    again = hyperopt.Minibatches(x, batch_size=4, seed=3, indices=True)
    assert all(torch.equal(next(again)[1], b[1]) for b in epoch)
    other_seed = hyperopt.Minibatches(x, batch_size=4, seed=4, indices=True)
    assert not all(torch.equal(next(other_seed)[1], b[1]) for b in epoch)
    second_epoch = torch.cat([next(stream)[1] for _ in range(3)])
    assert not torch.equal(second_epoch, torch.cat([b[1] for b in epoch]))


def test_full_batches_and_noise():
    x, y = torch.randn(5, 2, dtype=torch.float64), torch.arange(5)
    full = hyperopt.Minibatches(x, y)
    assert all(torch.equal(next(full)[0], x) for _ in range(2))
    noisy = hyperopt.Minibatches(x, y, batch_size=2, noise_shape=(3,))
    xb, yb, noise = next(noisy)
    assert noise.shape == (2, 3) and noise.dtype == torch.float64
    global_state = torch.get_rng_state()
    next(noisy)
    assert torch.equal(torch.get_rng_state(), global_state)  # its own generator


def test_state_dict_restores_the_position_mid_epoch():
    stream = hyperopt.Minibatches(torch.arange(7.0), batch_size=3, noise_shape=(1,))
    next(stream)
    saved = stream.state_dict()
    expected = [next(stream) for _ in range(4)]
    fresh = hyperopt.Minibatches(torch.arange(7.0), batch_size=3, noise_shape=(1,), seed=99)
    fresh.load_state_dict(saved)
    for want in expected:
        got = next(fresh)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    with pytest.raises(ValueError, match="saved for 7 examples"):
        hyperopt.Minibatches(torch.arange(8.0)).load_state_dict(saved)
    with pytest.raises(ValueError, match="state: expected a dict"):
        fresh.load_state_dict({"position": 0})


def test_bad_minibatch_arguments():
    with pytest.raises(ValueError, match="at least one tensor"):
        hyperopt.Minibatches()
    with pytest.raises(ValueError, match="first dimensions differ"):
        hyperopt.Minibatches(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="no examples"):
        hyperopt.Minibatches(torch.zeros(0, 2))
    with pytest.raises(TypeError, match=r"tensors\[1\]"):
        hyperopt.Minibatches(torch.zeros(3), [1, 2, 3])
    with pytest.raises(ValueError, match="batch_size: must be between 1 and the number"):
        hyperopt.Minibatches(torch.zeros(3), batch_size=4)
    with pytest.raises(TypeError, match="batch_size"):
        hyperopt.Minibatches(torch.zeros(3), batch_size=2.0)
    with pytest.raises(ValueError, match="noise_shape"):
        hyperopt.Minibatches(torch.zeros(3), noise_shape=3)


class Passes:
    """A re-iterable (like a DataLoader) that counts how often it was iterated over."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


def test_reiterables_restart_and_batches_must_be_tensors():
    loop = hyperopt.HyperOptimizer(
        train_loss=lambda w, h, x: ((w - x) ** 2).sum() + h * (w**2).sum(),
        val_loss=lambda w, h, x: ((w - x) ** 2).sum(),
        inner_optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        outer_optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        inner_steps=2,
    )
    train = Passes([torch.tensor(1.0), torch.tensor(2.0)])  # single tensors are batches too
    state = loop.init(torch.zeros(()), torch.tensor(0.1), train, Passes([(torch.tensor(1.0),)]))
    loop.step(state)  # draws three training batches from a list of two
    assert train.passes == 2 and state.step == 1
    state = loop.init(torch.zeros(()), torch.tensor(0.1), [{"x": torch.ones(())}], [torch.ones(())])
    with pytest.raises(TypeError, match="train_batches: batches must be tensors or tuples"):
        loop.step(state)
