"""Property tests over generated user programs (issue 16): random pytree structures for params
and hparams, small module architectures with and without BatchNorm and Dropout, inner solvers
written with in-place `torch.optim` or as pure functions or `implicitfn.minimize`, keyword and
positional calls. Each asserts, against a dense float64 implicit-function-theorem oracle, that
the hypergradient is right, and that no tensor of the caller (params, hparams, data, module)
changed. The strategies are in `strategies.py`; every example is a tiny problem."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from helpers import (
    assert_untouched,
    dense_implicit_hypergradient,
    forward_over_reverse_hessian,
    ravel_tree,
    relative_error,
    snapshot,
    storage,
)
from hypothesis import event, given
from strategies import build_pytree, module_programs, pytree_programs, pytree_size

import implicitfn

F64 = torch.float64


def call(fit, style, params, hparams, *data, names):
    """`fit(params, hparams, *data)` in the drawn calling style."""
    if style == "positional":
        return fit(params, hparams, *data)
    if style == "last-keyword":
        return fit(params, hparams, *data[:-1], **{names[-1]: data[-1]})
    return fit(params, hparams, **dict(zip(names, data, strict=True)))


def describe(structure) -> str:
    """The containers of a drawn structure, outermost first (for hypothesis' statistics)."""
    kind, content = structure
    if kind == "tensor":
        return "tensor"
    return f"{kind}[{', '.join(describe(child) for child in content)}]"


# -- random pytrees ------------------------------------------------------------------------------


def flat(tree) -> torch.Tensor:
    """What a user writes to treat any tree of tensors as one vector (None entries skipped)."""
    return torch.cat([t.reshape(-1) for t in pytree.tree_leaves(tree) if t is not None])


def in_place_solver(kind):
    """The inner solver as a user writes it with torch.optim: trains the leaves it is given."""

    def fit(params, hparams, x, y, weights, mask=None):
        leaves = pytree.tree_leaves(params)
        for leaf in leaves:
            leaf.requires_grad_()
        if kind == "lbfgs-in-place":
            optimizer = torch.optim.LBFGS(
                leaves, max_iter=200, tolerance_grad=1e-12, line_search_fn="strong_wolfe"
            )
            steps = 1
        else:
            optimizer, steps = torch.optim.SGD(leaves, lr=0.3), 300

        def closure():
            optimizer.zero_grad()
            loss = fit.loss(params, hparams, x, y, weights, mask)
            loss.backward()
            return loss

        for _ in range(steps):
            optimizer.step(closure)
        return pytree.tree_map(lambda t: t.detach(), params)

    return fit


def functional_newton(params, hparams, x, y, weights, mask=None):
    """The inner solver as a pure function: Newton's method on the raveled leaves, building a
    new tree of the same structure."""
    leaves, spec = pytree.tree_flatten(params)
    sizes = [leaf.numel() for leaf in leaves]

    def tree(vector):
        parts = vector.split(sizes)
        return pytree.tree_unflatten(
            [p.reshape(leaf.shape) for p, leaf in zip(parts, leaves, strict=True)], spec
        )

    def loss(vector):
        return functional_newton.loss(tree(vector), hparams, x, y, weights, mask)

    vector = flat(params)
    for _ in range(12):
        step = torch.linalg.solve(torch.func.hessian(loss)(vector), torch.func.grad(loss)(vector))
        vector = vector - step
    return tree(vector)


@given(program=pytree_programs())
def test_any_pytree_any_solver_any_call_gives_the_dense_hypergradient(program):
    gen = torch.Generator().manual_seed(program["seed"])
    d, k, n = pytree_size(program["params"]), pytree_size(program["hparams"]), 12
    for key in ("solver", "call", "with_none"):
        event(f"{key}={program[key]}")
    event(f"params: {describe(program['params'])}")

    def normal(*shape, scale=1.0):
        return scale * torch.randn(shape, generator=gen, dtype=F64)

    x, x_val = normal(n, d), normal(n, d)
    y = (torch.rand(n, generator=gen) > 0.5).to(F64)
    y_val = (torch.rand(n, generator=gen) > 0.5).to(F64)
    weights = (0.5 + torch.rand(n, generator=gen, dtype=F64)).requires_grad_()
    mixing = normal(d, k, scale=0.3)
    params = build_pytree(program["params"], lambda shape: normal(*shape, scale=0.1))
    hparams = build_pytree(
        program["hparams"], lambda shape: normal(*shape, scale=0.3).requires_grad_()
    )
    extra = ()
    if program["with_none"]:  # None entries are passed through untouched
        hparams, extra = {"penalties": hparams, "schedule": None}, (None,)

    def train_loss(params, hparams, x, y, weights, mask=None):
        assert mask is None
        w = flat(params)
        decay = torch.exp(mixing @ flat(hparams))  # per-weight penalties from the hparams tree
        data = weights * F.binary_cross_entropy_with_logits(x @ w, y, reduction="none")
        return data.mean() + 0.5 * (decay * w**2).sum()

    def val_loss(params):
        return F.binary_cross_entropy_with_logits(x_val @ flat(params), y_val)

    adjoint = implicitfn.ImplicitAdjoint(solver=implicitfn.CG(max_steps=100, rtol=1e-13))
    before = snapshot((params, hparams, x, y, weights))
    data, names = (x, y, weights, *extra), ("x", "y", "weights", "mask")[: 3 + len(extra)]
    if program["solver"] == "minimize":
        w = implicitfn.minimize(train_loss, params, hparams, *data, tol=1e-11, adjoint=adjoint)
    else:
        inner = (
            functional_newton
            if program["solver"] == "functional-newton"
            else in_place_solver(program["solver"])
        )
        inner.loss = train_loss
        fit = implicitfn.implicit_diff(implicitfn.stationarity(train_loss), adjoint=adjoint)(inner)
        w = call(fit, program["call"], params, hparams, *data, names=names)

    assert pytree.tree_structure(w) == pytree.tree_structure(params)
    assert not storage(w) & storage((params, hparams, x, y, weights))
    inputs = [t for t in pytree.tree_leaves(hparams) if t is not None] + [weights]
    grads = torch.autograd.grad(val_loss(w), inputs)
    assert_untouched((params, hparams, x, y, weights), before)

    expected = dense_implicit_hypergradient(
        lambda w, z: train_loss(w, z[0], x, y, z[1]),
        lambda w, z: val_loss(w),
        pytree.tree_map(lambda t: t.detach(), w),
        (pytree.tree_map(lambda t: None if t is None else t.detach(), hparams), weights.detach()),
    )
    expected = [t for t in pytree.tree_leaves(expected) if t is not None]
    assert relative_error(list(grads), expected) < 1e-7


# -- small modules -------------------------------------------------------------------------------


def make_net(program) -> torch.nn.Sequential:
    torch.manual_seed(program["seed"])
    layers, width = [], 3
    for hidden in program["hidden"]:
        layers.append(torch.nn.Linear(width, hidden))
        if program["batch_norm"]:
            layers.append(torch.nn.BatchNorm1d(hidden))
        layers.append(torch.nn.Tanh())
        if program["dropout"] is not None:
            layers.append(torch.nn.Dropout(0.3))
        width = hidden
    layers.append(torch.nn.Linear(width, 2))
    return torch.nn.Sequential(*layers).to(F64)


def with_rng_state(state, fn):
    """`fn` drawing, on every call, the random numbers that `state` gives."""

    @functools.wraps(fn)
    def fixed(*args):
        torch.random.set_rng_state(state)
        return fn(*args)

    return fixed


@given(program=module_programs())
def test_small_modules_give_the_dense_hypergradient_and_stay_untouched(program):
    gen = torch.Generator().manual_seed(program["seed"])
    n = 16
    for key in ("batch_norm", "dropout", "curvature", "solver", "call", "per_layer"):
        event(f"{key}={program[key]}")
    x, x_val = (torch.randn(n, 3, generator=gen, dtype=F64) for _ in range(2))
    y, y_val = (torch.randint(0, 2, (n,), generator=gen) for _ in range(2))
    net = make_net(program)
    module_before = {k: v.clone() for k, v in net.state_dict().items()}
    dropout_on = program["dropout"] == "on"
    apply, params = implicitfn.functional_model(net, dropout="on" if dropout_on else "off")
    evaluate, _ = implicitfn.functional_model(net)  # validation: dropout off
    names = [name for name, _ in net.named_parameters()]
    if program["per_layer"]:
        log_decay = {name: torch.tensor(-2.0 + 0.1 * i, dtype=F64) for i, name in enumerate(names)}
    else:
        log_decay = {"all": torch.tensor(-2.0, dtype=F64)}
    hparams = {key: t.requires_grad_() for key, t in log_decay.items()}

    def penalty(params, hparams, x, y):
        named = params.flatten_keys(".")
        return 0.5 * sum(
            hparams[name if program["per_layer"] else "all"].exp() * (named[name] ** 2).sum()
            for name in names
        )

    train_loss = implicitfn.CompositeLoss(
        predict=lambda params, hparams, x, y: apply(params, x),
        output_loss=lambda logits, hparams, x, y: F.cross_entropy(logits, y),
        penalty=penalty,
    )

    def val_loss(params):
        return F.cross_entropy(evaluate(params, x_val), y_val)

    if program["curvature"] == "hessian":  # symmetric, maybe indefinite: MINRES
        solver, curvature = implicitfn.MINRES(max_steps=500, rtol=1e-12), implicitfn.Hessian()
    else:  # positive definite with the penalty: CG
        solver, curvature = implicitfn.CG(max_steps=500, rtol=1e-12), implicitfn.GaussNewton()
    # With dropout on, the point Adam reaches on fresh masks does not minimise one mask's loss.
    adjoint = implicitfn.ImplicitAdjoint(
        solver=solver, curvature=curvature, inner_rtol=None if dropout_on else 0.1
    )
    params_before = snapshot((params, hparams, x, y))

    if program["solver"] == "minimize":
        options = (
            {"optimizer": "adam", "learning_rate": 1e-2, "max_steps": 100, "tol": 0}
            if dropout_on
            else {"tol": 1e-9}
        )
        w = implicitfn.minimize(train_loss, params, hparams, x, y, adjoint=adjoint, **options)
    else:

        @implicitfn.implicit_diff(implicitfn.stationarity(train_loss), adjoint=adjoint)
        def fit(params, hparams, x, y):
            params.requires_grad_()
            if dropout_on:
                optimizer, steps = torch.optim.Adam(params.values(True, True), lr=1e-2), 100
            else:
                optimizer, steps = (
                    torch.optim.LBFGS(
                        params.values(True, True),
                        max_iter=300,
                        tolerance_grad=1e-10,
                        line_search_fn="strong_wolfe",
                    ),
                    1,
                )

            def closure():
                optimizer.zero_grad()
                loss = train_loss(params, hparams, x, y)
                loss.backward()
                return loss

            for _ in range(steps):
                optimizer.step(closure)
            return params.detach()

        w = call(fit, program["call"], params, hparams, x, y, names=("x", "y"))

    outer = val_loss(w)
    state = torch.random.get_rng_state()
    grads = torch.autograd.grad(outer, list(hparams.values()))
    assert torch.equal(torch.random.get_rng_state(), state), "the backward pass moved the RNG"

    point = {key: t.detach() for key, t in hparams.items()}
    solution = w.detach()
    fixed = functools.partial(with_rng_state, state)
    if program["curvature"] == "hessian":
        # Forward-over-reverse (see helpers); one draw of the masks for every direction.
        hessian = (
            (lambda fn: torch.func.jacfwd(torch.func.grad(fn), randomness="same"))
            if dropout_on
            else forward_over_reverse_hessian
        )
        matrix = None
    else:
        hessian, matrix = None, gauss_newton(apply, penalty, solution, point, x, y, fixed)
    with torch.random.fork_rng(devices=[]):
        expected = dense_implicit_hypergradient(
            fixed(lambda w, h: train_loss(w, h, x, y)),
            lambda w, h: val_loss(w),
            solution,
            point,
            hessian=hessian,
            matrix=matrix,
        )
    assert relative_error(list(grads), list(expected.values())) < 1e-6
    after = net.state_dict()
    assert all(torch.equal(after[k], v) for k, v in module_before.items())
    assert all(m.training for m in net.modules())
    assert_untouched((params, hparams, x, y), params_before)


def gauss_newton(apply, penalty, solution, hparams, x, y, fixed):
    r"""$J^\top H_{out} J + \nabla^2$ penalty at `solution`, raveled like `ravel_tree`; the masks
    of `fixed` (an RNG state) in every evaluation of `apply`."""
    vector, unravel = ravel_tree(solution)
    with torch.random.fork_rng(devices=[]):
        predict = fixed(lambda v: apply(unravel(v), x).reshape(-1))
        logits = predict(vector)
        # jacfwd: forward mode takes a randomness flag (the same mask for every direction).
        jacobian = torch.func.jacfwd(predict, randomness="same")(vector)
    output_hessian = torch.func.hessian(lambda out: F.cross_entropy(out.reshape(-1, 2), y))(logits)
    penalty_hessian = torch.func.hessian(lambda v: penalty(unravel(v), hparams, x, y))(vector)
    return jacobian.T @ output_hessian @ jacobian + penalty_hessian
