"""Builds the optional C extension; all other metadata lives in pyproject.toml.

``embcompress._kernels`` (plain C, no torch headers, so it needs no torch at build time) holds the
fused lookups of the frozen formats. It is optional: without a C compiler the install still
succeeds and the library runs its pure-torch path (``embcompress.frozen.kernels.available()``).
"""

import sys

from setuptools import Extension, setup

compile_args = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-std=c11"]
link_args = [] if sys.platform == "win32" else ["-pthread"]

setup(ext_modules=[Extension("embcompress._kernels", ["src/embcompress/_kernels.c"], optional=True,
                             extra_compile_args=compile_args, extra_link_args=link_args)])
