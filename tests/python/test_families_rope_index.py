"""ropekit.rope_index for every mRoPE family, against that family's own transformers get_rope_index (whichever
transformers line is installed: 5.x "token_types"; 4.57 "vision_start", or "video_brackets" for GLM-4V):
thousands of random prompts in the family's token layout, clean and perturbed, on the host loop, the fused device
algorithm (its row code run serially on the CPU; on CUDA the kernel) and the ATen reference.

ROPEKIT_FAMILY_CASES=N changes the number of clean cases per family (default 2000; perturbed: half of it; the ATen
reference, slow on the CPU, takes 400 clean and 200 perturbed of them)."""

from __future__ import annotations

import os

import pytest
import torch

import ropekit

from conftest import requires_cuda
from family_cases import (
    FAMILIES,
    TOKEN_TYPE_CONVENTIONS,
    build_family_case,
    random_family_case,
    rope_index_model,
    ropekit_kwargs,
    tiny_config,
    transformers_outcome,
)
from rope_index_cases import (
    WILD_KINDS, Image, Text, Video, compare, fail_on, in_vision_start_device_domain, outcome_problem, perturb,
)

pytestmark = pytest.mark.transformers

N_CASES = int(os.environ.get("ROPEKIT_FAMILY_CASES", "2000"))
AVAILABLE = [name for name, family in FAMILIES.items() if family.available()]


def call(fc, algorithm: str, device="cpu", **overrides):
    kwargs = ropekit_kwargs(fc)
    kwargs.update(overrides)
    case = fc.case
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    input_ids = move(case.input_ids)
    for key in ("image_grid_thw", "video_grid_thw", "attention_mask", "mm_token_type_ids", "second_per_grid_ts"):
        if key in kwargs:
            kwargs[key] = move(kwargs[key])
    if algorithm == "op":
        return ropekit.rope_index(input_ids, **kwargs, on_host=device == "cpu")
    names = ["image_grid_thw", "video_grid_thw", "attention_mask", "mm_token_type_ids", "spatial_merge_size",
             "image_token_id", "video_token_id", "vision_start_token_id", "convention"]
    positional = [kwargs.pop(name, None) for name in names]
    return torch.ops.ropekit._rope_index_algorithm(input_ids, *positional, algorithm=algorithm, **kwargs)


@pytest.fixture(scope="module", params=AVAILABLE)
def family_cases(request):
    """(family, [(case, transformers' result or None, its error)]): N_CASES clean cases, then N_CASES // 2 perturbed
    ones (masked-out spans, tril and segment-id masks, leftover and missing grids, span lengths off by one, odd
    grids)."""
    family = FAMILIES[request.param]
    config = tiny_config(family)
    model = rope_index_model(family, config)
    # no vision_start token in the GLM and ERNIE layouts
    kinds = [k for k in WILD_KINDS
             if not ((family.glm or family.temporal_merge or family.xdrope or family.frame_blocks)
                     and k == "vision_start_end")]
    cases = []
    for i in range(N_CASES + N_CASES // 2):
        fc = random_family_case(family, config, seed=0xFA11 * 1000 + i)
        if i >= N_CASES:
            fc.case = perturb(fc.case, seed=i, kind=kinds[i % len(kinds)])
        cases.append((fc, *transformers_outcome(fc, model)))
    return family, cases


def test_family_cases_are_realistic(family_cases):
    """Nearly every clean case gives positions in transformers (the generator writes each family's own layout)."""
    family, cases = family_cases
    clean = cases[:N_CASES]
    failed = [(fc, error) for fc, expected, error in clean if expected is None]
    assert not failed, f"transformers fails on clean {family.name} cases:\n{failed[0][0].describe()}\n{failed[0][1]}"
    videos = sum(fc.case.video_grid_thw is not None for fc, _, _ in clean)
    images = sum(fc.case.image_grid_thw is not None for fc, _, _ in clean)
    assert (videos == 0 if family.xdrope else videos > N_CASES // 4) and images > N_CASES // 4, (videos, images)


@pytest.mark.parametrize("algorithm", ["op", "kernel", "reference"])
def test_family_fuzz_matches_transformers(family_cases, algorithm):
    """The same positions and deltas as the family's transformers get_rope_index wherever it returns, and an error
    where it raises. The ATen reference may decline 4.57 spans that do not match their grids (its domain)."""
    family, cases = family_cases
    if algorithm == "reference" and (family.xdrope or family.frame_blocks):
        assert_reference_declines(family, cases[0][0])
        return
    if algorithm == "reference":  # dozens of tensor ops per call on the CPU: a sample of clean and perturbed cases
        cases = cases[:400] + cases[N_CASES:N_CASES + 200]
    failures, declined = [], 0
    for fc, expected, error in cases:
        try:
            got = call(fc, algorithm)
        except (ValueError, RuntimeError) as e:
            if expected is not None:
                if algorithm == "reference" and family.convention() == "vision_start" and not \
                        in_vision_start_device_domain(fc.case, family.frames):
                    declined += 1
                    continue
                failures.append((fc, f"raised {type(e).__name__}: {e}"))
            continue
        problem = outcome_problem(got, expected, error)
        if problem:
            failures.append((fc, problem))
    fail_on(failures, len(cases), f"{family.name} cases differ ({algorithm})")
    assert declined <= len(cases) // 4


def test_patched_get_rope_index_follows_transformers(family_cases):
    """The replacement ropekit installs as <Family>Model.get_rope_index, called the way the model calls it (each
    line's signature, Qwen2.5-VL's second_per_grid_ts included): transformers' result, or a ValueError where
    transformers raises."""
    from ropekit.transformers.rope_index import MROPE_RULES, make_get_rope_index

    family, cases = family_cases
    config = tiny_config(family)
    model = rope_index_model(family, config)
    patched = make_get_rope_index(family.model_class().__dict__["get_rope_index"], MROPE_RULES[family.name])
    patched.__ropekit_live__ = True  # as ropekit.transformers._patching.patch() marks an installed replacement
    for fc, expected, error in cases[:300] + cases[N_CASES:N_CASES + 300]:
        got, raised = transformers_outcome(fc, model, fn=patched)
        if expected is None:
            assert got is None and raised.startswith("ValueError"), (fc.describe(), error, raised)
        else:
            assert raised is None, f"{fc.describe()}\n  {raised}"
            assert compare(got, expected) is None, fc.describe()


def assert_reference_declines(family, fc):
    """HunYuan-VL's "xdrope" and HY-V4-VL's "frame_blocks" have no ATen composition: the reference says so (the host
    loop and the fused algorithm, which the patch and the op use on the CPU and CUDA, compute them)."""
    with pytest.raises(ValueError, match=f"does not implement convention '{family.convention()}'"):
        call(fc, "reference")


@requires_cuda
@pytest.mark.cuda
def test_family_fuzz_on_cuda(family_cases):
    """On the GPU: the fused kernel and the host path on CUDA inputs, on every case transformers returns for."""
    family, cases = family_cases
    for fc, expected, _ in cases:
        if expected is None:
            continue
        want = tuple(t.to("cuda") for t in expected)
        for algorithm in ("op", "kernel"):
            problem = compare(call(fc, algorithm, device="cuda"), want)
            assert problem is None, f"{algorithm}:\n{fc.describe()}\n  {problem}"


# ----------------------------------------------------------------------------------------------------------------
# packed batches: several samples per row, positions restarting at each


def _samples(family, config, seed, count, m=2, tps=4):
    """`count` single-row, unpadded samples of the family (mask None), with one merge size and tokens_per_second
    (one batch)."""
    out = []
    for k in range(count):
        fc = random_family_case(family, config, seed=seed * 100 + k)
        redraw = 0
        while fc.temporal_merge_size != (2 if family.temporal_merge else 1):  # rows drawn for this batch's merge
            redraw += 1
            fc = random_family_case(family, config, seed=(seed * 100 + k) * 1000 + redraw)
        out.append(build_family_case(family, config, [fc.case.rows[0]], m=m, seed=seed * 100 + k, mask="never",
                                     second_per_grid_ts=fc.second_per_grid_ts, tokens_per_second=tps,
                                     temporal_merge_size=2 if family.temporal_merge else 1,
                                     num_axes=4 if family.xdrope else 3))
    return out


def _cat_grids(samples, key):
    grids = [getattr(s.case, key) for s in samples if getattr(s.case, key) is not None]
    return torch.cat(grids) if grids else None


def _packed_case(family, config, rows, S):
    """A FamilyCase holding `rows` (lists of single-sample cases) back to back in rows of length S, with the grids
    and second_per_grid_ts of all samples in order; attention_mask holds segment ids (1, 2, ... per row; 0 padding).
    Returns it and the cu_seqlens of the same samples over the flattened tokens."""
    flat = [smp for row in rows for smp in row]
    ids = torch.full((len(rows), S), 151643, dtype=torch.int64)
    mm = torch.zeros((len(rows), S), dtype=torch.int64)
    seg = torch.zeros((len(rows), S), dtype=torch.int64)
    cu = [0]
    for b, row in enumerate(rows):
        at = 0
        for k, smp in enumerate(row):
            n = smp.case.input_ids.shape[1]
            ids[b, at:at + n] = smp.case.input_ids[0]
            mm[b, at:at + n] = smp.case.mm_token_type_ids[0]
            seg[b, at:at + n] = k + 1
            at += n
            cu.append(b * S + at)
    packed = build_family_case(family, config, [[Text(1)]], m=flat[0].case.spatial_merge_size)
    seconds = [smp.second_per_grid_ts for smp in flat if smp.second_per_grid_ts is not None]
    packed.second_per_grid_ts = torch.cat(seconds) if seconds else None
    packed.tokens_per_second = flat[0].tokens_per_second
    packed.temporal_merge_size = flat[0].temporal_merge_size
    packed.num_axes = flat[0].num_axes
    tensors = dict(input_ids=ids, attention_mask=seg, mm_token_type_ids=mm,
                   image_grid_thw=_cat_grids(flat, "image_grid_thw"), video_grid_thw=_cat_grids(flat, "video_grid_thw"))
    packed.case = type(packed.case)(None, [], flat[0].case.spatial_merge_size, flat[0].case.ids, "right", **tensors)
    return packed, torch.tensor(cu)


def _check_packed(family, rows, pos, deltas):
    pad = 0 if family.convention() in TOKEN_TYPE_CONVENTIONS else 1
    for b, row in enumerate(rows):
        at = 0
        for smp in row:
            alone_pos, alone_delta = call(smp, "op")  # the sample as its own unpadded row
            n = smp.case.input_ids.shape[1]
            assert torch.equal(pos[:, b, at:at + n], alone_pos[:, 0]), (family.name, b, at)
            at += n
        assert (pos[:, b, at:] == pad).all()
        assert deltas[b, 0] == alone_delta[0, 0] and deltas.dtype == torch.int64


@pytest.mark.parametrize("algorithm", ["op", "kernel", "reference"])
def test_packed_rows_equal_the_samples_alone(family_cases, algorithm):
    """A packed row (samples back to back, then padding) gets each sample's own positions, as if it were its own
    unpadded row, with grids consumed in order; the row's delta is its last sample's. Segment ids in the mask
    (packed=True), and cu_seqlens (samples over the flattened tokens; tokens past its last entry are padding)."""
    family, _ = family_cases
    config = tiny_config(family)
    if algorithm == "reference" and (family.xdrope or family.frame_blocks):
        assert_reference_declines(family, _samples(family, config, 0, count=1)[0])
        return
    for seed in range(10):
        rows = [_samples(family, config, seed * 7 + r, count=1 + (seed + r) % 3) for r in range(2)]
        S = max(sum(smp.case.input_ids.shape[1] for smp in row) for row in rows) + 3
        packed, _ = _packed_case(family, config, rows, S)
        pos, deltas = call(packed, algorithm, packed=True)
        _check_packed(family, rows, pos, deltas)
        # cu_seqlens: one row with trailing padding, and two full rows
        one = rows[:1]
        packed, cu = _packed_case(family, config, one, S)
        pos, deltas = call(packed, algorithm, attention_mask=None, cu_seqlens=cu)
        _check_packed(family, one, pos, deltas)
        full = [rows[0], rows[0]]
        S_full = sum(smp.case.input_ids.shape[1] for smp in rows[0])
        packed, cu = _packed_case(family, config, full, S_full)
        pos, deltas = call(packed, algorithm, attention_mask=None, cu_seqlens=cu)
        _check_packed(family, full, pos, deltas)


def test_packed_input_errors():
    ids = torch.tensor([[1, 2, 3, 4]])
    types = torch.zeros_like(ids)
    common = dict(mm_token_type_ids=types, spatial_merge_size=2)
    with pytest.raises(ValueError, match="cu_seqlens"):
        ropekit.rope_index(ids, attention_mask=torch.ones_like(ids), cu_seqlens=torch.tensor([0, 4]), **common)
    with pytest.raises(ValueError, match="packed=True"):
        ropekit.rope_index(ids, packed=True, **common)
    with pytest.raises(ValueError, match="cu_seqlens"):
        ropekit.rope_index(ids, cu_seqlens=torch.tensor([1, 4]), **common)
    with pytest.raises(ValueError, match="cu_seqlens"):
        ropekit.rope_index(torch.ones(2, 4, dtype=torch.long), mm_token_type_ids=torch.zeros(2, 4, dtype=torch.long),
                           spatial_merge_size=2, cu_seqlens=torch.tensor([0, 2, 6, 8]))  # a sample across rows
    with pytest.raises(ValueError, match="no packed sample"):
        ropekit.rope_index(torch.ones(2, 4, dtype=torch.long), mm_token_type_ids=torch.zeros(2, 4, dtype=torch.long),
                           spatial_merge_size=2, attention_mask=torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]),
                           packed=True)
