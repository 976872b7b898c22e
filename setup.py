"""Install tf_backdoor_defense: `pip install .` (extras: examples, test)."""

import pathlib
import re

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent
VERSION = re.search(
    r'__version__ = "([^"]+)"', (HERE / "tf_backdoor_defense" / "__init__.py").read_text()
).group(1)

EXAMPLES = ["mlxtend>=0.23"]

setup(
    name="tf_backdoor_defense",
    version=VERSION,
    description=(
        "Repair backdoored TensorFlow networks: activation pruning, fine-pruning and "
        "stronger defenses, as tf-keras callbacks and a tfmot-compatible layer wrapper."
    ),
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["tf_backdoor_defense", "tf_backdoor_defense.*"]),
    python_requires=">=3.9",
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "tf-keras>=2.21,<2.22",
        "tensorflow-model-optimization==0.8.1",
        "numpy>=1.23",
        "scipy>=1.9",
        "pandas>=1.5",
        "h5py>=3.8",
        "matplotlib>=3.7",
        "pillow>=9",
    ],
    extras_require={
        "examples": EXAMPLES,
        "test": ["pytest>=7", "pytest-xdist>=3", "hypothesis>=6"] + EXAMPLES,
    },
    entry_points={"console_scripts": ["tf-backdoor-defense=tf_backdoor_defense.cli:main"]},
    classifiers=[
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3",
        "Topic :: Security",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
