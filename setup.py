"""Treadle: a JAX/Flax research framework for TPUs and GPUs."""
import setuptools

setuptools.setup(
    name="treadle",
    version="0.1.0",
    description="Sharded JAX/Flax training for Llama, MoE, Mamba, RWKV and diffusion models.",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=[
        "models", "models.*", "layers", "layers.*", "pallas_kernels",
        "pallas_kernels.*", "train", "train.*", "configs", "configs.*",
    ]),
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "tensorflow-datasets>=4.9.9",
        "array_record>=0.8",
        "grain>=0.2.18",
        "absl-py",
        "ml-collections>=1.0",
        "sentencepiece",
        "safetensors",
        "numpy",
        "ml_dtypes",
        "pillow",  # PNG for the image datasets and sample grids (train/data/images/).
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-xdist",
            "torch==2.13.0",
            "tensorboardX>=2.6",  # Its protos read back the event files train/ writes.
            "transformers>=5",
            "diffusers>=0.42",  # UNet2DModel parity and export (tests/models/unet/).
            "rwkv",
            "nbclient",
            "nbformat",
            "ipykernel",
            "matplotlib",
        ],
    },
)
