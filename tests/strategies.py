"""Hypothesis strategies: random tree structures and well-conditioned linear systems."""

from __future__ import annotations

import hypothesis.strategies as st
import torch
from tensordict import TensorDict

import implicitfn

MAX_CONDITION = 1e3


@st.composite
def tree_structures(draw, max_leaves: int = 4, max_size: int = 6):
    """A list of (key path, shape) describing a nested TensorDict, a dict, or a plain tensor."""
    kind = draw(st.sampled_from(["tensordict", "dict", "tensor"]))
    if kind == "tensor":
        shape = tuple(draw(st.lists(st.integers(1, max_size), min_size=0, max_size=2)))
        return kind, [((), shape)]
    count = draw(st.integers(1, max_leaves))
    leaves = []
    for i in range(count):
        nested = draw(st.booleans())
        path = ("group", f"leaf{i}") if nested else (f"leaf{i}",)
        shape = tuple(draw(st.lists(st.integers(1, max_size), min_size=0, max_size=2)))
        leaves.append((path, shape))
    return kind, leaves


def build_tree(structure, make, dtype=torch.float64):
    """Build a tree of the drawn structure with leaves `make(shape, dtype)`."""
    kind, leaves = structure
    if kind == "tensor":
        return make(leaves[0][1], dtype)
    nested: dict = {}
    for path, shape in leaves:
        node = nested
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = make(shape, dtype)
    return TensorDict(nested) if kind == "tensordict" else nested


def spd_matrix(size: int, condition: float, seed: int, dtype=torch.float64) -> torch.Tensor:
    """A random SPD matrix with eigenvalues log-spaced in [1, condition]."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=torch.float64))
    eigenvalues = torch.logspace(
        0, torch.log10(torch.tensor(condition)).item(), size, dtype=torch.float64
    )
    return ((q * eigenvalues) @ q.T).to(dtype)


@st.composite
def spd_systems(draw, dtype=torch.float64):
    """(structure, matrix, seed): an SPD matrix of condition <= MAX_CONDITION on a random tree."""
    structure = draw(tree_structures())
    size = sum(int(torch.tensor(shape).prod().item()) if shape else 1 for _, shape in structure[1])
    condition = draw(st.floats(1.0, MAX_CONDITION))
    seed = draw(st.integers(0, 2**16))
    return structure, spd_matrix(size, condition, seed, dtype), seed


SOLVER_KINDS = (
    "CG",
    "MINRES",
    "GMRES",
    "FixedPoint",
    "Neumann",
    "StochasticNeumann",
    "Nystrom",
    "Dense",
    "Identity",
)


@st.composite
def linear_solvers(draw, kind: str):
    """A solver of `kind` with a random configuration: tolerances from none (rtol=0) to tight,
    budgets from 1 step, and step sizes that can diverge, so that every outcome occurs."""
    tolerances = {
        "rtol": draw(st.sampled_from([0.0, 1e-2, 1e-6, 1e-10])),
        "atol": draw(st.sampled_from([0.0, 1e-9])),
    }
    budget = {"max_steps": draw(st.integers(1, 80))}
    step = {"alpha": draw(st.sampled_from(["auto", 1e-3, 0.5, 1.0]))}
    if kind == "CG":
        preconditioner = draw(st.sampled_from([None, "jacobi"]))
        probes = draw(st.integers(1, 8))
        return implicitfn.CG(**budget, **tolerances, preconditioner=preconditioner, probes=probes)
    if kind == "MINRES":
        return implicitfn.MINRES(**budget, **tolerances)
    if kind == "GMRES":
        return implicitfn.GMRES(**budget, **tolerances, restart=draw(st.integers(1, 12)))
    if kind == "FixedPoint":
        return implicitfn.FixedPoint(**budget, **tolerances, **step)
    if kind == "Neumann":
        return implicitfn.Neumann(**budget, **tolerances, **step)
    if kind == "StochasticNeumann":
        scales = draw(st.lists(st.floats(0.8, 1.2), min_size=1, max_size=3))
        return implicitfn.StochasticNeumann([(s,) for s in scales], **budget, **tolerances, **step)
    if kind == "Nystrom":
        return implicitfn.Nystrom(
            rank=draw(st.integers(1, 20)),
            damping=draw(st.sampled_from([1e-3, 1.0, 100.0])),
            sketch=draw(st.sampled_from(["gaussian", "columns"])),
            **tolerances,
        )
    if kind == "Dense":
        return implicitfn.Dense(rtol=tolerances["rtol"] or 1e-12, atol=tolerances["atol"])
    assert kind == "Identity", kind
    return implicitfn.Identity(**tolerances)


@st.composite
def prox_points(draw, min_size: int = 1, max_size: int = 8, dtype=torch.float64):
    """(z, strengths, step): a point for a prox or projection, one positive strength per
    coordinate (in [0.1, 1.1]) and a step; tests `assume` their distance from the kinks."""
    size = draw(st.integers(min_size, max_size))
    seed = draw(st.integers(0, 2**16))
    step = draw(st.sampled_from([0.1, 0.5, 1.0]))
    gen = torch.Generator().manual_seed(seed)
    z = 2 * torch.randn(size, generator=gen, dtype=dtype)
    strengths = 0.1 + torch.rand(size, generator=gen, dtype=dtype)
    return z, strengths, step


# -- user programs (issue 16): pytree structures, small modules, inner solvers, calling styles ----

# Containers a user may pass as params or hparams; a TensorDict holds tensors and TensorDicts only.
PYTREE_KINDS = ("tensor", "tuple", "list", "dict", "tensordict")
# How the inner solver is written: torch.optim on the copies it is given, in place (the torch
# habit), a pure function that builds a new tree, or implicitfn.minimize in one line.
INNER_SOLVERS = ("lbfgs-in-place", "sgd-in-place", "functional-newton", "minimize")
# How the decorated function is called: every data argument positional, the last one as a
# keyword, or all of them as keywords.
CALL_STYLES = ("positional", "last-keyword", "all-keywords")


@st.composite
def leaf_shapes(draw, max_size: int = 2):
    return tuple(draw(st.lists(st.integers(1, max_size), min_size=0, max_size=2)))


@st.composite
def pytree_structures(draw, depth: int = 2, max_children: int = 3, inside_tensordict: bool = False):
    """A nested description of a pytree: `("tensor", shape)` or `(kind, [children])` with kind
    in `PYTREE_KINDS`; containers are never empty, and inside a TensorDict only tensors and
    TensorDicts occur. Build it with `build_pytree`."""
    kinds = ("tensor", "tensordict") if inside_tensordict else PYTREE_KINDS
    kind = draw(st.sampled_from(kinds if depth > 0 else ("tensor",)))
    if kind == "tensor":
        return ("tensor", draw(leaf_shapes()))
    count = draw(st.integers(1, max_children))
    children = [
        draw(
            pytree_structures(
                depth=depth - 1,
                max_children=max_children,
                inside_tensordict=inside_tensordict or kind == "tensordict",
            )
        )
        for _ in range(count)
    ]
    return (kind, children)


def pytree_size(structure) -> int:
    """The number of scalars in a tree of the drawn structure."""
    kind, content = structure
    if kind == "tensor":
        return int(torch.Size(content).numel())
    return sum(pytree_size(child) for child in content)


def build_pytree(structure, make):
    """The tree of the drawn structure, with leaves `make(shape)`, in the containers drawn."""
    kind, content = structure
    if kind == "tensor":
        return make(content)
    children = [build_pytree(child, make) for child in content]
    if kind == "tuple":
        return tuple(children)
    if kind == "list":
        return children
    named = {f"k{i}": child for i, child in enumerate(children)}
    return TensorDict(named) if kind == "tensordict" else named


@st.composite
def pytree_programs(draw, max_params: int = 10, max_hparams: int = 6):
    """A user program on random pytrees: regularised logistic regression whose weights live in
    a params tree of the drawn structure and whose per-weight penalties come from an hparams
    tree of another structure, with example weights as a differentiable data argument.

    Returns a dict: `params` and `hparams` structures, `with_none` (an extra None entry in
    hparams and a None data argument, passed through), `solver` (in `INNER_SOLVERS`), `call`
    (in `CALL_STYLES`) and `seed`."""
    params = draw(pytree_structures().filter(lambda s: 1 <= pytree_size(s) <= max_params))
    hparams = draw(pytree_structures().filter(lambda s: 1 <= pytree_size(s) <= max_hparams))
    solver = draw(st.sampled_from(INNER_SOLVERS))
    # minimize(loss, params, hparams, *args) takes the data positionally.
    call = "positional" if solver == "minimize" else draw(st.sampled_from(CALL_STYLES))
    return {
        "params": params,
        "hparams": hparams,
        "with_none": draw(st.booleans()),
        "solver": solver,
        "call": call,
        "seed": draw(st.integers(0, 2**16)),
    }


@st.composite
def module_programs(draw):
    """A small classifier `torch.nn.Sequential` and how a user trains and differentiates it.

    Returns a dict: `hidden` (widths of 1 or 2 tanh layers), `batch_norm` (a BatchNorm1d after
    each hidden Linear), `dropout` (None, or the mode of the Dropout layer in the condition:
    "off" (eval mode; the inner solver trains with it off too) or "on" (the training loss
    draws masks; the backward pass sees one draw)), `curvature` ("hessian" or "gauss-newton"),
    `per_layer` (one weight decay per parameter tensor, or one for all), `solver`
    ("lbfgs-in-place" or "minimize"), `call` (in `CALL_STYLES`) and `seed`."""
    hidden = draw(st.lists(st.integers(2, 4), min_size=1, max_size=2))
    dropout = draw(st.sampled_from([None, "off", "on"]))
    solver = draw(st.sampled_from(["lbfgs-in-place", "minimize"]))
    return {
        "hidden": hidden,
        "batch_norm": draw(st.booleans()),
        "dropout": dropout,
        "curvature": draw(st.sampled_from(["hessian", "gauss-newton"])),
        "per_layer": draw(st.booleans()),
        "solver": solver,
        "call": "positional" if solver == "minimize" else draw(st.sampled_from(CALL_STYLES)),
        "seed": draw(st.integers(0, 2**16)),
    }
