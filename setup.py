"""Builds ropekit._C: CPU kernels always, CUDA kernels when torch is a CUDA build and nvcc is found."""

import glob
import os
import sys

from setuptools import find_packages, setup


def _locate_cuda_home():
    """Point torch at the real toolkit when `nvcc` on PATH is a wrapper script outside it (e.g. /usr/local/bin)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for candidate in ("/usr/local/cuda", "/opt/cuda"):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = candidate
            return


_locate_cuda_home()
from torch.utils import cpp_extension  # noqa: E402  (reads CUDA_HOME at import)

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def want_cuda():
    if os.environ.get("ROPEKIT_FORCE_CPU") == "1":
        return False, "ROPEKIT_FORCE_CPU=1"
    if os.environ.get("ROPEKIT_SANITIZE") == "1":
        return False, "ROPEKIT_SANITIZE=1 instruments the CPU kernels"
    import torch

    if torch.version.cuda is None:
        return False, "torch is a CPU build"
    if cpp_extension.CUDA_HOME is None:
        return False, "nvcc / CUDA_HOME not found"
    return True, f"torch CUDA {torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"


def extension():
    with_cuda, why = want_cuda()
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    # -fopenmp: at::parallel_for is an OpenMP pragma in ATen's headers; without it the CPU kernels run on one thread.
    cxx = ["-O3", "-ffp-contract=off", "-fopenmp", "-DPy_LIMITED_API=0x030A0000"]
    link = ["-fopenmp"]
    if os.environ.get("ROPEKIT_SANITIZE") == "1":
        # AddressSanitizer + UndefinedBehaviorSanitizer for the CPU kernels (`make test-sanitize`); load the runtime
        # first: LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)".
        flags = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
        cxx = [f for f in cxx if f != "-O3"] + ["-O1", "-g"] + flags
        link += flags
    if not with_cuda:
        print(f"ropekit: building CPU-only ({why})", file=sys.stderr)
        return cpp_extension.CppExtension(
            "ropekit._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link, py_limited_api=True
        )
    # Without a GPU to query, torch would compile for every arch it knows; default to A100 and H100 (+PTX for
    # newer parts). TORCH_CUDA_ARCH_LIST still wins when set.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    print(
        f"ropekit: building with CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']} ({why})",
        file=sys.stderr,
    )
    sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    # A toolkit with only nvcc and the runtime lacks the cuBLAS/cuSPARSE headers that ATen's CUDA headers include;
    # the CUDA wheels torch depends on ship them. Searched after the toolkit's own headers.
    extra_headers = []
    for include in sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(cpp_extension.__file__)), "..",
                                                 "nvidia", "*", "include"))):
        extra_headers += ["-idirafter", os.path.abspath(include)]
    cxx += extra_headers
    # No --use_fast_math: the kernels must round exactly like PyTorch's own cos/sin/mul to stay bit-identical.
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-DROPEKIT_WITH_CUDA"]
    nvcc += [f"-Xcompiler={flag}" for flag in extra_headers]
    return cpp_extension.CUDAExtension(
        "ropekit._C",
        sources,
        define_macros=[("ROPEKIT_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=link,
        py_limited_api=True,
    )


setup(
    packages=find_packages("python"),
    package_dir={"": "python"},
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
