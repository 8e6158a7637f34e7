"""Build entry. Metadata lives in pyproject.toml; the CUDA extension of csrc/ joins here with its own issue,
and a machine without CUDA installs the pure-Python package with no compile step."""

from setuptools import setup

setup()
