"""Package layout for setuptools (the metadata is in pyproject.toml).

The example images live in the repository's top-level ``examples/`` folder (the README and the
tests use them from there) and are installed as ``cellpose_web/examples`` so the app finds them
when the package is installed; ``cellpose_web.resources.examples_dir`` looks in both places.
"""
from setuptools import find_namespace_packages, setup

setup(
    # namespace discovery: cellpose_web/ui has no __init__.py
    packages=find_namespace_packages(include=["cellpose_web", "cellpose_web.*"],
                                     exclude=["*.__pycache__", "cellpose_web.weights._runs*"])
    + ["cellpose_web.examples"],
    package_dir={"cellpose_web.examples": "examples"},
)
