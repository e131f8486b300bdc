"""Opt-in compilation with `torch.compile` of a pure function of tensors, with a bounded cache.

The adjoint compiles its own reverse pass (and [`hypergradient`][implicitfn.hypergradient] the
whole hypergradient) through a [`CompiledFunctions`] that the adjoint owns: there is no second
copy of the maths here, only the mechanics of compiling, caching and falling back.

- A function is compiled once per *family* (what it computes: the condition, the selected inputs)
  and per tensor metadata (shapes, dtypes, devices). Each artefact gets a code object of its
  own, so dynamo's per-code cache and recompile limit never mix artefacts. The cache keeps the
  `max_artefacts` most recently used ones.
- The first call of every artefact is checked by a caller-given acceptance test (the adjoint
  compares what its solve guarantees: the residual, measured eagerly, and the mixed product).
- A failure to compile, of the exception types torch raises for that (`torch._dynamo.exc`'s
  `Unsupported`, `BackendCompilerFailed`, `TorchRuntimeError`, inductor's `InductorError`,
  `InvalidCxxCompiler`, ...), or a failed acceptance test makes that family run eagerly from
  then on, with one [`CompileWarning`][implicitfn.CompileWarning]; the reason stays readable in
  `fallbacks`. Any other exception is a bug and propagates.
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import types
import warnings
from collections.abc import Callable, Hashable
from typing import Any

import torch
import torch.utils._pytree as pytree

from implicitfn._solution import under_transform

__all__ = ["Compile", "CompileWarning"]

_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclasses.dataclass(frozen=True)
class Compile:
    r"""How an [`ImplicitAdjoint`][implicitfn.ImplicitAdjoint] compiles its backward pass.

    Pass `compile=True` for the defaults, a mode string, or an instance of this class. The
    adjoint's solver must run a fixed number of steps (`solver.fixed_steps`, e.g.
    `CG(max_steps=10, rtol=0)`): then the whole reverse pass — linearisation, every solver
    step, the mixed product $B^\top v$ — is one graph, and with
    [`hypergradient`][implicitfn.hypergradient] the outer gradient too. Compiling costs seconds
    to a minute once per problem shape; see the "Compiled hypergradients" page.

    **Arguments:**

    - `mode`: the `torch.compile` mode: `"default"`, `"reduce-overhead"` (CUDA graphs on GPU;
      on CPU inductor's C++ wrapper), `"max-autotune"` or `"max-autotune-no-cudagraphs"`.
      Used with the `"inductor"` backend only.
    - `backend`: `"inductor"` (default: generated C++/Triton kernels) or another registered
      backend, e.g. `"aot_eager"` (no code generation: compiles in seconds) or `"eager"`.
    - `max_artefacts`: how many compiled graphs the adjoint keeps (least recently used dropped).

    ```python
    >>> import torch, implicitfn
    >>> inner = lambda w, lam: 0.5 * ((w - 1.0) ** 2).sum() + 0.5 * lam * (w ** 2).sum()
    >>> outer = lambda w, lam: (w ** 2).sum()
    >>> w_star, lam = torch.full((2,), 0.5), torch.tensor(1.0)
    >>> adjoint = implicitfn.ImplicitAdjoint(solver=implicitfn.CG(max_steps=2, rtol=0),
    ...                                      compile=implicitfn.Compile(backend="eager"))
    >>> g, info = implicitfn.hypergradient(inner, outer, w_star, lam, adjoint=adjoint)
    >>> round(float(g), 4)
    -0.5
    ```
    """

    mode: str = "default"
    backend: str | Callable[..., Any] = "inductor"
    max_artefacts: int = 16

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"mode: expected one of {list(_MODES)}, got {self.mode!r}.")
        if not (isinstance(self.backend, str) or callable(self.backend)):
            raise TypeError(
                f"backend: expected a torch.compile backend name such as 'inductor' or "
                f"'aot_eager', got {type(self.backend).__name__}."
            )
        if isinstance(self.max_artefacts, bool) or not isinstance(self.max_artefacts, int):
            raise TypeError(
                f"max_artefacts: expected an int, got {type(self.max_artefacts).__name__}."
            )
        if self.max_artefacts < 1:
            raise ValueError(f"max_artefacts: must be >= 1 (got {self.max_artefacts}).")


class CompileWarning(RuntimeWarning):
    """A compiled backward pass fell back to eager (same results, eager speed).

    Issued once per adjoint and reason; the adjoint's `compile_fallbacks` keeps every reason.

    ```python
    >>> import implicitfn
    >>> issubclass(implicitfn.CompileWarning, RuntimeWarning)
    True
    ```
    """


def as_compile(value: Any) -> Compile | None:
    """Resolve the `compile=` option: `False` -> None, `True` -> `Compile()`, a mode, a `Compile`."""
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


def _compile_failures() -> tuple[type[BaseException], ...]:
    """The exception types with which torch says "this cannot be compiled here"."""
    import torch._dynamo.exc as dynamo
    import torch._inductor.exc as inductor

    names = [
        (dynamo, "Unsupported"),
        (dynamo, "BackendCompilerFailed"),
        (dynamo, "TorchRuntimeError"),
        (dynamo, "UncapturedHigherOrderOpError"),
        (dynamo, "UserError"),  # e.g. a guard on a data-dependent value in the loss
        (dynamo, "InternalTorchDynamoError"),
        (inductor, "InductorError"),
        (inductor, "InvalidCxxCompiler"),
        (inductor, "CppCompileError"),
    ]
    return tuple(getattr(module, name) for module, name in names if hasattr(module, name))


NOT_COMPILED = object()  # returned when the caller must run the function eagerly
_FAILED = object()  # a cache entry: this key runs eagerly

Acceptance = Callable[[Any, tuple], "str | None"]


class CompiledFunctions:
    """The compiled artefacts of one owner (an adjoint), least recently used dropped first."""

    def __init__(self, options: Compile) -> None:
        self.options = options
        self.fallbacks: dict[str, str] = {}  # family name -> why it runs eagerly
        self.compiled = 0  # artefacts compiled so far (for tests and benchmarks)
        self._artefacts: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
        self._failed_families: set[Hashable] = set()

    def __len__(self) -> int:
        return len(self._artefacts)

    def call(
        self,
        family: Hashable,
        name: str,
        build: Callable[[], Callable[..., Any]],
        trees: tuple,
        accept: Acceptance,
    ) -> Any:
        """`build()(*trees)` compiled, or `NOT_COMPILED` for the caller to run it eagerly.

        `family` identifies the function `build` makes (the same family must build the same
        function); `name` says in words what it computes. Without an outer graph to record
        (grad mode off, or no input requiring grad) it runs on detached inputs, so a backward
        pass and a plain call share one graph. Inside `torch.func` transforms nothing is compiled.
        """
        if under_transform():  # eager here only; later calls outside transforms still compile
            self._warn(name, "it is called inside a torch.func transform (vmap, grad, jvp, ...)")
            return NOT_COMPILED
        if family in self._failed_families:
            return NOT_COMPILED
        flat, spec = pytree.tree_flatten(trees)
        positions = [i for i, leaf in enumerate(flat) if isinstance(leaf, torch.Tensor)]
        tensors = [flat[i] for i in positions]
        differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        if not differentiable:
            tensors = [t.detach() for t in tensors]
        statics = tuple(None if isinstance(leaf, torch.Tensor) else leaf for leaf in flat)
        meta = tuple((t.shape, t.dtype, t.device, t.requires_grad) for t in tensors)
        try:
            key = (family, spec, statics, meta)
            hash(key)
        except TypeError as error:  # an unhashable condition or argument
            self._fall_back(family, name, f"a part of the configuration is not hashable ({error})")
            return NOT_COMPILED
        artefact = self._artefacts.get(key)
        if artefact is _FAILED:
            return NOT_COMPILED
        if artefact is not None:
            self._artefacts.move_to_end(key)
            with torch.set_grad_enabled(differentiable):
                return self._finish(artefact(*tensors))

        fn = build()

        def rebuild(values: tuple[torch.Tensor, ...]) -> tuple:
            full = list(statics)
            for i, value in zip(positions, values, strict=True):
                full[i] = value
            return pytree.tree_unflatten(full, spec)

        def entry(*values: torch.Tensor) -> Any:
            return fn(*rebuild(values))

        code_name = f"implicitfn_{name.replace(' ', '_')}_{self.compiled}"
        compiled = self._compile(
            _fresh_function(entry, code_name), {t.device.type for t in tensors}
        )
        with torch.set_grad_enabled(differentiable):
            try:
                with warnings.catch_warnings():  # torch's own notes while tracing
                    warnings.filterwarnings("ignore", module=r"torch\.")
                    warnings.filterwarnings("ignore", category=DeprecationWarning)
                    output = compiled(*tensors)
            except _compile_failures() as error:
                self._artefacts[key] = _FAILED
                self._fall_back(family, name, f"{type(error).__name__}: {_first_line(error)}")
                return NOT_COMPILED
            self.compiled += 1
            rejection = accept(output, rebuild(tuple(tensors)))
        if rejection is not None:
            self._artefacts[key] = _FAILED
            self._fall_back(family, name, f"the compiled result failed its check ({rejection})")
            return NOT_COMPILED
        self._artefacts[key] = compiled
        while len(self._artefacts) > self.options.max_artefacts:
            self._artefacts.popitem(last=False)
        return self._finish(output)

    def _compile(self, fn: Callable[..., Any], devices: set[str]) -> Callable[..., Any]:
        """`torch.compile` with the options; `"reduce-overhead"` on CPU means inductor's C++
        wrapper (kernels called from C++ instead of generated Python), on GPU CUDA graphs."""
        options = self.options
        kwargs: dict[str, Any] = {"fullgraph": True, "dynamic": False, "backend": options.backend}
        if options.backend == "inductor":
            if options.mode == "reduce-overhead" and devices == {"cpu"}:
                kwargs["options"] = {"cpp_wrapper": True}
            elif options.mode != "default":
                kwargs["mode"] = options.mode
        return torch.compile(fn, **kwargs)

    def _finish(self, output: Any) -> Any:
        if self.options.mode == "reduce-overhead":  # CUDA graphs reuse their output buffers
            return pytree.tree_map(
                lambda t: t.clone() if isinstance(t, torch.Tensor) and t.is_cuda else t, output
            )
        return output

    def _fall_back(self, family: Hashable, name: str, reason: str) -> None:
        """Run `family` eagerly from now on, and say why."""
        self._failed_families.add(family)
        self._warn(name, reason)

    def _warn(self, name: str, reason: str) -> None:
        """One warning per reason; `fallbacks` keeps the last reason for each computation."""
        if self.fallbacks.get(name) == reason:
            return
        self.fallbacks[name] = reason
        warnings.warn(
            f"implicitfn: compile={self.options!r} did not compile {name} ({reason}); it runs "
            "eagerly, with the same results at eager speed. Common causes: Python "
            "control flow on tensor values in a loss, an operation torch.compile cannot capture, "
            "or no working C++ compiler (Compile(backend='aot_eager') needs none).",
            CompileWarning,
            stacklevel=5,
        )


def _fresh_function(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """A wrapper of `fn` with a code object of its own (dynamo caches per code object)."""

    def entry(*tensors: torch.Tensor) -> Any:
        return fn(*tensors)

    changes: dict[str, Any] = {"co_name": name}
    if sys.version_info >= (3, 11):
        changes["co_qualname"] = name
    code = entry.__code__.replace(**changes)
    return types.FunctionType(code, entry.__globals__, name, None, entry.__closure__)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"
