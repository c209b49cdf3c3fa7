"""qsparse: sparse quaternion neural networks in JAX/Flax.

Modules are imported explicitly (``from qsparse.layers import QDense``) so that using the
layers never pulls in the experiment stack (tensorflow-datasets, Orbax, absl). They stand in
tiers, each importable without the ones above it (``tests/test_imports.py`` enforces them):

* leaves, numpy or the standard library only: ``algebras``, ``ops``, ``files``, ``config``;
* core, + jax, flax, optax: ``quaternion``, ``initializers``, ``layers``, ``nnx``, ``models``,
  ``hyper``, ``masks``, ``pruning``, ``augment``, ``epoch``, ``train``, ``cpu``;
* run, + orbax, tensorflow-datasets, tensorboardX: ``data``, ``checkpoints``, ``rundir``,
  ``summaries``, ``progress``, ``loop``, ``experiment``, ``lottery``, ``distributed``,
  ``export``, and ``deploy`` (the numpy runtime of exported files);
* analysis, numpy + matplotlib, no jax: ``results``, ``paper``, ``report``, ``plots``,
  ``compare``, ``accounting``.
"""

__version__ = "0.1.0"
