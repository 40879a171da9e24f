"""Install smt_dist. See README.md: ``bash scripts/setup.sh`` pins a CPU-friendly torch first."""

from pathlib import Path

from setuptools import find_packages, setup

LOGGING = ["tensorboard", "wandb", "mlflow-skinny", "sqlalchemy", "alembic"]
QUANT = ["bitsandbytes>=0.50", "torchao>=0.18"]

setup(
    name="smt_dist",
    version="0.1.0",
    description="Sparse Matrix Tuning for distributed LLM fine-tuning (DeepSpeed, FSDP2, torchrun)",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["smt_dist", "smt_dist.*"]),
    # A range, not a pin: an already installed torch (CPU or CUDA) is kept as it is.
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.45",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "datasets>=4",  # data files and hub datasets, the tokenised cache
        "mpi4py>=3.1",
        "mpich; sys_platform == 'linux'",
    ],
    extras_require={
        # smt_dist.peft registers SMT in peft's internal tables: only the versions it is tested with.
        "peft": ["peft>=0.21,<0.22", "trl>=1.16,<2", "datasets>=4"],
        # --report_to: TensorBoard event files, W&B (offline too), MLflow in a local sqlite database.
        "logging": LOGGING,
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "ruff>=0.6",
            "peft>=0.21,<0.22",
            "trl>=1.16,<2",
            "datasets>=4",
            "matplotlib",
            *LOGGING,
            *QUANT,
        ],
        "bench": ["peft>=0.21,<0.22", "matplotlib"],
        # --load_in_4bit / --load_in_8bit (bitsandbytes, CPU and CUDA) and --torchao int8.
        "quant": QUANT,
    },
)
