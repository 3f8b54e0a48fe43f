"""Completeness: every mRoPE model type of the installed transformers is patched or in the documented table of those
that are not (ropekit.transformers.coverage), on each transformers line CI runs."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest

import ropekit
from ropekit.transformers import _MODEL_TYPES
from ropekit.transformers.coverage import NOT_SUPPORTED, mrope_model_types

pytestmark = pytest.mark.transformers

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_mrope_model_type_is_patched_or_listed():
    import transformers

    found = mrope_model_types()
    patched = [t for t in found if t in _MODEL_TYPES]
    assert {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v"} <= set(patched), found  # the scan finds what it must
    unplaced = [t for t in found if t not in _MODEL_TYPES and t not in NOT_SUPPORTED]
    assert not unplaced, (f"transformers {transformers.__version__} has mRoPE model types ropekit neither patches nor "
                          f"lists in ropekit.transformers.coverage.NOT_SUPPORTED (and the README): {unplaced}")
    assert not set(NOT_SUPPORTED) & set(_MODEL_TYPES), "a type is either patched or listed, not both"


def test_the_readme_table_is_the_list():
    text = README.read_text()
    section = text[text.index("### mRoPE model types ropekit does not patch"):]
    section = section[:section.index("\n### ", 1)]
    rows = dict(re.findall(r"^\| `([a-z0-9_]+)` \| (.+) \|$", section, re.M))
    assert rows == NOT_SUPPORTED


def test_the_scan_reads_code_not_comments(tmp_path, monkeypatch):
    import transformers.models

    root = tmp_path / "models"
    for name, body in {"commented": "# mrope_section = [16, 24, 24]\n",
                       "indexed": "class M:\n    def get_rope_index(self):\n        pass\n",
                       "sectioned": "def f(config):\n    return config.rope_parameters['mrope_section']\n"}.items():
        (root / name).mkdir(parents=True)
        (root / name / f"modeling_{name}.py").write_text(body)
    monkeypatch.setattr(transformers.models, "__file__", str(root / "__init__.py"))
    assert mrope_model_types() == ["indexed", "sectioned"]


def test_apply_to_model_names_the_reason():
    model = types.SimpleNamespace(config=types.SimpleNamespace(model_type="glm_image"))
    with pytest.raises(ValueError, match="'glm_image' is not supported: images_per_sample"):
        ropekit.apply_to_model(model)
