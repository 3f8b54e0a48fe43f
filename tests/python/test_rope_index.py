"""`ropekit.rope_index`: bit-exact parity with transformers' own `Qwen3VLModel.get_rope_index` (5.x "token_types",
4.57 "vision_start"; `make test` runs this module under both) on thousands of random, realistic Qwen3-VL layouts,
for the host (`on_host=True`) and the device (`on_host=False`) algorithm, on CPU and CUDA; ValueError on
inconsistent inputs; and, on CUDA, a sync-free `on_host=False` that can be captured in a CUDA graph.

A failing fuzz case prints its seed; `python tests/python/rope_index_cases.py --seed N` prints it in full.
ROPEKIT_RI_CASES=N changes the number of fuzz cases per convention (default 2000)."""

from __future__ import annotations

import os
import re

import pytest
import torch

import ropekit

from conftest import requires_cuda
from rope_index_cases import (
    CONVENTIONS,
    FUZZ_BASE_SEED,
    WILD_KINDS,
    Case,
    Image,
    Text,
    Video,
    build_case,
    compare,
    fail_on,
    outcome_problem,
    installed_convention,
    in_vision_start_device_domain,
    perturb,
    random_case,
    structural_rope_index,
    tiny_qwen3_vl_model,
    transformers_outcome,
    transformers_rope_index,
)

pytestmark = pytest.mark.transformers

N_CASES = int(os.environ.get("ROPEKIT_RI_CASES", "2000"))
INSTALLED = installed_convention()


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def skip_unless_installed(convention: str) -> None:
    if convention != INSTALLED:
        other = "4.57 (make test-tf457)" if convention == "vision_start" else "5.x (make test-python)"
        pytest.skip(
            f"the installed transformers {_transformers_version()} implements the '{INSTALLED}' convention; "
            f"'{convention}' is compared with transformers {other}"
        )


def call_op(case, convention: str, on_host: bool, **overrides):
    kwargs = dict(
        image_grid_thw=case.image_grid_thw,
        video_grid_thw=case.video_grid_thw,
        attention_mask=case.attention_mask,
        mm_token_type_ids=case.mm_token_type_ids if convention == "token_types" else None,
        spatial_merge_size=case.spatial_merge_size,
        image_token_id=case.ids["image"],
        video_token_id=case.ids["video"],
        vision_start_token_id=case.ids["vision_start"],
        convention=convention,
        on_host=on_host,
    )
    kwargs.update(overrides)
    input_ids = kwargs.pop("input_ids", case.input_ids)
    return ropekit.rope_index(input_ids, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def hf_model():
    return tiny_qwen3_vl_model()


@pytest.fixture(scope="module")
def fuzz_cases(hf_model):
    """N_CASES random cases for the installed convention, each with transformers' own answer."""
    cases = [random_case(FUZZ_BASE_SEED + i, INSTALLED) for i in range(N_CASES)]
    return [(case, transformers_rope_index(hf_model, case)) for case in cases]


def run_fuzz(pairs, convention: str, on_host: bool, device: str) -> None:
    failures = []
    for case, expected in pairs:
        case = case.to(device)
        before = {k: v.clone() for k, v in case.tensors().items() if v is not None}
        try:
            got = call_op(case, convention, on_host)
        except Exception as e:  # noqa: BLE001 - every valid case must succeed; report what it raised
            failures.append((case, f"raised {type(e).__name__}: {e}"))
            continue
        problem = compare(got, tuple(t.to(device) for t in expected))
        mutated = [k for k, v in before.items() if not torch.equal(v, case.tensors()[k])]
        if mutated:
            problem = (problem + "\n  " if problem else "") + f"the op modified its input(s) {mutated} in place"
        if problem:
            failures.append((case, problem))
    if failures:
        shown = "\n\n".join(
            f"{case.describe()}\n  {problem}\n  reproduce: python tests/python/rope_index_cases.py --seed {case.seed} "
            f"--convention {convention}"
            for case, problem in failures[:5]
        )
        seeds = [case.seed for case, _ in failures]
        pytest.fail(
            f"{len(failures)}/{len(pairs)} cases differ from transformers {_transformers_version()} get_rope_index "
            f"(convention={convention!r}, on_host={on_host}, device={device}); failing seeds (first 50): "
            f"{seeds[:50]}\n\nfirst {min(5, len(failures))}:\n{shown}",
            pytrace=False,
        )


# ----------------------------------------------------------------------------------------------------------------
# the generator itself


def test_generator_matches_transformers(fuzz_cases):
    """The generated layouts are what they claim to be: positions computed from the layout description alone equal
    transformers' answer from the token ids and grids, for every fuzz case (validates the test's inputs)."""
    assert len(fuzz_cases) == N_CASES
    for case, expected in fuzz_cases:
        problem = compare(structural_rope_index(case, INSTALLED), expected)
        assert problem is None, f"generator/transformers disagree:\n{case.describe()}\n  {problem}"


def test_generator_covers_the_layouts(fuzz_cases):
    cases = [case for case, _ in fuzz_cases]
    if len(cases) < 500:
        pytest.skip("coverage is only asserted for a full-size fuzz run")

    def count(pred):
        return sum(1 for c in cases if pred(c))

    has = {
        "no grids at all": count(lambda c: c.image_grid_thw is None and c.video_grid_thw is None),
        "images only": count(lambda c: c.image_grid_thw is not None and c.video_grid_thw is None),
        "videos only": count(lambda c: c.video_grid_thw is not None and c.image_grid_thw is None),
        "images and videos": count(
            lambda c: c.image_grid_thw is not None and c.video_grid_thw is not None
            and len(c.image_grid_thw) > 0 and len(c.video_grid_thw) > 0
        ),
        "multi-frame video": count(lambda c: c.video_grid_thw is not None and bool((c.video_grid_thw[:, 0] > 1).any())),
        "left padded": count(lambda c: c.attention_mask is not None and c.pad_side == "left" and not c.attention_mask.all()),
        "right padded": count(lambda c: c.attention_mask is not None and c.pad_side == "right" and not c.attention_mask.all()),
        "all-ones mask": count(lambda c: c.attention_mask is not None and bool(c.attention_mask.all())),
        "no mask": count(lambda c: c.attention_mask is None),
        "a row without vision beside one with": count(
            lambda c: len({any(not isinstance(i, Text) for i in r) for r in c.rows}) == 2
        ),
        "a one-token row": count(lambda c: 1 in c.lengths),
        "S >= 200": count(lambda c: c.input_ids.shape[1] >= 200),
        "int32 input_ids": count(lambda c: c.input_ids.dtype == torch.int32),
        "merge size != 2": count(lambda c: c.spatial_merge_size != 2),
        "non-default special ids": count(lambda c: c.ids["image"] != 151655),
        "empty (0, 3) grid tensor": count(
            lambda c: any(g is not None and g.shape[0] == 0 for g in (c.image_grid_thw, c.video_grid_thw))
        ),
        "bool attention_mask": count(lambda c: c.attention_mask is not None and c.attention_mask.dtype == torch.bool),
        "int32 mm_token_type_ids": count(lambda c: c.mm_token_type_ids.dtype == torch.int32),
        "non-contiguous input": count(lambda c: any(not t.is_contiguous() for t in c.tensors().values() if t is not None)),
    }
    missing = [k for k, v in has.items() if v < 5]
    assert not missing, f"the generator rarely produces: {missing} ({has})"


# ----------------------------------------------------------------------------------------------------------------
# fuzz parity with transformers


@pytest.mark.parametrize("on_host", [True, False], ids=["on_host", "on_device"])
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_fuzz_matches_transformers_cpu(fuzz_cases, convention, on_host):
    skip_unless_installed(convention)
    run_fuzz(fuzz_cases, convention, on_host, "cpu")


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("on_host", [True, False], ids=["on_host", "on_device"])
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_fuzz_matches_transformers_cuda(fuzz_cases, hf_model, convention, on_host):
    skip_unless_installed(convention)
    # The expectations are transformers' CPU answers moved to CUDA; check on a few cases that transformers on CUDA
    # inputs gives exactly that (same values, dtype, device).
    for case, expected in fuzz_cases[:20]:
        on_cuda = transformers_rope_index(hf_model, case.to("cuda"))
        assert compare(on_cuda, tuple(t.to("cuda") for t in expected)) is None, case.describe()
    run_fuzz(fuzz_cases, convention, on_host, "cuda")


# ----------------------------------------------------------------------------------------------------------------
# hand-written layouts (both values of on_host; no transformers needed for the layout, transformers for the answer)


HANDWRITTEN = {
    "image_then_video": [[Text(4), Image(4, 6), Text(3), Video(2, 4, 4, [3, 3]), Text(2)]],
    "vision_first_token": [[Image(2, 2), Text(2)], [Video(1, 2, 4, [2]), Text(1)]],
    "vision_last_token": [[Text(3), Image(6, 2)], [Text(1), Video(3, 2, 2, [1, 1, 1])]],
    "back_to_back_images": [[Text(1), Image(2, 2), Image(4, 2), Image(2, 8), Text(1)]],
    "tall_and_wide": [[Text(2), Image(16, 2), Text(2), Image(2, 16), Text(2)]],
    "text_only_rows": [[Text(7)], [Text(1)], [Text(30)]],
    "single_token": [[Text(1)]],
}


@pytest.mark.parametrize("pad_side", ["left", "right"])
@pytest.mark.parametrize("on_host", [True, False], ids=["on_host", "on_device"])
@pytest.mark.parametrize("name", sorted(HANDWRITTEN))
def test_handwritten_layouts(hf_model, name, on_host, pad_side):
    rows = HANDWRITTEN[name]
    for extra_pad in (0, 3):
        mask = "always" if extra_pad == 0 else "auto"
        case = build_case(rows + [[Text(2)]], pad_side=pad_side, extra_pad=extra_pad, mask=mask, seed=1)
        expected = transformers_rope_index(hf_model, case)
        problem = compare(call_op(case, INSTALLED, on_host), expected)
        assert problem is None, f"{name}:\n{case.describe(with_tensors=True)}\n  {problem}"


# ----------------------------------------------------------------------------------------------------------------
# inconsistent inputs


def _base_case(**kwargs):
    # images [[1,4,6],[1,2,2]] (6 and 1 tokens), one video [[2,4,4]] (two frames of 4 tokens), right padded
    rows = [
        [Text(3), Image(4, 6), Text(2), Image(2, 2), Text(1)],
        [Text(2), Video(2, 4, 4, [2, 3]), Text(4)],
    ]
    return build_case(rows, seed=7, **kwargs)


def _grid(rows):
    return torch.tensor(rows, dtype=torch.int64)


def _set(t, index, value):
    t = t.clone()
    t[index] = value
    return t


COUNT = r"(?i)grid|span|image|video"
LENGTH = r"(?i)length|tokens?|span|expected|grid"
DIVISIBLE = r"(?i)divis|merge|multiple"
TOKEN_TYPE = r"(?i)mm_token_type|token.?type|modalit"
DTYPE = r"(?i)dtype|integer|int64|int32|long|float"
SHAPE = r"(?i)shape|dim|rank|size|\(N, ?3\)|2-?D|\(B, ?S\)"

# name -> (conventions it applies to, overrides given to the op, message pattern, also checked with on_host=False)
MALFORMED = {
    # more vision spans than grids
    "image_grid_missing": (CONVENTIONS, lambda c: dict(image_grid_thw=c.image_grid_thw[:1]), COUNT, True),
    "video_grid_missing": (CONVENTIONS, lambda c: dict(video_grid_thw=None), COUNT, True),
    "video_has_fewer_frames_in_grid": (CONVENTIONS, lambda c: dict(video_grid_thw=_grid([[1, 4, 4]])), COUNT, True),
    "no_grids_but_spans": (("token_types",), lambda c: dict(image_grid_thw=None, video_grid_thw=None), COUNT, True),
    # fewer vision spans than grids (grids left over)
    "extra_image_grid": (CONVENTIONS, lambda c: dict(image_grid_thw=_grid([[1, 4, 6], [1, 2, 2], [1, 2, 2]])), COUNT, True),
    "extra_video_grid": (CONVENTIONS, lambda c: dict(video_grid_thw=_grid([[2, 4, 4], [1, 2, 2]])), COUNT, True),
    "video_has_more_frames_in_grid": (CONVENTIONS, lambda c: dict(video_grid_thw=_grid([[3, 4, 4]])), COUNT, True),
    "image_grid_for_text_only_batch": (
        CONVENTIONS,
        lambda c: dict(input_ids=c.input_ids[:, :2], attention_mask=None, mm_token_type_ids=c.mm_token_type_ids[:, :2],
                       image_grid_thw=_grid([[1, 2, 2]]), video_grid_thw=None),
        COUNT,
        True,
    ),
    # a span whose length != t*(h/m)*(w/m)
    "image_span_shorter_than_grid": (CONVENTIONS, lambda c: dict(image_grid_thw=_grid([[1, 4, 8], [1, 2, 2]])), LENGTH, True),
    "image_span_longer_than_grid": (CONVENTIONS, lambda c: dict(image_grid_thw=_grid([[1, 4, 4], [1, 2, 2]])), LENGTH, True),
    "video_frame_length_mismatch": (CONVENTIONS, lambda c: dict(video_grid_thw=_grid([[2, 4, 6]])), LENGTH, True),
    "image_grid_t_not_1": (CONVENTIONS, lambda c: dict(image_grid_thw=_grid([[2, 4, 6], [1, 2, 2]])), LENGTH, True),
    # h or w not divisible by the merge size (floor division would still give the span's length)
    "image_h_not_divisible": (CONVENTIONS, lambda c: dict(image_grid_thw=_grid([[1, 5, 6], [1, 2, 2]])), DIVISIBLE, False),
    "image_w_not_divisible": (CONVENTIONS, lambda c: dict(image_grid_thw=_grid([[1, 4, 7], [1, 2, 2]])), DIVISIBLE, False),
    "video_h_not_divisible": (CONVENTIONS, lambda c: dict(video_grid_thw=_grid([[2, 5, 4]])), DIVISIBLE, False),
    # mm_token_type_ids values outside {0, 1, 2}
    "token_type_3": (("token_types",), lambda c: dict(mm_token_type_ids=_set(c.mm_token_type_ids, (0, 0), 3)), TOKEN_TYPE, False),
    "token_type_negative": (("token_types",), lambda c: dict(mm_token_type_ids=_set(c.mm_token_type_ids, (1, 1), -1)), TOKEN_TYPE, False),
    "token_types_missing": (("token_types",), lambda c: dict(mm_token_type_ids=None), r"(?i)mm_token_type_ids", False),
    # dtypes
    "float_input_ids": (CONVENTIONS, lambda c: dict(input_ids=c.input_ids.float()), DTYPE, False),
    "float_image_grid": (CONVENTIONS, lambda c: dict(image_grid_thw=c.image_grid_thw.float()), DTYPE, False),
    "float_video_grid": (CONVENTIONS, lambda c: dict(video_grid_thw=c.video_grid_thw.float()), DTYPE, False),
    "float_token_types": (("token_types",), lambda c: dict(mm_token_type_ids=c.mm_token_type_ids.float()), DTYPE, False),
    # ranks and shapes
    "input_ids_1d": (
        CONVENTIONS,
        lambda c: dict(input_ids=c.input_ids[0], attention_mask=None, mm_token_type_ids=c.mm_token_type_ids[0]),
        SHAPE,
        False,
    ),
    "input_ids_3d": (
        CONVENTIONS,
        lambda c: dict(input_ids=c.input_ids[None], attention_mask=c.attention_mask[None],
                       mm_token_type_ids=c.mm_token_type_ids[None]),
        SHAPE,
        False,
    ),
    "attention_mask_wrong_shape": (CONVENTIONS, lambda c: dict(attention_mask=c.attention_mask[:, 1:]), SHAPE, False),
    "attention_mask_1d": (CONVENTIONS, lambda c: dict(attention_mask=c.attention_mask[0]), SHAPE, False),
    "token_types_wrong_shape": (("token_types",), lambda c: dict(mm_token_type_ids=c.mm_token_type_ids[:, 1:]), SHAPE, False),
    "image_grid_1d": (CONVENTIONS, lambda c: dict(image_grid_thw=c.image_grid_thw.reshape(-1)), SHAPE, False),
    "image_grid_n_by_2": (CONVENTIONS, lambda c: dict(image_grid_thw=c.image_grid_thw[:, 1:]), SHAPE, False),
    "image_grid_n_by_4": (
        CONVENTIONS,
        lambda c: dict(image_grid_thw=torch.cat([c.image_grid_thw, torch.ones(2, 1, dtype=torch.int64)], 1)),
        SHAPE,
        False,
    ),
    "video_grid_3d": (CONVENTIONS, lambda c: dict(video_grid_thw=c.video_grid_thw[:, :, None]), SHAPE, False),
}


# Arguments the op rejects whatever transformers does with them (the patched get_rope_index hands such inputs to
# transformers' own code instead, see test_patched_get_rope_index_falls_back).
ARGUMENT_ERRORS = {
    "token_types_missing", "float_input_ids", "float_image_grid", "float_video_grid", "float_token_types",
    "input_ids_1d", "input_ids_3d", "attention_mask_wrong_shape", "attention_mask_1d", "token_types_wrong_shape",
    "image_grid_1d", "image_grid_n_by_2", "image_grid_n_by_4", "video_grid_3d",
}


def _malformed_params(installed_only: bool = False, skip_arguments: bool = False):
    for name, (conventions, _, _, _) in sorted(MALFORMED.items()):
        if skip_arguments and name in ARGUMENT_ERRORS:
            continue
        for convention in conventions:
            if installed_only and convention != INSTALLED:
                continue
            yield pytest.param(name, convention, id=f"{name}-{convention}")


def _overridden(case, overrides):
    """The case with the overridden tensors, as transformers would see them."""
    tensors = {k: overrides.get(k, v) for k, v in case.tensors().items()}
    return Case(case.seed, case.rows, case.spatial_merge_size, case.ids, case.pad_side, **tensors)


def test_malformed_base_case_is_valid(hf_model):
    """The unmodified base of the malformed-input tests is consistent: the op accepts it and agrees with transformers."""
    case = _base_case()
    assert case.image_grid_thw.tolist() == [[1, 4, 6], [1, 2, 2]] and case.video_grid_thw.tolist() == [[2, 4, 4]]
    expected = transformers_rope_index(hf_model, case)
    for on_host in (True, False):
        for strict in (False, True):
            assert compare(call_op(case, INSTALLED, on_host, strict=strict), expected) is None


@pytest.mark.parametrize("name,convention", list(_malformed_params(skip_arguments=True)))
def test_strict_rejects_inconsistent_inputs(name, convention):
    """ropekit's own strict checks (strict=True): every inconsistent input raises a ValueError naming the problem,
    on the host; the device algorithm trips its assert."""
    _, overrides, pattern, on_device = MALFORMED[name]
    case = _base_case()
    with pytest.raises(ValueError) as info:
        call_op(case, convention, True, strict=True, **overrides(case))
    assert re.search(pattern, str(info.value)), f"ValueError message does not name the problem: {info.value}"
    with pytest.raises((RuntimeError, ValueError)):
        call_op(case, convention, False, strict=True, **overrides(case))


@pytest.mark.parametrize("name,convention", [p for p in _malformed_params() if p.values[0] in ARGUMENT_ERRORS])
def test_malformed_arguments_raise_value_error(name, convention):
    _, overrides, pattern, _ = MALFORMED[name]
    case = _base_case()
    for on_host in (True, False):
        for strict in (False, True):
            with pytest.raises(ValueError) as info:
                call_op(case, convention, on_host, strict=strict, **overrides(case))
            assert re.search(pattern, str(info.value)), f"ValueError message does not name the problem: {info.value}"


@pytest.mark.parametrize("name,convention", list(_malformed_params(installed_only=True, skip_arguments=True)))
def test_inconsistent_inputs_follow_transformers(hf_model, name, convention):
    """The fidelity rule (strict=False, the patch's mode): where transformers returns positions for an inconsistent
    input (grids left over, h or w not divisible, under 4.57 even spans whose length does not match their grid),
    the op returns the same; where transformers raises (more spans than grids, positions that do not fit), the op
    raises a ValueError instead of reading out of bounds."""
    _, overrides, pattern, _ = MALFORMED[name]
    case = _base_case()
    expected, error = transformers_outcome(hf_model, _overridden(case, overrides(case)))
    if expected is None:
        with pytest.raises(ValueError) as info:
            call_op(case, convention, True, **overrides(case))
        assert re.search(r"(?i)grid|span|token|vision", str(info.value)), info.value
        with pytest.raises((RuntimeError, ValueError)):
            call_op(case, convention, False, **overrides(case))
        return
    problem = compare(call_op(case, convention, True, **overrides(case)), expected)
    assert problem is None, f"{name}: transformers returns positions, the op differs:\n  {problem}"
    try:
        got = call_op(case, convention, False, **overrides(case))
    except RuntimeError:
        # the device algorithm's domain leaves out 4.57 spans that do not match their grid; nothing else
        assert convention == "vision_start" and name in OUT_OF_DEVICE_DOMAIN, f"{name}: the device algorithm raised"
        return
    assert compare(got, expected) is None


# 4.57 turns spans that do not match their grid into (odd) positions with a sequential scan; the device algorithm
# leaves those to the host (its assert fires).
OUT_OF_DEVICE_DOMAIN = {"image_span_shorter_than_grid", "image_span_longer_than_grid", "video_frame_length_mismatch"}


@pytest.mark.parametrize("grid", [[1, 2**62, 2**62], [1, 2**63 - 1, 2**63 - 1], [2**41, 2, 2], [3, 2**22, 2**23],
                                  [2**20, 2**12, 2**12], [0, 2**62, 4], [0, 2**63 - 1, 2**63 - 1]])
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_grids_past_2_40_tokens_raise_value_error(grid, convention):
    """A grid of more than 2^40 tokens, or with an extent above 2^40, has no meaningful result (transformers cannot
    allocate its positions); ropekit says so on every algorithm, with one rule, instead of letting
    t * (h // m) * (w // m) or the text advance overflow into garbage positions."""
    case = _base_case()
    image_grid_thw = _grid([grid, [1, 2, 2]])
    messages = {"host": r"image_grid_thw: grid 0 has more than 2\^40 tokens",
                "kernel": r"row 0: a grid of more than 2\^40 tokens"}
    for algorithm, message in messages.items():
        for strict in (False, True):
            with pytest.raises(ValueError, match=message):
                call_algorithm(case, convention, algorithm, strict=strict, image_grid_thw=image_grid_thw)
    with pytest.raises(RuntimeError, match="no result"):
        call_algorithm(case, convention, "reference", image_grid_thw=image_grid_thw)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_a_grid_of_exactly_2_40_tokens_is_not_too_large(convention):
    case = _base_case()
    image_grid_thw = _grid([[1, 2**21, 2**21], [1, 2, 2]])  # (2^20)^2 tokens at merge size 2: the span is too short
    with pytest.raises(ValueError) as info:
        call_algorithm(case, convention, "host", image_grid_thw=image_grid_thw)
    assert "2^40" not in str(info.value)


@pytest.mark.parametrize("on_host", [True, False], ids=["host", "device"])
def test_temporal_merge_size_divides_video_frames(on_host):
    """ERNIE-4.5-VL's resampler merges temporal_merge_size frames: a (t, h, w) video takes t // temporal_merge_size
    temporal positions (floor: 5 // 2 == 2), exactly the result of the grid (t // merge, h, w) without a merge; the
    caller's grid is not written to; images are not merged. opcheck and the fake kernel take the argument."""
    ids = torch.tensor([[1, 3, 9, 9, 9, 9, 4] + [8] * 8 + [5]])
    types = torch.where(ids == 9, 1, torch.where(ids == 8, 2, 0))
    images = torch.tensor([[1, 4, 4]])
    common = dict(mm_token_type_ids=types, spatial_merge_size=2, image_token_id=9, video_token_id=8,
                  video_frames=False, on_host=on_host)
    for t in (4, 5):
        videos = torch.tensor([[t, 4, 4]])
        merged = ropekit.rope_index(ids, images, videos, temporal_merge_size=2, **common)
        assert videos.tolist() == [[t, 4, 4]]
        expected = ropekit.rope_index(ids, images, torch.tensor([[2, 4, 4]]), **common)
        assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(merged, expected))
    op = torch.ops.ropekit.rope_index.default
    torch.library.opcheck(op, (ids, images, torch.tensor([[4, 4, 4]]), None, types, 2, 9, 8, -1, "token_types",
                               on_host), {"video_frames": False, "temporal_merge_size": 2})
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="temporal_merge_size"):
            ropekit.rope_index(ids, images, torch.tensor([[4, 4, 4]]), temporal_merge_size=bad, **common)
    with pytest.raises(ValueError, match="temporal_merge_size"):
        op(ids, images, torch.tensor([[4, 4, 4]]), None, types, 2, 9, 8, -1, "token_types", on_host,
           temporal_merge_size=0)


@pytest.mark.parametrize("on_host", [True, False], ids=["host", "device"])
def test_xdrope_rows_errors_and_dtypes(on_host):
    """HunYuan-VL's "xdrope": num_axes rows (the leading ones each token's index), an image's grid tokens (column,
    row, ordinal over the batch) on the last three, its first and last span tokens left as text; deltas in
    input_ids' dtype; without image_grid_thw every token is text; grids left over, a span of another length, video
    grids, temporal scaling, and num_axes below 3 (or above 3 in another convention) raise ValueError."""
    h, w = 4, 4  # merge 2: 2 rows of 3 columns (a newline column per row) = 6 grid tokens
    types = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.int32)
    ids = types * 7 + 3
    mask = torch.tensor([[1] * 10, [0, 0] + [1] * 8])
    grids = torch.tensor([[1, h, w], [1, h, w]])
    common = dict(mm_token_type_ids=types, spatial_merge_size=2, convention="xdrope", on_host=on_host)
    pos, deltas = ropekit.rope_index(ids, grids, None, mask, num_axes=4, **common)
    assert pos.shape == (4, 2, 10) and pos.dtype == torch.int32 and deltas.dtype == torch.int32
    assert pos[0, 0].tolist() == list(range(10))  # the leading row: each token's index
    assert pos[1, 0].tolist() == [0, 1, 0, 1, 2, 0, 1, 2, 8, 9]  # width: the columns; first/last span tokens: index
    assert pos[2, 0].tolist() == [0, 1, 0, 0, 0, 1, 1, 1, 8, 9]  # height: the rows
    assert pos[3, 0].tolist() == [0, 1, 0, 0, 0, 0, 0, 0, 8, 9]  # the image's ordinal: the batch's first
    # row 1: a bare span (the grid tokens alone), its image the batch's second: ordinal 1; padding 0 on every row
    assert pos[:, 1, :2].eq(0).all() and pos[0, 1, 2:].tolist() == list(range(8))
    assert pos[1, 1, 3:9].tolist() == [0, 1, 2, 0, 1, 2] and pos[2, 1, 3:9].tolist() == [0, 0, 0, 1, 1, 1]
    assert pos[3, 1, 3:9].tolist() == [1] * 6
    assert deltas.tolist() == [[0], [0]]
    three, _ = ropekit.rope_index(ids, grids, None, mask, num_axes=3, **common)  # no leading row
    assert torch.equal(three, pos[1:])
    text, _ = ropekit.rope_index(ids, None, None, mask, num_axes=4, **common)  # no grids: every token is text
    assert text[:, 0].tolist() == [list(range(10))] * 4
    for bad, match in ((dict(image_grid_thw=torch.tensor([[1, h, w]] * 3)), "image spans"),
                       (dict(image_grid_thw=torch.tensor([[1, h, 8], [1, h, w]])), "span"),
                       (dict(video_grid_thw=grids), "images only"),
                       (dict(tokens_per_second=2), "temporal scaling"),
                       (dict(num_axes=2), "num_axes")):
        args = dict(image_grid_thw=grids, video_grid_thw=None, num_axes=4)
        args.update(bad)
        with pytest.raises(ValueError, match=match):
            ropekit.rope_index(ids, args.pop("image_grid_thw"), args.pop("video_grid_thw"), mask, **args, **common)
    with pytest.raises(ValueError, match="num_axes"):
        ropekit.rope_index(ids, grids, None, mask, mm_token_type_ids=types, spatial_merge_size=2, num_axes=4)
    with pytest.raises(ValueError, match="does not implement convention 'xdrope'"):
        torch.ops.ropekit._rope_index_algorithm(ids, grids, None, mask, types, 2, -1, -1, -1, "xdrope", num_axes=4,
                                                algorithm="reference")


@pytest.mark.parametrize("on_host", [True, False], ids=["host", "device"])
def test_frame_blocks_positions_errors_and_dtypes(on_host):
    """HY-V4-VL's "frame_blocks": transformers' docstring example (a 2-frame video, 2 rows of 3 tokens per frame: each
    frame a block of max(2, 3) = 3 positions), an image after it, left padding; positions in input_ids' dtype, int64
    deltas; videos whole whatever video_frames says; a grid of no tokens, temporal scaling and the ATen reference
    raise ValueError; strict names the frame-block span length (the host loop; the fused algorithm names the rule)."""
    types = torch.tensor([[0] + [2] * 12 + [0] + [1] * 6 + [0], [0] * 14 + [1] * 6 + [0]], dtype=torch.int32)
    ids = types * 5 + 3
    mask = torch.ones_like(types)
    mask[1, :13] = 0  # row 1: left padding, then text, an image, text
    video, images = torch.tensor([[2, 4, 4]]), torch.tensor([[1, 4, 4], [1, 4, 4]])
    common = dict(mm_token_type_ids=types, spatial_merge_size=2, convention="frame_blocks", on_host=on_host)
    pos, deltas = ropekit.rope_index(ids, images, video, mask, **common)
    assert pos.shape == (3, 2, 21) and pos.dtype == torch.int32 and deltas.dtype == torch.int64
    # transformers' example, after one text token: T [0]*6 + [3]*6, H 0,0,0,1,1,1,3,3,3,4,4,4, W 0,1,2,0,1,2,3,4,5,...
    video_t, video_h, video_w = (torch.tensor(v) + 1 for v in ([0] * 6 + [3] * 6, [0, 0, 0, 1, 1, 1, 3, 3, 3, 4, 4, 4],
                                                               [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]))
    assert pos[0, 0, 1:13].tolist() == video_t.tolist() and pos[1, 0, 1:13].tolist() == video_h.tolist()
    assert pos[2, 0, 1:13].tolist() == video_w.tolist()
    assert pos[:, 0, 13].tolist() == [7] * 3  # max(ids) + 1, then the image at 8 (a block of 3)
    assert pos[:, 0, 14:20].tolist() == [[8] * 6, [8, 8, 8, 9, 9, 9], [8, 9, 10, 8, 9, 10]]
    assert pos[:, 0, 20].tolist() == [11] * 3 and deltas[0].item() == 11 + 1 - 21
    assert pos[:, 1, :13].eq(0).all() and pos[:, 1, 13].tolist() == [0] * 3  # padding 0; text from 0
    assert pos[:, 1, 14:20].tolist() == [[1] * 6, [1, 1, 1, 2, 2, 2], [1, 2, 3, 1, 2, 3]]
    assert pos[:, 1, 20].tolist() == [4] * 3 and deltas[1].item() == 4 + 1 - 8
    frames, _ = ropekit.rope_index(ids, images, video, mask, video_frames=False, **common)
    assert torch.equal(frames, pos)  # videos are whole grids either way
    long_pos, long_deltas = ropekit.rope_index(ids.long(), images, video, mask, **common)
    assert long_pos.dtype == torch.int64 and torch.equal(long_pos, pos.long()) and torch.equal(long_deltas, deltas)
    for bad, match in ((dict(video_grid_thw=torch.tensor([[0, 4, 4]])), "no tokens"),
                       (dict(image_grid_thw=torch.tensor([[1, 4, 4]])), "more image spans"),
                       (dict(tokens_per_second=2), "temporal scaling"),
                       (dict(num_axes=4), "num_axes")):
        args = dict(image_grid_thw=images, video_grid_thw=video)
        args.update(bad)
        with pytest.raises(ValueError, match=match):
            ropekit.rope_index(ids, args.pop("image_grid_thw"), args.pop("video_grid_thw"), mask, **args, **common)
    strict_error = re.escape("needs t * (h / m) * (w / m + 1) = 4") if on_host else "a span whose"
    with pytest.raises(ValueError, match=strict_error):
        ropekit.rope_index(ids, torch.tensor([[1, 4, 4], [1, 4, 2]]), video, mask, strict=True, **common)
    with pytest.raises(ValueError, match="does not implement convention 'frame_blocks'"):
        torch.ops.ropekit._rope_index_algorithm(ids, images, video, mask, types, 2, -1, -1, -1, "frame_blocks",
                                                algorithm="reference")
    none_pos, none_deltas = ropekit.rope_index(ids[:0], None, None, None, **dict(common, mm_token_type_ids=types[:0]))
    assert none_pos.shape == (3, 0, 21) and none_deltas.dtype == torch.float32  # torch.tensor([]) of no rows


def test_unknown_convention_raises_value_error():
    case = _base_case()
    with pytest.raises(ValueError, match=r"(?i)convention"):
        call_op(case, "qwen2", True)


# ----------------------------------------------------------------------------------------------------------------
# wild inputs: the fidelity rule on thousands of perturbed batches


N_WILD = int(os.environ.get("ROPEKIT_RI_WILD_CASES", "2000"))


@pytest.fixture(scope="module")
def wild_cases(hf_model):
    """N_WILD perturbed cases (masked-out spans, tril and segment-id masks, leftover or missing grids, span lengths
    off by one, odd grids, a trailing vision_start), each with transformers' outcome (positions, or its error)."""
    out = []
    for i in range(N_WILD):
        case = perturb(random_case(FUZZ_BASE_SEED + 7919 * i, INSTALLED), seed=i, kind=WILD_KINDS[i % len(WILD_KINDS)])
        out.append((case, *transformers_outcome(hf_model, case)))
    return out


def test_wild_cases_cover_both_outcomes(wild_cases):
    returned = sum(1 for _, expected, _ in wild_cases if expected is not None)
    raised = len(wild_cases) - returned
    if len(wild_cases) >= 500:
        assert returned >= len(wild_cases) // 4 and raised >= len(wild_cases) // 20, (returned, raised)


@pytest.mark.parametrize("on_host", [True, False], ids=["on_host", "on_device"])
def test_wild_cases_follow_transformers(wild_cases, on_host):
    """Where transformers returns, the op returns exactly the same, on the host loop and on the device algorithm
    alike (4.57's vision_start scan included: spans that do not match their grids, vision tokens with no
    vision_start before them); where transformers raises, the op raises (ValueError) and never returns something
    else."""
    failures = []
    for case, expected, error in wild_cases:
        try:
            got = call_op(case, INSTALLED, on_host)
        except (ValueError, RuntimeError) as e:
            if expected is not None:
                failures.append((case, f"raised {type(e).__name__} ({e}) where transformers returns positions"))
            continue
        problem = outcome_problem(got, expected, error)
        if problem:
            failures.append((case, problem))
    fail_on(failures, len(wild_cases),
            f"wild cases differ from transformers {_transformers_version()} (on_host={on_host})")


def test_patched_get_rope_index_follows_transformers(wild_cases, hf_model):
    """The patched method itself (what the model calls): on the wild cases it returns what transformers returns,
    and raises ValueError (never something else, never a different result) where transformers raises."""
    ropekit.unpatch()
    ropekit.apply_to_qwen3_vl()
    try:
        for case, expected, error in wild_cases[:400]:
            if expected is None:
                with pytest.raises(ValueError):
                    transformers_rope_index(hf_model, case, patched=True)
                continue
            problem = compare(transformers_rope_index(hf_model, case, patched=True), expected)
            assert problem is None, f"{case.describe()}\n  {problem}"
    finally:
        ropekit.unpatch()


@pytest.mark.parametrize("name", ["float_token_types", "image_grid_n_by_4"])
def test_patched_get_rope_index_falls_back(hf_model, name, count_rope_index):
    """Arguments the op does not take (float token types, (N, 4) grids that transformers indexes by column) go to
    transformers' own code: the same result, where the op alone would raise."""
    if name == "float_token_types" and INSTALLED == "vision_start":
        pytest.skip("transformers 4.57's get_rope_index takes no mm_token_type_ids")
    case = _overridden(_base_case(), MALFORMED[name][1](_base_case()))
    expected, error = transformers_outcome(hf_model, case)
    if expected is None:
        pytest.skip(f"transformers {_transformers_version()} rejects it too: {error}")
    ropekit.unpatch()
    ropekit.apply_to_qwen3_vl()
    try:
        assert compare(transformers_rope_index(hf_model, case, patched=True), expected) is None
    finally:
        ropekit.unpatch()
    assert not count_rope_index


# ----------------------------------------------------------------------------------------------------------------
# the examples that showed the bug (ValueError from the patched get_rope_index where transformers returns)


def assert_follows_transformers(hf_model, case):
    """The installed transformers' outcome, mirrored by both algorithms: the same positions, or a ValueError (host)
    and the device assert where transformers raises. Returns transformers' result (None when it raised)."""
    expected, error = transformers_outcome(hf_model, case)
    for on_host in (True, False):
        if expected is None:
            with pytest.raises((ValueError, RuntimeError) if not on_host else ValueError):
                call_op(case, INSTALLED, on_host)
        else:
            problem = compare(call_op(case, INSTALLED, on_host), expected)
            assert problem is None, f"on_host={on_host}: {problem}"
    return expected


def test_tril_mask_with_a_grid_per_row(hf_model):
    """A causal-LM style attention_mask = tril(ones): row 0 attends only to token 0 while every row has its own
    image grid. transformers 5.x consumes grids in order over the attended spans and ignores the rest (4.57 fails
    on row 1, whose last attended token is a vision_start)."""
    rows = [[Text(1), Image(4, 4), Text(2)], [Text(1), Image(2, 4), Text(1)], [Text(2), Image(4, 2), Text(1)]]
    case = build_case(rows, mask="always", seed=3)
    B, S = case.input_ids.shape
    case = _overridden(case, dict(attention_mask=torch.tril(torch.ones(B, S, dtype=torch.int64))))
    expected = assert_follows_transformers(hf_model, case)
    assert (expected is not None) == (INSTALLED == "token_types")
    with pytest.raises(ValueError):
        call_op(case, INSTALLED, True, strict=True)


def test_segment_id_mask_hides_an_image_under_4_57(hf_model):
    """4.57 with a packed mask of segment ids [1]*7 + [2]*9 + [0], an image in segment 2: transformers treats
    mask != 1 as padding (the image and its grid are skipped) and returns positions."""
    rows = [[Text(7), Text(1), Image(4, 4), Text(2)]]  # 16 tokens, then one of padding
    case = build_case(rows, mask="always", length=17, seed=4)
    mask = torch.tensor([[1] * 7 + [2] * 9 + [0]])
    case = _overridden(case, dict(attention_mask=mask))
    expected, error = (transformers_outcome(hf_model, case) if INSTALLED == "vision_start"
                       else (call_op(case, "vision_start", True), None))
    assert error is None, error
    for on_host in (True, False):
        got = call_op(case, "vision_start", on_host)
        assert compare(got, expected) is None
    assert got[0][:, 0, 7:].eq(1).all(), "mask != 1 is padding under 4.57"


def test_leftover_grids_and_video_frames(hf_model):
    rows = [[Text(2), Video(2, 4, 4, [1, 1]), Text(1), Image(2, 2), Text(1)]]
    case = build_case(rows, seed=5)
    case = _overridden(case, dict(video_grid_thw=torch.tensor([[3, 4, 4], [2, 2, 2]]),  # a 3rd frame, a 2nd video
                                  image_grid_thw=torch.tensor([[1, 2, 2], [1, 4, 4]])))  # a 2nd image
    assert assert_follows_transformers(hf_model, case) is not None
    with pytest.raises(ValueError, match="grids but the input has only|video frames but the input has only"):
        call_op(case, INSTALLED, True, strict=True)


def test_masked_out_spans(hf_model):
    """Vision spans inside masked-out tokens (left padding made of an earlier, truncated conversation): the grids
    are consumed by the attended spans only, in order, and the leftovers ignored."""
    rows = [[Text(1), Image(2, 4), Text(2), Image(4, 4), Text(3)], [Text(2), Video(2, 2, 4, [1, 1]), Text(2)]]
    case = build_case(rows, mask="always", seed=6)
    mask = case.attention_mask.clone()
    mask[0, 7:13] = 0  # hides the second image (start, 4 image tokens, end): its grid is left over
    mask[1, 3:7] = 0  # hides the first video frame (start, 2 tokens, end): the second takes the first frame's grid
    case = _overridden(case, dict(attention_mask=mask))
    assert assert_follows_transformers(hf_model, case) is not None


# ----------------------------------------------------------------------------------------------------------------
# CUDA: sync-free device algorithm, CUDA graphs


def _expected(hf_model, case, convention):
    """transformers' answer where the installed version implements `convention`, else the op's host algorithm on
    CPU (whose parity with transformers the other transformers version checks)."""
    cpu = case.to("cpu")
    if convention == INSTALLED:
        return transformers_rope_index(hf_model, cpu)
    return call_op(cpu, convention, True)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_on_device_is_sync_free_on_cuda(hf_model, convention):
    cases = [random_case(FUZZ_BASE_SEED + i, convention).to("cuda") for i in range(200)]
    expected = [_expected(hf_model, c, convention) for c in cases]
    for case in cases[:3]:  # warm up (lazy CUDA init, allocator) outside the checked region
        call_op(case, convention, False)
    torch.cuda.synchronize()
    outputs = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for case in cases:
            outputs.append(call_op(case, convention, False))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    for case, got, exp in zip(cases, outputs, expected):
        problem = compare(got, tuple(t.to("cuda") for t in exp))
        assert problem is None, f"{case.describe()}\n  {problem}"


# Pairs of layouts with identical tensor shapes (B, S, grid rows, video frame counts), so that the second can be
# copied into the static inputs of a graph captured on the first.
GRAPH_PAIRS = {
    "mixed_left_padded": (
        dict(rows=[[Text(5), Image(4, 6), Text(3), Video(2, 4, 4, [2, 2]), Text(1)], [Text(2), Image(8, 8), Text(10)]],
             pad_side="left", length=40),
        dict(rows=[[Text(1), Video(2, 6, 2, [1, 4]), Text(7), Image(2, 2)], [Image(4, 4), Text(20)]],
             pad_side="left", length=40),
    ),
    "mixed_right_padded": (
        dict(rows=[[Text(3), Image(2, 4), Text(2)], [Text(2), Video(3, 2, 2, [1, 1, 1]), Image(6, 6), Text(4)]],
             pad_side="right", length=40),
        dict(rows=[[Image(4, 4), Text(9)], [Video(3, 4, 2, [2, 2, 2]), Text(1), Image(2, 2), Text(12)]],
             pad_side="right", length=40),
    ),
    "text_only": (
        dict(rows=[[Text(9)], [Text(4)]], pad_side="left", length=12),
        dict(rows=[[Text(2)], [Text(9)]], pad_side="left", length=12),
    ),
}


def _graph_pair(name):
    a, b = (build_case(**spec, seed=i) for i, spec in enumerate(GRAPH_PAIRS[name]))
    for k, ta in a.tensors().items():
        tb = b.tensors()[k]
        assert (ta is None) == (tb is None) and (ta is None or ta.shape == tb.shape), f"{name}: {k} shapes differ"
    assert a.video_grid_thw is None or torch.equal(a.video_grid_thw[:, 0], b.video_grid_thw[:, 0])
    return a, b


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(GRAPH_PAIRS))
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_on_device_captures_in_cuda_graph(hf_model, convention, name):
    first, second = _graph_pair(name)
    expected_first = tuple(t.to("cuda") for t in _expected(hf_model, first, convention))
    expected_second = tuple(t.to("cuda") for t in _expected(hf_model, second, convention))
    static = first.to("cuda")

    def run():
        return call_op(static, convention, False)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            eager = run()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert compare(eager, expected_first) is None

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    graph.replay()
    torch.cuda.synchronize()
    problem = compare(tuple(out), expected_first)
    assert problem is None, f"graph replay differs:\n{first.describe()}\n  {problem}"

    # new data, same shapes: the replay follows the inputs
    for k, t in static.tensors().items():
        if t is not None:
            t.copy_(second.tensors()[k])
    graph.replay()
    torch.cuda.synchronize()
    problem = compare(tuple(out), expected_second)
    assert problem is None, f"graph replay on new inputs differs:\n{second.describe()}\n  {problem}"


def call_algorithm(case, convention: str, algorithm: str, **overrides):
    """One of the op's algorithms by name, on the case's device: "host" (the host loop), "reference" (the ATen
    device algorithm) or "kernel" (the fused device algorithm: the CUDA kernel, or on the CPU the same row code run
    serially)."""
    kwargs = dict(
        image_grid_thw=case.image_grid_thw, video_grid_thw=case.video_grid_thw, attention_mask=case.attention_mask,
        mm_token_type_ids=case.mm_token_type_ids if convention == "token_types" else None,
    )
    kwargs.update(overrides)
    return torch.ops.ropekit._rope_index_algorithm(
        case.input_ids, kwargs.pop("image_grid_thw"), kwargs.pop("video_grid_thw"), kwargs.pop("attention_mask"),
        kwargs.pop("mm_token_type_ids"), case.spatial_merge_size, case.ids["image"], case.ids["video"],
        case.ids["vision_start"], convention, algorithm=algorithm, **kwargs,
    )


def call_reference(case, convention: str, **overrides):
    return call_algorithm(case, convention, "reference", **overrides)


@pytest.mark.parametrize("which", ["fuzz", "wild"])
def test_fused_kernel_row_code_matches_transformers_cpu(fuzz_cases, wild_cases, which):
    """The fused kernel's row code (rope_index_kernel.h), run serially on the CPU, against transformers: the same
    positions wherever transformers returns (clean fuzz cases and wild ones), and an error where it raises. The GPU
    runs the same code with block scans (test_fused_kernel_matches_reference_and_transformers_cuda)."""
    cases = [(c, e, None) for c, e in fuzz_cases] if which == "fuzz" else wild_cases
    failures = []
    for case, expected, error in cases:
        try:
            got = call_algorithm(case, INSTALLED, "kernel")
        except (ValueError, RuntimeError) as e:
            if expected is not None:
                failures.append((case, f"raised {type(e).__name__} ({e}) where transformers returns positions"))
            continue
        problem = outcome_problem(got, expected, error)
        if problem:
            failures.append((case, problem))
    fail_on(failures, len(cases), "cases differ (fused kernel row code, CPU)")


def test_fused_kernel_row_code_strict_cpu():
    for name, (conventions, overrides, pattern, _) in sorted(MALFORMED.items()):
        if name in ARGUMENT_ERRORS:
            continue
        case = _base_case()
        for convention in conventions:
            with pytest.raises((ValueError, RuntimeError)):
                call_algorithm(case, convention, "kernel", strict=True, **overrides(case))
            assert compare(call_algorithm(case, convention, "kernel", strict=True),
                           call_op(case, convention, True)) is None


@requires_cuda
@pytest.mark.cuda
def test_fused_kernel_matches_reference_and_transformers_cuda(fuzz_cases, wild_cases):
    """On the GPU, the fused kernel (on_host=False) equals transformers on the clean fuzz cases and on every wild
    case transformers returns positions for, and equals the ATen reference wherever that one has a result. (Cases
    transformers fails on are not run here: their device-side assert would end the process's CUDA context; see
    test_device_assert_fires_cuda.)"""
    failures = []
    compared_with_reference = 0
    cases = [(c, e) for c, e in fuzz_cases] + [(c, e) for c, e, _ in wild_cases if e is not None]
    for case, expected in cases:
        cuda_case = case.to("cuda")
        expected = tuple(t.to("cuda") for t in expected)
        problem = compare(call_op(cuda_case, INSTALLED, False), expected)  # on_host=False: the fused kernel
        if problem:
            failures.append((case, problem))
            continue
        if INSTALLED == "token_types" or in_vision_start_device_domain(case):
            compared_with_reference += 1
            problem = compare(call_reference(cuda_case, INSTALLED), expected)
            if problem:
                failures.append((case, "the ATen reference on CUDA: " + problem))
    fail_on(failures, len(cases), "cases differ on CUDA")
    assert compared_with_reference >= len(fuzz_cases)


@requires_cuda
@pytest.mark.cuda
def test_device_assert_fires_cuda(tmp_path):
    """More image spans than grids on the device path: a device-side assert (in a child process, since it ends the
    CUDA context), never positions read out of bounds."""
    import subprocess
    import sys

    script = tmp_path / "assert.py"
    script.write_text(
        "import torch, ropekit\n"
        "ids = torch.tensor([[1, 7, 9, 9, 9, 9, 6]], device='cuda')\n"
        "types = (ids == 9).long()\n"
        "pos, deltas = ropekit.rope_index(ids, image_grid_thw=torch.zeros(0, 3, dtype=torch.long, device='cuda'),\n"
        "    mm_token_type_ids=types, spatial_merge_size=2, convention='token_types', on_host=False)\n"
        "torch.cuda.synchronize()\n"
        "print('no assert')\n"
    )
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "no assert" not in run.stdout, run.stdout + run.stderr
    assert "assert" in (run.stdout + run.stderr).lower(), run.stderr
