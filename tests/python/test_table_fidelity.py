"""The patched rotary embedding never serves a stale table, and its table stays bounded in memory.

Every in-place route to a rotary module's ``inv_freq`` / ``attention_scaling`` is tried: after each one, the patched
module must return exactly (``torch.equal``) what transformers computes from the module's current values. The
routes that autograd's version counter sees were always caught; the others (``.data``, inference tensors, numpy
views, ``set_``, storage writes) are caught by comparing values with the table's snapshot (on CPU) or inside the
gather kernel (CUDA). Then: a position of 5e6 neither grows the table nor host memory, and stays bit-identical.
"""

from __future__ import annotations

import copy
import resource

import pytest
import torch

import ropekit
from ropekit import ops
from ropekit.modules import MAX_TABLE_ROWS, RopeTable
from ropekit.transformers._patching import original
from ropekit.transformers.rotary import table_of

from conftest import requires_cuda, tiny_qwen3_config, tiny_qwen3_vl_text_config

pytestmark = pytest.mark.transformers


def qwen3_rotary(config=None):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    return Qwen3RotaryEmbedding(config or tiny_qwen3_config())


def qwen3_vl_rotary():
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    return Qwen3VLTextRotaryEmbedding(tiny_qwen3_vl_text_config())


def reference(module, x, position_ids):
    return original(type(module), "forward")(module, x, position_ids)


def assert_matches_transformers(module, x, pos):
    ours = module(x, pos)
    ref = reference(module, x, pos)
    for a, b, name in zip(ours, ref, ("cos", "sin")):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), f"{name}: max |diff| {(a.float() - b.float()).abs().max().item():.3g}"


def _halve_data(m):
    m.inv_freq.data.mul_(0.5)  # rope theta changed through .data: no version bump


def _numpy_view(m):
    if m.inv_freq.device.type != "cpu":
        pytest.skip("numpy views exist for CPU tensors only")
    m.inv_freq.numpy()[:] *= 0.25


def _set_storage(m):
    with torch.no_grad():
        m.inv_freq.set_(m.inv_freq.detach().clone() * 0.75)  # same tensor object, new storage


def _untyped_storage_copy(m):
    fresh = (m.inv_freq.detach() * 1.5).contiguous()
    m.inv_freq.untyped_storage().copy_(fresh.untyped_storage())


def _copy_under_no_grad(m):
    with torch.no_grad():
        m.inv_freq.copy_(m.inv_freq * 0.9)  # tracked by the version counter


def _replace_buffer(m):
    m.inv_freq = m.inv_freq * 0.8  # a new tensor object


def _load_state_dict(m):
    state = {"inv_freq": m.inv_freq * 0.7}
    m.load_state_dict(state, strict=False)  # a non-persistent buffer is not loaded: must change nothing


def _cast_module(m):
    m.to(torch.bfloat16)  # inv_freq rounded to bf16, as model.to(bf16) does


def _attention_scaling(m):
    m.attention_scaling = 0.5


def _partial_element(m):
    m.inv_freq.data[3] = 0.125  # one frequency only


ROUTES = {
    "data_mul": _halve_data,
    "numpy_view": _numpy_view,
    "set_storage": _set_storage,
    "untyped_storage_copy": _untyped_storage_copy,
    "copy_no_grad": _copy_under_no_grad,
    "replace_buffer": _replace_buffer,
    "load_state_dict": _load_state_dict,
    "cast_module": _cast_module,
    "attention_scaling": _attention_scaling,
    "one_element_data": _partial_element,
}


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("family", ["qwen3", "qwen3_vl"])
def test_in_place_changes_are_never_served_stale(unpatch_after, device, route, family):
    module = (qwen3_rotary() if family == "qwen3" else qwen3_vl_rotary()).to(device)
    ropekit.apply_to_qwen3()
    ropekit.apply_to_qwen3_vl()
    x = torch.randn(2, 24, 8, device=device)
    shape = (2, 24) if family == "qwen3" else (3, 2, 24)
    pos = torch.randint(0, 100, shape, generator=torch.Generator().manual_seed(0)).to(device)
    assert_matches_transformers(module, x, pos)  # builds the table
    assert table_of(module).cos is not None
    before = [t.clone() for t in module(x, pos)]
    ROUTES[route](module)
    assert_matches_transformers(module, x, pos)
    if route not in ("load_state_dict",):
        assert not torch.equal(module(x, pos)[0], before[0]), "the route changed nothing: the test proves nothing"
    assert_matches_transformers(module, x.bfloat16(), pos)  # and again, from a warm cache


def test_inference_mode_buffer_changed_in_place(unpatch_after):
    """A buffer made under torch.inference_mode has no version counter at all."""
    ropekit.apply_to_qwen3()
    with torch.inference_mode():
        module = qwen3_rotary()
        x = torch.randn(1, 16, 8)
        pos = torch.arange(16)[None] * 5
        assert_matches_transformers(module, x, pos)
        module.inv_freq.mul_(0.5)
        assert_matches_transformers(module, x, pos)


def test_theta_change_through_data_matches_model_logits(unpatch_after):
    """The issue's example: `rotary_emb.inv_freq.data.mul_(0.5)` changed a tiny Qwen3's logits by 0.27 when a stale
    table was served."""
    from transformers import Qwen3ForCausalLM

    from conftest import build

    model = build(Qwen3ForCausalLM, tiny_qwen3_config(), "cpu")
    reference_model = copy.deepcopy(model)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    ropekit.apply_to_qwen3(model)
    with torch.no_grad():
        model(input_ids=ids)  # table built
        for m in (model, reference_model):
            m.model.rotary_emb.inv_freq.data.mul_(0.5)
        ours = model(input_ids=ids).logits
        ropekit.unpatch()
        ref = reference_model(input_ids=ids).logits
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_computes_changed_frequencies(device, dtype):
    """The gather op itself: columns whose current frequency differs from the table's are computed exactly."""
    inv = 1.0 / (1e4 ** (torch.arange(0, 32, 2).float() / 32)).to(device)
    snapshot = inv.clone()
    tables = ops.rope_cache(snapshot, 128)
    changed = inv.clone()
    changed[::3] *= 0.5
    pos = torch.randint(-10, 300, (2, 50), generator=torch.Generator().manual_seed(2)).to(device)
    ours = ops.rope_cos_sin(*tables, pos, dtype, changed, 1.0, snapshot)
    fresh = ops.rope_cos_sin(*ops.rope_cache(changed, 300), pos, dtype, changed, 1.0)
    for a, b in zip(ours, fresh):
        assert torch.equal(a, b)
    mpos = torch.stack([pos, pos + 1, pos * 2])
    ours = ops.mrope_cos_sin(*tables, mpos, [3, 3, 2], dtype, changed, 1.0, snapshot)
    fresh = ops.mrope_cos_sin(*ops.rope_cache(changed, 600), mpos, [3, 3, 2], dtype, changed, 1.0)
    for a, b in zip(ours, fresh):
        assert torch.equal(a, b)


def test_table_inv_freq_needs_inv_freq():
    tables = ops.rope_cache(torch.ones(4), 8)
    with pytest.raises(RuntimeError, match="table_inv_freq"):
        ops.rope_cos_sin(*tables, torch.zeros(1, 2, dtype=torch.long), torch.float32, None, 1.0, torch.ones(4))
    with pytest.raises(RuntimeError, match="table_inv_freq: expected float32"):
        ops.rope_cos_sin(*tables, torch.zeros(1, 2, dtype=torch.long), torch.float32, torch.ones(4), 1.0,
                         torch.ones(4, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------------------
# Bounded memory


def _reset_peak_rss() -> bool:
    """Reset the process's peak resident set (Linux >= 4.0: writing 5 to clear_refs), so that the next reading is
    the peak since now, not since the process started (an earlier test's larger peak would hide this one's)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_huge_position_keeps_memory_bounded(unpatch_after, device):
    """One position of 5,000,000 used to grow the CPU table to cover it (6.2 GB at head_dim 128). On CPU host memory,
    on CUDA device memory, stays within the table's bound, and the rows past it are bit-identical."""
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    from conftest import rope_kwargs

    config = Qwen3Config(hidden_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                         max_position_embeddings=4096, **rope_kwargs())
    module = Qwen3RotaryEmbedding(config).to(device)
    ropekit.apply_to_qwen3()
    x = torch.randn(1, 4, 8, device=device)
    pos = torch.tensor([[0, 17, 4_999_999, 5_000_000]], device=device)
    peak_reset = _reset_peak_rss()
    rss_before = _peak_rss_bytes()  # after a reset: the current resident set
    cuda_before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    assert_matches_transformers(module, x, pos)
    table = table_of(module)
    assert table.rows <= MAX_TABLE_ROWS
    # the table's own bytes, and the process's peak, both far below what covering 5e6 rows would take (2.56 GB)
    assert table.cos.numel() * 4 * 2 <= 64 * 2**20
    if peak_reset:  # otherwise the lifetime peak may predate this test and the check would say nothing
        assert _peak_rss_bytes() - rss_before < 256 * 2**20
    if device.type == "cuda":
        assert torch.cuda.memory_allocated() - cuda_before <= 64 * 2**20 + 2**20
    # and the rows past the table are exact
    cos, sin = module(x, pos)
    half = 64
    inv = module.inv_freq
    freqs = inv[None, :] * torch.tensor([4_999_999.0, 5_000_000.0], device=device)[:, None]
    assert torch.equal(cos[0, 2:, :half], freqs.cos())
    assert torch.equal(sin[0, 2:, half:], freqs.sin())


def test_table_growth_stops_at_the_limit(device):
    table = RopeTable(initial_rows=16, max_rows=1024)
    inv = 1.0 / (1e4 ** (torch.arange(0, 16, 2).float() / 16)).to(device)
    pos = torch.tensor([[3, 700, 5000, 1 << 20]], device=device)
    cos, sin = table.cos_sin(inv, 1.0, pos, torch.float32)
    assert table.rows <= 1024
    ref = ops.rope_cos_sin(*ops.rope_cache(inv, 1), pos, torch.float32, inv, 1.0)
    assert torch.equal(cos, ref[0]) and torch.equal(sin, ref[1])


@requires_cuda
def test_cuda_table_covers_the_expected_context_without_sync(unpatch_after):
    """On CUDA the table is sized from what the host knows (the model's max_position_embeddings, capped), so decode
    at position 100k reads the table like decode at 1k, and nothing syncs."""
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    from conftest import rope_kwargs

    config = Qwen3Config(hidden_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                         max_position_embeddings=131072, **rope_kwargs())
    module = Qwen3RotaryEmbedding(config).cuda()
    ropekit.apply_to_qwen3()
    x = torch.randn(64, 1, 8, device="cuda", dtype=torch.bfloat16)
    module(x, torch.full((64, 1), 5, device="cuda"))  # table built
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for position in (1000, 100_000):
            module(x, torch.full((64, 1), position, device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert table_of(module).rows >= 100_001
    assert_matches_transformers(module, x, torch.full((64, 1), 100_000, device="cuda"))
