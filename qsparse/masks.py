"""Pruning masks: boolean pytrees with the structure and leaf shapes of the params.

A mask leaf is True where the weight is alive. Leaves that are never pruned (biases, and the
output layer when it is exempt) are all-True arrays rather than ``None``, so every
``jax.tree.map`` over ``(params, masks)`` works without special cases, Orbax saves them as any
other array, and multi-device code can give masks the params' sharding.

Which leaves are prunable is a rule on the parameter *path* (``("Dense_0", "kernel")``):
kernels (``kernel`` for real layers, ``qkernel`` for quaternion ones, ``hkernel`` for the other
algebras' component kernels) are prunable; biases and PHM's learned rules (``phm_rules``) are
not, and the module named ``output`` is prunable unless the rule exempts it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qsparse import ops

Params = Any
Masks = Any

KERNEL_NAMES = ops.KERNEL_NAMES
HYPERCOMPLEX_KERNELS = ops.COMPONENT_KERNELS  # component kernels: the n components on axis 0


def path_str(path) -> str:
    """'Dense_0/kernel' for a jax key path or a tuple of names."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def by_path(tree: Any, dtype: Any = None) -> dict[str, np.ndarray]:
    """A pytree's leaves as numpy arrays keyed by :func:`path_str`: how mask and export files
    name them."""
    return {path_str(p): np.asarray(x, dtype) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def is_quaternion(path) -> bool:
    """Quaternion component kernels are the ``qkernel`` leaves (component axis 0)."""
    return path_str(path).split("/")[-1] == "qkernel"


def is_hypercomplex(path) -> bool:
    """Component kernels of any algebra (``qkernel``, ``hkernel``): one number of ``n``
    components per index of axes 1 and up."""
    return path_str(path).split("/")[-1] in HYPERCOMPLEX_KERNELS


@dataclasses.dataclass(frozen=True)
class PruneRule:
    """Which parameters may be pruned. The paper prunes every kernel, the output layer's too."""

    prune_output: bool = True
    output_name: str = "output"

    def __call__(self, path) -> bool:
        names = path_str(path).split("/")
        if names[-1] not in KERNEL_NAMES:
            return False
        return self.prune_output or self.output_name not in names[:-1]


def prunable(params: Params, rule: PruneRule = PruneRule()) -> Any:
    """A pytree of Python bools: which leaves the rule lets us prune."""
    return jax.tree_util.tree_map_with_path(lambda p, _: rule(p), params)


def ones(params: Params) -> Masks:
    return jax.tree.map(lambda p: jnp.ones(p.shape, jnp.bool_), params)


def apply(params: Params, masks: Masks) -> Params:
    """Zero the pruned weights (``where`` keeps dtypes and never multiplies by NaN)."""
    return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, masks)


def is_subset(new: Masks, old: Masks) -> bool:
    """True when every weight alive in ``new`` is alive in ``old`` (masks only shrink)."""
    return all(bool(jnp.all(~n | o)) for n, o in zip(jax.tree.leaves(new), jax.tree.leaves(old)))


def count(
    masks: Masks, rule: PruneRule = PruneRule(), prunable_only: bool = True
) -> tuple[int, int]:
    """(alive, total) real weights over the prunable leaves, or over all leaves."""
    alive = total = 0
    for path, m in jax.tree_util.tree_leaves_with_path(masks):
        if prunable_only and not rule(path):
            continue
        alive += int(np.count_nonzero(np.asarray(m)))
        total += m.size
    return alive, total


def density_report(masks: Masks, rule: PruneRule = PruneRule()) -> dict:
    """Per-leaf and total densities, in real-parameter units and in hypercomplex units.

    A hypercomplex weight (a quaternion, a complex number, ...) counts as alive when any of its
    ``n`` components is alive (under ``element`` grouping it can be partly pruned;
    ``number_full`` counts the ones with all components alive). "all" totals include biases (and
    PHM's rules), as the paper's "% weights left".
    """
    leaves = {}
    totals = dict(
        prunable_alive=0,
        prunable_total=0,
        all_alive=0,
        all_total=0,
        number_alive=0,
        number_full=0,
        number_total=0,
    )
    for path, m in jax.tree_util.tree_leaves_with_path(masks):
        m = np.asarray(m)
        entry = dict(
            shape=list(m.shape), prunable=rule(path), alive=int(m.sum()), total=int(m.size)
        )
        entry["density"] = entry["alive"] / max(entry["total"], 1)
        if is_hypercomplex(path):
            entry.update(
                number_alive=int(m.any(axis=0).sum()),
                number_full=int(m.all(axis=0).sum()),
                number_total=int(math.prod(m.shape[1:])),
            )
            for k in ("number_alive", "number_full", "number_total"):
                totals[k] += entry[k]
        leaves[path_str(path)] = entry
        totals["all_alive"] += entry["alive"]
        totals["all_total"] += entry["total"]
        if entry["prunable"]:
            totals["prunable_alive"] += entry["alive"]
            totals["prunable_total"] += entry["total"]
    totals["density_prunable"] = totals["prunable_alive"] / max(totals["prunable_total"], 1)
    totals["density_all"] = totals["all_alive"] / max(totals["all_total"], 1)
    return {"leaves": leaves, "total": totals}
