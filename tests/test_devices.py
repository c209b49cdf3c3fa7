"""Data parallelism over 2 forced CPU devices must not hang.

Automatically sharded ``jit`` deadlocked in an all-reduce rendezvous in 5 of 14 runs of a few
hundred steps on a 2-core machine; the epoch is explicit per-device code (``shard_map``) for that
reason. This runs 20 separate epochs, 600 all-reduced steps in all, in a fresh process with a
hard time limit.
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = (
    pytest.mark.subprocess
)  # starts Python processes: skipped by a quick run (-m "not subprocess")

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from qsparse import masks as M, models, train
    assert jax.local_device_count() == 2
    model = models.create("lenet12", "quat", num_classes=10)
    params = models.init_params(model, jax.random.key(0), (8, 8, 1))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (600, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, 600).astype(np.int32)
    trainer = train.Trainer(train.EpochSpec(20, 30, (0.5,), (0.25,), False))
    data = trainer.put_data(images, labels)
    tx = train.make_optimizer("adam", 1e-3)
    for run in range(20):
        state = train.stack([train.create_train_state(model, params, M.ones(params), tx)])
        state, metrics = trainer.train_epoch(state, *data, train.stack([jax.random.key(run)]))
        assert np.isfinite(metrics["train_loss"]).all()
    print("OK", trainer.trace_count)
""")


def test_twenty_two_device_runs_finish():
    env = {
        **os.environ,
        "XLA_FLAGS": os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
    }
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["OK", "1"]
