"""bf16 at model level: how far a patched bf16 model may be from an unpatched one, and the criterion behind it.

In bf16 the patched and unpatched models round differently (the fused q/k norm + RoPE computes in fp32 and rounds
once, transformers rounds after each step), so they cannot agree bit for bit and a fixed tolerance between the two
says little by itself. The criterion: against an fp32 reference (the same weights, unpatched, fp32), the patched bf16
model's error must be no worse than the unpatched bf16 model's error, up to a small factor,

    err(patched bf16) <= BF16_ERROR_FACTOR * err(unpatched bf16) + eps,

for the logits, the loss and the parameter gradients of a training step, with err the max abs error and the relative
Frobenius error; eps is the noise floor of bf16 itself (below). On top of that, the direct differences
|patched bf16 - unpatched bf16| are bounded by the absolute tolerances below, chosen from measurement with headroom.

Tiny models (random weights, random inputs, fixed seeds), as in test_models.py: Qwen3, Qwen3-VL (images + video),
Qwen3.5 and Qwen4-Exp (text models), Qwen2-VL and Qwen2.5-VL (images + videos), GLM-4V, GLM-4V-MoE and GLM-4.6V
(videos). Models with data-dependent top-k choices (MoE routing, Qwen4-Exp's indexer) run with those choices made
trivial (family_models.without_discrete_choices): a near-tie flipped by any change of rounding moves a token's output
by a whole expert's difference, which no rounding criterion describes and which ropekit does not touch. With
``ROPEKIT_BF16_TABLE=<file>`` the measured errors are appended to that file as a markdown table.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import ropekit

import family_models
import test_families
from conftest import (build, has_qwen3_5, multimodal_batch, tiny_qwen3_5_text_config, tiny_qwen3_config,
                      tiny_qwen3_vl_config)

pytestmark = pytest.mark.transformers

# ---- The documented bf16 tolerance (README quotes these numbers) -------------------------------------------------
# Criterion, vs an fp32 unpatched reference with the same weights: err(patched bf16) <= FACTOR * err(unpatched bf16)
# + eps, for logits, loss and gradients, as max abs error and as relative Frobenius error.
BF16_ERROR_FACTOR = 1.25
# bf16's unit roundoff u (8 significand bits) sets eps, the noise floor: for a max abs error u * max|reference|
# (between half and one bf16 step at the reference's largest values); for a relative Frobenius error u / 2 (below the
# ~u/sqrt(3) that merely storing the reference in bf16 costs); for the loss (computed in fp32 from bf16 logits, and
# moved at most 2 * max|logit change| by a logit change) the logits' max abs eps.
BF16_UNIT_ROUNDOFF = 2.0**-8
# Absolute bounds on |patched bf16 - unpatched bf16| (same weights, same inputs), max abs over all elements. Measured
# maxima over 12 seeds each of Qwen3, Qwen3-VL (images + video) and Qwen3.5, transformers 4.57.6 and 5.18.0: logits
# 0.0078 (two bf16 steps: these tiny models' logits are below 1 in magnitude), loss 4.1e-4, gradients
# 0.0039; the bounds keep ~2.5x headroom. They are absolute, so they hold for logits of this O(1) size; larger logits
# have proportionally larger bf16 steps.
BF16_LOGITS_ATOL = 0.02
BF16_LOSS_ATOL = 1e-3
BF16_GRAD_ATOL = 0.01
# -----------------------------------------------------------------------------------------------------------------

SEEDS = [0, 1, 2]
ROWS: list[tuple] = []


@pytest.fixture(scope="module", autouse=True)
def bf16_table():
    yield
    path = os.environ.get("ROPEKIT_BF16_TABLE")
    if not path or not ROWS:
        return
    import transformers

    lines = [
        f"\ntorch {torch.__version__}, transformers {transformers.__version__}: errors vs the fp32 reference, "
        "unpatched bf16 / patched bf16 (max abs, relative Frobenius); |patched - unpatched| max abs\n",
        "| model | seed | logits max | logits rel | loss | grads max | grads rel | q/k norm grads rel "
        "| logits p-e | loss p-e | grads p-e |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in ROWS]
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")


def errors(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max abs error, relative Frobenius error) of x against the fp32 reference."""
    diff = x.float() - ref
    return diff.abs().max().item(), (diff.norm() / ref.norm()).item()


def assert_no_worse(what: str, patched: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor) -> None:
    (p_max, p_rel), (e_max, e_rel) = errors(patched, ref), errors(eager, ref)
    eps_max = BF16_UNIT_ROUNDOFF * ref.abs().max().item()
    eps_rel = BF16_UNIT_ROUNDOFF / 2
    assert e_rel > 0, f"{what}: the unpatched bf16 model equals the fp32 reference; nothing was measured"
    assert p_max <= BF16_ERROR_FACTOR * e_max + eps_max, f"{what} max abs error: patched {p_max:.3g}, eager {e_max:.3g}"
    assert p_rel <= BF16_ERROR_FACTOR * e_rel + eps_rel, f"{what} rel error: patched {p_rel:.3g}, eager {e_rel:.3g}"


def flat(grads: dict, names) -> torch.Tensor:
    return torch.cat([grads[name].float().flatten() for name in names])


def forward_and_step(model, inputs, labels):
    """Logits of an eval forward, then the loss and every parameter's gradient of a training-mode forward."""
    with torch.no_grad():
        logits = model.eval()(**inputs).logits
    model.train().zero_grad(set_to_none=True)
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    model.eval()
    return logits, loss.detach().float(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def tiny_qwen3_vl_config_small_vocab():
    """tiny_qwen3_vl_config with a 256-token vocabulary (special tokens renumbered below it): the real ids need a
    ~152k-row lm_head whose bf16 matmuls would dominate this file's time on CPU."""
    config = tiny_qwen3_vl_config()
    config.text_config.vocab_size = 256
    config.image_token_id, config.video_token_id = 250, 251
    config.vision_start_token_id, config.vision_end_token_id = 252, 253
    return config


def text_inputs(seed):
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(100 + seed))
    return dict(input_ids=ids)


def family_case(name):
    from transformers import Qwen3ForCausalLM, Qwen3VLForConditionalGeneration

    if name in family_models.FAMILIES:  # Qwen2-VL, Qwen2.5-VL, Qwen4-Exp, the GLM-4V family, the 5.x model types
        import transformers

        family = family_models.FAMILIES[name]
        if family.id == "qwen4_exp":  # the text model, as for Qwen3.5 (see the README's bf16 section)
            from transformers import Qwen4ExpForCausalLM

            config = family_models.qwen4_exp_text_config(**family_models.DENSE_QWEN4_EXP)
            return Qwen4ExpForCausalLM, config, text_inputs, family.apply
        config = family_models.without_discrete_choices(family)  # MoE routing: see there
        # GLM-4V: videos (frames of image tokens) with a left-padded row; the others: images and videos
        rows = test_families.VIDEO_ROWS if family.layout == "glm" else None
        inputs = lambda seed: family_models.multimodal_inputs(family, config, 100 + seed, rows=rows)  # noqa: E731
        return getattr(transformers, family.cls), config, inputs, family.apply

    if name == "qwen3":
        return Qwen3ForCausalLM, tiny_qwen3_config(), text_inputs, ropekit.apply_to_qwen3
    if name == "qwen3_vl":
        config = tiny_qwen3_vl_config_small_vocab()
        inputs = lambda seed: multimodal_batch(config, torch.Generator().manual_seed(100 + seed))  # noqa: E731
        return Qwen3VLForConditionalGeneration, config, inputs, ropekit.apply_to_qwen3_vl
    from transformers import Qwen3_5ForCausalLM

    return Qwen3_5ForCausalLM, tiny_qwen3_5_text_config(), text_inputs, ropekit.apply_to_qwen3_5


FAMILIES = [
    "qwen3",
    "qwen3_vl",
    pytest.param("qwen3_5", marks=pytest.mark.skipif(
        not has_qwen3_5(), reason="Qwen3.5 exists from transformers 5.x (4.57 has no qwen3_5 module)")),
    *[pytest.param(param.values[0].id, marks=param.marks, id=param.id) for param in family_models.family_params()],
]
MULTIMODAL = {"qwen3_vl", *family_models.FAMILIES} - {"qwen4_exp"}  # Qwen4-Exp: its text model, as Qwen3.5
WITHOUT_QK_NORMS = {name for name, family in family_models.FAMILIES.items() if not family.fused}
WITHOUT_ROTATION = {name for name, family in family_models.FAMILIES.items() if not family.rotation}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_patched_no_worse_than_eager(unpatch_after, count_fused, count_apply_rope, count_rope_index, family,
                                          seed):
    cls, config, make_inputs, apply = family_case(family)
    model = build(cls, config, "cpu", seed=seed)
    inputs = make_inputs(seed)
    labels = inputs["input_ids"].clone()
    if "attention_mask" in inputs:
        labels[inputs["attention_mask"] == 0] = -100

    ref_logits, ref_loss, ref_grads = forward_and_step(model, inputs, labels)  # fp32, unpatched
    ref_logits, ref_grads = ref_logits.float(), {n: g.float() for n, g in ref_grads.items()}
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    del model
    eager_logits, eager_loss, eager_grads = forward_and_step(bf16, inputs, labels)
    assert not count_fused and not count_apply_rope
    apply()
    logits, loss, grads = forward_and_step(bf16, inputs, labels)
    if family in WITHOUT_ROTATION:  # HY-V4-VL: the rotary is served from the table, the MLA rotation is its own
        assert not count_apply_rope and not count_fused
    elif family in WITHOUT_QK_NORMS:  # nothing to fuse: the rotation itself is the op
        assert count_apply_rope and not count_fused, "ropekit.apply_rope ran in bf16"
    else:
        assert count_fused, "the fused q/k norm + RoPE ran in bf16"
    assert bool(count_rope_index) == (family in MULTIMODAL), "the multimodal model's get_rope_index went to ropekit"
    assert logits.dtype == eager_logits.dtype == torch.bfloat16
    assert set(grads) == set(eager_grads) == set(ref_grads)

    # The criterion: no worse than unpatched bf16, against fp32.
    assert_no_worse("logits", logits, eager_logits, ref_logits)
    names = sorted(ref_grads)
    assert_no_worse("gradients", flat(grads, names), flat(eager_grads, names), flat(ref_grads, names))
    # the text attention's q/k norms, computed by the fused op's backward (GLM-OCR's tower has its own, unfused)
    norms = [n for n in names if ("q_norm" in n or "k_norm" in n) and ".visual." not in n]
    assert bool(norms) == (family not in WITHOUT_QK_NORMS)
    if norms:
        assert_no_worse("q/k norm weight gradients", flat(grads, norms), flat(eager_grads, norms),
                        flat(ref_grads, norms))
    loss_eps = BF16_UNIT_ROUNDOFF * ref_logits.abs().max().item()
    loss_err, eager_loss_err = (loss - ref_loss).abs().item(), (eager_loss - ref_loss).abs().item()
    assert loss_err <= BF16_ERROR_FACTOR * eager_loss_err + loss_eps, (loss_err, eager_loss_err)

    # The documented absolute tolerance between patched and unpatched bf16.
    logits_diff = (logits.float() - eager_logits.float()).abs().max().item()
    loss_diff = (loss - eager_loss).abs().item()
    grads_diff = (flat(grads, names) - flat(eager_grads, names)).abs().max().item()
    assert logits_diff <= BF16_LOGITS_ATOL
    assert loss_diff <= BF16_LOSS_ATOL
    assert grads_diff <= BF16_GRAD_ATOL

    e, p = errors(eager_logits, ref_logits), errors(logits, ref_logits)
    ref_flat, ref_norms = flat(ref_grads, names), (flat(ref_grads, norms) if norms else None)
    ge, gp = errors(flat(eager_grads, names), ref_flat), errors(flat(grads, names), ref_flat)
    ne, np_ = ((errors(flat(eager_grads, norms), ref_norms), errors(flat(grads, norms), ref_norms)) if norms
               else ((float("nan"),) * 2,) * 2)
    pair = lambda a, b: f"{a:.3g} / {b:.3g}"  # noqa: E731
    ROWS.append((family, str(seed), pair(e[0], p[0]), pair(e[1], p[1]), pair(eager_loss_err, loss_err),
                 pair(ge[0], gp[0]), pair(ge[1], gp[1]), pair(ne[1], np_[1]), f"{logits_diff:.3g}", f"{loss_diff:.3g}",
                 f"{grads_diff:.3g}"))
