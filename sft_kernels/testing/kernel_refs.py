"""Kernels named across processes: the ``@triton.jit`` function under autotune / heuristics
wrappers (:func:`_unwrap`), and :class:`_FnRef`, a picklable reference (module, qualname,
file) that a worker process resolves by re-importing the module, so that every
``@triton.jit`` there, helpers included, is a real ``JITFunction`` (see :mod:`.runner` for
why a worker)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from .ptxas import CompileError

def _unwrap(obj):
    """The JITFunction / InterpretedFunction under autotune / heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        InterpretedFunction = ()
    seen = 0
    while not isinstance(obj, (JITFunction, InterpretedFunction)):
        inner = getattr(obj, "fn", None)
        if inner is None or seen > 10:
            raise TypeError(f"{obj!r} is not a @triton.jit function")
        obj, seen = inner, seen + 1
    return obj


def _python_fn(obj):
    return _unwrap(obj).fn


def _is_jit(obj) -> bool:
    from triton.runtime.jit import JITFunction

    try:
        return isinstance(_unwrap(obj), JITFunction)
    except TypeError:
        return False


def _is_kernel_like(obj) -> bool:
    try:
        _unwrap(obj)
        return True
    except TypeError:
        return False


@dataclass(frozen=True)
class _FnRef:
    module: str
    qualname: str
    file: str

    @classmethod
    def of(cls, obj) -> "_FnRef":
        py = _python_fn(obj)
        if "<locals>" in py.__qualname__:
            raise CompileError(
                f"kernel {py.__qualname__} is defined inside a function; the compile check "
                "re-imports kernels, so define it at module level")
        return cls(py.__module__, py.__qualname__, py.__code__.co_filename)

    def resolve(self):
        import importlib
        import importlib.util

        mod = None
        if self.module != "__main__":
            try:
                mod = importlib.import_module(self.module)
            except ImportError:
                mod = None
        if mod is None or not _same_file(getattr(mod, "__file__", None), self.file):
            modname = f"_sft_compile_check_{abs(hash(self.file))}"
            mod = sys.modules.get(modname)
            if mod is None:
                spec = importlib.util.spec_from_file_location(modname, self.file)
                mod = importlib.util.module_from_spec(spec)
                sys.modules[modname] = mod
                spec.loader.exec_module(mod)
        obj = mod
        for part in self.qualname.split("."):
            obj = getattr(obj, part)
        return _unwrap(obj)


def _same_file(a, b) -> bool:
    try:
        return bool(a) and os.path.samefile(a, b)
    except OSError:
        return False


def _to_wire(value):
    """Replace kernels inside constexpr values by references (for the subprocess)."""
    if _is_kernel_like(value):
        return _FnRef.of(value)
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_to_wire(v) for v in value)
    return value


def _from_wire(value):
    if isinstance(value, _FnRef):
        return value.resolve()
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_from_wire(v) for v in value)
    return value
