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
    Image,
    Text,
    Video,
    build_case,
    compare,
    installed_convention,
    random_case,
    structural_rope_index,
    tiny_qwen3_vl_model,
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


def _malformed_params(on_device_only: bool = False):
    for name, (conventions, _, _, on_device) in sorted(MALFORMED.items()):
        if on_device_only and not on_device:
            continue
        for convention in conventions:
            yield pytest.param(name, convention, id=f"{name}-{convention}")


def test_malformed_base_case_is_valid(hf_model):
    """The unmodified base of the malformed-input tests is consistent: the op accepts it and agrees with transformers."""
    case = _base_case()
    assert case.image_grid_thw.tolist() == [[1, 4, 6], [1, 2, 2]] and case.video_grid_thw.tolist() == [[2, 4, 4]]
    expected = transformers_rope_index(hf_model, case)
    for on_host in (True, False):
        assert compare(call_op(case, INSTALLED, on_host), expected) is None


@pytest.mark.parametrize("name,convention", list(_malformed_params()))
def test_malformed_raises_value_error(name, convention):
    _, overrides, pattern, _ = MALFORMED[name]
    case = _base_case()
    with pytest.raises(ValueError) as info:
        call_op(case, convention, True, **overrides(case))
    assert re.search(pattern, str(info.value)), f"ValueError message does not name the problem: {info.value}"


@pytest.mark.parametrize("name,convention", list(_malformed_params(on_device_only=True)))
def test_malformed_raises_on_device_algorithm(name, convention):
    _, overrides, _, _ = MALFORMED[name]
    case = _base_case()
    with pytest.raises((RuntimeError, ValueError)):
        call_op(case, convention, False, **overrides(case))


def test_unknown_convention_raises_value_error():
    case = _base_case()
    with pytest.raises(ValueError, match=r"(?i)convention"):
        call_op(case, "qwen2", True)


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
