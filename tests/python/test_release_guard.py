"""The patch-time guard (issue: every transformers release users install).

A future transformers release is simulated with a test-local copy of the installed ``modeling_qwen3`` (and of
``modeling_qwen3_vl`` for ``get_rope_index``), written to a file and imported as a module whose name ends in
``modeling_qwen3`` (its known code is looked up by that tail), with one edit ropekit cannot know about. For each edit,
ropekit either transforms the code correctly (patched equals unpatched: logits and greedy generate with a KV cache,
and the fused op really ran) or declines it with one ``RopekitDeclined`` warning, leaving transformers' code in place
(patched still equals unpatched). It never raises at patch time and never gives a different result.

Also here: the support report (``python -m ropekit``) on the installed release, the derived forward's readable
traceback, the ``kernels`` Hub-kernel wrapper, and ``kernelize`` coexistence where ``kernels`` is installed.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import ropekit
from ropekit.transformers import RopekitDeclined, _ModelingModule, _apply, support_report
from ropekit.transformers._guard import hub_kernel_inner

from conftest import TINY, rope_kwargs

pytestmark = pytest.mark.transformers

_COUNTER = [0]


def _future_module(tmp_path, edit, family: str = "qwen3"):
    """A copy of the installed modeling_<family> with ``edit(source) -> source`` applied, imported from a file."""
    installed = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    source = inspect.getsource(installed)
    # relative imports -> absolute, so the copy imports the installed transformers' utilities
    source = re.sub(r"^from \.\.\.", "from transformers.", source, flags=re.M)
    source = re.sub(r"^from \.\.", "from transformers.models.", source, flags=re.M)
    source = re.sub(r"^from \.(\w+)", rf"from transformers.models.{family}.\1", source, flags=re.M)
    edited = edit(source)
    assert edited != source or edit is _unchanged, "the edit did not apply to this release's source"
    _COUNTER[0] += 1
    name = f"ropekit_future_{_COUNTER[0]}.modeling_{family}"
    path = tmp_path / f"modeling_{family}_{_COUNTER[0]}.py"
    path.write_text(edited)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _unchanged(source):
    return source


def _qwen3_spec(module):
    return _ModelingModule(module.__name__, "Qwen3RotaryEmbedding", attention="Qwen3Attention", norm="Qwen3RMSNorm")


def _attention_source(source):
    """(start, end) of Qwen3Attention.forward's text in the module source (its decorators included)."""
    start = source.index("class Qwen3Attention(")
    end = source.index("\nclass ", start + 1)
    return start, end


def _edit_attention(pattern, replacement, count=1):
    def edit(source):
        start, end = _attention_source(source)
        body, n = re.subn(pattern, replacement, source[start:end], count=count, flags=re.M)
        assert n == count, f"pattern {pattern!r} not found in Qwen3Attention"
        return source[:start] + body + source[end:]

    return edit


def _cache_name(source) -> str:
    start, end = _attention_source(source)
    return "cache" if re.search(r"^\s+cache: ", source[start:end], flags=re.M) else "past_key_values"


def _rename_cache_argument(source):
    """What 5.24 did: the attention's cache argument takes a new name and the old one is still accepted through
    transformers' deprecate_kwarg wrapper (the decoder layer keeps passing the old name)."""
    old = _cache_name(source)
    start, end = _attention_source(source)
    body = source[start:end]
    body = re.sub(rf"\b{old}\b", "kv_store", body)
    body = body.replace("    def forward(", f'    @deprecate_kwarg("{old}", version="99.0", new_name="kv_store")\n'
                                           "    def forward(", 1)
    header = "from transformers.utils.deprecation import deprecate_kwarg\n"
    return header + source[:start] + body + source[end:]


def _model(module, seed=0):
    config = module.Qwen3Config(**TINY, **rope_kwargs()) if hasattr(module, "Qwen3Config") else None
    if config is None:
        from transformers import Qwen3Config

        config = Qwen3Config(**TINY, **rope_kwargs())
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = module.Qwen3ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.2)
    return model.eval()


def _run(model):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, TINY["vocab_size"], (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                pad_token_id=0)
    return logits, tokens


def _patch(module, **switches):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = _apply("Qwen3", None, switches.get("rope", True), False, switches.get("qk_norm_rope", True),
                      specs=[_qwen3_spec(module)])
    declined = [w for w in caught if issubclass(w.category, RopekitDeclined)]
    return rows, declined


def _row(rows, switch, target_suffix):
    (row,) = [r for r in rows if r.switch == switch and r.target.endswith(target_suffix)]
    return row


# edits of the attention forward ropekit must transform correctly (patched == unpatched, fused op ran)
TRANSFORMED = {
    "renamed cache argument behind deprecate_kwarg (5.24's change)": _rename_cache_argument,
    "a new statement between norm and RoPE that does not touch q/k": _edit_attention(
        r"^(\s+)value_states = ", r"\1self.calls = getattr(self, 'calls', 0) + 1\n\1value_states = "),
    "a new output step after attention": _edit_attention(
        r"^(\s+)attn_output = self\.o_proj\(attn_output\)", r"\1attn_output = self.o_proj(attn_output) * 1.5"),
}
# edits it must decline (one warning), leaving transformers' code in place
DECLINED = {
    "a statement between norm and RoPE that changes the normed queries": _edit_attention(
        r"^(\s+)value_states = ", r"\1query_states = query_states * 2.0\n\1value_states = "),
    "a new side effect on the normed keys": _edit_attention(
        r"^(\s+)value_states = ", r"\1self.last_keys = key_states\n\1value_states = "),
    "the norm applied without the transpose": _edit_attention(
        r"self\.q_norm\((.*)\)\.transpose\(1, 2\)", r"self.q_norm(\1).transpose(1, 2).contiguous()"),
    "RoPE's results bound to other names (the old names read later)": _edit_attention(
        r"^(\s+)query_states, key_states = apply_rotary_pos_emb\(query_states, key_states, cos, sin\)",
        r"\1q_rot, k_rot = apply_rotary_pos_emb(query_states, key_states, cos, sin)\n"
        r"\1query_states, key_states = q_rot + 0 * query_states.sum(), k_rot"),
    "RoPE called with a keyword argument": _edit_attention(
        r"apply_rotary_pos_emb\(query_states, key_states, cos, sin\)",
        r"apply_rotary_pos_emb(query_states, key_states, cos, sin, unsqueeze_dim=1)"),
}


@pytest.mark.parametrize("edit", list(TRANSFORMED), ids=list(TRANSFORMED))
def test_future_attention_is_transformed_correctly(tmp_path, edit, count_fused, unpatch_after):
    module = _future_module(tmp_path, TRANSFORMED[edit])
    model = _model(module)
    expected = _run(model)
    calls_before = getattr(model.model.layers[0].self_attn, "calls", None)
    rows, declined = _patch(module)
    assert not declined, [str(w.message) for w in declined]
    assert _row(rows, "qk_norm_rope", "Qwen3Attention.forward").patched
    got = _run(model)
    assert count_fused, "the derived forward never took the fused path"
    assert torch.equal(got[1], expected[1]), "greedy generate with a KV cache differs from unpatched"
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-5)
    if calls_before is not None:  # the side effect ran as many times as unpatched
        assert model.model.layers[0].self_attn.calls == 2 * calls_before


@pytest.mark.parametrize("edit", list(DECLINED), ids=list(DECLINED))
def test_future_attention_is_declined_with_one_warning(tmp_path, edit, count_fused, unpatch_after):
    module = _future_module(tmp_path, DECLINED[edit])
    model = _model(module)
    expected = _run(model)
    rows, declined = _patch(module)
    row = _row(rows, "qk_norm_rope", "Qwen3Attention.forward")
    assert not row.patched and "Qwen3Attention" in str(declined[0].message)
    assert len(declined) == 1, [str(w.message) for w in declined]
    import transformers

    assert f"transformers {transformers.__version__}" in str(declined[0].message)  # names the release
    assert module.Qwen3Attention.forward is inspect.getattr_static(module.Qwen3Attention, "forward")
    got = _run(model)
    assert not count_fused
    assert torch.equal(got[1], expected[1])
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-5)
    # the rotary patches are independent of the attention's: they still apply
    assert _row(rows, "rope", "Qwen3RotaryEmbedding.forward").patched


def test_unknown_norm_declines_fusion_only(tmp_path, count_fused, count_apply_rope, unpatch_after):
    """The fused op stands in for the norm's forward: an edited RMSNorm (here an extra scale) declines the fusion,
    with one warning, while apply_rotary_pos_emb is still patched."""
    def edit(source):
        start = source.index("class Qwen3RMSNorm(")
        end = source.index("\nclass ", start + 1)
        body = source[start:end].replace("return self.weight * hidden_states.to(input_dtype)",
                                         "return self.weight * hidden_states.to(input_dtype) * 1.0")
        return source[:start] + body + source[end:]

    module = _future_module(tmp_path, edit)
    model = _model(module)
    expected = _run(model)
    rows, declined = _patch(module)
    assert len(declined) == 1 and "Qwen3RMSNorm.forward" in str(declined[0].message)
    assert _row(rows, "rope", "apply_rotary_pos_emb").patched
    got = _run(model)
    assert not count_fused and count_apply_rope
    assert torch.equal(got[1], expected[1])


@pytest.mark.parametrize("what", ["apply_rotary_pos_emb body", "rotate_half helper", "rotary forward"])
def test_changed_rotation_code_is_declined(tmp_path, what, count_fused, count_apply_rope, unpatch_after):
    edits = {
        "apply_rotary_pos_emb body": lambda s: s.replace("k_embed = (k * cos) + (rotate_half(k) * sin)",
                                                         "k_embed = (k * cos) + (rotate_half(k) * sin) * 1.0"),
        "rotate_half helper": lambda s: s.replace("return torch.cat((-x2, x1), dim=-1)",
                                                  "return torch.cat((-x2, x1), dim=-1) * 1.0"),
        "rotary forward": lambda s: re.sub(r"(cos = emb\.cos\(\) \* self\.attention_scaling)", r"\1 * 1.0", s),
    }
    module = _future_module(tmp_path, edits[what])
    model = _model(module)
    expected = _run(model)
    rows, declined = _patch(module)
    assert declined, "an edited function was patched"
    got = _run(model)
    assert torch.equal(got[1], expected[1])
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0 if what == "rotary forward" else 1e-5)
    if what == "rotary forward":
        assert not _row(rows, "rope", "Qwen3RotaryEmbedding.forward").patched
        assert _row(rows, "rope", "apply_rotary_pos_emb").patched and count_fused
    else:  # the rotation is what the fused op reproduces too: both decline
        assert not _row(rows, "rope", "apply_rotary_pos_emb").patched
        assert not _row(rows, "qk_norm_rope", "Qwen3Attention.forward").patched
        assert not count_fused and not count_apply_rope


def test_unknown_wrapper_of_apply_rotary_pos_emb_is_declined(tmp_path, count_fused, unpatch_after):
    """A callable object around apply_rotary_pos_emb that ropekit does not know (not the kernels module)."""
    def edit(source):
        return source + textwrap.dedent("""

            class _Wrapper:
                def __init__(self, f):
                    self.f = f

                def __call__(self, *args, **kwargs):
                    return self.f(*args, **kwargs)


            apply_rotary_pos_emb = _Wrapper(apply_rotary_pos_emb)
            """)

    module = _future_module(tmp_path, edit)
    model = _model(module)
    expected = _run(model)
    rows, declined = _patch(module)
    assert len(declined) == 2  # apply_rotary_pos_emb, and the fusion that stands in for it
    assert isinstance(module.apply_rotary_pos_emb, object) and not _row(rows, "rope", "apply_rotary_pos_emb").patched
    got = _run(model)
    assert not count_fused and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("change", ["signature", "body"])
def test_changed_get_rope_index_is_declined(tmp_path, change, count_rope_index, unpatch_after):
    """get_rope_index with a renamed parameter or an edited body: declined, transformers' own runs."""
    def edit(source):
        start = source.index("    def get_rope_index(")
        end = source.index("\n    def ", start + 1)
        if change == "signature":
            body = re.sub(r"\battention_mask\b", "attn_mask", source[start:end])
        else:
            body = re.sub(r"(\n(\s+)mrope_position_deltas = )", r"\n\2_unused = 0\1", source[start:end], count=1)
        assert body != source[start:end]
        return source[:start] + body + source[end:]

    module = _future_module(tmp_path, edit, family="qwen3_vl")
    spec = _ModelingModule(module.__name__, "Qwen3VLTextRotaryEmbedding", "interleaved",
                           vl_model="Qwen3VLModel", model_type="qwen3_vl")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = _apply("Qwen3-VL", None, False, True, False, specs=[spec])
    declined = [w for w in caught if issubclass(w.category, RopekitDeclined)]
    assert len(declined) == 1 and "get_rope_index" in str(declined[0].message)
    assert not rows[0].patched
    assert "get_rope_index" not in vars(module.Qwen3VLModel) or not hasattr(
        vars(module.Qwen3VLModel)["get_rope_index"], "__ropekit_original__")


def _patch_vision(module, **switches):
    """Qwen2.5-VL's vision switches on a copy of its modeling module: (support rows, RopekitDeclined warnings)."""
    from ropekit.transformers.vision import VisionTower

    spec = _ModelingModule(module.__name__, None, vision=VisionTower("Qwen2_5_VisionTransformerPretrainedModel",
                                                                     "Qwen2_5_VisionRotaryEmbedding"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = _apply("Qwen2.5-VL", None, False, False, False, specs=[spec], **switches)
    return rows, [w for w in caught if issubclass(w.category, RopekitDeclined)]


def _edit_function(name, pattern, replacement):
    def edit(source):
        start = source.index(f"def {name}(")
        end = source.index("\ndef ", start + 1) if "\ndef " in source[start + 1:] else len(source)
        end = min(end, source.index("\nclass ", start + 1))
        body, n = re.subn(pattern, replacement, source[start:end], count=1)
        assert n == 1, f"{pattern!r} not in {name}"
        return source[:start] + body + source[end:]

    return edit


@pytest.mark.parametrize("edit", [
    _edit_function("apply_rotary_pos_emb_vision", r"q, k = q\.float\(\), k\.float\(\)",
                   "q, k = q.double(), k.double()"),
    _edit_function("apply_rotary_pos_emb_vision", r"q_embed = q_embed\.to\(orig_q_dtype\)",
                   "q_embed = (q_embed * 1.0).to(orig_q_dtype)"),
], ids=["computes in float64", "an extra step"])
def test_changed_vision_rotation_is_declined(tmp_path, edit, unpatch_after):
    """An edited apply_rotary_pos_emb_vision: one warning, transformers' function stays, the results are its own."""
    module = _future_module(tmp_path, edit, family="qwen2_5_vl")
    original = module.apply_rotary_pos_emb_vision
    rows, declined = _patch_vision(module, vision_rope=True)
    assert len(declined) == 1 and "apply_rotary_pos_emb_vision" in str(declined[0].message)
    assert not _row(rows, "vision_rope", "apply_rotary_pos_emb_vision").patched
    assert module.apply_rotary_pos_emb_vision is original


def test_changed_vision_position_helper_is_declined(tmp_path, unpatch_after):
    """transformers 4.57: an edited get_window_index is declined with one warning (rot_pos_emb, unchanged, is
    patched); on 5.x the towers have no such helper and the switch has nothing to patch."""
    installed = importlib.import_module("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")
    if "get_window_index" not in vars(installed.Qwen2_5_VisionTransformerPretrainedModel):
        rows = _apply("Qwen2.5-VL", None, False, False, False, vision_positions=True)
        assert not [r for r in rows if r.switch == "vision_positions"]
        return

    def edit(source):
        return source.replace("vit_merger_window_size = self.window_size // self.spatial_merge_size // "
                              "self.patch_size", "vit_merger_window_size = self.window_size // self.patch_size", 1)

    module = _future_module(tmp_path, edit, family="qwen2_5_vl")
    rows, declined = _patch_vision(module, vision_positions=True)
    assert len(declined) == 1 and "get_window_index" in str(declined[0].message)
    assert not _row(rows, "vision_positions", "get_window_index").patched
    assert _row(rows, "vision_positions", "rot_pos_emb").patched


def test_unchanged_copy_is_patched_like_the_release(tmp_path, count_fused, unpatch_after):
    """Control for the tests above: the unedited copy of the installed release is patched everywhere."""
    module = _future_module(tmp_path, _unchanged)
    rows, declined = _patch(module)
    assert not declined and all(r.patched for r in rows), [r.line() for r in rows]


def test_derived_forward_has_a_readable_traceback(unpatch_after):
    from transformers.models.qwen3 import modeling_qwen3

    ropekit.apply_to_qwen3()
    forward = inspect.unwrap(modeling_qwen3.Qwen3Attention.forward)
    filename = forward.__code__.co_filename
    assert filename.startswith("<ropekit fused q/k norm + RoPE") and "Qwen3Attention.forward" in filename
    import linecache

    text = "".join(linecache.getlines(filename))
    assert "__ropekit_norms" in text and "apply_rotary_pos_emb" in text
    assert forward.__globals__ is vars(modeling_qwen3)  # runs in the modeling module's namespace


def test_support_report_patches_everything_on_this_release():
    """The installed release is one CI tests: every family's every switch is patched (a guard that declines
    silently everywhere would fail here, and in the fused-call counts of the model-level suites)."""
    rows = support_report()
    assert rows
    declined = [r.line() for r in rows if not r.patched and not r.left]  # left: known forms left on purpose
    assert not declined, declined
    switches = {r.switch for r in rows}
    # vision_positions: the position helpers of transformers 4.57's towers (5.x towers have none to replace)
    import transformers.models.qwen2_vl.modeling_qwen2_vl as qwen2_vl

    has_helpers = "rot_pos_emb" in vars(qwen2_vl.Qwen2VisionTransformerPretrainedModel)
    expected = {"rope", "qk_norm_rope", "rope_index", "vision_rope"} | ({"vision_positions"} if has_helpers else set())
    assert switches == expected


def test_python_m_ropekit_reports_and_exits_zero():
    result = subprocess.run([sys.executable, "-m", "ropekit"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    import transformers

    assert f"transformers:         {transformers.__version__}" in out and "torch:" in out and "kernels:" in out
    assert "DECLINED" not in out and " 0 declined" in out
    for family in ("Qwen3", "Qwen3-VL", "Qwen2-VL", "GLM-4V"):
        assert f"patched   {family} " in out


def _kernels_wrapped():
    from transformers.models.qwen3 import modeling_qwen3

    return hub_kernel_inner(ropekit.transformers._unwrapped(modeling_qwen3.apply_rotary_pos_emb)) is not None


def test_kernels_hub_wrapper_is_seen_through(count_fused, count_apply_rope, unpatch_after):
    """transformers 5.25 with the kernels package: apply_rotary_pos_emb is a Hub-kernel nn.Module. ropekit patches
    the function inside it, fuses the attention, and unpatch() restores the module object itself."""
    if not _kernels_wrapped():
        pytest.skip("this transformers release does not wrap apply_rotary_pos_emb in a kernels Hub-kernel module")
    from transformers.models.qwen3 import modeling_qwen3

    wrapper = modeling_qwen3.apply_rotary_pos_emb
    model = _model(modeling_qwen3)
    expected = _run(model)
    ropekit.apply_to_qwen3(model)
    got = _run(model)
    assert count_fused and torch.equal(got[1], expected[1])
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-5)
    q, k = torch.randn(2, 4, 5, 32), torch.randn(2, 2, 5, 32)
    cos, sin = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    assert torch.equal(modeling_qwen3.apply_rotary_pos_emb(q, k, cos, sin)[0], wrapper(q, k, cos, sin)[0])
    assert count_apply_rope
    ropekit.unpatch()
    assert modeling_qwen3.apply_rotary_pos_emb is wrapper


def test_kernelize_coexists(count_fused, unpatch_after):
    """``kernelize`` and ``set_use_kernels(True)`` (kernels installed, offline: no Hub kernel is mapped for CPU), before
    or after patching, give the unpatched model's tokens; ropekit's rotation runs unless kernelize selected a kernel
    for it."""
    if not _kernels_wrapped():
        pytest.skip("this transformers release does not wrap apply_rotary_pos_emb in a kernels Hub-kernel module")
    from kernels import Mode, kernelize
    from transformers.models.qwen3 import modeling_qwen3

    model = _model(modeling_qwen3)
    expected = _run(model)
    kernelize(model, mode=Mode.INFERENCE, device="cpu")
    ropekit.apply_to_qwen3(model)
    got = _run(model)
    assert torch.equal(got[1], expected[1])
    other = _model(modeling_qwen3)
    kernelize(other, mode=Mode.INFERENCE, device="cpu")
    assert torch.equal(_run(other)[1], expected[1])
    # transformers' own switch (what from_pretrained(use_kernels=True) calls), after patching
    third = _model(modeling_qwen3)
    third.set_use_kernels(True)
    assert third.use_kernels and torch.equal(_run(third)[1], expected[1])
    assert count_fused


def test_a_kernel_selected_by_kernelize_still_runs(count_fused, unpatch_after):
    """Where kernelize selected a Hub kernel for apply_rotary_pos_emb (the model's private wrapper has a forward of
    its own), the call goes to that kernel as unpatched, and the attention does not fuse around it."""
    if not _kernels_wrapped():
        pytest.skip("this transformers release does not wrap apply_rotary_pos_emb in a kernels Hub-kernel module")
    import types

    from transformers.models.qwen3 import modeling_qwen3

    model = _model(modeling_qwen3)
    expected = _run(model)
    wrapper = modeling_qwen3.apply_rotary_pos_emb
    inner = hub_kernel_inner(wrapper)
    calls = []

    def kernel(self, *args, **kwargs):  # stands in for a Hub kernel: transformers' function, counted
        calls.append(1)
        return inner(*args, **kwargs)

    for layer in model.model.layers:
        (private,) = [f for f in layer.self_attn._kernel_funcs.values() if type(f) is type(wrapper)]
        private.forward = types.MethodType(kernel, private)  # what kernelize does when it selects a kernel
    ropekit.apply_to_qwen3(model)
    got = _run(model)
    assert calls, "the selected kernel never ran"
    assert not count_fused
    assert torch.equal(got[1], expected[1])


def test_recorded_fingerprints_equal_the_live_ones(tmp_path):
    """The record made from a wheel's source (``python -m ropekit record-known``) and the check made at patch time
    from live objects compute the same fingerprints: a wheel holding the installed modeling_qwen3 records exactly
    what the installed functions give."""
    import json
    import zipfile

    from transformers.models.qwen3 import modeling_qwen3

    from ropekit.transformers._guard import live_fingerprint

    wheel = tmp_path / "transformers-9.9.9-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("transformers/models/qwen3/modeling_qwen3.py", inspect.getsource(modeling_qwen3))
    out = tmp_path / "known.json"
    result = subprocess.run([sys.executable, "-m", "ropekit", "record-known", "--verified", "9.9.9", "--output",
                             str(out), str(wheel)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())["modules"]["qwen3"]
    live = {
        "Qwen3RotaryEmbedding.forward": live_fingerprint(vars(modeling_qwen3.Qwen3RotaryEmbedding)["forward"],
                                                         modeling_qwen3.Qwen3RotaryEmbedding),
        "apply_rotary_pos_emb": live_fingerprint(ropekit.transformers._unwrapped(modeling_qwen3.apply_rotary_pos_emb)),
        "Qwen3RMSNorm.forward": live_fingerprint(vars(modeling_qwen3.Qwen3RMSNorm)["forward"],
                                                 modeling_qwen3.Qwen3RMSNorm),
    }
    for name, fingerprint in live.items():
        assert fingerprint is not None, name
        assert record[name] == {fingerprint: {"releases": "9.9.9", "verified": ["9.9.9"]}}, name


def test_a_rotation_replaced_after_patching_turns_fusion_off(count_fused, unpatch_after):
    """The fused op stands in for the module's apply_rotary_pos_emb as checked at patch time: a function put there
    later (another library, a user's own rotation) is called, not skipped."""
    from transformers.models.qwen3 import modeling_qwen3

    model = _model(modeling_qwen3)
    ropekit.apply_to_qwen3(model, rope=False)
    installed = modeling_qwen3.apply_rotary_pos_emb
    calls = []

    def mine(*args, **kwargs):
        calls.append(1)
        return installed(*args, **kwargs)

    _run(model)
    assert count_fused
    count_fused.clear()
    modeling_qwen3.apply_rotary_pos_emb = mine
    try:
        _run(model)
    finally:
        modeling_qwen3.apply_rotary_pos_emb = installed
    assert calls and not count_fused


def test_hooks_on_the_hub_kernel_rotation_module_fire(count_fused, unpatch_after):
    """transformers 5.25's apply_rotary_pos_emb is an nn.Module: a hook on it sees every layer's call, patched or
    not (the attention does not fuse around it, the patched function calls the module)."""
    if not _kernels_wrapped():
        pytest.skip("this transformers release does not wrap apply_rotary_pos_emb in a kernels Hub-kernel module")
    from transformers.models.qwen3 import modeling_qwen3

    model = _model(modeling_qwen3)
    wrapper = modeling_qwen3.apply_rotary_pos_emb
    counts = []
    for patched in (False, True):
        if patched:
            ropekit.apply_to_qwen3(model)
        calls = []
        handle = wrapper.register_forward_hook(lambda *a: calls.append(1))
        try:
            tokens = _run(model)[1]
        finally:
            handle.remove()
        counts.append((len(calls), tokens))
    assert counts[0][0] > 0 and counts[1][0] == counts[0][0]
    assert torch.equal(counts[1][1], counts[0][1])
    assert not count_fused
