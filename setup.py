"""Builds the one compiled part, the ring helper (shardswitch/virtio/_vring.c); the rest is pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("shardswitch.virtio._vring", ["shardswitch/virtio/_vring.c"],
                             extra_compile_args=["-O2", "-Wall", "-Wextra"])])
