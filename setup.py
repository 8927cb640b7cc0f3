"""keras-moe: the sparsely-gated Mixture-of-Experts layer (Shazeer et al. 2017) for Keras 3."""

from setuptools import setup

setup(
    name="keras-moe",
    version="0.1.0",
    description=(
        "Sparsely-gated Mixture-of-Experts layers, MoE-LSTM language and "
        "translation models, and their training pipelines for Keras 3 / TensorFlow"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The models and pipelines live in top-level folders of the repository
    # but install under the keras_moe namespace, so an install never claims
    # generic names such as `models` or `pipelines` in site-packages.
    packages=["keras_moe", "keras_moe.models", "keras_moe.pipelines"],
    package_data={"keras_moe.pipelines": ["configs/*/*.yaml"]},
    package_dir={
        "keras_moe": "keras_moe",
        "keras_moe.models": "models",
        "keras_moe.pipelines": "pipelines",
    },
    install_requires=[
        "tensorflow==2.21.*",
        "keras>=3.15,<3.16",
        "tensorflow-text==2.21.*",
        # The compiled WordPiece learner (pipelines/data/wordpiece_learner.py).
        "tokenizers>=0.20,<1",
        "sacrebleu>=2.6",
        "tensorboard",
        "pyyaml",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            # Most tests spend their time tracing graphs in one Python
            # thread; two worker processes keep both cores busy.
            "pytest-xdist>=3.5",
            "ruff",
            # The TFDS lm1b reader is tested on a dataset prepared locally;
            # TFDS 4.9 needs importlib-resources without declaring it
            # (tensorflow/datasets#11212).
            "tensorflow-datasets>=4.9,<5",
            "importlib-resources",
            # `keras-moe experts heatmap` draws its PNG with matplotlib.
            "matplotlib>=3.7",
        ],
        # The expert x domain heat map's PNG (`keras-moe experts heatmap`).
        "plots": ["matplotlib>=3.7"],
        "tfds": ["tensorflow-datasets>=4.9,<5", "importlib-resources"],
    },
    entry_points={"console_scripts": ["keras-moe=keras_moe.pipelines.cli:main"]},
)
