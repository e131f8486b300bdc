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
