"""The training core needs only jax, flax, optax and numpy: no tensorflow(-datasets), no orbax."""

import subprocess
import sys

SCRIPT = """
import builtins, sys

real_import = builtins.__import__
def guarded(name, *args, **kwargs):
    if name.split(".")[0] in ("tensorflow", "tensorflow_datasets", "orbax"):
        raise ImportError(f"the training core imported {name}")
    return real_import(name, *args, **kwargs)
builtins.__import__ = guarded
import qsparse.train, qsparse.models, qsparse.pruning, qsparse.augment, qsparse.cpu
print(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets", "orbax")))
"""


def test_training_core_imports_without_tfds_or_orbax():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120,
                            env={"JAX_PLATFORMS": "cpu", "PATH": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
