"""Bookkeeping for monkeypatches: every original is recorded once and can be restored exactly."""

from __future__ import annotations

import importlib
from typing import Any

_MISSING = object()
# (owner, attribute name) -> the object found in owner.__dict__ before ropekit touched it
_ORIGINALS: dict[tuple[Any, str], Any] = {}


def import_optional(module_name: str):
    """The transformers module, or None when the installed version does not have it."""
    try:
        return importlib.import_module(module_name)
    except ImportError:
        return None


def original(owner: Any, name: str) -> Any:
    """The unpatched attribute (as a plain attribute lookup would return it)."""
    raw = _ORIGINALS.get((owner, name), _MISSING)
    if raw is _MISSING:
        return getattr(owner, name)
    return raw.__get__(None, owner) if isinstance(raw, (staticmethod, classmethod)) else raw


def patch(owner: Any, name: str, replacement: Any) -> None:
    """Set owner.name = replacement, remembering the original the first time. Idempotent."""
    key = (owner, name)
    if key not in _ORIGINALS:
        _ORIGINALS[key] = vars(owner).get(name, _MISSING)
    setattr(owner, name, replacement)


def is_patched(owner: Any, name: str) -> bool:
    return (owner, name) in _ORIGINALS


def unpatch_all() -> None:
    """Restore every patched attribute to the exact object it was before patching."""
    for (owner, name), raw in reversed(list(_ORIGINALS.items())):
        if raw is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, raw)
    _ORIGINALS.clear()
