import pytest
import torch
from helpers import assert_trees_close, assert_unchanged, clone_tree
from hypothesis import given
from strategies import build_tree, tree_structures
from tensordict import TensorDict

import implicitfn


def randn(shape, dtype):
    return torch.randn(shape, dtype=dtype)


@given(tree_structures())
def test_algebra_matches_flat_vectors(structure):
    a = build_tree(structure, randn)
    b = build_tree(structure, randn)
    a_before, b_before = clone_tree(a), clone_tree(b)
    flat_a, unravel = implicitfn.tree_ravel(a)
    flat_b, _ = implicitfn.tree_ravel(b)
    torch.testing.assert_close(implicitfn.tree_vdot(a, b), flat_a @ flat_b)
    torch.testing.assert_close(implicitfn.tree_norm(a), torch.linalg.vector_norm(flat_a))
    axpy = implicitfn.tree_axpy(2.5, a, b)
    torch.testing.assert_close(implicitfn.tree_ravel(axpy)[0], 2.5 * flat_a + flat_b)
    assert_trees_close(unravel(flat_a), a)
    zeros = implicitfn.tree_zeros_like(a)
    assert float(implicitfn.tree_norm(zeros)) == 0.0
    assert type(zeros) is type(a)
    assert_unchanged(a_before, a)
    assert_unchanged(b_before, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_is_preserved(dtype):
    tree = TensorDict({"a": torch.ones(2, dtype=dtype), "b": {"c": torch.ones(3, dtype=dtype)}})
    assert implicitfn.tree_vdot(tree, tree).dtype == dtype
    assert implicitfn.tree_ravel(tree)[0].dtype == dtype


def test_vmap_over_tree_algebra_equals_loop():
    batch = TensorDict({"a": torch.randn(4, 3), "b": {"c": torch.randn(4, 2)}}, batch_size=[4])
    batched = torch.func.vmap(lambda t: implicitfn.tree_vdot(t, t))(batch)
    looped = torch.stack([implicitfn.tree_vdot(batch[i], batch[i]) for i in range(4)])
    torch.testing.assert_close(batched, looped)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None])
def test_all_finite_reads_the_whole_tree_once_and_is_exact(bad):
    """One read for the tree, and no false alarm when a leaf's sum overflows its dtype."""
    from implicitfn._solution import all_finite

    overflowing = torch.full((4,), 3e38, dtype=torch.float32)  # finite, sum = inf in float32
    tree = {
        "a": overflowing,
        "b": {"c": torch.ones(3, dtype=torch.float64), "d": torch.zeros(2, 2)},
        "e": torch.arange(3),  # integer leaves are finite by construction
    }
    if bad is not None:
        tree["b"]["c"] = tree["b"]["c"].clone()
        tree["b"]["c"][1] = bad
    assert all_finite(tree) is (bad is None)
    assert all_finite(TensorDict({"w": torch.ones(2), "v": torch.ones(3)})) is True
