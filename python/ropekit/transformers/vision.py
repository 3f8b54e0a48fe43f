"""The vision towers of the mRoPE families.

Three things, each checked against or derived from the installed transformers code:

- ``apply_rotary_pos_emb_vision`` (module-level, one per modeling module) as ``ropekit.apply_rope_vision``: the
  same float32 math in one pass, bit-identical forward and backward, on the strided q/k views the towers pass.
- transformers 4.57's position helpers, methods of the tower: ``rot_pos_emb``, ``get_window_index`` (Qwen2.5-VL)
  and ``fast_pos_embed_interpolate`` (Qwen3-VL). Each walks ``grid_thw`` in Python, with host syncs per image; the
  replacements read it on the host once and compute the same tensors with ropekit's ops.
- transformers 5.x towers compute the same inputs with ``transformers.vision_utils`` helpers that take precomputed
  values from the forward's kwargs. :class:`VisionInputs` derives, from the installed tower forward and the
  model's ``get_<modality>_features``, which helpers run with which arguments, and runs them on the CPU (in
  DataLoader workers, through ``ropekit.data.MRopeCollator``): the tower then does no position work.
"""

from __future__ import annotations

import ast
import builtins
import functools
import importlib
import inspect
import pickle
import textwrap
from dataclasses import dataclass

import torch

from .. import ops
from ._patching import global_module_hooks, is_live, kernel_devices, module_hooks, plain_tensors

_VISION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class VisionTower:
    """A family's vision tower: its class, and (4.57) the rotary class its ``rot_pos_emb`` calls."""

    cls: str
    rotary: str | None = None  # 4.57's vision rotary class (``self.rotary_pos_emb``), called with the largest extent
    returns_pos_ids: bool = False  # GLM-4V 4.57: rot_pos_emb returns (embeddings, pos_ids)
    # its 4.57 position helpers are patched (POSITION_HELPERS); False: only the rotation is (the Omni towers)
    helpers: bool = True


# --------------------------------------------------------------------------------------------------------------
# apply_rotary_pos_emb_vision


def _rotation_in_domain(q, k, cos, sin) -> bool:
    """Where ``ops.apply_rope_vision`` computes bit for bit what transformers' function computes: (N, H, D) q/k of
    one float dtype (float64 is downcast by transformers: not in), (N, D) cos/sin in float32 or q's dtype (its
    ``.float()`` widens those exactly), not requiring grad, all on one device, plain tensors."""
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(cos, torch.Tensor)
            and isinstance(sin, torch.Tensor) and plain_tensors(q, k, cos, sin) and kernel_devices(q, k, cos, sin)):
        return False
    if not (q.dim() == 3 and k.dim() == 3 and cos.dim() == 2 and sin.shape == cos.shape):
        return False
    if not (q.dtype in _VISION_DTYPES and k.dtype == q.dtype and cos.dtype == sin.dtype
            and cos.dtype in (torch.float32, q.dtype)):
        return False
    if not (k.device == q.device and cos.device == q.device and sin.device == q.device):
        return False
    n, d = q.shape[0], q.shape[-1]
    if not (k.shape[0] == n and k.shape[-1] == d and tuple(cos.shape) == (n, d) and d % 2 == 0):
        return False
    return not (torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad))


def make_apply_rotary_pos_emb_vision(original):
    """``apply_rotary_pos_emb_vision(q, k, cos, sin)`` running ``ops.apply_rope_vision`` where that is bit-identical
    (see ``_rotation_in_domain``), the original otherwise (other shapes its broadcasting takes, float64, cos/sin
    that require grad, tensor subclasses) and once unpatched."""

    @functools.wraps(original)
    def apply_rotary_pos_emb_vision(q, k, cos, sin):
        if is_live(apply_rotary_pos_emb_vision) and _rotation_in_domain(q, k, cos, sin):
            return ops.apply_rope_vision(q, k, cos, sin)
        return original(q, k, cos, sin)

    apply_rotary_pos_emb_vision.__ropekit_original__ = original
    apply_rotary_pos_emb_vision.__ropekit_live__ = False
    return apply_rotary_pos_emb_vision


# --------------------------------------------------------------------------------------------------------------
# transformers 4.57's position helpers


def _installed(replacement, original):
    """The helper replacement as installed: run outside torch.compile's tracing (``torch.compiler.disable``). Its host
    read of the grid would be a graph break in ropekit's code, and a wrapper that called transformers' helper under
    tracing would make Dynamo meet that helper's data-dependent steps once more per frame; skipped whole, the tower's
    graph breaks once at the call, where transformers' helper breaks at every such step (per image)."""
    installed = torch.compiler.disable(replacement, recursive=True)
    installed.__ropekit_original__ = original
    installed.__ropekit_live__ = False  # set by patch(), cleared by unpatch()
    return installed


def _host_grid(grid_thw, require_t: bool, merge: int | None):
    """``grid_thw`` read on the host once, as an (n, 3) int64 CPU tensor, where the native helper computes what
    transformers computes: n >= 1 (an empty list makes transformers fail), no negative extent, ``t >= 1`` where
    asked (a grid of no frames is a corner where 4.57's helpers disagree among themselves), ``h`` and ``w``
    multiples of ``merge`` where given (transformers' reshape fails otherwise). None: the original runs (and
    fails, or not, as it does)."""
    if not (isinstance(grid_thw, torch.Tensor) and plain_tensors(grid_thw) and grid_thw.dim() == 2
            and grid_thw.shape[0] >= 1 and grid_thw.shape[1] == 3 and not grid_thw.is_floating_point()
            and not grid_thw.is_complex() and grid_thw.dtype != torch.bool):
        return None
    grid = grid_thw.detach().to("cpu", torch.int64)  # the one host pull
    if bool((grid < 0).any()) or (require_t and bool((grid[:, 0] < 1).any())):
        return None
    if merge is not None and bool(((grid[:, 1:] % merge) != 0).any()):
        return None
    return grid


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on ``device``: on CUDA without a host sync (pinned memory, non-blocking copy), elsewhere as
    ``.to`` copies it."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _default_device():
    return torch.get_default_device() if hasattr(torch, "get_default_device") else torch.device("cpu")


def _module_unobserved(module) -> bool:
    """No hook anywhere that would see the module called with other (equal-valued) arguments."""
    return not (module_hooks(module) or global_module_hooks() or "forward" in vars(module))


def make_rot_pos_emb(original, rotary_cls, returns_pos_ids: bool):
    """4.57's ``rot_pos_emb(self, grid_thw)`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4V and MoE siblings): the
    positions from ``ops.vision_position_ids`` on the host-read grid, the frequency table from the tower's own rotary
    module called with the largest extent as an int, then the same gather. GLM-4V also returns the positions, on
    the default device as its ``torch.arange`` made them."""

    @functools.wraps(original)
    def rot_pos_emb(self, grid_thw):
        rotary = getattr(self, "rotary_pos_emb", None)
        if not (is_live(installed) and type(rotary) is rotary_cls and _module_unobserved(rotary)):
            return original(self, grid_thw)
        grid = _host_grid(grid_thw, require_t=True, merge=self.spatial_merge_size)
        if grid is None:
            return original(self, grid_thw)
        pos_ids = ops.vision_position_ids(grid, self.spatial_merge_size)
        table = rotary(int(grid[:, 1:].max()))
        embeddings = table[_to_device(pos_ids, table.device)].flatten(1)
        if returns_pos_ids:
            return embeddings, pos_ids.to(_default_device())
        return embeddings

    installed = _installed(rot_pos_emb, original)
    return installed


def make_get_window_index(original):
    """4.57 Qwen2.5-VL ``get_window_index(self, grid_thw)`` -> ``(window_index, cu_window_seqlens)``: the index on
    the default device (transformers' ``torch.arange`` has no device) and the boundaries as a list of ints, from
    ``ops.vision_window_index`` on the host-read grid."""

    @functools.wraps(original)
    def get_window_index(self, grid_thw):
        if not is_live(installed):
            return original(self, grid_thw)
        m, window, patch = self.spatial_merge_size, self.window_size, self.patch_size
        if not (isinstance(m, int) and isinstance(window, int) and isinstance(patch, int) and m >= 1 and patch >= 1
                and window >= 0 and window // m // patch >= 1):
            return original(self, grid_thw)  # transformers divides by the window: its own error
        grid = _host_grid(grid_thw, require_t=False, merge=None)
        if grid is None:
            return original(self, grid_thw)
        index, bounds = ops.vision_window_index(grid, m, window, patch)
        return index.to(_default_device()), bounds.tolist()

    installed = _installed(get_window_index, original)
    return installed


def make_fast_pos_embed_interpolate(original):
    """4.57 Qwen3-VL ``fast_pos_embed_interpolate(self, grid_thw)``: the bilinear taps and weights from
    ``ops.vision_pos_embed_interp`` (torch's own linspace and transformers' float arithmetic, in transformers' order),
    the weights rounded to ``pos_embed``'s dtype as ``torch.tensor`` rounds transformers' Python floats; then the
    same embedding lookup, sum of the four taps, and per-grid frame repeat and merge-block order, with the host-read
    extents (the same autograd graph, so the ``pos_embed`` gradient accumulates in the same order)."""

    @functools.wraps(original)
    def fast_pos_embed_interpolate(self, grid_thw):
        pos_embed = getattr(self, "pos_embed", None)
        # transformers' linspace runs on the default device and in the default dtype: the op reproduces the CPU's
        if not (is_live(installed) and type(pos_embed) is torch.nn.Embedding and _module_unobserved(pos_embed)
                and torch.get_default_dtype() in (torch.float32, torch.float64)
                and _default_device().type == "cpu"):
            return original(self, grid_thw)
        merge = self.config.spatial_merge_size
        grid = _host_grid(grid_thw, require_t=False, merge=merge)
        if grid is None:
            return original(self, grid_thw)
        indices, weights = ops.vision_pos_embed_interp(grid, self.num_grid_per_side, merge)
        weight = pos_embed.weight
        taps = pos_embed(_to_device(indices, weight.device)) * \
            _to_device(weights.to(weight.dtype), weight.device)[:, :, None]
        patch_pos_embeds = taps[0] + taps[1] + taps[2] + taps[3]
        extents = grid.tolist()
        per_grid = patch_pos_embeds.split([h * w for _, h, w in extents])
        return torch.cat([
            x.repeat(t, 1).view(t, h // merge, merge, w // merge, merge, -1).permute(0, 1, 3, 2, 4, 5).flatten(0, 4)
            for x, (t, h, w) in zip(per_grid, extents)
        ])

    installed = _installed(fast_pos_embed_interpolate, original)
    return installed


POSITION_HELPERS = ("rot_pos_emb", "get_window_index", "fast_pos_embed_interpolate")


def make_position_helper(name: str, original, tower: VisionTower, module):
    if name == "rot_pos_emb":
        return make_rot_pos_emb(original, getattr(module, tower.rotary), tower.returns_pos_ids)
    if name == "get_window_index":
        return make_get_window_index(original)
    return make_fast_pos_embed_interpolate(original)


# --------------------------------------------------------------------------------------------------------------
# transformers 5.x: the tower's precomputed inputs, derived from its code


class VisionInputsUnavailable(ValueError):
    """The installed model's vision tower takes no precomputed inputs ropekit can derive (the reason says why)."""


class _KeyRecorder(dict):
    """The ``kwargs`` handed to a ``vision_utils`` helper: empty, recording which keys the helper takes from it."""

    def __init__(self):
        super().__init__()
        self.keys: list[str] = []

    def pop(self, key, *default):
        self.keys.append(key)
        return default[0] if default else None

    def get(self, key, default=None):
        self.keys.append(key)
        return default


@dataclass(frozen=True)
class _Step:
    """One ``targets = helper(..., kwargs=kwargs)`` statement of the tower forward, its arguments evaluated where
    they do not depend on the batch: ("grid",), ("local", name) or ("const", value)."""

    module: str
    name: str
    args: tuple
    kwargs: tuple
    targets: tuple
    keys: tuple = ()

    def helper(self):
        return getattr(importlib.import_module(self.module), self.name)


@dataclass(frozen=True)
class _GridTransform:
    """What ``get_<modality>_features`` hands the tower as ``grid_thw``: its own grid, or the value of a few
    statements of its body that read only that grid (GLM-4V splits videos into frames), compiled in the modeling
    module's namespace."""

    module: str = ""
    param: str = ""
    source: str = ""  # empty: the grid as given

    def __call__(self, grid):
        if not self.source:
            return grid
        return _compiled_transform(self.module, self.source)(grid)


@functools.lru_cache(maxsize=None)
def _compiled_transform(module: str, source: str):
    namespace = dict(vars(importlib.import_module(module)))
    exec(compile(source, f"<ropekit vision grid: {module}>", "exec"), namespace)
    return namespace["_ropekit_tower_grid"]


def _underlying(function):
    from ._guard import underlying

    return underlying(function)


def _function_ast(function) -> ast.FunctionDef:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        raise VisionInputsUnavailable(f"the source of {function.__qualname__} cannot be read") from None
    node = tree.body[0] if tree.body else None
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise VisionInputsUnavailable(f"{function.__qualname__} is not a plain function")
    return node


def _body(node) -> list:
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    return body


def _target_names(target) -> tuple | None:
    if isinstance(target, ast.Name):
        return (target.id,)
    if isinstance(target, ast.Tuple) and all(isinstance(e, ast.Name) for e in target.elts):
        return tuple(e.id for e in target.elts)
    return None


def _passes_kwargs(call: ast.Call, kwargs_name: str) -> bool:
    """``helper(..., kwargs=kwargs)``: the ``vision_utils`` convention for a helper that may take a precomputed value."""
    return any(k.arg == "kwargs" and isinstance(k.value, ast.Name) and k.value.id == kwargs_name
               for k in call.keywords)


_MUTATING_METHODS = frozenset(("update", "pop", "popitem", "setdefault", "clear", "__setitem__", "__delitem__"))


def _in_place(method: str) -> bool:
    """A tensor method that writes its tensor (``mul_``, ``copy_``; not ``__len__``)."""
    return method.endswith("_") and not method.endswith("__")


def _require_unchanged(node, names: tuple, where: str) -> None:
    """Raise VisionInputsUnavailable where the function rebinds one of ``names`` (assignment, loop, ``with``,
    walrus, ``del``, ``global`` / ``nonlocal``), stores into or deletes from it, or calls a mutating dict method or
    an in-place tensor method on it: the derivation reads the function's steps as running on the values it was
    given."""
    names = set(names)
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and sub.id in names and isinstance(sub.ctx, (ast.Store, ast.Del)):
            raise VisionInputsUnavailable(f"{where} rebinds {sub.id}")
        if isinstance(sub, (ast.Global, ast.Nonlocal)) and names & set(sub.names):
            raise VisionInputsUnavailable(f"{where} declares {sorted(names & set(sub.names))} global")
        if isinstance(sub, (ast.Subscript, ast.Attribute)) and isinstance(sub.ctx, (ast.Store, ast.Del)) \
                and isinstance(sub.value, ast.Name) and sub.value.id in names:
            raise VisionInputsUnavailable(f"{where} changes {sub.value.id}: {ast.unparse(sub)}")
        if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute) \
                and (sub.func.attr in _MUTATING_METHODS or _in_place(sub.func.attr)) \
                and isinstance(sub.func.value, ast.Name) and sub.func.value.id in names:
            raise VisionInputsUnavailable(f"{where} changes {sub.func.value.id}: {ast.unparse(sub)}")


def _picklable(value) -> bool:
    try:
        pickle.dumps(value)
    except Exception:  # noqa: BLE001 - anything that does not pickle cannot go to a DataLoader worker
        return False
    return True


def _tower_steps(tower) -> list[_Step]:
    """The helper calls of the installed tower forward that take the forward's kwargs, with their batch-independent
    arguments evaluated on ``tower``."""
    forward = _underlying(type(tower).forward)
    if forward is None:
        raise VisionInputsUnavailable(f"{type(tower).__name__}.forward is not a function ropekit can read")
    node = _function_ast(forward)
    params = [a.arg for a in node.args.args]
    if "grid_thw" not in params or node.args.kwarg is None:
        raise VisionInputsUnavailable(f"{type(tower).__name__}.forward takes no grid_thw and **kwargs")
    kwargs_name, globals_ = node.args.kwarg.arg, forward.__globals__
    _require_unchanged(node, ("grid_thw", kwargs_name), f"{type(tower).__name__}.forward")
    top_level = {id(stmt.value) for stmt in _body(node) if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1}
    for call in ast.walk(node):
        if isinstance(call, ast.Call) and id(call) not in top_level and _passes_kwargs(call, kwargs_name):
            raise VisionInputsUnavailable(f"{type(tower).__name__}.forward passes kwargs=kwargs other than in a "
                                          f"plain assignment: {ast.unparse(call)}")
    steps, produced = [], set()
    for stmt in _body(node):
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.value, ast.Call)):
            continue
        call = stmt.value
        if not _passes_kwargs(call, kwargs_name):
            continue
        if not isinstance(call.func, ast.Name):
            raise VisionInputsUnavailable(f"{type(tower).__name__}.forward passes its kwargs to "
                                          f"{ast.unparse(call.func)}, which is not a helper ropekit can run")
        helper = globals_.get(call.func.id)
        targets = _target_names(stmt.targets[0])
        if not (inspect.isfunction(helper) and helper.__module__.startswith("transformers.") and targets):
            raise VisionInputsUnavailable(f"{type(tower).__name__}.forward passes its kwargs to "
                                          f"{call.func.id}, which is not a transformers helper ropekit can run")

        def spec(expr):
            if isinstance(expr, ast.Name) and expr.id == "grid_thw":
                return ("grid",)
            if isinstance(expr, ast.Name) and expr.id in produced:
                return ("local", expr.id)
            names = {n.id for n in ast.walk(expr) if isinstance(n, ast.Name)}
            if names & (set(params) - {"self"}) or names & produced:
                raise VisionInputsUnavailable(f"an argument of {call.func.id} in {type(tower).__name__}.forward "
                                              f"depends on the batch: {ast.unparse(expr)}")
            try:
                value = eval(compile(ast.Expression(expr), "<ropekit>", "eval"), globals_, {"self": tower})
            except Exception as error:  # noqa: BLE001 - whatever it raises, the argument cannot be precomputed
                raise VisionInputsUnavailable(f"cannot evaluate {ast.unparse(expr)}: {error}") from None
            if not _picklable(value):
                raise VisionInputsUnavailable(f"{ast.unparse(expr)} does not pickle (DataLoader workers need it)")
            return ("const", value)

        args = tuple(spec(a) for a in call.args)
        kwargs = tuple((k.arg, spec(k.value)) for k in call.keywords if k.arg != "kwargs")
        steps.append(_Step(helper.__module__, helper.__name__, args, kwargs, targets))
        produced.update(targets)
    if not steps:
        raise VisionInputsUnavailable(f"{type(tower).__name__}.forward takes no precomputed inputs "
                                      "(transformers 4.57 towers compute their positions themselves)")
    return steps


def _decorated_with_prefixes(raw, modality: str) -> bool:
    """Whether ``get_<modality>_features`` strips its modality prefix from kwargs (transformers'
    ``accepts_precomputed_kwargs(modality=...)``, recognised by its code object), so that
    ``model(image_cu_seqlens=...)`` reaches the tower as ``cu_seqlens``."""
    decorator = getattr(importlib.import_module(raw.__module__), "accepts_precomputed_kwargs", None) \
        if inspect.isfunction(raw) else None
    if decorator is None:
        return False
    try:
        probe = decorator(modality=modality)(lambda *args, **kwargs: None)
    except Exception:  # noqa: BLE001 - another decorator of that name: not the one ropekit knows
        return False
    seen = set()
    while inspect.isfunction(raw) and id(raw) not in seen:
        seen.add(id(raw))
        if raw.__code__ is probe.__code__:
            return inspect.getclosurevars(raw).nonlocals.get("prefix") == f"{modality}_"
        raw = getattr(raw, "__wrapped__", None)
    return False


def _grid_transform(model_cls, modality: str, depth: int = 0) -> _GridTransform:
    """Derive what ``model_cls.get_<modality>_features`` passes to ``self.visual`` as ``grid_thw``."""
    name = f"get_{modality}_features"
    function = _underlying(getattr(model_cls, name, None))
    if function is None or depth > 2:
        raise VisionInputsUnavailable(f"{model_cls.__name__}.{name} is not a function ropekit can read")
    node = _function_ast(function)
    params = [a.arg for a in node.args.args]
    if len(params) < 3:
        raise VisionInputsUnavailable(f"{model_cls.__name__}.{name} takes no grid")
    grid_param, body = params[2], _body(node)
    for index, stmt in enumerate(body):
        for call in ast.walk(stmt):
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                    and isinstance(call.func.value, ast.Name) and call.func.value.id == "self"):
                continue
            if call.func.attr == "visual":
                grid = next((k.value for k in call.keywords if k.arg == "grid_thw"), None)
                grid = grid if grid is not None else (call.args[1] if len(call.args) > 1 else None)
                return _slice(function, body[:index], grid_param, grid, f"{model_cls.__name__}.{name}")
            if call.func.attr.startswith("get_") and call.func.attr.endswith("_features") and len(call.args) >= 2 \
                    and isinstance(call.args[1], ast.Name) and call.args[1].id == grid_param:
                other = call.func.attr[len("get_"):-len("_features")]
                return _grid_transform(model_cls, other, depth + 1)  # Qwen3-VL: videos go through images
    raise VisionInputsUnavailable(f"{model_cls.__name__}.{name} does not call self.visual")


def _slice(function, before: list, grid_param: str, grid, where: str) -> _GridTransform:
    if grid is None:
        raise VisionInputsUnavailable(f"{where} calls self.visual without a grid_thw")
    node = _function_ast(function)
    # the function's own variables: a statement left out that touches one the grid needs (a loop, an in-place
    # call, an alias, an assignment that also rebinds it) could change the grid, so no transform is derived then
    local = {a.arg for a in node.args.args + node.args.kwonlyargs} | \
        {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}

    def names(tree) -> set:
        return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}

    # the plain assignments the grid depends on, to a fixpoint (a later assignment can feed an earlier read)
    needed, kept = names(grid), set()
    while True:
        more = [s for s in before if id(s) not in kept and isinstance(s, ast.Assign) and len(s.targets) == 1
                and _target_names(s.targets[0]) and set(_target_names(s.targets[0])) & needed]
        if not more:
            break
        for stmt in more:
            kept.add(id(stmt))
            needed |= names(stmt.value)
    for stmt in before:
        if id(stmt) not in kept and names(stmt) & needed & local:
            raise VisionInputsUnavailable(f"{where}: `{ast.unparse(stmt).splitlines()[0]}` may change the grid it "
                                          "hands its tower")
    if isinstance(grid, ast.Name) and grid.id == grid_param:
        return _GridTransform()
    kept = [s for s in before if id(s) in kept]
    defined = {t for s in kept for t in _target_names(s.targets[0])} | {grid_param}
    free = needed - defined
    if free & local or any(n not in function.__globals__ and not hasattr(builtins, n) for n in free):
        raise VisionInputsUnavailable(f"the grid {where} hands its tower depends on more than the batch's grid")
    lines = [f"def _ropekit_tower_grid({grid_param}):"] + [f"    {ast.unparse(s)}" for s in kept] + \
        [f"    return {ast.unparse(grid)}"]
    return _GridTransform(function.__module__, grid_param, "\n".join(lines) + "\n")


def _vision_model(model):
    """The model that owns ``visual`` and ``get_<modality>_features`` (inside PEFT / conditional-generation
    wrappers)."""
    seen = set()
    while model is not None and id(model) not in seen:
        seen.add(id(model))
        if isinstance(getattr(model, "visual", None), torch.nn.Module):
            return model
        get_base = getattr(model, "get_base_model", None)
        model = get_base() if callable(get_base) else getattr(model, "model", None)
    raise VisionInputsUnavailable("the model has no vision tower (`visual`)")


class VisionInputs:
    """The inputs a transformers 5.x vision tower would compute from ``grid_thw`` (rotary position ids, attention
    boundaries, window order, interpolation taps, ...), computed ahead of time, keyed as ``model(...)`` forwards them
    to the tower (``image_<name>`` / ``video_<name>``).

    ``VisionInputs(model)`` derives them from the installed code: the tower forward's ``x = helper(..., kwargs=
    kwargs)`` statements (the ``transformers.vision_utils`` helpers, which return a precomputed value from the
    kwargs when one is there) with their arguments evaluated on the tower, and the grid each modality's
    ``get_<modality>_features`` hands the tower. A dry run checks that every helper takes back what it produced.
    Calling it with a batch's grids (CPU tensors, in a DataLoader worker) runs the same helpers on them: the values
    are the tower's own. Picklable (spawned workers). Raises :class:`VisionInputsUnavailable` (a ``ValueError``)
    where the tower takes no precomputed inputs (transformers 4.57) or its code has another shape.
    """

    @classmethod
    def for_tower(cls, tower) -> "VisionInputs":
        """The inputs of ``tower`` itself, for grids handed to it directly (``tower(pixels, grid_thw=grid,
        **inputs(image_grid_thw=grid))`` with the ``image_`` prefix removed): no model, no modality transform."""
        inputs = object.__new__(cls)
        inputs._derive(tower, _tower_steps(tower), {"image": _GridTransform()})
        return inputs

    def __init__(self, model):
        owner = _vision_model(model)
        tower = owner.visual
        steps = _tower_steps(tower)
        self.grids = {}  # modality -> _GridTransform
        for modality in ("image", "video"):
            raw = inspect.getattr_static(type(owner), f"get_{modality}_features", None)
            if raw is not None and _decorated_with_prefixes(raw, modality):
                self.grids[modality] = _grid_transform(type(owner), modality)
        if not self.grids:
            raise VisionInputsUnavailable(f"{type(owner).__name__}.get_image_features / get_video_features do not "
                                          "take precomputed inputs (no accepts_precomputed_kwargs)")
        self._derive(tower, steps, self.grids)

    def _derive(self, tower, steps, grids: dict) -> None:
        """Dry runs on a sample batch's grid (two images, or a 2-frame video): each modality's grid transform, then
        the steps (``_check``)."""
        merge = getattr(tower, "spatial_merge_size", 1) or 1
        sample = torch.tensor([[1, 4 * merge, 6 * merge], [2, 2 * merge, 2 * merge]])
        for modality, transform in grids.items():
            try:
                tower_grid = transform(sample)
            except Exception as error:  # noqa: BLE001 - a transform that fails on a plain grid is not one to run
                raise VisionInputsUnavailable(f"the {modality} grid transform fails on a sample grid: {error}") \
                    from None
            if not (isinstance(tower_grid, torch.Tensor) and tower_grid.dim() == 2 and tower_grid.shape[1] == 3):
                raise VisionInputsUnavailable(f"the {modality} grid transform does not give an (n, 3) grid")
        self.grids = grids
        self.steps = self._check(steps, sample)

    @staticmethod
    def _run(grid, steps, given=None) -> tuple[dict, list]:
        """Run the steps on ``grid``: (key -> value, the steps with the keys each read). ``given``: precomputed
        values to hand every helper (the check); otherwise each gets an empty recording kwargs."""
        values, out, done = {}, {}, []
        for step in steps:
            def resolve(spec):
                return grid if spec[0] == "grid" else values[spec[1]] if spec[0] == "local" else spec[1]

            kwargs = dict(given) if given is not None else _KeyRecorder()
            result = step.helper()(*(resolve(a) for a in step.args), **{k: resolve(v) for k, v in step.kwargs},
                                   kwargs=kwargs)
            results = result if len(step.targets) > 1 else (result,)
            values.update(zip(step.targets, results))
            keys = step.keys if given is not None else tuple(kwargs.keys)
            out.update(zip(keys, results))
            done.append(_Step(step.module, step.name, step.args, step.kwargs, step.targets, keys))
        return out, done

    def _check(self, steps, grid) -> list:
        """Run every step on a sample grid, learning the keys each helper reads; then run them again with those keys
        given and require each helper to return exactly what it was given (the precomputed values are used)."""
        out, steps = self._run(grid, steps)
        for step in steps:
            if len(step.keys) != len(step.targets):
                raise VisionInputsUnavailable(f"{step.name} reads kwargs {list(step.keys)} but returns "
                                              f"{len(step.targets)} values")
        given = {k: v for k, v in out.items() if v is not None}
        again, _ = self._run(grid, steps, given)
        for key, value in given.items():
            if again.get(key) is not value:
                raise VisionInputsUnavailable(f"the tower does not use a precomputed {key!r}")
        return steps

    def __call__(self, image_grid_thw=None, video_grid_thw=None) -> dict:
        """``{"image_position_ids": ..., "video_cu_seqlens": ..., ...}`` for a batch's grids (None: that modality is
        absent). Values the tower would not take (``max_seqlen`` outside flash attention) are left out."""
        out = {}
        for modality, grid in (("image", image_grid_thw), ("video", video_grid_thw)):
            if grid is None or modality not in self.grids:
                continue
            values, _ = self._run(self.grids[modality](grid), self.steps)
            out.update({f"{modality}_{key}": value for key, value in values.items() if value is not None})
        return out
