"""Install mrcnn: `pip install -e ".[test]"` (see README.md)."""

import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_requirements():
    with open(os.path.join(HERE, "requirements.txt")) as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


setup(
    name="mrcnn",
    version="0.1.0",
    description="Mask R-CNN for TensorFlow 2 / Keras 3 (matterport-compatible) with a U-Net mask head",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mrcnn", "mrcnn.*"]),
    python_requires=">=3.10",
    install_requires=read_requirements(),
    extras_require={
        # Tests, the notebook runner and the linter (ruff.toml; .ci/run runs it first).
        "test": ["pytest>=8", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29",
                 "ruff>=0.6"],
        # matterport's imgaug augmenters. imgaug 0.4.0 does not import under numpy 2: this
        # extra pins numpy 1.26 (the oldest TensorFlow 2.21 takes) and an OpenCV built for it.
        # Augmenters that use aliases numpy removed in 1.24 (SomeOf, Power, FrequencyNoise,
        # polygons) still fail; albumentations is the default and recommended path.
        "imgaug": ["imgaug==0.4.0", "numpy>=1.26,<2", "opencv-python-headless<4.12"],
    },
    license="MIT",
)
