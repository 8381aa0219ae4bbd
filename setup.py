"""Build script for modkern.

Installs the ``modkern`` package and the Triton kernels directory ``kernels/`` as the
sub-package ``modkern.kernels`` (never as a top-level ``kernels`` module: the Hugging Face
package of that name owns it). The CUDA C++ extension ``modkern._C`` (``csrc/``) is built only
where a CUDA build of torch and ``nvcc`` are present; ``MODKERN_BUILD_CUDA=0/1`` overrides the
detection. Without it the install is pure Python and ``backend="auto"`` falls back to Triton or
PyTorch. ``triton`` is an extra (``.[triton]``, included in ``.[test]``): torch's CUDA builds
bring it anyway, and on a CPU it only serves the test suite's interpreter.

GPU build (needs torch importable in the build environment)::

    pip install --no-build-isolation --no-deps -e .
"""

import glob
import os

from setuptools import find_packages, setup


def _want_cuda_extension():
    flag = os.environ.get("MODKERN_BUILD_CUDA")
    if flag is not None and flag.strip() not in ("", "auto"):
        return flag.strip() not in ("0", "false", "False", "no")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extensions():
    if not _want_cuda_extension():
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

    if torch.version.cuda is None or CUDA_HOME is None:
        raise RuntimeError(
            f"MODKERN_BUILD_CUDA asks for the CUDA extension, but torch {torch.__version__} is "
            + ("a CPU-only build" if torch.version.cuda is None else "a CUDA build with no CUDA toolkit found")
            + ": install a CUDA build of torch and nvcc (or set CUDA_HOME), or unset MODKERN_BUILD_CUDA"
        )

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    if not sources:
        return [], {}
    nvcc_flags = [
        "-O3",
        "--use_fast_math",
        "-std=c++17",
        "-lineinfo",
        # Hopper first (sm_90a unlocks wgmma/TMA/cluster features), plus a portable target.
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_80,code=compute_80",
    ]
    if os.environ.get("MODKERN_PTXAS_VERBOSE", "0") == "1":
        nvcc_flags.append("-Xptxas=-v")
    ext = CUDAExtension(
        name="modkern._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": nvcc_flags},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

# Triton wheels exist for Linux only; elsewhere the Triton backend is unavailable and its tests skip.
TRITON = "triton>=3.6; platform_system == 'Linux'"

setup(
    name="modkern",
    version="0.1.0",
    description="Fused GPU kernels for modality-robust fine-tuning of multimodal LLMs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["modkern", "modkern.*"]) + ["modkern.kernels"],
    package_dir={"modkern": "modkern", "modkern.kernels": "kernels"},
    # triton is not required: it runs kernels only on a GPU (torch's CUDA builds already depend on it)
    # and in the test suite's interpreter; `import modkern` and the CPU paths work without it.
    install_requires=[
        "torch>=2.6",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "triton": [TRITON],
        "test": [
            TRITON,
            "pytest>=8",
            "pytest-benchmark>=4",
            "transformers>=5,<6",
            "accelerate",
            "matplotlib",
            "liger-kernel",
            "peft",
            "trl",  # the SFTTrainer integration test (tests/test_trl.py)
            # ZeRO-3 test on CPU (DeepSpeed's CPU accelerator, gloo); the test skips when it is not importable
            "deepspeed; platform_system == 'Linux'",
        ],
        # the Trainer path: `modkern train --model DIR --data FILE`, `modkern diagnose --data` (its picture)
        "hf": ["transformers>=5,<6", "accelerate", "pillow", "matplotlib"],
        "trl": ["trl", "transformers>=5,<6", "accelerate"],
        "demo": ["transformers>=5,<6", "matplotlib"],
        "liger": ["liger-kernel"],
        "bench": [TRITON, "pytest>=8", "pytest-benchmark>=4", "transformers>=5,<6", "matplotlib", "liger-kernel"],
        "dev": ["ruff"],
    },
    entry_points={"console_scripts": ["modkern=modkern.apps.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
