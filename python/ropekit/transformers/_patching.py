"""Bookkeeping for monkeypatches: every original is recorded once and can be restored exactly.

Replacements carry a ``__ropekit_live__`` flag that ``unpatch_all`` clears: a reference to a replacement that
outlives its patch (accelerate keeps the forward it wrapped in ``_old_forward``; ``from x import f`` keeps ``f``)
then behaves as the original instead of running ropekit after ``unpatch()``.
"""

from __future__ import annotations

import importlib
import types
import weakref
from typing import Any

import torch

_MISSING = object()
# (class or module, attribute name) -> the object found in owner.__dict__ before ropekit touched it
_ORIGINALS: dict[tuple[Any, str], Any] = {}
# model instances (weakly held, so patching never keeps a model alive) -> {attribute name: (original function,
# replacement function)}; instance attributes are methods bound to the instance, stored unbound so that the entry
# holds no reference to its key
_INSTANCE_ORIGINALS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# every replacement installed since the last unpatch_all, to be marked dead by it
_INSTALLED: list[Any] = []


def import_optional(module_name: str):
    """The transformers module, or None when the installed version does not have it."""
    try:
        return importlib.import_module(module_name)
    except ImportError:
        return None


def _tracing_tensor_types() -> tuple:
    """The tensors torch's own tracers run Python code on (non-strict torch.export, make_fx): the ops' fake kernels
    serve them, so they count as plain."""
    types_ = []
    try:
        from torch._subclasses.fake_tensor import FakeTensor

        types_.append(FakeTensor)
    except ImportError:
        pass
    try:
        from torch._subclasses.functional_tensor import FunctionalTensor

        types_.append(FunctionalTensor)
    except ImportError:
        pass
    return tuple(types_)


_TRACING_TENSORS = _tracing_tensor_types()


def plain_tensors(*tensors: Any) -> bool:
    """Whether every argument is a tensor ropekit's ops have kernels for: a plain tensor or parameter, or a tracer's
    fake / functional tensor. Any other tensor subclass, such as the DTensor of torch's own tensor / sequence
    parallelism, has no sharding rule or dispatch for them, so a patch hands such calls to transformers' code.
    ``None`` arguments are skipped."""
    return all(
        t is None or type(t) is torch.Tensor or type(t) is torch.nn.Parameter or isinstance(t, _TRACING_TENSORS)
        for t in tensors
    )


def _kernel_device_types() -> frozenset:
    """The device types this build of ropekit has kernels for: CPU, meta (the fake kernels), CUDA where built."""
    from .. import ops  # noqa: F401 - the kernels are registered when ropekit.ops has loaded the extension

    cuda = torch._C._dispatch_has_kernel_for_dispatch_key("ropekit::apply_rope", "CUDA")  # ropekit.has_cuda_kernels
    return frozenset(("cpu", "meta") + (("cuda",) if cuda else ()))


# read once (the build's kernels do not change), so that torch.compile sees a constant where a patch checks it
KERNEL_DEVICE_TYPES = _kernel_device_types()


def kernel_devices(*tensors: Any) -> bool:
    """Whether every tensor (``None`` skipped) lives on a device ropekit's ops have kernels for; on any other (a
    CPU-only build's CUDA tensors, MPS, XPU) a patch hands the call to transformers' code. Runs on every patched
    call: the common cases are tested with tensor flags (well under a microsecond), not ``.device``."""
    types_ = KERNEL_DEVICE_TYPES
    for t in tensors:
        if t is not None and ("cpu" if t.is_cpu else "cuda" if t.is_cuda else "meta" if t.is_meta
                              else t.device.type) not in types_:
            return False
    return True


def global_module_hooks() -> bool:
    """Hooks registered for every module (``torch.nn.modules.module.register_module_{forward,forward_pre,
    full_backward,full_backward_pre}_hook``)."""
    from torch.nn.modules import module as nn_module

    return bool(
        nn_module._global_forward_hooks
        or nn_module._global_forward_pre_hooks
        or nn_module._global_backward_hooks
        or nn_module._global_backward_pre_hooks
    )


def module_hooks(module) -> bool:
    """Any forward, forward-pre, backward or backward-pre hook on this module."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def original(owner: Any, name: str) -> Any:
    """The unpatched attribute (as a plain attribute lookup would return it)."""
    raw = _ORIGINALS.get((owner, name), _MISSING)
    if raw is _MISSING:
        return getattr(owner, name)
    return raw.__get__(None, owner) if isinstance(raw, (staticmethod, classmethod)) else raw


def is_live(replacement: Any) -> bool:
    """Whether a replacement's patch is still in force (False once unpatch_all ran)."""
    return getattr(getattr(replacement, "__func__", replacement), "__ropekit_live__", False)


def patch(owner: Any, name: str, replacement: Any) -> None:
    """Set owner.name = replacement, remembering the original the first time. Idempotent. ``owner`` is a class, a
    module, or a model instance (held weakly), whose attribute and replacement are methods bound to it."""
    if isinstance(owner, (type, types.ModuleType)):
        if (owner, name) not in _ORIGINALS:
            _ORIGINALS[(owner, name)] = vars(owner).get(name, _MISSING)
    else:
        names = _INSTANCE_ORIGINALS.setdefault(owner, {})
        first = names[name][0] if name in names else vars(owner)[name].__func__
        names[name] = (first, replacement.__func__)
    function = getattr(replacement, "__func__", replacement)
    function.__ropekit_live__ = True
    _INSTALLED.append(function)
    setattr(owner, name, replacement)


def is_patched(owner: Any, name: str) -> bool:
    return (owner, name) in _ORIGINALS


def unpatch_all() -> None:
    """Restore every patched attribute to the exact object it was before patching, and mark every replacement
    dead so that references to it kept elsewhere run the original."""
    for (owner, name), raw in reversed(list(_ORIGINALS.items())):
        _restore(owner, name, raw)
    for owner, names in list(_INSTANCE_ORIGINALS.items()):
        for name, (function, replacement) in names.items():
            if getattr(vars(owner).get(name), "__func__", None) is replacement:  # not moved since (remove_hook does)
                setattr(owner, name, types.MethodType(function, owner))
    for function in _INSTALLED:
        function.__ropekit_live__ = False
    _ORIGINALS.clear()
    _INSTANCE_ORIGINALS.clear()
    _INSTALLED.clear()


def _restore(owner: Any, name: str, raw: Any) -> None:
    if raw is not _MISSING:
        setattr(owner, name, raw)
    else:
        delattr(owner, name)
