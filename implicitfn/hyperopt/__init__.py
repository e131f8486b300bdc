"""The paper's workflow: a hyper-optimisation loop and hyperparameter families.

`HyperOptimizer` alternates inner training steps with implicit hyper steps (Lorraine, Vicol &
Duvenaud 2020, Algorithm 1); the families (`WeightDecay`, `ExampleWeights`,
`LearnedAugmentation`, `DistilledData`) build the training-loss terms and inputs that carry the
hyperparameters. Built on the public API of `implicitfn` only.
"""

from implicitfn.hyperopt._data import Minibatches
from implicitfn.hyperopt._families import (
    DistilledData,
    ExampleWeights,
    LearnedAugmentation,
    WeightDecay,
)
from implicitfn.hyperopt._history import History
from implicitfn.hyperopt._loop import Checkpoint, HyperOptimizer, HyperState
from implicitfn.hyperopt._schedule import GeometricTolerance

__all__ = [
    "Checkpoint",
    "DistilledData",
    "ExampleWeights",
    "GeometricTolerance",
    "History",
    "HyperOptimizer",
    "HyperState",
    "LearnedAugmentation",
    "Minibatches",
    "WeightDecay",
]
