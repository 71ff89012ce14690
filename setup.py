from setuptools import setup

setup(
    name="fusedrnn",
    version="0.1.0",
    description="Triton kernels for LSTM, GRU and Elman RNN layers: drop-in torch.nn replacements",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fusedrnn", "fusedrnn.tools", "fusedrnn.kernels"],
    # kernels/ holds Triton code only; it installs as fusedrnn.kernels so that no top-level
    # package named `kernels` (an unrelated PyPI project) is created.
    package_dir={"fusedrnn": "fusedrnn", "fusedrnn.kernels": "kernels"},
    install_requires=[
        # A lower bound only: never force a torch upgrade (CI pins the CPU build it has on disk).
        "torch>=2.4",
        "numpy",
        'triton>=3.0; platform_system == "Linux"',
    ],
    extras_require={
        "test": ["pytest", "hypothesis", "pytest-benchmark"],
        "bench": ["matplotlib", "tqdm", "pytest-benchmark"],
        # ONNX export tests (tests/test_onnx.py): both of torch's exporters and onnxruntime.
        "onnx": ["onnx", "onnxscript", "onnxruntime"],
    },
    entry_points={"console_scripts": ["fusedrnn=fusedrnn.tools.cli:main"]},
)
