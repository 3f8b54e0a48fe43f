"""ropekit.data: mRoPE position ids computed on the CPU in the data pipeline (DataLoader workers included), equal to
the model's own get_rope_index, for every family and both transformers lines; packed batches; and a model fed those
position ids computes nothing more (get_rope_index is not called) and gives the same logits."""

from __future__ import annotations

import pytest
import torch

import ropekit
from ropekit.data import MRopeCollator, mrope_position_ids

from conftest import build, multimodal_batch, tiny_qwen3_vl_config
from family_cases import FAMILIES, random_family_case, rope_index_model, tiny_config, transformers_outcome
from rope_index_cases import compare

pytestmark = pytest.mark.transformers

AVAILABLE = [name for name, family in FAMILIES.items() if family.available()]


def as_batch(fc) -> dict:
    case = fc.case
    batch = {k: v for k, v in case.tensors().items() if v is not None}
    if fc.second_per_grid_ts is not None:
        batch["second_per_grid_ts"] = fc.second_per_grid_ts
    return batch


def family_config(family, fc):
    config = tiny_config(family)
    config.vision_config.spatial_merge_size = fc.case.spatial_merge_size
    if family.time_scaled:
        config.vision_config.tokens_per_second = fc.tokens_per_second
    return config


@pytest.mark.parametrize("name", AVAILABLE)
def test_collator_equals_the_models_get_rope_index(name):
    family = FAMILIES[name]
    for seed in range(40):
        fc = random_family_case(family, tiny_config(family), seed=seed)
        config = family_config(family, fc)
        expected, error = transformers_outcome(fc, rope_index_model(family, config))
        assert error is None, error
        batch = MRopeCollator(config, collate_fn=lambda features: dict(features[0]), rope_deltas_key="rope_deltas")(
            [as_batch(fc)])
        assert compare((batch["position_ids"], batch["rope_deltas"]), expected) is None, fc.describe()


def test_text_positions_and_packed_rows():
    family = FAMILIES["qwen3_vl"]
    fc = random_family_case(family, tiny_config(family), seed=5)
    config = family_config(family, fc)
    batch = as_batch(fc)
    pos3, _ = mrope_position_ids(batch, config)
    pos4, _ = mrope_position_ids(batch, config, text_positions=True)
    assert pos4.shape[0] == 4 and torch.equal(pos4[1:], pos3)
    mask = batch.get("attention_mask")
    attended = torch.ones_like(batch["input_ids"], dtype=torch.bool) if mask is None else mask != 0
    assert torch.equal(pos4[0][attended], torch.cat([torch.arange(int(n)) for n in attended.sum(1)]))
    # packed: two samples in one row restart their text positions
    ids = torch.tensor([[11, 12, 13, 21, 22, 0]])
    seg = torch.tensor([[1, 1, 1, 2, 2, 0]])
    packed = dict(input_ids=ids, attention_mask=seg, mm_token_type_ids=torch.zeros_like(ids))
    pos, deltas = mrope_position_ids(packed, config, packed=True, text_positions=True)
    assert pos[:, 0, :5].tolist() == [[0, 1, 2, 0, 1]] * 4 and deltas.tolist() == [[0]]
    assert pos[0, 0, 5] == 0  # text positions pad with 0; the mRoPE rows with the line's padding value (5.x 0, 4.57 1)
    pos, _ = mrope_position_ids(dict(input_ids=ids, mm_token_type_ids=torch.zeros_like(ids)), config,
                                cu_seqlens=torch.tensor([0, 3, 5]), text_positions=True)
    assert pos[0, 0].tolist() == [0, 1, 2, 0, 1, 0]


def test_unsupported_model_type_is_refused():
    from transformers import Qwen3Config

    with pytest.raises(ValueError, match="model_type 'qwen3'"):
        MRopeCollator(Qwen3Config())


class _Batches(torch.utils.data.Dataset):
    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


def _first(features):
    return dict(features[0])


def test_collator_runs_in_dataloader_workers():
    family = FAMILIES["qwen3_vl"]
    config = tiny_config(family)
    cases = [random_family_case(family, config, seed=100 + i) for i in range(6)]
    cases = [fc for fc in cases if fc.case.spatial_merge_size == 2]
    collate = MRopeCollator(config, collate_fn=_first)
    loader = torch.utils.data.DataLoader(_Batches([as_batch(fc) for fc in cases]), batch_size=1, collate_fn=collate,
                                         num_workers=2, multiprocessing_context="spawn")
    got = [batch["position_ids"] for batch in loader]
    assert len(got) == len(cases)
    for fc, pos in zip(cases, got):
        expected, _ = mrope_position_ids(as_batch(fc), config)
        assert torch.equal(pos, expected)


def test_model_fed_position_ids_skips_get_rope_index(unpatch_after, monkeypatch):
    """The point of the helper: with position_ids from the collator the model computes no positions itself, and its
    logits equal a forward that computed them."""
    from transformers import Qwen3VLForConditionalGeneration
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    config = tiny_qwen3_vl_config()
    model = build(Qwen3VLForConditionalGeneration, config, "cpu")
    inputs = multimodal_batch(config, torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(**inputs).logits
        position_ids, _ = mrope_position_ids(inputs, config)
        calls = []
        real = Qwen3VLModel.get_rope_index
        monkeypatch.setattr(Qwen3VLModel, "get_rope_index", lambda *a, **k: calls.append(1) or real(*a, **k))
        ours = model(**inputs, position_ids=position_ids).logits
    assert not calls
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def _multimodal(seed):
    return multimodal_batch(tiny_qwen3_vl_config(), torch.Generator().manual_seed(seed))


def test_collator_adds_the_vision_towers_inputs_in_spawned_workers(unpatch_after):
    """MRopeCollator(vision=model): in spawned DataLoader workers, the tower's precomputed inputs (image_ and video_
    position ids, attention boundaries, interpolation taps) next to the positions; the model fed the whole batch
    gives the logits of a plain forward. transformers 4.57's towers take none: a clear error."""
    from transformers import Qwen3VLForConditionalGeneration

    from ropekit.data import VisionInputsUnavailable

    config = tiny_qwen3_vl_config()
    model = build(Qwen3VLForConditionalGeneration, config, "cpu")
    try:
        import transformers.vision_utils  # noqa: F401  (5.x)
    except ImportError:
        with pytest.raises(VisionInputsUnavailable, match="4.57"):
            MRopeCollator(config, collate_fn=_first, vision=model)
        return
    collate = MRopeCollator(config, collate_fn=_first, vision=model)
    raw = [_multimodal(seed) for seed in range(3)]
    loader = torch.utils.data.DataLoader(_Batches(raw), batch_size=1, collate_fn=collate, num_workers=2,
                                         multiprocessing_context="spawn")
    batches = list(loader)
    assert len(batches) == len(raw)
    for inputs, batch in zip(raw, batches):
        local = collate([inputs])
        assert set(batch) == set(local)
        assert {"image_position_ids", "image_cu_seqlens", "image_interp_indices", "video_position_ids"} <= set(batch)
        for key, value in local.items():
            assert torch.equal(batch[key], value) if isinstance(value, torch.Tensor) else batch[key] == value, key
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).logits, model(**inputs).logits, rtol=0, atol=1e-6)
