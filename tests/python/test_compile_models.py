"""torch.compile graph-break accounting per Qwen3 family: tiny models built from their config classes (random
weights), compiled unpatched and patched. Patching must never add a graph break, no break may come from ropekit,
the ropekit ops must really be traced into the graphs (their fake kernels at work), and the compiled patched model
must give what the eager patched model gives.

Counting: every compile goes through ``ExplainWithBackend`` (what ``torch._dynamo.explain`` uses), so one compile
yields the captured graphs and the break reasons with their user stacks; ``counters["graph_break"]`` is checked too
(it counts each time Dynamo hits a break, so a break inside a loop counts more than once). Both sides compile with
``aot_eager``: Dynamo + AOTAutograd (fake kernels, functionalisation, the joint forward/backward graph through the
registered autograd) with eager kernels; Inductor's C++ codegen would take minutes on this CPU, and test_models.py
already compiles a patched Qwen3 with Inductor. With ``ROPEKIT_GRAPH_BREAK_TABLE=<file>`` the counts are appended to
that file as a markdown table.
"""

from __future__ import annotations

import collections
import copy
import os
import re
from dataclasses import dataclass, field

import pytest
import torch
from torch._dynamo.backends.debugging import ExplainWithBackend
from torch._dynamo.utils import counters

import family_models
import ropekit

from conftest import (TINY, TINY_MOE, build, has_qwen3_5, multimodal_batch, tiny_qwen3_5_text_config,
                      tiny_qwen3_config, tiny_qwen3_moe_config, tiny_qwen3_vl_config, tiny_qwen3_vl_text_config)

pytestmark = pytest.mark.transformers

PACKAGE_DIR = os.path.dirname(os.path.abspath(ropekit.__file__))
# A path anywhere (the virtualenv itself may live under a folder named "ropekit"); kept only inside the package.
_PATH = re.compile(r"/[^\s'\"():,]+")


def _outside_package(path: str) -> bool:
    return not os.path.abspath(path).startswith(PACKAGE_DIR + os.sep)


def mentions_ropekit(reason) -> bool:
    """A break reason (``GraphCompileReason`` or a counter message) that points at ropekit: the break site (the
    innermost frame of its user stack outside torch) inside the ropekit package, or ropekit named in its text (an op
    ``ropekit::...``, ``torch.ops.ropekit``, the package's modules). File paths outside the package are blanked
    first: ``/root/.cache/ropekit/venv/...`` is not ropekit. A break inside transformers code that a patched forward
    calls (Qwen4-Exp's indexer, run as the module it is by the fused attention) has ropekit frames further out in its
    stack, and is transformers' break, present unpatched too."""
    text = reason if isinstance(reason, str) else reason.reason
    stack = [] if isinstance(reason, str) else reason.user_stack
    site = next((frame for frame in reversed(stack) if not _in_torch(frame.filename)), None)
    if site is not None and not _outside_package(site.filename):
        return True
    text = _PATH.sub(lambda m: "<path>" if _outside_package(m.group(0)) else m.group(0), text)
    return "ropekit" in text


TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def _in_torch(path: str) -> bool:
    return os.path.abspath(path).startswith(TORCH_DIR + os.sep)


def _site(reason) -> str:
    frame = reason.user_stack[-1] if reason.user_stack else None
    where = f" @ {os.path.basename(frame.filename)}:{frame.lineno} {frame.name}" if frame else ""
    return reason.reason.strip().split("\n")[0] + where


@dataclass
class Capture:
    output: object
    graph_count: int
    break_reasons: list
    counted_breaks: int  # sum of counters["graph_break"]
    counter_messages: list
    ropekit_ops: set = field(default_factory=set)

    @property
    def breaks(self) -> int:
        return len(self.break_reasons)

    def summary(self) -> str:
        sites = collections.Counter(_site(r) for r in self.break_reasons)
        return "; ".join(f"{n}x {s}" for s, n in sorted(sites.items(), key=lambda kv: -kv[1])) or "-"


def capture(run, model, backend: str, fullgraph: bool = False) -> Capture:
    """Compile ``model`` with a fresh Dynamo state, call ``run(compiled)`` and collect what Dynamo did."""
    torch._dynamo.reset()
    counters.clear()
    explain = ExplainWithBackend(backend)
    # Dynamo's recompile limit (8) would let a frame fall back to eager part-way (transformers 5.24+'s deprecate_kwarg
    # wrapper around each attention forward recompiles per layer), and where that happens depends on everything
    # compiled before it: raised, so both sides are compiled whole and their graphs compare
    with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=1024):
        output = run(torch.compile(model, backend=explain, fullgraph=fullgraph))
    info = explain.output()
    ops = {
        str(node.target)
        for graph in info.graphs
        for node in graph.graph.nodes
        if node.op == "call_function" and str(node.target).startswith("ropekit.")
    }
    result = Capture(output, info.graph_count, list(info.break_reasons), sum(counters["graph_break"].values()),
                     list(counters["graph_break"]), ops)
    torch._dynamo.reset()
    return result


# Both sides are compiled with the same backend: the backend can change Dynamo's graph split (on transformers 4.57
# the multimodal Qwen3-VL gets one more graph under aot_eager than under eager, patched or not).
BACKEND = "aot_eager"
TABLE: list[tuple[str, Capture, Capture]] = []


@pytest.fixture(scope="module", autouse=True)
def graph_break_table():
    yield
    path = os.environ.get("ROPEKIT_GRAPH_BREAK_TABLE")
    if not path or not TABLE:
        return
    import transformers

    lines = [
        f"\ntorch {torch.__version__}, transformers {transformers.__version__}\n",
        "| family | transformers | graphs (unpatched / patched) | breaks (unpatched / patched) "
        "| break reasons, unpatched | break reasons, patched |",
        "|---|---|---|---|---|---|",
    ]
    for family, ref, ours in TABLE:
        lines.append(f"| {family} | {transformers.__version__} | {ref.graph_count} / {ours.graph_count} "
                     f"| {ref.breaks} / {ours.breaks} | {ref.summary()} | {ours.summary()} |")
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")


def assert_close_tree(actual, expected, atol=1e-5):
    if isinstance(expected, dict):
        assert set(actual) == set(expected)
        for name in expected:
            torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=atol, msg=name)
    elif isinstance(expected, (tuple, list)):
        for a, e in zip(actual, expected, strict=True):
            assert_close_tree(a, e, atol)
    else:
        torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


def check_family(family, model, run, apply, expected_ops=("ropekit.qk_norm_rope",)):
    """Unpatched vs patched graph breaks of ``run(model)``, and the compiled patched output vs eager patched (and,
    checking the harness, compiled unpatched vs eager unpatched).

    Where the unpatched model compiles into a single graph with no break, the patched one is compiled with
    ``fullgraph=True`` (which raises on any break)."""
    eager_unpatched = run(model)
    unpatched = capture(run, model, BACKEND)
    apply()
    eager = run(model)
    patched = capture(run, model, BACKEND, fullgraph=unpatched.breaks == 0 and unpatched.graph_count == 1)
    TABLE.append((family, unpatched, patched))
    assert_close_tree(unpatched.output, eager_unpatched)  # the harness itself: compiled == eager, unpatched

    assert patched.graph_count <= unpatched.graph_count, (patched.summary(), unpatched.summary())
    assert patched.breaks <= unpatched.breaks, (patched.summary(), unpatched.summary())
    assert patched.counted_breaks <= unpatched.counted_breaks, (patched.counter_messages, unpatched.counter_messages)
    assert not [r for r in patched.break_reasons if mentions_ropekit(r)], patched.summary()
    assert not [m for m in patched.counter_messages if mentions_ropekit(m)], patched.counter_messages
    assert not unpatched.ropekit_ops, "the unpatched model reached a ropekit op"
    assert set(expected_ops) <= patched.ropekit_ops, f"not traced: {set(expected_ops) - patched.ropekit_ops}"
    assert_close_tree(patched.output, eager)
    return unpatched, patched


# ------------------------------------------------------------------------------------------------------------------
# Tiny configs and inputs


def tiny_qwen3_vl_moe_text_config():
    from transformers import Qwen3VLMoeTextConfig

    base = tiny_qwen3_vl_text_config()
    rope = ({"rope_parameters": base.rope_parameters} if hasattr(base, "rope_parameters")
            else {"rope_theta": base.rope_theta, "rope_scaling": base.rope_scaling})
    config = Qwen3VLMoeTextConfig(**dict(TINY, num_hidden_layers=1), **rope, **TINY_MOE)
    config._attn_implementation = "eager"
    return config


def token_ids(seed, batch=2, seq=12):
    return torch.randint(0, TINY["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))


def mrope_positions(batch=2, seq=12, axes=3):
    """Distinct rows, as get_rope_index produces around an image: temporal / height / width (HunYuan-VL's ``axes``
    rows: the leading ones the token index, the last two changed likewise)."""
    pos = torch.arange(seq).expand(axes, batch, seq).clone()
    pos[axes - 2, :, 3:9] = torch.arange(6) % 3 + 3
    pos[axes - 1, :, 3:9] = torch.arange(6) // 3 + 3
    return pos


def no_grad(run):
    def wrapped(model):
        with torch.no_grad():
            return run(model)

    return wrapped


def training_step(model, run_loss):
    """run(model) -> (loss, every parameter's gradient): a forward in training mode and a backward."""
    params = dict(model.named_parameters())

    def run(fn):
        model.zero_grad(set_to_none=True)
        loss = run_loss(fn)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in params.items() if p.grad is not None}

    return run


# ------------------------------------------------------------------------------------------------------------------
# Inference forwards


def test_qwen3(unpatch_after):
    from transformers import Qwen3ForCausalLM

    model = build(Qwen3ForCausalLM, tiny_qwen3_config(), "cpu", seed=20)
    ids = token_ids(21)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    check_family("Qwen3", model, no_grad(lambda m: m(input_ids=ids, attention_mask=mask).logits),
                 ropekit.apply_to_qwen3)


def test_qwen3_moe(unpatch_after):
    from transformers import Qwen3MoeForCausalLM

    config = tiny_qwen3_moe_config()
    config.num_hidden_layers = 1  # on 4.57 each sparse block breaks in its loop over experts: one is enough
    model = build(Qwen3MoeForCausalLM, config, "cpu", seed=22)
    ids = token_ids(23)
    check_family("Qwen3-MoE", model, no_grad(lambda m: m(input_ids=ids).logits), ropekit.apply_to_qwen3)


def test_qwen3_vl_text_model(unpatch_after):
    from transformers import Qwen3VLTextModel

    model = build(Qwen3VLTextModel, tiny_qwen3_vl_text_config(), "cpu", seed=24)
    ids, pos = token_ids(25), mrope_positions()
    check_family("Qwen3-VL text", model,
                 no_grad(lambda m: m(input_ids=ids, position_ids=pos).last_hidden_state), ropekit.apply_to_qwen3_vl)


def test_qwen3_vl_moe_text_model(unpatch_after):
    from transformers import Qwen3VLMoeTextModel

    model = build(Qwen3VLMoeTextModel, tiny_qwen3_vl_moe_text_config(), "cpu", seed=26)
    ids, pos = token_ids(27), mrope_positions()
    check_family("Qwen3-VL-MoE text", model,
                 no_grad(lambda m: m(input_ids=ids, position_ids=pos).last_hidden_state), ropekit.apply_to_qwen3_vl)


def test_qwen3_vl_multimodal(unpatch_after):
    """The whole Qwen3VLForConditionalGeneration on images and a 2-frame video with left padding: the vision tower
    and the multimodal merge break the graph unpatched (data-dependent shapes); patched, get_rope_index is one traced
    op (``ropekit.rope_index``), so its breaks go away, and the text attention runs the fused op. One vision block
    and one text layer: Dynamo's tracing of the many broken frames dominates this test's time (the tower's breaks
    repeat per block, and ropekit does not touch the tower)."""
    from transformers import Qwen3VLForConditionalGeneration

    config = tiny_qwen3_vl_config()
    config.vision_config.depth = 1  # deepstack_visual_indexes=[0] still names a block
    config.text_config.num_hidden_layers = 1
    model = build(Qwen3VLForConditionalGeneration, config, "cpu", seed=28)
    inputs = multimodal_batch(config, torch.Generator().manual_seed(29))
    unpatched, patched = check_family("Qwen3-VL (images + video)", model, no_grad(lambda m: m(**inputs).logits),
                                      ropekit.apply_to_qwen3_vl,
                                      expected_ops=("ropekit.qk_norm_rope", "ropekit.rope_index"))

    def in_rope_index(reason):
        return any(frame.name == "get_rope_index" for frame in reason.user_stack)

    assert any(in_rope_index(r) for r in unpatched.break_reasons), unpatched.summary()
    assert not any(in_rope_index(r) for r in patched.break_reasons), patched.summary()


@pytest.mark.skipif(not has_qwen3_5(), reason="Qwen3.5 exists from transformers 5.x (4.57 has no qwen3_5 module)")
def test_qwen3_5(unpatch_after):
    from transformers import Qwen3_5ForCausalLM

    model = build(Qwen3_5ForCausalLM, tiny_qwen3_5_text_config(), "cpu", seed=30)
    ids = token_ids(31)
    check_family("Qwen3.5 text", model, no_grad(lambda m: m(input_ids=ids).logits), ropekit.apply_to_qwen3_5)


# ------------------------------------------------------------------------------------------------------------------
# The other mRoPE families (Qwen2-VL, Qwen2.5-VL, Qwen4-Exp, GLM-4V, GLM-4V-MoE, GLM-4.6V)


def _family_ops(family, multimodal):
    # HY-V4-VL: its MLA rotation is transformers' and the table is not read under torch.compile (transformers'
    # rotary forward traces): only its get_rope_index is a ropekit op in the graph
    ops = ("ropekit.qk_norm_rope",) if family.fused else ("ropekit.apply_rope",) if family.rotation else ()
    return ops + (("ropekit.rope_index",) if multimodal else ())


@pytest.mark.parametrize("family", family_models.family_params(ids=set(family_models.FAMILIES) - {"glm46v"}))
def test_family_text_model(unpatch_after, family):
    """The family's text model with distinct (3, B, S) mRoPE positions (GLM-4.6V runs GLM-4V's): patched, the
    rotation is one traced op. Qwen4-Exp's indexer loops over the queries with nonzero (transformers' breaks, the
    same patched): one short row."""
    model = family_models.shared_model(family)
    config = copy.deepcopy(model.config.text_config)
    if family.id == "qwen4_exp":  # its linear-attention layer (untouched by ropekit) dominates the tracing time
        config.num_hidden_layers, config.layer_types = 1, ["indexed_attention"]
    text_model = build(type(family_models.language_model(model)), config, "cpu", seed=40)
    batch, seq = (1, 6) if family.id == "qwen4_exp" else (2, 12)
    ids = token_ids(41, batch, seq)
    if seq >= 9:
        pos = mrope_positions(batch, seq, family.axes)
    else:  # a 2x2 image at tokens 2..5
        pos = torch.arange(seq).expand(3, batch, seq).clone()
        pos[1, :, 2:6], pos[2, :, 2:6] = torch.tensor([2, 2, 3, 3]), torch.tensor([2, 3, 2, 3])
    check_family(f"{family.id} text", text_model,
                 no_grad(lambda m: m(input_ids=ids, position_ids=pos).last_hidden_state), family.apply,
                 expected_ops=_family_ops(family, False))


@pytest.mark.parametrize("family", family_models.family_params())
def test_family_multimodal(unpatch_after, family):
    """The whole conditional-generation model on two images with a left-padded row (Qwen4-Exp: no padding, where
    transformers' indexed attention gives NaN): one text layer (Qwen4-Exp: indexed attention), one vision block.
    The vision tower and the placeholder checks break the graph unpatched and patched alike; get_rope_index's breaks
    go away patched (one traced op)."""
    config = family.config()
    config.text_config.num_hidden_layers = 1
    if family.id == "qwen4_exp":
        config.text_config.layer_types = ["indexed_attention"]
    model = family.build(seed=42, config=config)
    rows = [[("text", 3), ("image", 4, 6), ("text", 2)], [("text", 2), ("image", 4, 4), ("text", 3)]]
    if family.id == "qwen4_exp":
        rows = [rows[0], rows[0]]
    inputs = family_models.multimodal_inputs(family, config, 43, rows=rows)
    unpatched, patched = check_family(f"{family.id} (images)", model, no_grad(lambda m: m(**inputs).logits),
                                      family.apply, expected_ops=_family_ops(family, True))

    def in_rope_index(reason):
        return any(frame.name == "get_rope_index" for frame in reason.user_stack)

    assert not any(in_rope_index(r) for r in patched.break_reasons), patched.summary()


# ------------------------------------------------------------------------------------------------------------------
# Training: forward in training mode with grad, then backward through the AOT-compiled joint graph


def test_qwen3_training_forward_backward(unpatch_after):
    from transformers import Qwen3ForCausalLM

    model = build(Qwen3ForCausalLM, tiny_qwen3_config(), "cpu", seed=32).train()
    ids = token_ids(33)
    run = training_step(model, lambda m: m(input_ids=ids, labels=ids).loss)
    _, patched = check_family("Qwen3 training (fwd + bwd)", model, run, ropekit.apply_to_qwen3)
    assert any("q_norm" in name for name in patched.output[1]), "norm weights got gradients through the fused op"


def test_qwen3_vl_text_training_forward_backward(unpatch_after):
    from transformers import Qwen3VLTextModel

    model = build(Qwen3VLTextModel, tiny_qwen3_vl_text_config(), "cpu", seed=34).train()
    ids, pos = token_ids(35), mrope_positions()
    probe = torch.randn(2, 12, TINY["hidden_size"], generator=torch.Generator().manual_seed(36))
    run = training_step(model, lambda m: (m(input_ids=ids, position_ids=pos).last_hidden_state * probe).sum())
    _, patched = check_family("Qwen3-VL text training (fwd + bwd)", model, run, ropekit.apply_to_qwen3_vl)
    assert any("k_norm" in name for name in patched.output[1])


def test_training_step_function_breaks_only_at_backward(unpatch_after):
    """A whole step function (forward, loss, ``loss.backward()``) under Dynamo: the one break is Tensor.backward()
    (Dynamo does not trace it by default), the same unpatched and patched."""
    from transformers import Qwen3ForCausalLM

    config = tiny_qwen3_config()
    config.num_hidden_layers = 1
    model = build(Qwen3ForCausalLM, config, "cpu", seed=37).train()
    ids = token_ids(38)
    params = dict(model.named_parameters())

    def step(input_ids):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        return loss.detach()

    def run(fn):
        model.zero_grad(set_to_none=True)
        return fn(ids), {n: p.grad.clone() for n, p in params.items()}

    unpatched = capture(run, step, BACKEND)
    ropekit.apply_to_qwen3()
    eager = run(step)
    patched = capture(run, step, BACKEND)
    TABLE.append(("Qwen3 step function (fwd + loss.backward())", unpatched, patched))
    for result in (unpatched, patched):
        assert result.breaks == 1 and "backward" in result.break_reasons[0].reason, result.summary()
    assert patched.graph_count == unpatched.graph_count
    assert not mentions_ropekit(patched.break_reasons[0])
    assert "ropekit.qk_norm_rope" in patched.ropekit_ops
    assert_close_tree(patched.output, eager)


def test_mentions_ropekit_ignores_install_paths():
    """The check itself: a virtualenv under ~/.cache/ropekit is not ropekit; the package and its ops are."""

    class Frame:
        def __init__(self, filename):
            self.filename = filename

    class Reason:
        def __init__(self, text, files=()):
            self.reason, self.user_stack = text, [Frame(f) for f in files]

    outside = "/root/.cache/ropekit/venv/lib/python3.11/site-packages/transformers/models/qwen3/modeling_qwen3.py"
    assert not mentions_ropekit(Reason(f"Data dependent operator at {outside}:12", [outside]))
    inside = os.path.join(PACKAGE_DIR, "transformers", "attention.py")
    assert mentions_ropekit(Reason("x", [outside, inside]))
    assert mentions_ropekit(Reason("x", [outside, inside, os.path.join(TORCH_DIR, "nn", "functional.py")]))
    assert not mentions_ropekit(Reason("Dynamic shape operator", [outside, inside, outside]))  # transformers' break
    assert mentions_ropekit(Reason("Operator ropekit::qk_norm_rope has no fake kernel"))
    assert mentions_ropekit("call_function torch.ops.ropekit.rope_index")
