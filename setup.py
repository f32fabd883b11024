from setuptools import find_packages, setup

setup(
    name="deepseek-jax",
    version="0.1.0",
    description="DeepSeek-V3 / R1 in JAX: MLA, DeepSeekMoE, MTP, FP8, GRPO",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["deepseek_jax*", "kernels_pallas*", "launch*", "configs*"]),
    install_requires=[
        "jax>=0.10.2",
        "flax",
        "optax",
        "orbax-checkpoint",
        "chex",
        "grain",
        "tensorstore",
        "ml-collections",
        "sentencepiece",
        "tokenizers",
        "jinja2",
        "safetensors",
        "tensorboardX",
        "ml_dtypes",
        "numpy",
        "tqdm",
        "matplotlib",  # the learning curves a GRPO run draws (rl.curves)
        "fastapi",  # launch.serve: the OpenAI-compatible HTTP API
        "uvicorn",
        "prometheus-client",
    ],
    extras_require={
        # tensorboard: the tests read the event files with TensorBoard's own reader
        "dev": ["pytest", "pytest-xdist", "hypothesis", "ruff", "nbclient", "ipykernel", "tensorboard",
                "openai", "httpx"],
        "tpu": ["jax[tpu]"],
        "cuda": ["jax[cuda12]"],
    },
)
