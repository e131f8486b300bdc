r"""Proximal operators and projections whose Jacobians are correct almost everywhere.

Each is a frozen dataclass, callable as `prox(z, step, hparams)`: the proximal map
$\mathrm{prox}_{\eta g}(z) = \arg\min_w \tfrac12\lVert w - z\rVert^2 + \eta\, g(w, \lambda)$.
Projections are the proximal maps of indicator functions (the step does not matter) and are
also callable as `projection.project(z, hparams)`.

Strengths, radii and bounds are *hyperparameters*: given as a key of `hparams`
(`"alpha"` reads `hparams["alpha"]`), a callable `hparams -> tensor`, `None` (the whole of
`hparams`, when it is a tensor) or a plain number (a constant, never differentiated). They are
read at each call, so gradients flow to them through `hparams`; a tensor closed over in a
lambda would silently get none.

Every operator is written with `torch` operations whose derivatives are the right ones away
from the kinks (`relu`, `sign`, `clamp`, sorting), so autograd, `torch.func` transforms and
`vmap` give its Jacobian. The ones that hold coordinates at a value no differentiated input
moves (zero for L1, elastic net, group lasso, non-negativity and the simplex; the bounds of a
box with constant bounds) say so through `support`, which lets
[`proximal_gradient`][implicitfn.proximal_gradient] solve the backward system on the support
only.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch

__all__ = [
    "AbstractProjection",
    "AbstractProx",
    "projection_box",
    "projection_l2_ball",
    "projection_nonnegative",
    "projection_simplex",
    "prox_elastic_net",
    "prox_group_lasso",
    "prox_l1",
]

Hyperparameter = str | Callable[[Any], torch.Tensor] | float | int | None


class AbstractProx(abc.ABC):
    r"""A proximal operator $\mathrm{prox}_{\eta g(\cdot, \lambda)}$, the `prox` of
    [`proximal_gradient`][implicitfn.proximal_gradient].

    Implement `__call__(z, step, hparams) -> tensor` with `torch` operations whose derivatives
    are right almost everywhere. Optionally implement `support(z, step, hparams)`: a boolean
    tensor marking the coordinates whose output moves with $z$; the others must be held at a
    value that no differentiated input moves (e.g. exactly zero). Then the backward solve is
    restricted to the support. Set `jacobian_is_mask = True` when the Jacobian is the
    0/1 diagonal of that support (soft thresholding, non-negativity): the restricted system is
    then symmetric and [`CG`][implicitfn.CG] applies.

    ```python
    >>> import dataclasses, torch, implicitfn
    >>> @dataclasses.dataclass(frozen=True)
    ... class Shrink(implicitfn.AbstractProx):       # g(w) = lambda/2 |w|^2
    ...     def __call__(self, z, step, hparams):
    ...         return z / (1 + step * hparams)
    >>> Shrink()(torch.tensor([2.0, 4.0]), 1.0, torch.tensor(1.0))
    tensor([1., 2.])
    ```
    """

    jacobian_is_mask: ClassVar[bool] = False

    @abc.abstractmethod
    def __call__(self, z: torch.Tensor, step: float, hparams: Any) -> torch.Tensor:
        r"""$\mathrm{prox}_{\eta g}(z)$ with $\eta$ = `step` and the hyperparameters in `hparams`."""

    @property
    def restricts(self) -> bool:
        """Whether `support` says which coordinates are held fixed (see the class docstring)."""
        return type(self).support is not AbstractProx.support

    def support(self, z: torch.Tensor, step: float, hparams: Any) -> torch.Tensor | None:
        """The coordinates whose output moves with `z` (a boolean tensor), or None."""
        return None


class AbstractProjection(AbstractProx):
    r"""The Euclidean projection onto a set $C_\lambda$, the `projection` of
    [`projected_gradient`][implicitfn.projected_gradient]; also a prox (of the indicator of
    $C_\lambda$, for every step).

    Implement `project(z, hparams) -> tensor`.

    ```python
    >>> import dataclasses, torch, implicitfn
    >>> @dataclasses.dataclass(frozen=True)
    ... class Halfline(implicitfn.AbstractProjection):   # C = {w >= hparams}
    ...     def project(self, z, hparams):
    ...         return torch.maximum(z, hparams)
    >>> Halfline().project(torch.tensor([-1.0, 3.0]), torch.tensor(0.5))
    tensor([0.5000, 3.0000])
    ```
    """

    @abc.abstractmethod
    def project(self, z: torch.Tensor, hparams: Any) -> torch.Tensor:
        r"""$\Pi_{C_\lambda}(z)$."""

    def __call__(self, z: torch.Tensor, step: float, hparams: Any) -> torch.Tensor:
        return self.project(z, hparams)


# -- reading hyperparameters -------------------------------------------------------------------


def _check_spec(spec: Any, name: str, *, nonnegative: bool = True) -> None:
    """Raise at construction when `spec` cannot name a hyperparameter."""
    if spec is None or isinstance(spec, str) or callable(spec):
        return
    if isinstance(spec, bool) or not isinstance(spec, (int, float)):
        raise TypeError(
            f"{name}: expected a key of hparams (str), a callable hparams -> tensor, None (hparams "
            f"itself) or a number, got {type(spec).__name__}; to tune it, put the tensor in "
            f"hparams and pass its key, e.g. {name}='alpha'."
        )
    if not math.isfinite(spec) or (nonnegative and spec < 0):
        raise ValueError(f"{name}: must be a finite number >= 0, got {spec}.")


def _read(spec: Hyperparameter, hparams: Any, name: str, like: torch.Tensor) -> torch.Tensor:
    """The hyperparameter `spec` names, as a tensor."""
    if isinstance(spec, (int, float)):
        return torch.as_tensor(float(spec), dtype=like.dtype, device=like.device)
    if spec is None:
        value = hparams
    elif isinstance(spec, str):
        try:
            value = hparams[spec]
        except (KeyError, TypeError, IndexError):
            raise KeyError(
                f"{name}={spec!r}: hparams has no entry {spec!r} (hparams is "
                f"{type(hparams).__name__}); pass the strength as hparams[{spec!r}]."
            ) from None
    else:
        value = spec(hparams)
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise TypeError(
            f"{name}: expected a floating-point tensor, got "
            f"{value.dtype if isinstance(value, torch.Tensor) else type(value).__name__}"
            + ("; hparams itself is used when the key is None" if spec is None else "")
            + "."
        )
    return value


def _broadcasts(value: torch.Tensor, shape: torch.Size, name: str, what: str) -> torch.Tensor:
    try:
        ok = torch.broadcast_shapes(value.shape, shape) == shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name}: shape {tuple(value.shape)} does not broadcast to {what} {tuple(shape)}; "
            "give a scalar or one value per entry."
        )
    return value


def _check_input(z: Any, step: Any, who: str) -> None:
    if not isinstance(z, torch.Tensor) or not z.is_floating_point():
        raise TypeError(
            f"{who}: expects a floating-point tensor of parameters, got {type(z).__name__}; for a "
            "dict of parameters write the prox as a function of the dict that calls this one "
            "on the penalised entry."
        )
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not step > 0:
        raise ValueError(f"{who}: step must be a number > 0, got {step!r}.")


def _soft_threshold(z: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    # sign(z) relu(|z| - t): derivative 1 where |z| > t, 0 below; -sign(z) in t on the support.
    return torch.sign(z) * torch.relu(z.abs() - threshold)


def _safe_norm(squares: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(sqrt(squares) where positive else 1, positive)`: no NaN gradient at zero."""
    positive = squares > 0
    return torch.sqrt(torch.where(positive, squares, torch.ones_like(squares))), positive


def _nonzero(output: torch.Tensor) -> torch.Tensor:
    return output != 0


# -- proximal operators ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class L1(AbstractProx):
    r"""Soft thresholding; made by [`prox_l1`][implicitfn.prox_l1]."""

    strength: Hyperparameter = None
    jacobian_is_mask: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_spec(self.strength, "strength")

    def __call__(self, z, step, hparams):
        _check_input(z, step, "prox_l1")
        alpha = _broadcasts(_read(self.strength, hparams, "strength", z), z.shape, "strength", "z")
        return _soft_threshold(z, step * alpha)

    def support(self, z, step, hparams):
        return _nonzero(self(z, step, hparams))


@dataclasses.dataclass(frozen=True)
class ElasticNet(AbstractProx):
    r"""Soft thresholding then shrinkage; made by [`prox_elastic_net`][implicitfn.prox_elastic_net]."""

    l1: Hyperparameter = "l1"
    l2: Hyperparameter = "l2"

    def __post_init__(self) -> None:
        _check_spec(self.l1, "l1")
        _check_spec(self.l2, "l2")

    def __call__(self, z, step, hparams):
        _check_input(z, step, "prox_elastic_net")
        alpha = _broadcasts(_read(self.l1, hparams, "l1", z), z.shape, "l1", "z")
        beta = _broadcasts(_read(self.l2, hparams, "l2", z), z.shape, "l2", "z")
        return _soft_threshold(z, step * alpha) / (1 + step * beta)

    def support(self, z, step, hparams):
        return _nonzero(self(z, step, hparams))


@dataclasses.dataclass(frozen=True, eq=False)
class GroupLasso(AbstractProx):
    r"""Block soft thresholding; made by [`prox_group_lasso`][implicitfn.prox_group_lasso]."""

    groups: torch.Tensor  # (num_groups, size): one-hot membership
    strength: Hyperparameter = None

    def __post_init__(self) -> None:
        _check_spec(self.strength, "strength")

    def __call__(self, z, step, hparams):
        _check_input(z, step, "prox_group_lasso")
        members = self.groups.to(dtype=z.dtype, device=z.device)
        if z.shape[-1:] != members.shape[1:]:
            raise ValueError(
                f"prox_group_lasso: groups has {members.shape[1]} entries, but z has "
                f"{z.shape[-1]} coordinates in its last dimension; give one group id per coordinate."
            )
        alpha = _read(self.strength, hparams, "strength", z)
        alpha = _broadcasts(alpha, z.shape[:-1] + members.shape[:1], "strength", "the groups")
        norms, positive = _safe_norm((z * z) @ members.T)
        scale = torch.where(positive, torch.relu(1 - step * alpha / norms), torch.zeros_like(norms))
        return z * (scale @ members)

    def support(self, z, step, hparams):
        return _nonzero(self(z, step, hparams))


def prox_l1(strength: Hyperparameter = None) -> AbstractProx:
    r"""Soft thresholding, the prox of $g(w) = \sum_j \alpha_j |w_j|$ (Lasso).

    $\mathrm{prox}_{\eta g}(z)_j = \mathrm{sign}(z_j)\max(|z_j| - \eta\alpha_j, 0)$. Its Jacobian
    is the 0/1 diagonal of the support $S = \{j : |z_j| > \eta\alpha_j\}$, and
    $\partial\,\mathrm{prox}_j/\partial\alpha_j = -\eta\,\mathrm{sign}(z_j)$ on $S$.

    **Arguments:**

    - `strength`: $\alpha \ge 0$, a scalar or one per coordinate (a hyperparameter per feature):
      a key of `hparams`, a callable `hparams -> tensor` (e.g. `lambda h: h["log_alpha"].exp()`),
      `None` for `hparams` itself, or a constant number.

    ```python
    >>> import torch, implicitfn
    >>> prox = implicitfn.prox_l1("alpha")
    >>> prox(torch.tensor([3.0, -0.5, -2.0]), 1.0, {"alpha": torch.tensor([1.0, 1.0, 0.5])})
    tensor([ 2.0000, -0.0000, -1.5000])
    ```
    """
    return L1(strength)


def prox_elastic_net(l1: Hyperparameter = "l1", l2: Hyperparameter = "l2") -> AbstractProx:
    r"""The prox of $g(w) = \sum_j \alpha_j |w_j| + \tfrac{\beta_j}{2} w_j^2$ (elastic net).

    $\mathrm{prox}_{\eta g}(z)_j = \mathrm{sign}(z_j)\max(|z_j| - \eta\alpha_j, 0)/(1 + \eta\beta_j)$:
    the Jacobian is diagonal, $1/(1 + \eta\beta_j)$ on the support and 0 off it. The restricted
    system is not symmetric with per-coordinate $\beta$: use [`GMRES`][implicitfn.GMRES], or put
    the ridge term in the smooth loss and use [`prox_l1`][implicitfn.prox_l1] to get one that
    [`CG`][implicitfn.CG] solves.

    **Arguments:**

    - `l1`, `l2`: $\alpha, \beta \ge 0$ (scalars or per coordinate), each a key of `hparams`, a
      callable `hparams -> tensor`, `None` for `hparams` itself, or a constant number.

    ```python
    >>> import torch, implicitfn
    >>> prox = implicitfn.prox_elastic_net("l1", "l2")
    >>> prox(torch.tensor([3.0, 0.5]), 1.0, {"l1": torch.tensor(1.0), "l2": torch.tensor(1.0)})
    tensor([1., 0.])
    ```
    """
    return ElasticNet(l1, l2)


def prox_group_lasso(groups: Any, strength: Hyperparameter = None) -> AbstractProx:
    r"""Block soft thresholding, the prox of $g(w) = \sum_g \alpha_g \lVert w_g\rVert_2$ (group lasso).

    $\mathrm{prox}_{\eta g}(z)_g = \max(1 - \eta\alpha_g/\lVert z_g\rVert, 0)\, z_g$: a whole
    group is zero when $\lVert z_g\rVert \le \eta\alpha_g$; on a surviving group the Jacobian is
    $(1 - \frac{\eta\alpha_g}{\lVert z_g\rVert}) I + \eta\alpha_g \frac{z_g z_g^\top}{\lVert z_g\rVert^3}$.

    **Arguments:**

    - `groups`: the group id ($0, 1, \ldots$) of each coordinate of the last dimension of the
      parameters (a sequence of ints or an integer tensor).
    - `strength`: $\alpha_g \ge 0$, a scalar or one per group; as in [`prox_l1`][implicitfn.prox_l1].

    ```python
    >>> import torch, implicitfn
    >>> prox = implicitfn.prox_group_lasso([0, 0, 1], "alpha")
    >>> prox(torch.tensor([3.0, 4.0, 0.5]), 1.0, {"alpha": torch.tensor(2.5)})
    tensor([1.5000, 2.0000, 0.0000])
    ```
    """
    try:
        ids = torch.as_tensor(groups)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"groups: expected a sequence of int group ids, got {type(groups).__name__}."
        ) from None
    if ids.ndim != 1 or ids.numel() == 0 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise TypeError(
            f"groups: expected a non-empty 1-D sequence of int group ids (one per coordinate), "
            f"got a {ids.dtype} tensor of shape {tuple(ids.shape)}."
        )
    if int(ids.min()) < 0:
        raise ValueError(f"groups: ids must be >= 0, got {int(ids.min())}.")
    members = torch.nn.functional.one_hot(ids.long(), int(ids.max()) + 1).T.to(torch.float64)
    _check_spec(strength, "strength")
    return GroupLasso(members, strength)


# -- projections -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Nonnegative(AbstractProjection):
    r"""$\max(z, 0)$; made by [`projection_nonnegative`][implicitfn.projection_nonnegative]."""

    jacobian_is_mask: ClassVar[bool] = True

    def project(self, z, hparams):
        _check_input(z, 1.0, "projection_nonnegative")
        return torch.relu(z)

    def support(self, z, step, hparams):
        return z > 0


@dataclasses.dataclass(frozen=True)
class Box(AbstractProjection):
    r"""$\min(\max(z, l), u)$; made by [`projection_box`][implicitfn.projection_box]."""

    lower: Hyperparameter
    upper: Hyperparameter

    def __post_init__(self) -> None:
        _check_spec(self.lower, "lower", nonnegative=False)
        _check_spec(self.upper, "upper", nonnegative=False)
        numbers = [isinstance(b, (int, float)) for b in (self.lower, self.upper)]
        if all(numbers) and not self.lower <= self.upper:
            raise ValueError(f"lower, upper: need lower <= upper, got {self.lower} > {self.upper}.")

    @property
    def jacobian_is_mask(self) -> bool:  # type: ignore[override]
        return self.restricts

    @property
    def restricts(self) -> bool:
        """Only constant bounds are held by no differentiated input."""
        return isinstance(self.lower, (int, float)) and isinstance(self.upper, (int, float))

    def project(self, z, hparams):
        _check_input(z, 1.0, "projection_box")
        lower = _broadcasts(_read(self.lower, hparams, "lower", z), z.shape, "lower", "z")
        upper = _broadcasts(_read(self.upper, hparams, "upper", z), z.shape, "upper", "z")
        # clamp's derivative: 1 in z strictly inside, 1 in the bound that is active.
        return torch.clamp(z, min=lower.expand(z.shape), max=upper.expand(z.shape))

    def support(self, z, step, hparams):
        if not self.restricts:
            return None
        return (z > self.lower) & (z < self.upper)


@dataclasses.dataclass(frozen=True)
class _RadiusProjection(AbstractProjection):
    """A projection onto sets of radius $r$ (a hyperparameter), one set per vector along the
    last dimension of z."""

    radius: Hyperparameter = 1.0

    def __post_init__(self) -> None:
        _check_spec(self.radius, "radius")

    def _radius(self, z: torch.Tensor, hparams: Any, sets: str) -> torch.Tensor:
        """The radius as a tensor, checked to broadcast to the `sets` of z (z.shape[:-1])."""
        radius = _read(self.radius, hparams, "radius", z)
        return _broadcasts(radius, z.shape[:-1], "radius", f"the {sets} (z.shape[:-1])")


@dataclasses.dataclass(frozen=True)
class Simplex(_RadiusProjection):
    r"""Projection onto $\{w \ge 0, \sum w = r\}$; made by [`projection_simplex`][implicitfn.projection_simplex]."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.radius, (int, float)) and not self.radius > 0:
            raise ValueError(f"radius: must be > 0, got {self.radius}.")

    def project(self, z, hparams):
        _check_input(z, 1.0, "projection_simplex")
        radius = self._radius(z, hparams, "simplices")
        # Held, Wolfe and Crowder (1974); Duchi et al. (2008): the threshold tau from the sorted
        # values. tau is a mean over the support, so autograd gives the Jacobian
        # diag(1_S) - 1_S 1_S^T / |S| and d/dr = 1_S / |S|.
        ordered = torch.sort(z, dim=-1, descending=True).values
        ranks = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype, device=z.device)
        excess = torch.cumsum(ordered, dim=-1) - radius[..., None]
        count = (ordered - excess / ranks > 0).sum(dim=-1, keepdim=True).clamp(min=1)
        tau = torch.gather(excess, -1, count - 1) / count.to(z.dtype)
        return torch.relu(z - tau)

    def support(self, z, step, hparams):
        return _nonzero(self.project(z, hparams))


@dataclasses.dataclass(frozen=True)
class L2Ball(_RadiusProjection):
    r"""Projection onto $\{\lVert w\rVert_2 \le r\}$; made by [`projection_l2_ball`][implicitfn.projection_l2_ball]."""

    def project(self, z, hparams):
        _check_input(z, 1.0, "projection_l2_ball")
        radius = self._radius(z, hparams, "balls")
        norms, positive = _safe_norm((z * z).sum(dim=-1))
        scale = torch.where(positive & (norms > radius), radius / norms, torch.ones_like(norms))
        return z * scale[..., None]


def projection_nonnegative() -> AbstractProjection:
    r"""The projection onto the non-negative orthant, $\max(z, 0)$.

    Its Jacobian is the 0/1 diagonal of $\{z > 0\}$; coordinates at zero stay there, so the
    backward solve is restricted to the positive coordinates (and is symmetric).

    ```python
    >>> import torch, implicitfn
    >>> implicitfn.projection_nonnegative().project(torch.tensor([-1.0, 2.0]), None)
    tensor([0., 2.])
    ```
    """
    return Nonnegative()


def projection_box(lower: Hyperparameter, upper: Hyperparameter) -> AbstractProjection:
    r"""The projection onto the box $\{l \le w \le u\}$, $\min(\max(z, l), u)$.

    The Jacobian in $z$ is the 0/1 diagonal of $\{l < z < u\}$; in the bounds it is 1 where that
    bound is active. With constant (number) bounds the coordinates at a bound are held there, so
    the backward solve is restricted to the interior; with bounds in `hparams` it is not.

    **Arguments:**

    - `lower`, `upper`: scalars or per coordinate; each a key of `hparams`, a callable
      `hparams -> tensor`, `None` for `hparams` itself, or a constant number.

    ```python
    >>> import torch, implicitfn
    >>> implicitfn.projection_box(0.0, 1.0).project(torch.tensor([-1.0, 0.5, 2.0]), None)
    tensor([0.0000, 0.5000, 1.0000])
    ```
    """
    return Box(lower, upper)


def projection_simplex(radius: Hyperparameter = 1.0) -> AbstractProjection:
    r"""The projection onto the simplex $\{w \ge 0, \sum_j w_j = r\}$, along the last dimension.

    $\Pi(z) = \max(z - \tau, 0)$ with $\tau$ such that the result sums to $r$. On the support
    $S$ the Jacobian is $I - \mathbf{1}\mathbf{1}^\top/|S|$ and $\partial\Pi/\partial r =
    \mathbf{1}_S/|S|$; coordinates at zero stay there (restricted backward solve).

    **Arguments:**

    - `radius`: $r > 0$, one per simplex (a scalar for a vector); as `strength` in
      [`prox_l1`][implicitfn.prox_l1].

    ```python
    >>> import torch, implicitfn
    >>> implicitfn.projection_simplex().project(torch.tensor([0.8, 0.6, -1.0]), None)
    tensor([0.6000, 0.4000, 0.0000])
    ```
    """
    return Simplex(radius)


def projection_l2_ball(radius: Hyperparameter = 1.0) -> AbstractProjection:
    r"""The projection onto the Euclidean ball $\{\lVert w\rVert_2 \le r\}$, along the last dimension.

    $\Pi(z) = z\,\min(1, r/\lVert z\rVert)$: the identity inside; outside, the Jacobian is
    $\frac{r}{\lVert z\rVert}(I - \frac{z z^\top}{\lVert z\rVert^2})$ and
    $\partial\Pi/\partial r = z/\lVert z\rVert$.

    **Arguments:**

    - `radius`: $r \ge 0$, one per ball (a scalar for a vector); as `strength` in
      [`prox_l1`][implicitfn.prox_l1].

    ```python
    >>> import torch, implicitfn
    >>> implicitfn.projection_l2_ball(1.0).project(torch.tensor([3.0, 4.0]), None)
    tensor([0.6000, 0.8000])
    ```
    """
    return L2Ball(radius)
