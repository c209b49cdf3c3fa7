"""Shared test settings: CPU only, float32 matmuls at full precision for exact comparisons."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory):
    """A tfds data dir with real MNIST built once (offline, from the shipped archives)."""
    from qsparse import data

    root = tmp_path_factory.mktemp("tfds")
    data.load("mnist", data_dir=root)
    return root
