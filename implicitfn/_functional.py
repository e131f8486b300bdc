"""nn.Module -> a pure function of an explicit parameter TensorDict (the one functional_call).

What the module does in train mode is chosen here, explicitly, per kind of layer: normalisation
layers with batch or running statistics (`batch_norm=`), random layers on or off (`dropout=`).
Whatever is chosen, `apply` never writes to a tensor: torch.func refuses in-place updates of
captured tensors (a BatchNorm's running statistics) under `grad`, `vjp`, `jvp` and `vmap`, and
the caller's module must not change because the library evaluated a condition.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

import torch
from tensordict import TensorDict

__all__ = ["functional_model"]

BatchNormMode = Literal["batch", "running"]
DropoutMode = Literal["off", "on"]
_BATCH_NORM_MODES = ("batch", "running")
_DROPOUT_MODES = ("off", "on")
# The buffers a normalisation layer updates in train mode; everything else is a constant.
_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def _is_norm(module: torch.nn.Module) -> bool:
    """BatchNorm*, SyncBatchNorm, InstanceNorm* and their lazy forms: layers with running statistics."""
    return isinstance(module, torch.nn.modules.batchnorm._NormBase)


def _check_mode(value: Any, name: str, choices: tuple[str, ...], meaning: str) -> None:
    if not isinstance(value, str):
        raise TypeError(
            f"{name}: expected one of {', '.join(map(repr, choices))} ({meaning}), got "
            f"{type(value).__name__} {value!r}."
        )
    if value not in choices:
        raise ValueError(
            f"{name}: expected one of {', '.join(map(repr, choices))} ({meaning}), got {value!r}."
        )


def _flat_names(params: Any, prefix: str = "") -> dict[str, Any]:
    """`{"0.weight": tensor, ...}` from a (nested) TensorDict or mapping keyed like the module."""
    if isinstance(params, TensorDict):
        return dict(params.flatten_keys(".").items())
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, (Mapping, TensorDict)):
            flat.update(_flat_names(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _listed(names: set[str]) -> str:
    shown = sorted(names)
    return ", ".join(map(repr, shown[:5])) + (
        f" and {len(shown) - 5} more" if len(shown) > 5 else ""
    )


@dataclasses.dataclass(frozen=True, eq=False)
class FunctionalModel:
    r"""`apply(params, *inputs, **kwargs)`: a module's forward as a pure function of its parameters.

    Made by [`functional_model`][implicitfn.functional_model], which documents the choices
    (`batch_norm`, `dropout`). It reads nothing but its arguments and the constants in
    `buffers`, and writes nothing: the module it was made from is never touched.

    **Arguments** (of a call):

    - `params`: a TensorDict (or nested dict) keyed like `module.named_parameters()`, with every
      parameter; batched tensors (under `vmap`) and tensors that carry gradients are fine.
    - `*inputs`, `**kwargs`: the module's forward arguments.

    **Returns:** what `module(*inputs, **kwargs)` returns with those parameters, in the chosen
    modes, without updating any buffer.

    ```python
    >>> import torch, implicitfn
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    >>> apply, params = implicitfn.functional_model(net, batch_norm="running")
    >>> apply
    FunctionalModel(batch_norm='running', dropout='off')
    >>> sorted(apply.buffers.keys(include_nested=True, leaves_only=True))
    [('1', 'num_batches_tracked'), ('1', 'running_mean'), ('1', 'running_var')]
    ```
    """

    module: torch.nn.Module = dataclasses.field(repr=False)
    batch_norm: BatchNormMode = "batch"
    dropout: DropoutMode = "off"
    _run: torch.nn.Module = dataclasses.field(init=False, repr=False)
    _buffers: dict[str, torch.Tensor | None] = dataclasses.field(init=False, repr=False)
    _names: frozenset[str] = dataclasses.field(init=False, repr=False)
    _training: dict[str, bool] | None = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.module, torch.nn.Module):
            raise TypeError(
                f"module: expected a torch.nn.Module, got {type(self.module).__name__}; "
                "functional_model turns a module into (apply, params)."
            )
        _check_mode(
            self.batch_norm,
            "batch_norm",
            _BATCH_NORM_MODES,
            "normalise by the batch's statistics, as in train mode, or by the running "
            "statistics, as in eval mode",
        )
        _check_mode(
            self.dropout,
            "dropout",
            _DROPOUT_MODES,
            "random layers act as the identity, as in eval mode, or draw a new mask per call, "
            "as in train mode",
        )
        lazy = [n for n, p in self.module.named_parameters() if torch.nn.parameter.is_lazy(p)]
        if lazy:
            raise ValueError(
                f"module: has uninitialised lazy parameters ({_listed(set(lazy))}); run one "
                "forward pass, module(example_input), before functional_model."
            )
        # Train or eval, per submodule: norm layers follow batch_norm, the others dropout.
        training = {
            name: (self.batch_norm == "batch") if _is_norm(sub) else (self.dropout == "on")
            for name, sub in self.module.named_modules()
        }
        statistics = {
            f"{name}.{stat}" if name else stat
            for name, sub in self.module.named_modules()
            if _is_norm(sub)
            for stat in _STATISTICS
        }
        # A snapshot of the buffers, passed explicitly on every call. With batch statistics the
        # running statistics are None: the layer normalises by the batch and updates nothing.
        buffers = {
            name: None
            if (self.batch_norm == "batch" and name in statistics)
            else b.detach().clone()
            for name, b in self.module.named_buffers()
        }
        run, flags = _structural_copy(self.module), None
        if run is None:  # not deep-copyable: switch the modes around each call instead
            run, flags = self.module, training
        else:
            for name, sub in run.named_modules():
                sub.training = training[name]
        object.__setattr__(self, "_run", run)
        object.__setattr__(self, "_buffers", buffers)
        object.__setattr__(self, "_names", frozenset(n for n, _ in self.module.named_parameters()))
        object.__setattr__(self, "_training", flags)

    @property
    def buffers(self) -> TensorDict:
        """The constants `apply` reads: a detached snapshot of the module's buffers taken when
        it was made (without the running statistics when `batch_norm="batch"`)."""
        present = {name: b for name, b in self._buffers.items() if b is not None}
        return TensorDict(present).unflatten_keys(".") if present else TensorDict({})

    def init_params(self) -> TensorDict:
        """A detached copy of the module's current parameters, keyed like `named_parameters()`."""
        params = {name: p.detach().clone() for name, p in self.module.named_parameters()}
        return TensorDict(params).unflatten_keys(".") if params else TensorDict({})

    def __call__(self, params: TensorDict | Mapping[str, Any], *inputs: Any, **kwargs: Any) -> Any:
        if not isinstance(params, (TensorDict, Mapping)):
            raise TypeError(
                f"params: expected the TensorDict returned by functional_model (or a dict keyed "
                f"like module.named_parameters()), got {type(params).__name__}; call "
                "apply(params, *inputs)."
            )
        flat = _flat_names(params)
        if flat.keys() != self._names:
            missing, unexpected = self._names - flat.keys(), flat.keys() - self._names
            raise ValueError(
                "params: must hold exactly the module's parameters"
                + (f"; missing {_listed(missing)}" if missing else "")
                + (f"; unexpected {_listed(unexpected)}" if unexpected else "")
                + ". Start from the params returned by functional_model (a missing parameter "
                "would silently be read from the module, a constant)."
            )
        with _modes(self._run, self._training):
            return torch.func.functional_call(self._run, (flat, self._buffers), inputs, kwargs)


def _structural_copy(module: torch.nn.Module) -> torch.nn.Module | None:
    """A copy of the module's Python objects that shares every tensor (no memory is copied),
    so its train/eval flags can be set once; None when the module cannot be deep-copied."""
    memo: dict[int, Any] = {}
    for sub in module.modules():
        for value in vars(sub).values():
            if isinstance(value, torch.Tensor):
                memo[id(value)] = value
        for tensors in (sub._parameters, sub._buffers):
            for value in tensors.values():
                if value is not None:
                    memo[id(value)] = value
    try:
        return copy.deepcopy(module, memo)
    except Exception:  # a module holding an object deepcopy refuses (a lock, a generator, ...)
        return None


@contextmanager
def _modes(module: torch.nn.Module, training: dict[str, bool] | None) -> Iterator[None]:
    """Set each submodule's train/eval flag for one call and restore it, when `training` is given."""
    if training is None:
        yield
        return
    modules = dict(module.named_modules())
    saved = {name: sub.training for name, sub in modules.items()}
    try:
        for name, sub in modules.items():
            sub.training = training.get(name, sub.training)
        yield
    finally:
        for name, sub in modules.items():
            sub.training = saved[name]


def functional_model(
    module: torch.nn.Module,
    *,
    batch_norm: BatchNormMode | None = None,
    dropout: DropoutMode = "off",
) -> tuple[Callable[..., Any], TensorDict]:
    r"""Turn `module` into a pure function `apply(params, *inputs)` and a copy of its parameters.

    `apply` is what the training loss, the optimality condition and the validation loss call
    instead of `module(x)`: its parameters are an argument, so the implicit function theorem
    can differentiate with respect to them, and it has no side effects, so torch.func's
    transforms (`grad`, `vjp`, `jvp`, `vmap`) and the curvature products
    ([`Hessian`][implicitfn.Hessian], [`GaussNewton`][implicitfn.GaussNewton]) can call it as
    often as they need. Buffers are explicit too: a detached snapshot taken here, read as
    constants (`apply.buffers`), never written. The module itself is never modified.

    What train mode would do is chosen per kind of layer, explicitly:

    - `batch_norm="batch"` (default): BatchNorm and InstanceNorm layers normalise by the
      statistics of the batch they are given, as in train mode, but never update
      `running_mean`, `running_var` or `num_batches_tracked`. This is the right optimality
      condition when the inner problem is trained in train mode: the condition must be the
      gradient of the loss the inner solver actually minimised, and that loss normalised by
      batch statistics. Reading the running statistics instead would evaluate the gradient of
      another function, at a point that is not its minimum; and running statistics that move
      while the solver trains are state outside $F(w, \lambda, \ldots)$'s arguments, so $F$
      would not be a function the implicit function theorem applies to. Batch statistics
      couple the examples of a batch: give the condition the batch (or the full training set)
      the solver converged on.
    - `batch_norm="running"`: the running statistics stored in the module now, as in eval mode,
      as constants. Right when the inner problem trains with frozen statistics (fine-tuning a
      pretrained network in eval mode). Call `functional_model` again to see statistics the
      module updated later.
    - `dropout="off"` (default): Dropout (and the other layers that are random in train mode:
      AlphaDropout, RReLU, the dropout of RNN and attention layers) acts as in eval mode. Use
      it for the condition: the implicit function theorem needs one operator
      $A = \partial F/\partial w$, and a condition that draws new masks on every product makes
      each product of a Krylov solve come from a different random operator, so the solve does
      not converge, or converges to the wrong answer. If the inner problem was trained with
      dropout, the dropout-off condition is the usual deterministic surrogate of its expected
      loss; to use one mask instead, evaluate the whole backward pass with one seed inside
      `torch.random.fork_rng()`.
    - `dropout="on"`: new masks on every call, as in train mode: for the inner solver's own
      training loss (make a second `apply` for it). Under `vmap` it needs
      `randomness="different"` or `"same"`.

    Other layers run in eval mode with `dropout="off"` and in train mode with `dropout="on"`.

    **Arguments:**

    - `module`: any `torch.nn.Module` (lazy modules after their first forward pass).
    - `batch_norm`: `"batch"` or `"running"` (see above). Left out, it is `"batch"`, with a
      warning when the module is in eval mode and has running statistics (say which you mean).
    - `dropout`: `"off"` or `"on"` (see above).

    **Returns:** `(apply, params)`: `params` is a detached copy of the module's parameters, a
    TensorDict keyed like `module.named_parameters()` (nested by submodule), and
    `apply(params, *inputs, **kwargs)` equals `module(*inputs, **kwargs)` with those parameters,
    BatchNorm in train mode (`"batch"`) or eval mode (`"running"`) and Dropout in eval mode
    (`"off"`) or train mode (`"on"`), without updating any buffer. `apply` also has
    `.buffers` (the constants it reads), `.batch_norm`, `.dropout` and `.module`.

    ```python
    >>> import torch, implicitfn
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4),
    ...                           torch.nn.Tanh(), torch.nn.Dropout(0.5), torch.nn.Linear(4, 1))
    >>> apply, params = implicitfn.functional_model(net)   # batch statistics, dropout off
    >>> sorted(params.keys(include_nested=True, leaves_only=True))
    [('0', 'bias'), ('0', 'weight'), ('1', 'bias'), ('1', 'weight'), ('4', 'bias'), ('4', 'weight')]
    >>> x = torch.randn(8, 3)
    >>> out = apply(params, x)                               # pure: net's buffers are unchanged
    >>> int(net[1].num_batches_tracked), net[1].running_mean.abs().sum().item()
    (0, 0.0)
    >>> grads = torch.func.grad(lambda p: apply(p, x).square().mean())(params)
    >>> evaluate, _ = implicitfn.functional_model(net, batch_norm="running")
    >>> torch.equal(evaluate(params, x), net.eval()(x))
    True
    ```
    """
    if batch_norm is None:
        batch_norm = "batch"
        if (
            isinstance(module, torch.nn.Module)
            and not module.training
            and any(_is_norm(sub) and sub.track_running_stats for sub in module.modules())
        ):
            warnings.warn(
                "functional_model: the module is in eval mode, but batch_norm defaults to "
                "'batch' (normalise by batch statistics, as in train mode); pass "
                "batch_norm='running' to use its running statistics or batch_norm='batch' to "
                "confirm.",
                UserWarning,
                stacklevel=2,
            )
    apply = FunctionalModel(module, batch_norm, dropout)
    return apply, apply.init_params()
