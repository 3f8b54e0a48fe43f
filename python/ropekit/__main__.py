"""``python -m ropekit``: the support report. Prints torch (and whether this build of ropekit has CUDA kernels), the
transformers release and the ``kernels`` version, then, per family, module and switch, whether ropekit patches it
leaves it (known code in a form ropekit leaves to transformers) or declines it and why. Exits 0 when nothing is
declined, 1 when anything is, 2 without transformers.

``python -m ropekit record-known --verified V,... WHEEL...`` (maintainers): record the fingerprints of the
transformers code ropekit checks at patch time, from release wheels, into ``transformers/known_code.json``.
"""

from __future__ import annotations

import sys


def environment() -> dict[str, str]:
    """The versions the report starts with, also for logs."""
    from importlib import metadata

    import torch

    import ropekit

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    try:
        import transformers

        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = "not installed"
    return {
        "ropekit": ropekit.__version__,
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "ropekit CUDA kernels": "yes" if ropekit.has_cuda_kernels() else "no",
        "transformers": transformers_version,
        "kernels": version("kernels"),
    }


def main(argv: list[str]) -> int:
    if argv[:1] == ["record-known"]:
        from ropekit.transformers._guard import record_known

        return record_known(argv[1:])
    env = environment()
    for key, value in env.items():
        print(f"{key + ':':<22}{value}")
    if env["transformers"] == "not installed":
        print("transformers is not installed: no patch applies")
        return 2
    from ropekit.transformers import support_report

    rows = support_report()
    print()
    for row in rows:
        print(row.line())
    patched, left = sum(row.patched for row in rows), sum(row.left for row in rows)
    declined = len(rows) - patched - left
    print(f"\n{patched} patched, {left} left to transformers, {declined} declined")
    from ropekit.transformers.coverage import NOT_SUPPORTED, mrope_model_types

    others = [t for t in mrope_model_types() if t in NOT_SUPPORTED]
    if others:
        print(f"\nmRoPE model types of this release ropekit does not patch ({len(others)}):")
        for model_type in others:
            print(f"  {model_type}: {NOT_SUPPORTED[model_type]}")
    return 1 if declined else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
