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
    build_family_case,
    random_family_case,
    rope_index_model,
    ropekit_kwargs,
    tiny_config,
    transformers_outcome,
)
from rope_index_cases import WILD_KINDS, Image, Text, Video, compare, in_vision_start_device_domain, perturb

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
    kinds = [k for k in WILD_KINDS if not (family.glm and k == "vision_start_end")]
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
    assert videos > N_CASES // 4 and images > N_CASES // 4, (videos, images)


@pytest.mark.parametrize("algorithm", ["op", "kernel", "reference"])
def test_family_fuzz_matches_transformers(family_cases, algorithm):
    """The same positions and deltas as the family's transformers get_rope_index wherever it returns, and an error
    where it raises. The ATen reference may decline 4.57 spans that do not match their grids (its domain)."""
    family, cases = family_cases
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
        if expected is None:
            failures.append((fc, f"returned positions where transformers raises {error}"))
            continue
        problem = compare(got, expected)
        if problem:
            failures.append((fc, problem))
    if failures:
        shown = "\n\n".join(f"{fc.describe(with_tensors=True)}\n  {problem}" for fc, problem in failures[:3])
        pytest.fail(f"{len(failures)}/{len(cases)} {family.name} cases differ ({algorithm}):\n{shown}", pytrace=False)
    assert declined <= len(cases) // 4


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
