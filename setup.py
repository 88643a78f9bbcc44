"""Builds omoe_kernels.ops._C, the compiled ops (CPU always; CUDA when it can).

    pip install --no-build-isolation -e .      # or: make install

OMOE_BUILD_CUDA: "auto" (default) builds the CUDA kernels when nvcc and a CUDA build of
torch are both present; "1" requires them; "0" builds the CPU kernels only.
TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0a" (wgmma needs 9.0a).
"""
import glob
import os
import shutil

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    mode = os.environ.get("OMOE_BUILD_CUDA", "auto").strip().lower()
    if mode in ("0", "off", "false", "no"):
        return False
    import torch

    cuda_home = os.environ.get("CUDA_HOME") or ("/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else None)
    nvcc = shutil.which("nvcc") or (cuda_home and os.path.join(cuda_home, "bin", "nvcc"))
    have = torch.version.cuda is not None and nvcc is not None and os.path.exists(nvcc)
    if mode in ("1", "on", "true", "yes") and not have:
        raise RuntimeError("OMOE_BUILD_CUDA=1 but nvcc or a CUDA build of torch is missing")
    if have and cuda_home and "CUDA_HOME" not in os.environ:
        # torch guesses CUDA_HOME from nvcc's location and can miss the toolkit's libraries.
        os.environ["CUDA_HOME"] = cuda_home
    return have


def _extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx_flags = ["-O3", "-fopenmp"]
    if _want_cuda() and glob.glob(os.path.join("csrc", "cuda", "*.cu")):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        # csrc/cuda: the kernels (*.cu, no ATen headers, so nvcc stays quick) and the
        # ATen side that checks, launches and registers them (*.cpp, host compiler).
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        return CUDAExtension(
            "omoe_kernels.ops._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags + ["-DOMOE_WITH_CUDA"],
                                "nvcc": ["-O3", "-lineinfo", "-DOMOE_WITH_CUDA",
                                         "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "omoe_kernels.ops._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=cxx_flags,
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
