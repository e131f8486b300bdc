"""nn.Module -> a pure function of an explicit parameter TensorDict (the one functional_call)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tensordict import TensorDict

__all__ = ["functional_model"]


def functional_model(module: torch.nn.Module) -> tuple[Callable[..., Any], TensorDict]:
    """Turn `module` into `apply(params, *inputs)` and a detached copy of its parameters.

    Buffers (batch-norm statistics, say) are read from the module at call time and are not
    differentiated. The module is not modified.

    **Arguments:**

    - `module`: any `torch.nn.Module`.

    **Returns:** `(apply, params)` where `params` is a TensorDict keyed like
    `module.named_parameters()` (nested by submodule) and
    `apply(params, *inputs) == module(*inputs)` with those parameters.

    ```python
    >>> import torch, implicitfn
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> apply, params = implicitfn.functional_model(net)
    >>> apply(params, torch.ones(2, 3)).shape
    torch.Size([2, 1])
    >>> sorted(params.keys(include_nested=True, leaves_only=True))
    [('0', 'bias'), ('0', 'weight'), ('2', 'bias'), ('2', 'weight')]
    ```
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}.")
    params = TensorDict(
        {name: p.detach().clone() for name, p in module.named_parameters()}
    ).unflatten_keys(".")

    def apply(params: TensorDict, *inputs: Any) -> Any:
        flat = dict(params.flatten_keys(".").items())
        buffers = dict(module.named_buffers())
        return torch.func.functional_call(module, (flat, buffers), inputs)

    return apply, params
