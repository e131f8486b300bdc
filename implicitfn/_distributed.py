r"""Data-parallel backward passes: averages over the ranks of a `torch.distributed` process group.

The model: the data are sharded over $R$ ranks and every loss is the mean over ranks of the
rank's local loss, $L = \frac1R \sum_r L_r$. Then every quantity of the implicit backward pass
is the mean of the local ones: the cotangent $\bar w = \frac1R\sum_r \bar w_r$, the operator
$A = \frac1R \sum_r A_r$ (so each product $A v$ is one all-reduce of the local products) and
the mixed product $B^\top v = \frac1R \sum_r B_r^\top v$ for the (replicated) hyperparameters.
After the first reduction every vector a solver touches is the same on every rank, so every
scalar it computes (norms, inner products, residuals) and every branch it takes is too.

Everything goes through `torch.distributed.all_reduce` (a sum, then a division by $R$: gloo has
no `AVG`), on tensors where they already live, so gloo on CPU and nccl on GPU need no change.
The leaves of a tree are joined into one buffer per dtype and device: one all-reduce per product.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

from implicitfn._operator import AbstractLinearOperator, AbstractWrappedOperator
from implicitfn._tree import Tree

__all__ = ["all_reduce_gradients"]


def _is_process_group(value: Any) -> bool:
    return dist.is_available() and isinstance(value, dist.ProcessGroup)


def _check_group(group: Any, name: str) -> None:
    """Raise unless `group` (None: the default group) can be used from this process."""
    if not dist.is_available():
        raise RuntimeError(
            f"{name}: this PyTorch build has no torch.distributed; use a build with it or run "
            "without data parallelism."
        )
    if not dist.is_initialized():
        raise ValueError(
            f"{name}: no default process group; call torch.distributed.init_process_group(...) "
            "first (torchrun sets the environment for it), or turn data parallelism off."
        )
    if group is not None and dist.get_rank(group) < 0:
        raise ValueError(f"{name}: this rank is not a member of the given process group.")


class _MeanOverRanks(torch.autograd.Function):
    r"""$y = \frac1R\sum_r x_r$ on every rank, with autograd, forward-mode and vmap rules.

    The c10d ops have neither a batching rule nor a derivative, and the averaged products are
    taken inside `torch.func.vmap` (`Dense`, the Jacobi preconditioner, batches of problems) and,
    with `create_graph=True`, differentiated. The map is its own adjoint: the backward and the
    tangent are the same average. Under vmap the whole batch goes in one all-reduce.
    This is a communication primitive, not a second implicit-differentiation boundary.
    """

    @staticmethod
    def forward(x: torch.Tensor, group: Any) -> torch.Tensor:
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out.div_(dist.get_world_size(group))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _MeanOverRanks.apply(grad, ctx.group), None

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor, _group: None) -> torch.Tensor:
        return _MeanOverRanks.apply(tangent, ctx.group)

    @staticmethod
    def vmap(info, in_dims, x: torch.Tensor, group: Any):
        return _MeanOverRanks.apply(x, group), in_dims[0]


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """Averages over the ranks of `group` (None: the default process group)."""

    group: Any = None

    def __post_init__(self) -> None:
        if self.group is not None and not _is_process_group(self.group):
            raise TypeError(
                f"group: expected a torch.distributed.ProcessGroup or None, got "
                f"{type(self.group).__name__}."
            )

    def check(self) -> None:
        """Raise before any computing when there is no usable process group."""
        _check_group(self.group, "distributed")

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    def mean(self, tree: Tree) -> Tree:
        """The tree averaged over ranks: one all-reduce per dtype and device; None leaves stay."""
        flat, spec = pytree.tree_flatten(tree)
        buckets: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for i, leaf in enumerate(flat):
            if isinstance(leaf, torch.Tensor):
                buckets.setdefault((leaf.dtype, leaf.device), []).append(i)
        out = list(flat)
        for positions in buckets.values():
            pieces = [flat[i].reshape(-1) for i in positions]
            joined = _MeanOverRanks.apply(torch.cat(pieces), self.group)
            for i, piece in zip(positions, joined.split([p.numel() for p in pieces]), strict=True):
                out[i] = piece.view_as(flat[i])
        return pytree.tree_unflatten(out, spec)

    def operator(self, operator: AbstractLinearOperator) -> AbstractLinearOperator:
        return MeanOperator(operator, self)

    def input_gradients(self, products: list[Any], num_hparams: int) -> list[Any]:
        r"""The boundary's gradients for the leaves of `(hparams, args)`, from the local $-B_r^\top v$.

        The hyperparameters are replicated: their gradient is the mean over ranks. The
        arguments are this rank's shard of the data: the derivative of the mean loss with
        respect to them is the local product divided by $R$ (no communication).
        """
        head = self.mean(list(products[:num_hparams]))
        scale = 1.0 / self.world_size
        tail = [None if p is None else p * scale for p in products[num_hparams:]]
        return head + tail


@dataclasses.dataclass(frozen=True)
class MeanOperator(AbstractWrappedOperator):
    r"""$\frac1R\sum_r A_r$: the rank's operator with every product averaged over ranks."""

    reduction: DataParallel

    def mv(self, vector: Tree) -> Tree:
        return self.reduction.mean(self.operator.mv(vector))


def data_parallel(distributed: Any) -> DataParallel | None:
    """Read the `distributed=` argument of `implicit_diff` and `hypergradient`."""
    if distributed is False:
        return None
    if distributed is True:
        return DataParallel()
    if _is_process_group(distributed):
        return DataParallel(distributed)
    raise TypeError(
        "distributed: expected False (default), True (the default process group) or a "
        f"torch.distributed.ProcessGroup, got {type(distributed).__name__}."
    )


def all_reduce_gradients(hparams: Tree, *, group: Any = None) -> None:
    r"""Average the `.grad` of every leaf of `hparams` over the ranks, in place.

    With `distributed=True`, [`implicit_diff`][implicitfn.implicit_diff] gives each
    hyperparameter the implicit part of the gradient already averaged (the same on every
    rank), but the direct part $\partial L_V/\partial\lambda$ comes from the rank's own
    validation loss: call this after `.backward()` to average the whole gradient, as DDP does
    for parameters. Averaging a gradient that is already the same everywhere leaves it
    unchanged, so calling it is always correct. Not needed for
    [`hypergradient`][implicitfn.hypergradient], which returns the averaged result.

    Every leaf that requires grad takes part (a missing `.grad` counts as zeros and is set), so
    the ranks make the same all-reduce whatever their gradients: one per dtype and device.

    **Arguments:**

    - `hparams`: the hyperparameters (TensorDict, dict or tensor), the same structure on every
      rank.
    - `group`: the `torch.distributed.ProcessGroup`; `None` for the default group.

    **Returns:** `None`; the `.grad` fields are replaced by their averages.

    ```python
    >>> import torch, torch.distributed as dist, implicitfn
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> lam = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> (lam ** 2).sum().backward()
    >>> implicitfn.all_reduce_gradients({"lam": lam})     # one rank: the mean is itself
    >>> lam.grad
    tensor([2., 4.])
    >>> dist.destroy_process_group()
    ```
    """
    if group is not None and not _is_process_group(group):
        raise TypeError(
            f"group: expected a torch.distributed.ProcessGroup or None, got {type(group).__name__}."
        )
    _check_group(group, "all_reduce_gradients")
    tensors = [
        leaf
        for leaf in pytree.tree_leaves(hparams)
        if isinstance(leaf, torch.Tensor) and leaf.requires_grad
    ]
    grads = [torch.zeros_like(t) if t.grad is None else t.grad for t in tensors]
    with torch.no_grad():
        averaged = DataParallel(group).mean(grads)
    for tensor, value in zip(tensors, averaged, strict=True):
        tensor.grad = value.detach().clone()
