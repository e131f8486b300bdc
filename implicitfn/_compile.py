"""Opt-in compilation of the backward pass with `torch.compile`.

What one compiled graph covers (see [`Compile`][implicitfn.Compile] and the "Compiled
hypergradients" page):

- With a solver that runs a fixed number of steps ([`CG`][implicitfn.CG] and
  [`FixedPoint`][implicitfn.FixedPoint] with `rtol=None`, [`Neumann`][implicitfn.Neumann] with
  a numeric `alpha`, [`Identity`][implicitfn.Identity], [`Dense`][implicitfn.Dense]), a whole
  computation: [`hypergradient`][implicitfn.hypergradient] is one graph (outer gradient,
  linearisation, every solver step, mixed product $B^\\top v$, sum); the reverse pass of
  [`implicit_diff`][implicitfn.implicit_diff] is one graph (solve and mixed product). The loop
  is unrolled (`_base.iterate` freezes finished solves instead of breaking), so the graph holds
  the linearisation once and the steps after it, and the compiler fuses across steps; shared
  work (the training loss's forward pass) is computed once.
- With any other solver, each curvature product $v \\mapsto A v$ is one graph (it recomputes
  the linearisation inside) while the solver's loop stays in Python; the mixed product and the
  outer gradient are graphs of their own.

These are the eager computations of `_implicit` written once more as functions of tensors, to be
traced: the tests check that they agree. Every compiled function is a pure function of its
tensor arguments: the configuration (condition, curvature, solver, damping, tree structures,
non-tensor arguments) is closed over and is part of the cache key, together with each tensor's
shape, dtype and device. One key, one compilation: each artefact gets its own code object, so
dynamo's per-code cache (and its recompile limit) never mixes artefacts, and later calls with new
values reuse it. Dynamo still guards what user code reads besides its arguments (globals,
closures), so a changed global recompiles rather than going stale.

Safety: the first call of each artefact is checked against the eager computation; a failure to
compile (an operation dynamo cannot capture, no C++ compiler, ...) or a mismatch falls back to
eager with one [`CompileWarning`][implicitfn.CompileWarning], never a wrong result. Inside
`torch.func` transforms compiled functions are not used.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import sys
import types
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.func import grad

from implicitfn._curvature import AbstractCurvature, GaussNewton, Hessian, scalar_loss
from implicitfn._linear_solve import CG, AbstractLinearSolver, Dense, FixedPoint, Identity, Neumann
from implicitfn._linear_solve._base import check_vector
from implicitfn._operator import (
    POSITIVE_SEMIDEFINITE,
    SYMMETRIC,
    AbstractLinearOperator,
    damp,
)
from implicitfn._optimality import AbstractOptimalityCondition, mixed_product, on_leaves
from implicitfn._solution import SolveInfo, under_transform
from implicitfn._tree import Tree, tree_add

__all__ = ["Compile", "CompileWarning"]

_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_SCOPES = ("auto", "solve", "product")
_MAX_ARTEFACTS = 64  # compiled functions kept (least recently used dropped first)


@dataclasses.dataclass(frozen=True)
class Compile:
    r"""How [`implicit_diff`][implicitfn.implicit_diff] and [`hypergradient`][implicitfn.hypergradient] compile the backward pass.

    Pass `compile=True` for the defaults, `compile="reduce-overhead"` (or another `mode`) for a
    mode, or an instance of this class for full control. Compiling costs seconds to minutes once
    per problem shape and pays off after many outer steps: see the "Compiled hypergradients"
    page for the measured speed-ups and break-even points.

    **Arguments:**

    - `mode`: the `torch.compile` mode: `"default"`, `"reduce-overhead"` (for small problems,
      whose time is overhead: CUDA graphs on GPU; on CPU inductor's C++ wrapper, which calls the
      kernels from C++ instead of generated Python), `"max-autotune"` or
      `"max-autotune-no-cudagraphs"`. Used with the `"inductor"` backend only.
    - `backend`: the `torch.compile` backend, `"inductor"` (default: generated C++/Triton
      kernels) or another registered one, e.g. `"aot_eager"` (no code generation: compiles in
      seconds, removes Python and dispatch overhead only) or `"eager"` (tracing only, for tests).
    - `scope`: what one compiled graph covers. `"auto"` (default): with a solver that runs a
      fixed number of steps ([`CG`][implicitfn.CG] or [`FixedPoint`][implicitfn.FixedPoint] with
      `rtol=None`, [`Neumann`][implicitfn.Neumann] with a numeric `alpha`,
      [`Identity`][implicitfn.Identity], [`Dense`][implicitfn.Dense]) the whole computation
      (all of `hypergradient`; solve and mixed product of the reverse pass), otherwise each
      curvature product. `"solve"` insists on the former (a `ValueError` for other solvers);
      `"product"` compiles products only (smaller graphs, faster to compile, slower to run:
      each product recomputes the linearisation, and the loop stays in Python).

    ```python
    >>> import torch, implicitfn
    >>> implicitfn.Compile(mode="reduce-overhead").scope
    'auto'
    >>> inner = lambda w, lam: 0.5 * ((w - 1.0) ** 2).sum() + 0.5 * lam * (w ** 2).sum()
    >>> outer = lambda w, lam: (w ** 2).sum()
    >>> w_star, lam = torch.full((2,), 0.5), torch.tensor(1.0)
    >>> g, info = implicitfn.hypergradient(inner, outer, w_star, lam,
    ...                                    solver=implicitfn.CG(max_steps=2, rtol=None),
    ...                                    compile=implicitfn.Compile(backend="eager"))
    >>> round(float(g), 4)
    -0.5
    ```
    """

    mode: str = "default"
    backend: str | Callable[..., Any] = "inductor"
    scope: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"mode: expected one of {list(_MODES)}, got {self.mode!r}.")
        if not (isinstance(self.backend, str) or callable(self.backend)):
            raise TypeError(
                f"backend: expected a torch.compile backend name such as 'inductor' or "
                f"'aot_eager', got {type(self.backend).__name__}."
            )
        if self.scope not in _SCOPES:
            raise ValueError(f"scope: expected one of {list(_SCOPES)}, got {self.scope!r}.")


class CompileWarning(RuntimeWarning):
    """Compilation of the backward pass was not possible; it runs eagerly (same results).

    Issued once per configuration by [`implicit_diff`][implicitfn.implicit_diff] and
    [`hypergradient`][implicitfn.hypergradient] with `compile=...`; the message says why
    (an operation `torch.compile` cannot capture, no C++ compiler, a `torch.func` transform).

    ```python
    >>> import implicitfn
    >>> issubclass(implicitfn.CompileWarning, RuntimeWarning)
    True
    ```
    """


def as_compile(value: Any) -> Compile | None:
    """Resolve the `compile=` argument: `False`/`None` -> None, `True` -> `Compile()`, a mode."""
    if value is None or value is False:
        return None
    if value is True:
        return Compile()
    if isinstance(value, str):
        if value not in _MODES:
            raise ValueError(
                f"compile: expected True, False, a mode {list(_MODES)} or implicitfn.Compile(...), "
                f"got {value!r}."
            )
        return Compile(mode=value)
    if isinstance(value, Compile):
        return value
    raise TypeError(
        f"compile: expected a bool, a mode string or implicitfn.Compile(...), got "
        f"{type(value).__name__}."
    )


def fixed_steps(solver: AbstractLinearSolver) -> bool:
    """Whether `solver` runs a number of steps fixed by its configuration (not by the data)."""
    kind = type(solver)
    if kind is CG:
        return solver.rtol is None and solver.preconditioner is None
    if kind is FixedPoint:
        return solver.rtol is None and solver.alpha != "auto"
    if kind is Neumann:
        return solver.alpha != "auto"
    return kind in (Identity, Dense)


def check(options: Compile | None, solver: AbstractLinearSolver, distributed: bool) -> None:
    """Raise before any computing when `options` cannot serve this solver."""
    if options is None or options.scope != "solve":
        return
    if distributed:
        raise ValueError(
            "compile: scope='solve' cannot be combined with distributed=...: every product is "
            "all-reduced between ranks; use scope='auto' (compiled products)."
        )
    if not fixed_steps(solver):
        raise ValueError(
            f"compile: scope='solve' needs a solver with a fixed number of steps (CG or "
            f"FixedPoint with rtol=None, Neumann with a numeric alpha, Identity, Dense), got "
            f"{solver!r}; use scope='auto' to compile its products instead."
        )


def scope(options: Compile | None, solver: AbstractLinearSolver, distributed: bool) -> str | None:
    """What to compile for one backward solve: `"solve"`, `"product"` or None (eager).

    Inside a `torch.func` transform nothing is compiled, with one warning.
    """
    if options is None:
        return None
    if under_transform():
        _warn_once(
            ("transform", options),
            "compile=... is ignored inside torch.func transforms (vmap, grad, jvp, ...): the "
            "backward pass runs eagerly there.",
        )
        return None
    if options.scope == "product" or distributed or not fixed_steps(solver):
        return "product"
    return "solve"


def _whole(backward: Any) -> bool:
    """Whether `backward` compiles whole solves now (and none of them failed before)."""
    chosen = scope(backward.compile, backward.solver, backward.distributed is not None)
    return chosen == "solve" and (backward.compile, backward.condition) not in _FAILED_SOLVES


def _flat_spec(backward: Any, params: Tree) -> pytree.TreeSpec | None:
    """The structure of `params` when the eager path solves on leaf lists too (else None)."""
    structure = pytree.tree_structure(params)
    if not isinstance(backward.curvature, (Hessian, GaussNewton)):
        return None
    return structure if on_leaves(backward.condition, structure) is not None else None


# ---------------------------------------------------------------------------------------------
# The compiled computations: a whole solve, the reverse pass (solve and mixed product), the
# whole hypergradient, a linearisation or product, the mixed product and outer gradient.


def solve(
    backward: Any,
    spec: pytree.TreeSpec | None,
    transpose: bool,
    params: Tree,
    hparams: Tree,
    args: Sequence[Any],
    rhs: Tree,
    initial: Tree | None,
) -> tuple[Tree, SolveInfo] | None:
    """The whole solve of $A^\\top x = b$ (or $A x = b$) compiled; None when it fell back.

    `backward` is the decorator's configuration (`condition`, `curvature`, `solver`, `damping`,
    `compile`). With `spec` the condition is rewritten by `on_leaves` and `params`, `rhs` and
    `initial` are leaf lists, as in the eager path.
    """
    if (backward.compile, backward.condition) in _FAILED_SOLVES:
        return None
    check_vector(rhs, params, "vector")
    if initial is not None:
        check_vector(initial, params, "initial")
    condition, curvature, solver = backward.condition, backward.curvature, backward.solver
    damping = backward.damping

    def build() -> Callable[..., Any]:
        flat = condition if spec is None else on_leaves(condition, spec)

        def linear_solve(params, hparams, args, rhs, initial):
            operator = damp(flat.linearize(curvature, params, hparams, *args), damping)
            if transpose:
                operator = operator.transpose()
            return solver._solve(operator, rhs, initial)

        return linear_solve

    family = ("solve", condition, spec, curvature, solver, damping, transpose)
    trees = (params, hparams, tuple(args), rhs, initial)
    result = _run(backward.compile, family, build, trees)
    return None if result is _NOT_COMPILED else result


def _reverse_fn(
    backward: Any, spec: pytree.TreeSpec | None, selected: Sequence[bool]
) -> Callable[..., Any]:
    """`(params, hparams, args, rhs, initial) -> (v, info, -B^T v)` with $A^\\top v = $ `rhs`:
    the eager reverse pass (`_Backward._solve` then `mixed_product`) as one function to trace."""
    condition, curvature, solver = backward.condition, backward.curvature, backward.solver
    damping, selected = backward.damping, list(selected)
    flat = condition if spec is None else on_leaves(condition, spec)

    def reverse(params, hparams, args, rhs, initial):
        if spec is not None:
            params, rhs = pytree.tree_leaves(params), pytree.tree_leaves(rhs)
        operator = damp(flat.linearize(curvature, params, hparams, *args), damping).transpose()
        solution, info = solver._solve(operator, rhs, initial)
        negative = pytree.tree_map(torch.neg, solution)
        products = mixed_product(flat, params, hparams, args, selected, cotangent=negative)
        return solution, info, products

    return reverse


def reverse(
    backward: Any, params: Tree, hparams: Tree, args: Sequence[Any], rhs: Tree, selected: list
) -> list[torch.Tensor | None] | None:
    """`_Backward.reverse` as one compiled graph (solve and mixed product); None when it does
    not apply or fell back. Reports and remembers (warm start) like the eager path."""
    if not _whole(backward):
        return None
    check_vector(rhs, params, "vector")
    spec = _flat_spec(backward, params)
    memory = backward.memory
    initial = None if memory is None else memory.initial(True, _leaves_if(spec, rhs))
    family = ("reverse", backward.condition, spec, backward.curvature, backward.solver)
    family += (backward.damping, tuple(selected))
    trees = (params, hparams, tuple(args), rhs, initial)
    result = _run(backward.compile, family, lambda: _reverse_fn(backward, spec, selected), trees)
    if result is _NOT_COMPILED:
        return None
    solution, info, products = result
    backward.report(info, solution)
    if memory is not None:
        memory.remember(True, solution, info)
    return products


def hypergradient(
    backward: Any,
    outer_loss: Callable[..., torch.Tensor],
    params: Tree,
    hparams: Tree,
    inner_args: tuple[Any, ...],
    outer_args: tuple[Any, ...],
) -> tuple[Tree, SolveInfo] | None:
    """The whole of [`hypergradient`][implicitfn.hypergradient] (outer gradient, solve, mixed
    product, sum) as one compiled graph; None when it does not apply or fell back."""
    if not _whole(backward):
        return None
    spec = _flat_spec(backward, params)
    hparams_leaves, hparams_spec = pytree.tree_flatten(hparams)
    flat, inputs_spec = pytree.tree_flatten((hparams, inner_args))
    selected = [i < len(hparams_leaves) for i in range(len(flat))]

    def build() -> Callable[..., Any]:
        reverse_fn = _reverse_fn(backward, spec, selected)
        direct = grad(scalar_loss(outer_loss, "outer_loss"), argnums=(0, 1))

        def whole(params, hparams, inner_args, outer_args):
            direct_w, direct_h = direct(params, hparams, *outer_args)
            solution, info, products = reverse_fn(params, hparams, inner_args, direct_w, None)
            implicit, _ = pytree.tree_unflatten(products, inputs_spec)
            total = pytree.tree_leaves(tree_add(direct_h, implicit))
            return total, solution, info

        return whole

    family = ("hypergradient", outer_loss, backward.condition, spec, backward.curvature)
    family += (backward.solver, backward.damping)
    trees = (params, hparams, inner_args, outer_args)
    result = _run(backward.compile, family, build, trees)
    if result is _NOT_COMPILED:
        return None
    total, solution, info = result
    backward.report(info, solution)
    return pytree.tree_unflatten(total, hparams_spec), info.concrete()


def _leaves_if(spec: pytree.TreeSpec | None, tree: Tree) -> Tree:
    return tree if spec is None else pytree.tree_leaves(tree)


def linearize(
    backward: Any, spec: pytree.TreeSpec | None, params: Tree, hparams: Tree, args: Sequence[Any]
) -> AbstractLinearOperator:
    """$\\partial F/\\partial w$ of `backward.condition` as an operator whose products are compiled."""
    condition, curvature = backward.condition, backward.curvature
    flat = condition if spec is None else on_leaves(condition, spec)
    tags = {SYMMETRIC} if flat.symmetric else set()
    if isinstance(curvature, GaussNewton):
        tags.add(POSITIVE_SEMIDEFINITE)
    return _CompiledOperator(
        backward.compile,
        condition,
        spec,
        curvature,
        params,
        hparams,
        tuple(args),
        False,
        frozenset(tags),
    )


@dataclasses.dataclass(frozen=True, eq=False)
class _CompiledOperator(AbstractLinearOperator):
    """The Jacobian of a condition at a point with compiled products.

    Reverse-over-reverse (the default [`Hessian`][implicitfn.Hessian], or the exact Jacobian of
    another condition, transposed or symmetric): the residual $F$ is compiled as a
    differentiable function of the parameters, once per operator, and each product $A^\\top u$
    is `torch.autograd.grad` through it, running the compiled backward graph on the stored
    linearisation. Otherwise (Gauss-Newton, forward-over-reverse, $A u$ of a non-symmetric
    Jacobian) each product is one compiled call that linearises again. Falls back to the eager
    operator, linearised once on first need.
    """

    options: Compile
    condition: AbstractOptimalityCondition
    spec: pytree.TreeSpec | None
    curvature: AbstractCurvature
    params: Tree
    hparams: Tree
    args: tuple[Any, ...]
    transposed: bool
    tags: frozenset[str]  # type: ignore[misc]
    _state: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def template(self) -> Tree:  # type: ignore[override]
        return self.params

    def _flat(self) -> AbstractOptimalityCondition:
        return self.condition if self.spec is None else on_leaves(self.condition, self.spec)

    def mv(self, vector: Tree) -> Tree:
        if not under_transform():  # a solver's own vmap (Nystrom, Jacobi) runs eagerly
            linear = self._linearisation()
            if linear is not None:
                outputs, inputs = linear
                cotangents = pytree.tree_leaves(vector)
                products = torch.autograd.grad(
                    outputs, inputs, cotangents, retain_graph=True, allow_unused=True
                )
                products = [
                    torch.zeros_like(x) if g is None else g
                    for g, x in zip(products, inputs, strict=True)
                ]
                return pytree.tree_unflatten(products, pytree.tree_structure(vector))
            result = self._compiled_product(vector)
            if result is not _NOT_COMPILED:
                return result
        if "eager" not in self._state:
            operator = self._flat().linearize(self.curvature, self.params, self.hparams, *self.args)
            self._state["eager"] = operator.transpose() if self.transposed else operator
        return self._state["eager"].mv(vector)

    def _linearisation(self) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """`(F leaves, parameter leaves)` of a compiled differentiable residual, or None."""
        if "linear" not in self._state:
            self._state["linear"] = None
            reverse = (
                type(self.curvature) is Hessian and self.curvature.mode == "reverse-over-reverse"
            )
            inputs = [*pytree.tree_leaves((self.params, self.hparams, self.args))]
            recording = torch.is_grad_enabled() and any(
                isinstance(t, torch.Tensor) and t.requires_grad for t in inputs
            )  # a derivative of the result is wanted: products must record a graph, not use one
            if reverse and (self.transposed or self.is_symmetric) and not recording:
                params = pytree.tree_map(lambda t: t.detach().requires_grad_(True), self.params)
                hparams, args = _detached((self.hparams, self.args))
                flat = self._flat()
                family = ("linearise", self.condition, self.spec, self.curvature)
                with torch.enable_grad():
                    trees = (params, hparams, *args)
                    check = _same_products(pytree.tree_leaves(params))
                    result = _run(self.options, family, lambda: flat.residual, trees, check)
                if result is not _NOT_COMPILED:
                    self._state["linear"] = (pytree.tree_leaves(result), pytree.tree_leaves(params))
        return self._state["linear"]

    def _compiled_product(self, vector: Tree) -> Any:
        def build() -> Callable[..., Any]:
            flat, curvature, transposed = self._flat(), self.curvature, self.transposed

            def product(params, hparams, args, vector):
                operator = flat.linearize(curvature, params, hparams, *args)
                return (operator.transpose() if transposed else operator).mv(vector)

            return product

        family = ("product", self.condition, self.spec, self.curvature, self.transposed)
        return _run(self.options, family, build, (self.params, self.hparams, self.args, vector))

    def transpose(self) -> AbstractLinearOperator:
        if self.is_symmetric:
            return self
        return dataclasses.replace(self, transposed=not self.transposed, _state={})


def _same_products(inputs: list[torch.Tensor]) -> Callable[[Any, Any], str | None]:
    """A check comparing two residuals, differentiable in `inputs`, by one product each.

    $F$ is about 0 at the solution, so its values are rounding noise; the products
    $J^\\top u$ (here for a fixed $u$) are what the solver uses.
    """

    def check(output: Any, expected: Any) -> str | None:
        products = []
        for out in (pytree.tree_leaves(output), pytree.tree_leaves(expected)):
            probe = [torch.ones_like(x) / max(x.numel(), 1) ** 0.5 for x in out]
            grads = torch.autograd.grad(out, inputs, probe, retain_graph=True, allow_unused=True)
            products.append(
                [
                    torch.zeros_like(x) if g is None else g
                    for g, x in zip(grads, inputs, strict=True)
                ]
            )
        return _mismatch(products[0], products[1])

    return check


def _detached(tree: Any) -> Any:
    return pytree.tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, tree)


def cross_product(
    backward: Any,
    params: Tree,
    hparams: Tree,
    args: Sequence[Any],
    selected: Sequence[bool],
    cotangent: Tree,
) -> list[torch.Tensor | None]:
    """`mixed_product(..., cotangent=...)` with `backward.condition`, compiled when
    `backward.compile` asks for it."""
    condition = backward.condition
    if backward.compile is not None and not under_transform():

        def build() -> Callable[..., Any]:
            return lambda p, h, a, u: mixed_product(condition, p, h, a, selected, cotangent=u)

        family = ("mixed", condition, tuple(selected))
        trees = (params, hparams, tuple(args), cotangent)
        result = _run(backward.compile, family, build, trees)
        if result is not _NOT_COMPILED:
            return result
    return mixed_product(condition, params, hparams, args, selected, cotangent=cotangent)


def call(options: Compile | None, family: Hashable, fn: Callable[..., Any], *trees: Any) -> Any:
    """`fn(*trees)`, compiled when `options` asks for it (eager inside transforms).

    `family` must identify `fn`: the artefact compiled from the first `fn` serves every later
    call with the same family and tensor shapes.
    """
    if options is not None and not under_transform():
        result = _run(options, family, lambda: fn, trees)
        if result is not _NOT_COMPILED:
            return result
    return fn(*trees)


# ---------------------------------------------------------------------------------------------
# The cache of compiled artefacts and the fallback.

_NOT_COMPILED = object()
_FAILED = object()
_ARTEFACTS: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
_FAILED_FAMILIES: set[Hashable] = set()
_FAILED_OPTIONS: set[Compile] = set()
_FAILED_SOLVES: set[tuple[Compile, Any]] = set()  # (options, condition): whole solves run eagerly
_WARNED: set[Hashable] = set()
_STATISTICS = {"compiled": 0, "fallbacks": 0}


def statistics() -> dict[str, int]:
    """How many artefacts were compiled and how many configurations fell back (for tests)."""
    return dict(_STATISTICS, cached=len(_ARTEFACTS))


def reset() -> None:
    """Forget every compiled artefact, fallback and warning (for tests)."""
    _ARTEFACTS.clear()
    _FAILED_FAMILIES.clear()
    _FAILED_OPTIONS.clear()
    _FAILED_SOLVES.clear()
    _WARNED.clear()


class _Key:
    """A cache key whose hash is computed once (tree specs hash recursively)."""

    __slots__ = ("hash", "parts")

    def __init__(self, parts: tuple) -> None:
        self.parts = parts
        self.hash = hash(parts)

    def __hash__(self) -> int:
        return self.hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Key) and self.hash == other.hash and self.parts == other.parts


def _run(
    options: Compile,
    family: Hashable,
    build: Callable[[], Callable[..., Any]],
    trees: tuple,
    check: Callable[[Any, Any], str | None] | None = None,
) -> Any:
    """Run `build()(*trees)` compiled, or return `_NOT_COMPILED` for the caller to run eagerly.

    Unless a graph must be recorded through it (grad mode on and an input requiring grad: a
    derivative of the hypergradient), it runs without grad on detached inputs, so the backward
    pass (grad off, saved inputs requiring grad) and a plain call share one inference graph.
    """
    flat, spec = pytree.tree_flatten(trees)
    positions = [i for i, leaf in enumerate(flat) if isinstance(leaf, torch.Tensor)]
    tensors = [flat[i] for i in positions]
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if not differentiable:
        tensors = [t.detach() for t in tensors]
    statics = tuple(None if isinstance(leaf, torch.Tensor) else leaf for leaf in flat)
    meta = tuple((t.shape, t.dtype, t.device, t.requires_grad) for t in tensors)
    family = (options, family)
    try:
        key = _Key((family, spec, statics, meta))
    except TypeError as error:  # an unhashable condition, solver or argument
        _warn_once(type(error), f"a part of the configuration is not hashable ({error}).")
        return _NOT_COMPILED
    artefact = _ARTEFACTS.get(key)
    if artefact is _FAILED or family in _FAILED_FAMILIES or options in _FAILED_OPTIONS:
        return _NOT_COMPILED
    if artefact is not None:
        _ARTEFACTS.move_to_end(key)
        with torch.set_grad_enabled(differentiable):
            return _finish(artefact(*tensors), options)

    fn = build()

    def rebuild(values: Sequence[torch.Tensor]) -> tuple:
        full = list(statics)
        for i, value in zip(positions, values, strict=True):
            full[i] = value
        return pytree.tree_unflatten(full, spec)

    def entry(*values: torch.Tensor) -> Any:
        return fn(*rebuild(values))

    name = f"implicitfn_compiled_{len(_ARTEFACTS)}_{_STATISTICS['compiled']}"
    compiled = _compile(_fresh_function(entry, name), options, {t.device.type for t in tensors})
    with torch.set_grad_enabled(differentiable):
        try:
            with warnings.catch_warnings():  # torch's own deprecation notes while compiling
                warnings.filterwarnings("ignore", module=r"torch\.")
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                output = compiled(*tensors)
        except Exception as error:  # noqa: BLE001 - any failure to compile means: run eagerly
            _fail(family, key, f"{type(error).__name__}: {_first_line(error)}", error)
            return _NOT_COMPILED
        _STATISTICS["compiled"] += 1
        expected = fn(*rebuild(tensors))  # the first result is checked against eager
    mismatch = (check or _mismatch)(output, expected)
    if mismatch is not None:
        _fail(family, key, f"the compiled result differs from the eager one ({mismatch})")
        return expected
    _ARTEFACTS[key] = compiled
    while len(_ARTEFACTS) > _MAX_ARTEFACTS:
        _ARTEFACTS.popitem(last=False)
    return _finish(output, options)


def _compile(fn: Callable[..., Any], options: Compile, devices: set[str]) -> Callable[..., Any]:
    """`torch.compile` with the options; `"reduce-overhead"` on CPU means inductor's C++
    wrapper (the graph's kernels are called from C++ instead of generated Python: measured about
    10% faster on a small problem), on GPU CUDA graphs."""
    kwargs: dict[str, Any] = {"fullgraph": True, "dynamic": False, "backend": options.backend}
    if options.backend == "inductor":
        if options.mode == "reduce-overhead" and devices == {"cpu"}:
            kwargs["options"] = {"cpp_wrapper": True}
        elif options.mode != "default":
            kwargs["mode"] = options.mode
    return torch.compile(fn, **kwargs)


def _fresh_function(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """A wrapper of `fn` with a code object of its own.

    Dynamo keeps its cache on the code object: without this, every artefact (all closures of one
    function) would share one cache and its recompile limit.
    """

    def entry(*tensors: torch.Tensor) -> Any:
        return fn(*tensors)

    changes: dict[str, Any] = {"co_name": name}
    if sys.version_info >= (3, 11):
        changes["co_qualname"] = name
    code = entry.__code__.replace(**changes)
    return types.FunctionType(code, entry.__globals__, name, None, entry.__closure__)


def _finish(output: Any, options: Compile) -> Any:
    if options.mode == "reduce-overhead":  # CUDA graphs reuse their output buffers
        return pytree.tree_map(
            lambda t: t.clone() if isinstance(t, torch.Tensor) and t.is_cuda else t, output
        )
    return output


def _mismatch(actual: Any, expected: Any) -> str | None:
    """Why two outputs differ beyond rounding, or None.

    Floating leaves are compared by the relative norm of their difference over the whole output
    against $\\varepsilon^{1/3}$ of the dtype (5e-3 in float32, 6e-6 in float64): loose enough
    for reassociated sums amplified by an ill-conditioned solve, tight enough to catch a wrong
    graph. Other leaves must be equal.
    """
    flat_a, spec_a = pytree.tree_flatten(actual)
    flat_e, spec_e = pytree.tree_flatten(expected)
    if spec_a != spec_e:
        return f"structure {spec_a} instead of {spec_e}"
    squared_error, squared_norm, eps = 0.0, 0.0, 0.0
    for a, e in zip(flat_a, flat_e, strict=True):
        if not isinstance(e, torch.Tensor):
            if a is not e and a != e:
                return f"{a!r} instead of {e!r}"
            continue
        if not isinstance(a, torch.Tensor) or a.shape != e.shape or a.dtype != e.dtype:
            return f"{a!r} instead of a {e.dtype} tensor of shape {tuple(e.shape)}"
        if not e.is_floating_point():
            continue
        eps = max(eps, torch.finfo(e.dtype).eps)
        a, e = a.detach().double(), e.detach().double()
        finite = torch.isfinite(e)
        if not torch.equal(torch.isfinite(a), finite):
            return "NaN/Inf in different places"
        squared_error += float(((a - e)[finite] ** 2).sum())
        squared_norm += float((e[finite] ** 2).sum())
    tolerance = eps ** (1 / 3)
    if squared_error > tolerance**2 * squared_norm:
        relative = math.sqrt(squared_error / squared_norm) if squared_norm else math.inf
        return f"relative difference {relative:.1e}"
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"


_WHAT = {
    "linearise": "the linearisation",
    "solve": "the backward solve",
    "reverse": "the backward solve and mixed product",
    "hypergradient": "the hypergradient",
    "product": "a curvature product",
    "mixed": "the mixed product",
    "outer": "the outer gradient",
}


def _fail(family: tuple, key: _Key, reason: str, error: BaseException | None = None) -> None:
    """Remember that `family` runs eagerly, and say so once per options and kind of failure."""
    options, inner = family
    _STATISTICS["fallbacks"] += 1
    _ARTEFACTS[key] = _FAILED
    _FAILED_FAMILIES.add(family)
    if error is not None and _caused_by(error, "InvalidCxxCompiler"):
        _FAILED_OPTIONS.add(options)  # nothing else will compile either: stop trying
    if isinstance(inner, tuple) and inner[0] in ("solve", "reverse", "hypergradient"):
        _FAILED_SOLVES.add((options, inner[2] if inner[0] == "hypergradient" else inner[1]))
    what = _WHAT.get(inner[0], "the backward pass") if isinstance(inner, tuple) else "a function"
    _warn_once(
        (options, reason.split(":")[0]),
        f"compile={options!r} could not compile {what} ({reason}); it runs eagerly from now "
        "on, with the same results at eager speed. Common causes: Python control flow on tensor "
        "values in a loss, an operation torch.compile cannot capture, or no working C++ "
        "compiler (inductor on CPU needs one; Compile(backend='aot_eager') needs none).",
    )


def _caused_by(error: BaseException | None, name: str) -> bool:
    while error is not None:
        if type(error).__name__ == name or name in str(error).split(":")[0]:
            return True
        error = error.__cause__ or error.__context__
    return False


def _warn_once(family: Hashable, message: str) -> None:
    if family in _WARNED:
        return
    _WARNED.add(family)
    warnings.warn(f"implicitfn: {message}", CompileWarning, stacklevel=3)
