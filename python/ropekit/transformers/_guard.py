"""Patch-time checks: is the installed transformers code one whose behaviour ropekit reproduces?

A replacement of a whole upstream function (rotary forward, ``apply_rotary_pos_emb``,
``apply_multimodal_rotary_pos_emb``, ``get_rope_index``) or one that stands in for an upstream function's steps (the
fused op stands in for the family's RMSNorm forward and rotation) is only installed where the installed code is known
to ropekit: its **fingerprint** (below) is one that a transformers release ropekit was checked against carries, as
recorded in ``known_code.json``. Anything else, such as the code of a release that edited the function, is left
unpatched with one warning.

The fingerprint of a function is the sha256 of its normalised AST together with the normalised ASTs of the helpers it
calls that live in the same source file (``self.<method>(...)`` of its class, bare ``name(...)`` module functions),
recursively. Normalisation drops what cannot change behaviour: docstrings, type annotations, the function's own
name. Decorators, default values and every statement stay. The same function computes it from a live object
(``inspect.getsource``, at patch time) and from a wheel's source files (``scan``, to record releases), so a
recorded fingerprint means "the same code as that release".

Known wrappers are seen through: the ``kernels`` package's Hub-kernel ``Func`` module that 5.25 puts around
``apply_rotary_pos_emb`` (``use_kernel_forward_from_hub``), ``functools.wraps`` decorators, and ropekit's own
replacements.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
import os
import sys
import textwrap
import warnings
from typing import Any, Callable

_KNOWN_PATH = os.path.join(os.path.dirname(__file__), "known_code.json")


class RopekitDeclined(Warning):
    """ropekit left a transformers function or class unpatched because the installed code is not one it knows."""


# --------------------------------------------------------------------------------------------------------- wrappers


def _hub_kernel_forward(obj: Any):
    """The class-level forward of a ``kernels`` Hub-kernel function module (``@use_kernel_forward_from_hub`` on a
    function makes an ``nn.Module`` instance whose ``forward(*args, **kwargs)`` calls it), or None."""
    cls = type(obj)
    forward = vars(cls).get("forward") if hasattr(cls, "kernel_layer_name") else None
    if not inspect.isfunction(forward) or not forward.__globals__.get("__name__", "").startswith("kernels."):
        return None
    return forward


def hub_kernel_inner(obj: Any) -> Callable | None:
    """The function inside a ``kernels`` Hub-kernel function module, or None when ``obj`` is not one."""
    forward = _hub_kernel_forward(obj)
    if forward is None:
        return None
    try:
        inner = inspect.getclosurevars(forward).nonlocals.get("func")
    except (TypeError, ValueError):
        return None
    return inner if inspect.isfunction(inner) else None


def hub_kernel_routing(obj: Any) -> Callable[[], bool] | None:
    """For a ``kernels`` Hub-kernel function module: a function telling whether a call made now would reach a kernel
    that ``kernelize`` selected (the calling model's private wrapper has a forward other than the stock one), where
    the module itself must run; None when the ``kernels`` internals are not the ones ropekit knows (kernels 0.19:
    ``use_kernelized_func`` publishes ``{id(function module): (private wrapper, its forward)}`` in
    ``_ACTIVE_KERNEL_FUNCS`` while the model's forward runs)."""
    forward = _hub_kernel_forward(obj)
    active = forward.__globals__.get("_ACTIVE_KERNEL_FUNCS") if forward is not None else None
    if active is None or not callable(getattr(active, "get", None)):
        return None

    def routed() -> bool:
        functions = active.get()
        entry = functions.get(id(obj)) if functions else None
        return entry is not None and entry[1] is not forward

    return routed


def underlying(obj: Any) -> Callable | None:
    """The plain function behind ``obj``: ropekit's replacement's original, a Hub-kernel module's function,
    ``functools.wraps`` chains; None when ``obj`` is not a function ropekit can read."""
    seen = set()
    while id(obj) not in seen:
        seen.add(id(obj))
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
        elif hasattr(obj, "__ropekit_original__"):
            obj = obj.__ropekit_original__
        elif inspect.ismethod(obj):
            obj = obj.__func__
        elif inspect.isfunction(obj) and inspect.isfunction(getattr(obj, "__wrapped__", None)):
            obj = obj.__wrapped__  # functools.wraps decorators (deprecate_kwarg, kernels' use_kernelized_func)
        elif (inner := hub_kernel_inner(obj)) is not None:
            obj = inner
        elif inspect.isfunction(obj):
            return obj
        else:
            return None
    return None


# ------------------------------------------------------------------------------------------------------ fingerprints


class _Normalise(ast.NodeTransformer):
    def visit_FunctionDef(self, node):
        node = self.generic_visit(node)
        node.name = "_"
        node.returns = None
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            body = body[1:] or [ast.Pass()]
        node.body = body
        node.type_comment = None
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_arg(self, node):
        node.annotation = None
        node.type_comment = None
        return node

    def visit_AnnAssign(self, node):
        node = self.generic_visit(node)
        if node.value is None:
            return None
        return ast.Assign(targets=[node.target], value=node.value)


def _dump(node: ast.AST) -> str:
    import copy

    return ast.dump(_Normalise().visit(copy.deepcopy(node)), annotate_fields=False, include_attributes=False)


def _called_names(node: ast.AST) -> tuple[set[str], set[str]]:
    """(self.<method> names, bare function names) called in ``node``."""
    methods, functions = set(), set()
    for call in ast.walk(node):
        if not isinstance(call, ast.Call):
            continue
        func = call.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "self":
            methods.add(func.attr)
        elif isinstance(func, ast.Name):
            functions.add(func.id)
    return methods, functions


def _fingerprint(node: ast.FunctionDef, resolve: Callable[[str, str], ast.FunctionDef | None]) -> str:
    """sha256 of the normalised function and its same-file helpers. ``resolve(kind, name)`` gives a helper's AST
    (kind "method" or "function") or None for a name that is not a same-file function."""
    parts, seen, todo = [], set(), [("main", node)]
    while todo:
        key, current = todo.pop()
        parts.append(f"{key}:{_dump(current)}")
        methods, functions = _called_names(current)
        for kind, names in (("method", methods), ("function", functions)):
            for name in sorted(names):
                if (kind, name) in seen:
                    continue
                seen.add((kind, name))
                helper = resolve(kind, name)
                if helper is not None:
                    todo.append((f"{kind}.{name}", helper))
    parts.sort()
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _parsed(path: str, mtime: float) -> ast.Module | None:
    try:
        with open(path, encoding="utf-8") as f:
            return ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return None


def _function_node(function: Callable) -> ast.FunctionDef | None:
    """The AST of a live function, read from the file that defined it."""
    try:
        source = textwrap.dedent(inspect.getsource(function))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None
    node = tree.body[0] if tree.body else None
    return node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def _source_file(function: Callable) -> str | None:
    try:
        return inspect.getsourcefile(function)
    except TypeError:
        return None


def live_fingerprint(function: Any, owner: type | None = None) -> str | None:
    """The fingerprint of a live function (seen through known wrappers); ``owner``: the class whose ``self.<method>``
    calls it makes. None when its source cannot be read."""
    function = underlying(function)
    if function is None:
        return None
    node, path = _function_node(function), _source_file(function)
    if node is None or path is None:
        return None
    module = sys.modules.get(function.__module__)

    def resolve(kind: str, name: str):
        if kind == "method":
            if owner is None:
                return None
            target = inspect.getattr_static(owner, name, None)
        else:
            target = vars(module).get(name) if module is not None else None
        target = underlying(target) if target is not None else None
        if target is None or _source_file(target) != path:
            return None
        return _function_node(target)

    return _fingerprint(node, resolve)


def source_fingerprints(source: str) -> dict[str, str]:
    """Fingerprints of every module-level function and every method of every class in a source file, keyed
    ``name`` / ``Class.name``: how ``scan`` records a release (a method's ``self.<method>`` helpers resolve in its
    class and the classes of the same file it derives from)."""
    tree = ast.parse(source)
    functions = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}

    def methods_of(cls: ast.ClassDef, name: str):
        for item in cls.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == name:
                return item
        for base in cls.bases:
            if isinstance(base, ast.Name) and base.id in classes and base.id != cls.name:
                found = methods_of(classes[base.id], name)
                if found is not None:
                    return found
        return None

    out = {}
    for name, node in functions.items():
        out[name] = _fingerprint(node, lambda kind, n: functions.get(n) if kind == "function" else None)
    for cls_name, cls in classes.items():
        for item in cls.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                def resolve(kind, n, cls=cls):
                    return methods_of(cls, n) if kind == "method" else functions.get(n)

                out[f"{cls_name}.{item.name}"] = _fingerprint(item, resolve)
    return out


# ------------------------------------------------------------------------------------------------------ known code


@functools.lru_cache(maxsize=1)
def known_code() -> dict:
    """``{"verified": [release, ...], "modules": {module tail: {"Class.function" or "function": {fingerprint:
    {"releases": "5.19.0-5.23.0", "verified": [release, ...]}}}}}`` as ``main`` records it."""
    try:
        with open(_KNOWN_PATH, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def recorded(module_name: str, qualname: str, fingerprint: str | None) -> dict | None:
    """The record of this fingerprint of ``module_name.qualname``: ``{"releases": "5.19.0-5.23.0", "verified":
    [...]}``, or None when no recorded release carries it."""
    if fingerprint is None:
        return None
    tail = module_name.rsplit(".", 1)[-1].removeprefix("modeling_")
    return known_code().get("modules", {}).get(tail, {}).get(qualname, {}).get(fingerprint)


def known_releases(module_name: str, qualname: str, fingerprint: str | None) -> str | None:
    """The releases (a string such as ``"4.57.0-4.57.6, 5.18.0"``) whose ``module_name.qualname`` has this
    fingerprint, when one of them is a release ropekit's suite passed on; None otherwise."""
    entry = recorded(module_name, qualname, fingerprint)
    if not entry or not entry.get("verified"):
        return None
    return entry["releases"]


def transformers_version() -> str:
    try:
        import transformers

        return transformers.__version__
    except ImportError:  # pragma: no cover - the patches import transformers first
        return "?"


_WARNED: set = set()


def decline(what: str, why: str) -> str:
    """Warn once (per what and why) that ``what`` stays unpatched, and return the reason."""
    reason = f"{why} (transformers {transformers_version()})"
    key = (what, reason)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"ropekit: {what} left unpatched: {reason}; transformers' own code runs there",
                      RopekitDeclined, stacklevel=4)
    return reason


# ------------------------------------------------------------------------------------------------------------ scan


def _version_key(version: str):
    from packaging.version import Version

    return Version(version)


def _ranges(versions: list[str], all_versions: list[str]) -> str:
    """Compress sorted versions into ranges of consecutive entries of ``all_versions``."""
    index = {v: i for i, v in enumerate(all_versions)}
    versions = sorted(versions, key=_version_key)
    out, start, prev = [], None, None
    for v in versions:
        if start is None:
            start = prev = v
        elif index[v] == index[prev] + 1:
            prev = v
        else:
            out.append(start if start == prev else f"{start}-{prev}")
            start = prev = v
    if start is not None:
        out.append(start if start == prev else f"{start}-{prev}")
    return ", ".join(out)


def scan(wheels: list[str], modules: list[str], names: dict[str, list[str]]) -> dict:
    """Record the fingerprints of the functions ropekit patches or stands in for, from transformers wheels.

    ``modules``: modeling module tails (``qwen3``, ...); ``names[tail]``: the qualified names in it. Returns
    ``{tail: {qualname: {fingerprint: [versions]}}}``."""
    import re
    import zipfile

    seen: dict = {}
    for wheel in wheels:
        match = re.search(r"transformers-([^-]+)-", os.path.basename(wheel))
        if not match:
            continue
        version = match.group(1)
        with zipfile.ZipFile(wheel) as z:
            for tail in modules:
                path = f"transformers/models/{tail}/modeling_{tail}.py"
                try:
                    source = z.read(path).decode()
                except KeyError:
                    continue
                prints = source_fingerprints(source)
                for qualname in names[tail]:
                    if qualname in prints:
                        seen.setdefault(tail, {}).setdefault(qualname, {}).setdefault(prints[qualname], []).append(
                            version)
    return seen


def record_known(argv: list[str] | None = None) -> int:
    """``python -m ropekit record-known --verified 4.57.6,5.18.0,... WHEEL...``: record the fingerprints of
    the guarded functions in the given transformers wheels into known_code.json. A fingerprint is accepted at patch
    time only if one of the ``--verified`` releases (those ropekit's suite ran against) carries it; the others are
    recorded for the support report."""
    import argparse

    from . import guarded_names

    parser = argparse.ArgumentParser(prog="python -m ropekit record-known", description=record_known.__doc__)
    parser.add_argument("--verified", required=True, help="comma-separated releases the suite passed on")
    parser.add_argument("--output", default=_KNOWN_PATH, help="where to write (default: the package's record)")
    parser.add_argument("wheels", nargs="+")
    args = parser.parse_args(argv)
    verified = set(args.verified.split(","))
    names = guarded_names()
    raw = scan(args.wheels, list(names), names)
    out = {"verified": sorted(verified, key=_version_key), "modules": {}}
    all_versions = sorted({v for q in raw.values() for fps in q.values() for vs in fps.values() for v in vs},
                          key=_version_key)
    for tail, quals in sorted(raw.items()):
        for qualname, fps in sorted(quals.items()):
            for fp, vs in fps.items():
                out["modules"].setdefault(tail, {}).setdefault(qualname, {})[fp] = {
                    "releases": _ranges(vs, all_versions),
                    "verified": sorted(verified & set(vs), key=_version_key),
                }
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {args.output}: {sum(len(q) for q in out['modules'].values())} functions")
    return 0
