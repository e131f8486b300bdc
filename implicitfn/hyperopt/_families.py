"""Hyperparameter families: small pieces that build training-loss terms, weights or inputs.

Each family is a frozen configuration with an `init(...)` giving the raw (unconstrained)
hyperparameter values, and pure functions of those raw values used inside a training loss.
Families compose by keying their raw values in one hyperparameter TensorDict, e.g.
`TensorDict(decay=decay.init(params), weights=weights.init())`, and calling each piece on its
entry. Everything here runs under `torch.func` transforms.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from tensordict import TensorDict

import implicitfn

__all__ = ["DistilledData", "ExampleWeights", "LearnedAugmentation", "WeightDecay"]

Parametrization = Literal["log", "softplus"]


def _check_positive_float(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name}: expected a float > 0, got {value!r}.")


def _check_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}.")


def _paths_and_shapes(tree: Any) -> list[tuple[str, tuple[int, ...]]]:
    flat = pytree.tree_flatten_with_path(tree)[0]
    return [(pytree.keystr(path), tuple(leaf.shape)) for path, leaf in flat]


@dataclasses.dataclass(frozen=True)
class WeightDecay:
    r"""An $L_2$ penalty $\tfrac12\sum_i \lambda_i w_i^2$ with learned, positive strengths.

    Three granularities: one $\lambda$ for all parameters (`"global"`), one per tensor
    (`"per_tensor"`) or one per weight (`"per_weight"`, the paper's setting with as many
    hyperparameters as parameters). The strengths are kept positive by the parametrisation
    $\lambda = e^{r}$ (`"log"`) or $\lambda = \log(1 + e^{r})$ (`"softplus"`) of the raw value
    $r$ that is optimised.

    **Arguments:**

    - `granularity`: `"global"`, `"per_tensor"` or `"per_weight"`.
    - `parametrization`: `"log"` (multiplicative steps; good across orders of magnitude) or
      `"softplus"` (close to linear for large $\lambda$, can approach 0).
    - `initial`: the initial strength $\lambda_0 > 0$.

    ```python
    >>> import torch
    >>> from implicitfn import hyperopt
    >>> decay = hyperopt.WeightDecay("per_tensor", initial=0.1)
    >>> params = {"w": torch.ones(3), "b": torch.ones(1)}
    >>> raw = decay.init(params)
    >>> decay.strength(raw)["w"]
    tensor(0.1000)
    >>> decay.penalty(raw, params)               # 0.5 * 0.1 * (3 + 1)
    tensor(0.2000)
    ```
    """

    granularity: Literal["global", "per_tensor", "per_weight"] = "per_weight"
    parametrization: Parametrization = "log"
    initial: float = 1e-3

    def __post_init__(self) -> None:
        if self.granularity not in ("global", "per_tensor", "per_weight"):
            raise ValueError(
                f"granularity: expected 'global', 'per_tensor' or 'per_weight', got {self.granularity!r}."
            )
        if self.parametrization not in ("log", "softplus"):
            raise ValueError(
                f"parametrization: expected 'log' or 'softplus', got {self.parametrization!r}."
            )
        _check_positive_float(self.initial, "initial")

    def init(self, params: Any) -> Any:
        """The raw hyperparameters for `params`, all giving the strength `initial`.

        **Arguments:**

        - `params`: the parameters to decay (a TensorDict, dict of tensors or tensor); pass a
          subset (e.g. `params.exclude("bias")`) to leave some undecayed.

        **Returns:** a 0-dim tensor (`"global"`), or a tree like `params` with 0-dim leaves
        (`"per_tensor"`) or leaves shaped like the parameters (`"per_weight"`).
        """
        flat = pytree.tree_leaves(params)
        if not flat or not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in flat):
            raise TypeError(
                "params: expected a tree of floating-point tensors with at least one leaf."
            )
        raw = (
            math.log(self.initial)
            if self.parametrization == "log"
            else math.log(math.expm1(self.initial))
        )
        if self.granularity == "global":
            return torch.full((), raw, dtype=flat[0].dtype, device=flat[0].device)
        if self.granularity == "per_tensor":
            return pytree.tree_map(
                lambda t: torch.full((), raw, dtype=t.dtype, device=t.device), params
            )
        return pytree.tree_map(lambda t: torch.full_like(t, raw), params)

    def strength(self, raw: Any) -> Any:
        r"""The positive strengths $\lambda$ for raw values $r$ (same structure as `raw`)."""
        positive = torch.exp if self.parametrization == "log" else F.softplus
        return pytree.tree_map(positive, raw)

    def penalty(self, raw: Any, params: Any) -> torch.Tensor:
        r"""$\tfrac12\sum_i \lambda_i w_i^2$, the term to add to the training loss.

        **Arguments:**

        - `raw`: the raw hyperparameters made by [`init`][implicitfn.hyperopt.WeightDecay.init].
        - `params`: the parameters, with the structure given to `init`.

        **Returns:** a 0-dim tensor.
        """
        weights = pytree.tree_leaves(params)
        if self.granularity == "global":
            if not isinstance(raw, torch.Tensor) or raw.ndim != 0:
                raise ValueError(
                    "raw: a 'global' weight decay takes one 0-dim tensor; use init(params)."
                )
            return 0.5 * self.strength(raw) * sum((w**2).sum() for w in weights)
        expected = _paths_and_shapes(params)
        if self.granularity == "per_tensor":
            expected = [(path, ()) for path, _ in expected]
        if _paths_and_shapes(raw) != expected:
            raise ValueError(
                f"raw: structure {_paths_and_shapes(raw)} does not fit a {self.granularity!r} decay "
                f"of params {_paths_and_shapes(params)}; make it with init(params) on the same params."
            )
        strengths = pytree.tree_leaves(self.strength(raw))
        return 0.5 * sum((s * w**2).sum() for s, w in zip(strengths, weights, strict=True))


@dataclasses.dataclass(frozen=True)
class ExampleWeights:
    r"""One learned weight $\sigma(r_i) \in (0, 1)$ per training example.

    The training loss becomes $\frac1{|B|}\sum_{i \in B} \sigma(r_i)\,\ell_i(w)$ over a batch
    $B$; the hypergradient lowers the weight of examples whose fit hurts the validation loss
    (mislabelled ones, say). Batches must carry the examples' indices, e.g.
    [`Minibatches`][implicitfn.hyperopt.Minibatches]`(..., indices=True)`.

    **Arguments:**

    - `num_examples`: $N$, the size of the training set.
    - `initial`: the initial weight $\sigma(r_0) \in (0, 1)$ of every example.

    ```python
    >>> import torch
    >>> from implicitfn import hyperopt
    >>> weights = hyperopt.ExampleWeights(num_examples=4, initial=0.5)
    >>> raw = weights.init()
    >>> losses, indices = torch.tensor([1.0, 3.0]), torch.tensor([0, 2])
    >>> weights.weighted_mean(raw, losses, indices)       # (0.5 * 1 + 0.5 * 3) / 2
    tensor(1.)
    ```
    """

    num_examples: int
    initial: float = 0.5

    def __post_init__(self) -> None:
        _check_positive_int(self.num_examples, "num_examples")
        if (
            isinstance(self.initial, bool)
            or not isinstance(self.initial, (int, float))
            or not 0 < self.initial < 1
        ):
            raise ValueError(
                f"initial: expected a weight strictly between 0 and 1, got {self.initial!r}."
            )

    def init(
        self, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """The raw values $r$ (logits), shape `(num_examples,)`, all giving the weight `initial`."""
        logit = math.log(self.initial / (1 - self.initial))
        return torch.full((self.num_examples,), logit, dtype=dtype, device=device)

    def weights(self, raw: torch.Tensor) -> torch.Tensor:
        r"""All $N$ weights $\sigma(r)$."""
        return torch.sigmoid(raw)

    def weighted_mean(
        self, raw: torch.Tensor, losses: torch.Tensor, indices: torch.Tensor
    ) -> torch.Tensor:
        r"""$\frac1{|B|}\sum_{i \in B} \sigma(r_i)\,\ell_i$ for a batch's per-example losses.

        **Arguments:**

        - `raw`: the raw values made by [`init`][implicitfn.hyperopt.ExampleWeights.init].
        - `losses`: per-example losses of the batch, shape `(batch,)` (e.g. `reduction="none"`).
        - `indices`: the batch's example indices in $0..N-1$, shape `(batch,)`.

        **Returns:** a 0-dim tensor.
        """
        if raw.shape != (self.num_examples,):
            raise ValueError(
                f"raw: expected shape ({self.num_examples},), got {tuple(raw.shape)}; use init()."
            )
        if losses.ndim != 1 or indices.shape != losses.shape:
            raise ValueError(
                f"losses, indices: expected two 1-dim tensors of the batch size, got shapes "
                f"{tuple(losses.shape)} and {tuple(indices.shape)}; compute the losses with "
                "reduction='none'."
            )
        if indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"indices: expected an integer tensor, got {indices.dtype}.")
        return (torch.sigmoid(raw[indices]) * losses).mean()


@dataclasses.dataclass(frozen=True)
class LearnedAugmentation:
    r"""A data-augmentation network whose weights $\phi$ are hyperparameters.

    Training inputs are replaced by $\tilde x = x + g_\phi(x, \ldots)$, where `network` computes
    the perturbation $g_\phi$ from the input and any extra inputs (typically per-example noise,
    so that one network yields many augmentations). Zero-initialise its last layer to start
    from the identity. Give stochastic inputs as part of the batch (e.g.
    [`Minibatches`][implicitfn.hyperopt.Minibatches]`(..., noise_shape=(k,))`), not drawn inside
    the loss: implicit differentiation evaluates the training loss several times and they must
    agree.

    **Arguments:**

    - `network`: a `torch.nn.Module` called as `network(x, *extra)`, returning a tensor shaped
      like `x`. It is not modified; its current weights are the initial hyperparameters.

    ```python
    >>> import torch
    >>> from implicitfn import hyperopt
    >>> class Shift(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.scale = torch.nn.Parameter(torch.zeros(()))
    ...     def forward(self, x, noise):
    ...         return self.scale * noise
    >>> augmentation = hyperopt.LearnedAugmentation(Shift())
    >>> raw = augmentation.init()
    >>> x, noise = torch.ones(2, 3), torch.randn(2, 3)
    >>> torch.equal(augmentation.augment(raw, x, noise), x)     # identity at scale 0
    True
    ```
    """

    network: torch.nn.Module
    _apply: Any = dataclasses.field(init=False, repr=False, compare=False)
    _initial: TensorDict = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.network, torch.nn.Module):
            raise TypeError(
                f"network: expected a torch.nn.Module, got {type(self.network).__name__}."
            )
        apply, initial = implicitfn.functional_model(self.network)
        if initial.is_empty():
            raise ValueError("network: has no parameters, so there is nothing to learn.")
        object.__setattr__(self, "_apply", apply)
        object.__setattr__(self, "_initial", initial)

    def init(self) -> TensorDict:
        """A copy of the network's weights, the raw hyperparameters (keyed like its parameters)."""
        return self._initial.clone()

    def augment(self, raw: TensorDict, x: torch.Tensor, *extra: Any) -> torch.Tensor:
        r"""$x + g_\phi(x, \ldots)$ with the network weights `raw`."""
        perturbation = self._apply(raw, x, *extra)
        if perturbation.shape != x.shape:
            raise ValueError(
                f"network: returned shape {tuple(perturbation.shape)} for inputs of shape "
                f"{tuple(x.shape)}; it must return a perturbation shaped like its input."
            )
        return x + perturbation


@dataclasses.dataclass(frozen=True)
class DistilledData:
    r"""Dataset distillation: a few learned synthetic examples that the inner problem trains on.

    The hyperparameters are the synthetic inputs ($\text{per\_class}$ per class) and, with
    `learn_labels`, logits of soft labels. The inner problem trains on
    ([`inputs`][implicitfn.hyperopt.DistilledData.inputs], [`targets`][implicitfn.hyperopt.DistilledData.targets]),
    the outer loss is measured on real data. Pass them through `hparams` (as the loop does) or
    as `*args` of an [`implicit_diff`][implicitfn.implicit_diff]-decorated solver: gradients
    reach both.

    **Arguments:**

    - `num_classes`: $C \ge 2$.
    - `per_class`: synthetic examples per class.
    - `learn_labels`: also learn soft labels (initially 0.9 on the example's class).

    ```python
    >>> import torch
    >>> from implicitfn import hyperopt
    >>> distilled = hyperopt.DistilledData(num_classes=3, learn_labels=True)
    >>> raw = distilled.init(torch.zeros(3, 4))
    >>> distilled.inputs(raw).shape, distilled.labels.tolist()
    (torch.Size([3, 4]), [0, 1, 2])
    >>> distilled.targets(raw)[0]
    tensor([0.9000, 0.0500, 0.0500])
    ```
    """

    num_classes: int
    per_class: int = 1
    learn_labels: bool = False

    def __post_init__(self) -> None:
        _check_positive_int(self.num_classes, "num_classes")
        if self.num_classes < 2:
            raise ValueError(f"num_classes: expected at least 2 classes, got {self.num_classes}.")
        _check_positive_int(self.per_class, "per_class")
        if not isinstance(self.learn_labels, bool):
            raise TypeError(
                f"learn_labels: expected a bool, got {type(self.learn_labels).__name__}."
            )

    @property
    def labels(self) -> torch.Tensor:
        """The class of each synthetic example: `per_class` examples of class 0, then of 1, ..."""
        return torch.arange(self.num_classes).repeat_interleave(self.per_class)

    def init(self, inputs: torch.Tensor) -> TensorDict:
        """The raw hyperparameters, starting from the synthetic `inputs` given.

        **Arguments:**

        - `inputs`: initial synthetic inputs, shape `(num_classes * per_class, *features)`,
          ordered like [`labels`][implicitfn.hyperopt.DistilledData.labels] (random noise, class
          means or real examples, say). Copied, not modified.

        **Returns:** a TensorDict with `"inputs"` and, with `learn_labels`, `"label_logits"`.
        """
        count = self.num_classes * self.per_class
        if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
            raise TypeError("inputs: expected a floating-point tensor of initial synthetic inputs.")
        if inputs.ndim < 1 or len(inputs) != count:
            raise ValueError(
                f"inputs: expected {count} (num_classes * per_class) rows, got shape "
                f"{tuple(inputs.shape)}."
            )
        raw = TensorDict({"inputs": inputs.detach().clone()})
        if self.learn_labels:
            one_hot = F.one_hot(self.labels.to(inputs.device), self.num_classes).bool()
            # softmax(log p) = p: start from soft labels with 0.9 on the example's class.
            probabilities = torch.where(one_hot, 0.9, 0.1 / (self.num_classes - 1)).to(inputs.dtype)
            raw["label_logits"] = probabilities.log()
        return raw

    def inputs(self, raw: TensorDict) -> torch.Tensor:
        """The synthetic inputs."""
        return raw["inputs"]

    def targets(self, raw: TensorDict) -> torch.Tensor:
        """Class probabilities, shape `(num_classes * per_class, num_classes)`: learned soft
        labels, or one-hot labels without `learn_labels`. Use with
        `torch.nn.functional.cross_entropy(logits, targets)`."""
        inputs = raw["inputs"]
        if self.learn_labels:
            return torch.softmax(raw["label_logits"], dim=-1)
        return F.one_hot(self.labels.to(inputs.device), self.num_classes).to(inputs.dtype)
