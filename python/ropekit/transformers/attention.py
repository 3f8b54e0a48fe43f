"""The fused q/k-norm + RoPE attention forward of the families with per-head q/k norms (Qwen3, Qwen3-VL, Qwen3.5,
Qwen4-Exp), **derived from the installed release's own forward**.

``derive_attention_forward`` reads the installed ``<Family>Attention.forward`` (its source, through its decorators),
locates three statements structurally in its AST::

    Q = self.q_norm(<q expr>).transpose(1, 2)
    K = self.k_norm(<k expr>).transpose(1, 2)
    Q2, K2 = apply_rotary_pos_emb(Q, K, <cos>, <sin>)

and rewrites exactly those: ``<q expr>`` / ``<k expr>`` are evaluated where they were, and where fusion is allowed
(``_Fusion.norms``: no hooks, stock norms, dtypes the op rounds like transformers; ``_Fusion.rope``: cos/sin the op
takes) one ``ropekit.qk_norm_rope`` call produces ``Q2, K2``; otherwise the original three statements run as written.
Every other line (the cache update and its argument names, kwargs, the attention interface, output gates, indexers,
whatever a later release adds) is transformers' own code, compiled in the modeling module's namespace under a
readable file name (``<ropekit fused: Qwen3Attention.forward ...>``, registered with ``linecache`` so tracebacks
show the derived source). The decorators around the original (``deprecate_kwarg``, ``kernels``'
``use_kernelized_func``) are rebuilt around the derived function with their own code. Code of any other shape is
not fused: ``derive_attention_forward`` returns the reason, and the caller warns once and leaves the class alone.
"""

from __future__ import annotations

import __future__

import ast
import copy
import inspect
import linecache
import sys
import textwrap
import types

import torch

from .. import ops
from ._patching import global_module_hooks, is_live, kernel_devices, module_hooks, plain_tensors

_FUSABLE = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


_OUTPUT_CAPTURING = "transformers.utils.output_capturing"


def _has_hooks(module, attention: bool = False) -> bool:
    """Any forward, forward-pre, backward or backward-pre hook on this module. A fused layer skips the norms' calls
    and so their hooks (transformers' tensor parallelism all-reduces q_norm / k_norm weight gradients in a full
    backward hook), so any hook means the layer runs the original, unfused steps; so does any hook on the attention
    module itself. One exception (``attention=True``): transformers 5.x's own output-capturing forward hook, which
    it installs for good on every attention module the first time ``output_attentions`` / ``output_hidden_states``
    is asked for. It records the attention module's outputs, which the fused forward returns as well, so it sees
    the same thing either way; counting it would switch fusion off for the model's lifetime."""
    if not attention:
        return module_hooks(module)
    forward_hooks = [h for h in module._forward_hooks.values() if getattr(h, "__module__", None) != _OUTPUT_CAPTURING]
    return bool(forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks)


def _accelerate_placement_only(norm, stock_forward) -> bool:
    """accelerate's ``AlignDevicesHook`` without offload (``device_map`` placement) around the stock forward only
    moves inputs to the device the weights already live on; once the caller checks they live beside the
    activations, skipping it is exact. Any other hook, or a hook around a replaced forward, must run."""
    hooks_module = sys.modules.get("accelerate.hooks")
    hook = vars(norm).get("_hf_hook")
    if hooks_module is None or hook is None:
        return False
    wrapper, wrapped = vars(norm).get("forward"), vars(norm).get("_old_forward")
    if not (
        getattr(getattr(wrapper, "func", None), "__module__", None) == hooks_module.__name__  # accelerate's partial
        and getattr(wrapped, "__func__", None) is stock_forward
        and getattr(wrapped, "__self__", None) is norm
    ):
        return False
    hooks = hook.hooks if type(hook) is hooks_module.SequentialHook else (hook,)
    return all(type(h) is hooks_module.AlignDevicesHook and not h.offload for h in hooks)


def _peft_active_module(norm):
    """The module PEFT's ``modules_to_save`` wrapper would run for ``norm`` (the trained copy of the active adapter,
    or the original when adapters are disabled), mirroring its forward; ``norm`` itself when it is not such a
    wrapper or when the wrapper would do anything else (hooks, e.g. mixed-adapter batches), so the caller falls
    back to calling it."""
    other = sys.modules.get("peft.utils.other")
    wrapper_cls = getattr(other, "ModulesToSaveWrapper", None)
    if wrapper_cls is None or type(norm) is not wrapper_cls or _has_hooks(norm):
        return norm
    try:
        active = norm.active_adapters
        if norm.disable_adapters or not active or any(name not in norm._adapters for name in active):
            return norm.original_module
        return norm.modules_to_save[active[0]]
    except (AttributeError, KeyError):  # another PEFT release: let its own forward decide
        return norm


_PREFIX = "__ropekit_"


class _Declined(Exception):
    pass


def _is_self_call(node, attr: str) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "self")


def _norm_statement(stmt, attr: str):
    """``NAME = self.<attr>(EXPR).transpose(1, 2)`` -> (NAME, EXPR), else None."""
    if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
        return None
    value = stmt.value
    if not (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and value.func.attr == "transpose"
            and not value.keywords and len(value.args) == 2
            and all(isinstance(a, ast.Constant) and type(a.value) is int for a in value.args)
            and [a.value for a in value.args] == [1, 2]):
        return None
    inner = value.func.value
    if not (_is_self_call(inner, attr) and len(inner.args) == 1 and not inner.keywords):
        return None
    return stmt.targets[0].id, inner.args[0]


def _rope_statement(stmt, q_name: str, k_name: str):
    """``Q2, K2 = apply_rotary_pos_emb(Q, K, COS, SIN)`` -> (targets, cos, sin), else None."""
    if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Tuple)
            and len(stmt.targets[0].elts) == 2 and all(isinstance(e, ast.Name) for e in stmt.targets[0].elts)):
        return None
    call = stmt.value
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "apply_rotary_pos_emb"
            and not call.keywords and len(call.args) == 4
            and isinstance(call.args[0], ast.Name) and call.args[0].id == q_name
            and isinstance(call.args[1], ast.Name) and call.args[1].id == k_name):
        return None
    return stmt.targets[0], call.args[2], call.args[3]


def _names(node) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _count(tree, predicate) -> int:
    return sum(1 for n in ast.walk(tree) if predicate(n))


def _transform(function: ast.FunctionDef) -> ast.FunctionDef:
    """The rewritten function (see the module docstring); raises _Declined with the reason."""
    body = function.body
    if any(isinstance(n, ast.Name) and n.id.startswith(_PREFIX) for n in ast.walk(function)):
        raise _Declined("it already uses ropekit's names")
    if any(isinstance(n, ast.Name) and n.id in ("super", "__class__") for n in ast.walk(function)) or any(
            isinstance(n, (ast.Name, ast.Attribute)) and (getattr(n, "id", None) or getattr(n, "attr", ""))
            .startswith("__") and not (getattr(n, "id", None) or getattr(n, "attr", "")).endswith("__")
            for n in ast.walk(function)):
        raise _Declined("it uses super() or private names, which only compile inside its class")
    for attr in ("q_norm", "k_norm"):
        if _count(function, lambda n, a=attr: isinstance(n, ast.Attribute) and n.attr == a) != 1:
            raise _Declined(f"self.{attr} is not used exactly once")
    if _count(function, lambda n: isinstance(n, ast.Name) and n.id == "apply_rotary_pos_emb") != 1:
        raise _Declined("apply_rotary_pos_emb is not called exactly once")
    found = {}
    for i, stmt in enumerate(body):
        for attr in ("q_norm", "k_norm"):
            match = _norm_statement(stmt, attr)
            if match is not None:
                found[attr] = (i, *match)
    if set(found) != {"q_norm", "k_norm"}:
        raise _Declined("no `X = self.q_norm(...).transpose(1, 2)` and `self.k_norm` statements in its body")
    iq, q_name, q_expr = found["q_norm"]
    ik, k_name, k_expr = found["k_norm"]
    rope = [(i, _rope_statement(s, q_name, k_name)) for i, s in enumerate(body)]
    rope = [(i, m) for i, m in rope if m is not None]
    if len(rope) != 1 or not iq < ik < rope[0][0] or q_name == k_name:
        raise _Declined(f"no `apply_rotary_pos_emb({q_name}, {k_name}, cos, sin)` statement after the norms")
    ir, (targets, cos, sin) = rope[0]
    # on the fused path q_name / k_name hold the un-normed inputs until RoPE's targets rebind them: the targets must
    # be those names, and cos / sin must not read them
    if [t.id for t in targets.elts] != [q_name, k_name]:
        raise _Declined(f"apply_rotary_pos_emb's results are not assigned back to {q_name}, {k_name}")
    if (_names(cos) | _names(sin)) & {q_name, k_name}:
        raise _Declined(f"the cos / sin arguments of apply_rotary_pos_emb read {q_name} or {k_name}")
    for j in range(iq + 1, ir):
        if j != ik and _names(body[j]) & {q_name, k_name}:
            raise _Declined(f"a statement between the norms and RoPE uses {q_name} or {k_name}")
    if _names(q_expr) & {k_name} or _names(k_expr) & {q_name}:
        raise _Declined("the norm inputs depend on each other")

    def parse(text):
        return ast.parse(text).body

    fuse, q_raw, k_raw, out = (f"{_PREFIX}{n}" for n in ("fuse", "q", "k", "out"))

    def norm_of(stmt, raw, name):
        """``name = <fuse> ? raw : <the original norm expression on raw>``, at the original statement's place."""
        original = copy.deepcopy(stmt.value)
        original.func.value.args[0] = ast.Name(raw, ast.Load())
        return ast.Assign([ast.Name(name, ast.Store())],
                          ast.IfExp(ast.Name(fuse, ast.Load()), ast.Name(raw, ast.Load()), original))

    def norm_again(stmt, name):
        """The original norm expression on ``name`` (fusion allowed, cos/sin declined: the stock norms run late,
        which nothing can observe, having no hooks)."""
        original = copy.deepcopy(stmt.value)
        original.func.value.args[0] = ast.Name(name, ast.Load())
        return ast.Assign([ast.Name(name, ast.Store())], original)

    q_stmts = [ast.Assign([ast.Name(q_raw, ast.Store())], q_expr)] + parse(f"{fuse} = {_PREFIX}norms(self, {q_raw})") \
        + [norm_of(body[iq], q_raw, q_name)]
    k_stmts = [ast.Assign([ast.Name(k_raw, ast.Store())], k_expr), norm_of(body[ik], k_raw, k_name)]
    rope_stmts = parse(f"{out} = {_PREFIX}rope(self, {fuse}, {q_name}, {k_name}, COS, SIN) if {fuse} else None")
    rope_stmts[0].value.body.args[4:6] = [cos, sin]
    rope_stmts += [ast.If(
        test=ast.Compare(ast.Name(out, ast.Load()), [ast.Is()], [ast.Constant(None)]),
        body=[ast.If(test=ast.Name(fuse, ast.Load()),
                     body=[norm_again(body[iq], q_name), norm_again(body[ik], k_name)], orelse=[]), body[ir]],
        orelse=[ast.Assign([targets], ast.Name(out, ast.Load()))],
    )] + parse(f"del {q_raw}, {k_raw}, {out}")  # the raw projections are not kept alive past this point
    new_body = body[:iq] + q_stmts + body[iq + 1:ik] + k_stmts + body[ik + 1:ir] + rope_stmts + body[ir + 1:]
    function.body = new_body
    function.decorator_list = []
    return function


def _cell_value(cell):
    try:
        return cell.cell_contents
    except ValueError:
        return None


def _rewrap(wrapper, old, new):
    """``wrapper`` (a closure around ``old``, as ``functools.wraps`` decorators make) rebuilt from its own code
    around ``new``; None when ``old`` is not one of its closure cells."""
    cells = wrapper.__closure__ or ()
    hits = [i for i, c in enumerate(cells) if _cell_value(c) is old]
    if len(hits) != 1:
        return None
    closure = tuple(types.CellType(new) if i == hits[0] else c for i, c in enumerate(cells))
    rebuilt = types.FunctionType(wrapper.__code__, wrapper.__globals__, wrapper.__name__, wrapper.__defaults__,
                                 closure)
    rebuilt.__kwdefaults__ = dict(wrapper.__kwdefaults__) if wrapper.__kwdefaults__ else None
    rebuilt.__dict__.update(wrapper.__dict__)
    rebuilt.__wrapped__ = new
    for name in ("__qualname__", "__doc__", "__module__", "__annotations__"):
        setattr(rebuilt, name, getattr(wrapper, name))
    return rebuilt


_COUNTER = [0]


def _compile(function: ast.FunctionDef, module, where: str, free: tuple[str, ...]):
    """Compile ``function`` in ``module``'s namespace, with ``free`` as closure variables (the maker's arguments);
    returns the maker."""
    maker = ast.FunctionDef(
        name=f"{_PREFIX}make", args=ast.arguments(posonlyargs=[], args=[ast.arg(n) for n in free], vararg=None,
                                                 kwonlyargs=[], kw_defaults=[], kwarg=None, defaults=[]),
        body=[function, ast.Return(ast.Name(function.name, ast.Load()))], decorator_list=[], returns=None,
        type_params=[])
    tree = ast.fix_missing_locations(ast.Module(body=[maker], type_ignores=[]))
    text = ast.unparse(tree) + "\n"
    _COUNTER[0] += 1
    filename = f"<ropekit fused q/k norm + RoPE #{_COUNTER[0]}: {where}>"
    flags = __future__.annotations.compiler_flag if vars(module).get("annotations") is __future__.annotations else 0
    code = compile(text, filename, "exec", flags=flags, dont_inherit=True)
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    maker_code = next(c for c in code.co_consts if isinstance(c, types.CodeType) and c.co_name == maker.name)
    return types.FunctionType(maker_code, vars(module))


class _Fusion:
    """The two run-time decisions of a derived forward, with what they need from the family and its module."""

    def __init__(self, module, norm_cls, zero_centered: bool, is_neox: bool, partial: bool, rope_routed,
                 rope_function=None):
        self.module, self.norm_cls, self.norm_forward = module, norm_cls, norm_cls.forward
        # the module-level rotation checked at patch time (the fused op stands in for it): fusion only while the
        # module still calls that one (or ropekit's replacement of it), and, a Hub-kernel module, has no hooks
        self.rope_function = rope_function
        self.rope_is_module = isinstance(rope_function, torch.nn.Module)
        self.zero_centered, self.is_neox, self.partial = zero_centered, is_neox, partial
        self.rope_routed = rope_routed  # kernels: a kernelized apply_rotary_pos_emb would run -> no fusion
        self.replacement = None  # the installed forward, for is_live

    def eps(self, norm):
        return norm.eps if self.zero_centered else norm.variance_epsilon

    def stock_forward(self, norm) -> bool:
        """No instance-level forward, or one that changes nothing: the class's own bound method (left behind by
        accelerate's remove_hook_from_module) or a placement-only accelerate hook."""
        forward = vars(norm).get("forward")
        return (
            forward is None
            or (getattr(forward, "__func__", None) is self.norm_forward and getattr(forward, "__self__", None) is norm)
            or _accelerate_placement_only(norm, self.norm_forward)
        )

    def stock_norm(self, norm, query) -> bool:
        """The transformers RMSNorm as shipped: no hook (forward, forward-pre, backward, backward-pre) or
        instance-level forward that would expect to run (accelerate offload), and its weight already where the
        activations are."""
        return (
            type(norm) is self.norm_cls
            and getattr(norm, "group_size", None) is None  # Qwen4-Exp's norm can normalise groups of channels
            and self.stock_forward(norm)
            and not _has_hooks(norm)
            and norm.weight.device == query.device
        )

    def rope_current(self) -> bool:
        if self.rope_function is None:
            return True
        current = vars(self.module).get("apply_rotary_pos_emb")
        if current is not self.rope_function and getattr(current, "__ropekit_original__", None) is not \
                self.rope_function:
            return False
        return not (self.rope_is_module and _has_hooks(self.rope_function))

    def norms(self, attention, query):
        """(q_norm, k_norm) whose weights the fused op can use in their place, or None: fusion only where nothing
        observable would differ (no hook on the norms, on this attention module, or registered globally; stock
        norms; dtypes the op rounds exactly like transformers; plain tensors), and only while patched."""
        if not (is_live(self.replacement) and isinstance(query, torch.Tensor)):
            return None
        q_norm, k_norm = _peft_active_module(attention.q_norm), _peft_active_module(attention.k_norm)
        fusable = (
            self.norm_cls.forward is self.norm_forward
            and not global_module_hooks()
            and not _has_hooks(attention, attention=True)
            and not (self.rope_routed is not None and self.rope_routed())
            and self.rope_current()
            and query.dim() == 4
            and self.stock_norm(q_norm, query)
            and self.stock_norm(k_norm, query)
            and self.eps(q_norm) == self.eps(k_norm)
            and query.dtype in _FUSABLE
            and q_norm.weight.dtype in (query.dtype, torch.float32)
            and k_norm.weight.dtype == q_norm.weight.dtype
            and plain_tensors(query, q_norm.weight, k_norm.weight)
            and kernel_devices(query)
        )
        return (q_norm, k_norm) if fusable else None

    def rope(self, attention, norms, query, key, cos, sin):
        """The fused op's (query_states, key_states), or None where cos/sin or key are not what it takes (the
        original steps then run)."""
        fusable = (
            isinstance(cos, torch.Tensor)
            and isinstance(sin, torch.Tensor)
            and isinstance(key, torch.Tensor)
            and plain_tensors(key, cos, sin)
            and key.dim() == 4
            and key.dtype == query.dtype
            and key.device == query.device
            and key.shape[0] == query.shape[0]
            and key.shape[1] == query.shape[1]
            and key.shape[3] == query.shape[3]
            # the shapes the op takes (transformers' broadcasting takes more: cos/sin of seq 1, ...)
            and cos.dim() == 3
            and sin.shape == cos.shape
            and cos.shape[1] == query.shape[1]
            and cos.shape[0] in (1, query.shape[0])
            and cos.shape[2] % 2 == 0
            and cos.shape[2] <= query.shape[3]
            and (self.partial or cos.shape[2] == query.shape[3])
            and cos.dtype in (query.dtype, torch.float32)
            and sin.dtype == cos.dtype
            and cos.device == query.device
            and sin.device == query.device
            # the fused op differentiates q, k and the norm weights, not cos/sin (transformers makes them without
            # grad; a caller that scales them with a trainable factor gets the unfused steps, which do)
            and not (cos.requires_grad or sin.requires_grad)
        )
        if not fusable:
            return None
        q_norm, k_norm = norms
        return ops.qk_norm_rope(query, key, q_norm.weight, k_norm.weight, cos, sin, self.eps(q_norm),
                                self.zero_centered, is_neox=self.is_neox)


def derive_attention_forward(attention_cls, module, norm_cls_name: str, zero_centered: bool, *,
                             is_neox: bool = True, partial: bool = False, rope_routed=None, rope_function=None):
    """(replacement forward, None), or (None, reason) where the installed forward is not of a shape ropekit can
    transform. ``attention_cls.forward`` as found (seen through ropekit's own earlier replacement) is the original;
    ``zero_centered``: the norms are Qwen3.5 / Qwen4-Exp's ``(1 + w)`` RMSNorm; ``is_neox``: the rotation of the
    family's ``apply_rotary_pos_emb``; ``partial``: it rotates the first ``cos.shape[-1]`` channels and passes the rest
    through; ``rope_routed``: for a ``kernels``-wrapped ``apply_rotary_pos_emb``, whether a kernelized one would run;
    ``rope_function``: the module-level rotation checked at patch time, which fusion requires to be still in place."""
    original = attention_cls.__dict__.get("forward")
    original = getattr(original, "__ropekit_original__", original)
    chain = [original]
    while inspect.isfunction(chain[-1]) and inspect.isfunction(getattr(chain[-1], "__wrapped__", None)):
        chain.append(chain[-1].__wrapped__)
    inner = chain[-1]
    if not inspect.isfunction(inner):
        return None, "its forward is not a function"
    try:
        source = textwrap.dedent(inspect.getsource(inner))
        function = ast.parse(source).body[0]
        if not isinstance(function, ast.FunctionDef):
            raise _Declined("its forward is not a plain def")
        function = _transform(function)
    except _Declined as e:
        return None, str(e)
    except (OSError, TypeError, SyntaxError) as e:
        return None, f"its source cannot be read ({e})"
    norm_cls = getattr(module, norm_cls_name, None)
    if norm_cls is None:
        return None, f"the module has no {norm_cls_name}"
    fusion = _Fusion(module, norm_cls, zero_centered, is_neox, partial, rope_routed, rope_function)
    where = f"{attention_cls.__qualname__}.forward of {inspect.getsourcefile(inner)}"
    try:
        maker = _compile(function, module, where, (f"{_PREFIX}norms", f"{_PREFIX}rope"))
        derived = maker(fusion.norms, fusion.rope)
    except Exception as e:  # noqa: BLE001 - any failure to build means: do not patch
        return None, f"the derived forward does not compile ({type(e).__name__}: {e})"
    derived.__defaults__, derived.__kwdefaults__ = inner.__defaults__, inner.__kwdefaults__
    derived.__qualname__ = inner.__qualname__
    derived.__doc__ = inner.__doc__
    derived.__module__ = inner.__module__
    replacement = derived
    for wrapper, wrapped in zip(reversed(chain[:-1]), reversed(chain[1:])):
        replacement = _rewrap(wrapper, wrapped, replacement)
        if replacement is None:
            return None, f"its decorator {getattr(wrapper, '__qualname__', wrapper)!r} does not wrap it by closure"
    if replacement is original:  # pragma: no cover - defensive
        return None, "nothing to replace"
    replacement.__ropekit_original__ = original
    fusion.replacement = replacement
    return replacement, None
