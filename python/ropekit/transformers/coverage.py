"""Which of the installed transformers' model types have an mRoPE position index, and what ropekit does with each.

``mrope_model_types()`` reads the installed modeling modules (as text, nothing imported): a model type counts when its
module defines ``get_rope_index`` or reads ``mrope_section`` in code (a comment does not count). Each such type is
either patched (``apply_to_model`` takes it) or listed in ``NOT_SUPPORTED`` with the reason, the table the README
prints; a release that adds another fails ropekit's completeness test until it is placed in one or the other.
"""

from __future__ import annotations

import ast
import pathlib

_NOT_YET = "not ported yet (issue 17); transformers' own code runs"

# model type -> why ropekit does not patch it (README: "mRoPE model types ropekit does not patch")
NOT_SUPPORTED: dict[str, str] = {
    "glm_image": f"images_per_sample and the grids of the images to generate; {_NOT_YET}",
    "minicpmv4_7": f"'canvas M-RoPE' positions from target_sizes; {_NOT_YET}",
}


def _uses_mrope(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "get_rope_index":
            return True
        if isinstance(node, ast.Attribute) and node.attr == "mrope_section":
            return True
        if isinstance(node, ast.Name) and node.id == "mrope_section":
            return True
        if isinstance(node, ast.Constant) and node.value == "mrope_section":
            return True
    return False


def mrope_model_types() -> list[str]:
    """The installed transformers' model types (their ``transformers/models/<type>`` folder names) whose modeling
    module has an mRoPE position index or rotary, sorted."""
    import transformers.models

    found = []
    for path in sorted(pathlib.Path(transformers.models.__file__).parent.glob("*/modeling_*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if "get_rope_index" not in text and "mrope_section" not in text:
            continue
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        if _uses_mrope(tree):
            found.append(path.parent.name)
    return sorted(set(found))
