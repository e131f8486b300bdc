"""Minibatch streams, the loop's handling of iterables, and the subpackage's docstring examples."""

from __future__ import annotations

import doctest
import re

import pytest
import torch

import implicitfn.hyperopt._data
import implicitfn.hyperopt._families
import implicitfn.hyperopt._history
import implicitfn.hyperopt._loop
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


def test_reiterables_restart_and_batches_must_be_tensors():
    stream = implicitfn.hyperopt._data.BatchStream([(torch.ones(1),), (torch.zeros(1),)], "train_batches")
    assert [float(stream.next()[0]) for _ in range(5)] == [1.0, 0.0, 1.0, 0.0, 1.0]
    single = implicitfn.hyperopt._data.BatchStream([torch.ones(2)], "val_batches")
    assert isinstance(single.next(), tuple)
    wrong = implicitfn.hyperopt._data.BatchStream([{"x": torch.ones(1)}], "val_batches")
    with pytest.raises(TypeError, match="val_batches: batches must be tensors or tuples"):
        wrong.next()


class _FencedParser(doctest.DocTestParser):
    """Docstring examples sit in Markdown code fences; drop the fence lines before parsing."""

    def parse(self, string, name="<string>"):
        return super().parse(re.sub(r"^[ \t]*```[a-z]*[ \t]*$", "", string, flags=re.M), name)


@pytest.mark.parametrize(
    "module",
    [
        implicitfn.hyperopt._data,
        implicitfn.hyperopt._families,
        implicitfn.hyperopt._history,
        implicitfn.hyperopt._loop,
    ],
    ids=lambda m: m.__name__,
)
def test_docstring_examples(module, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    tests = doctest.DocTestFinder(parser=_FencedParser()).find(module)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in tests:
        runner.run(test)
    assert sum(len(t.examples) for t in tests) > 0
    assert runner.failures == 0, f"{runner.failures} failing docstring examples in {module.__name__}"
