"""One pruning step: scores -> how many survive where -> a new mask.

The three choices are independent (jaxpruner's decomposition, lottery-ticket semantics):

* **score**: ``magnitude`` (|w|; for a quaternion group the RMS of its four components, i.e.
  |q|/2, so a quaternion group and a real weight of the same per-component scale compare
  fairly in one global pool) or ``random`` (a control).
* **method**: ``global`` (one threshold over every prunable leaf, no per-layer normalisation,
  as the paper and open_lth) or ``layerwise`` (a fraction per leaf). Both take per-path
  overrides: a leaf with its own fraction leaves the global pool and is pruned on its own (the
  output layer at half rate, as Frankle & Carbin).
* **grouping**: ``element`` (every real component on its own, as the paper's code),
  ``number`` (the ``n`` components of a hypercomplex weight of any algebra share one mask bit)
  or ``quaternion`` (the same for quaternion kernels only: the name runs of the quaternion
  models have always used).

The unit that is counted is the group: a real weight, or under ``number`` grouping one
hypercomplex number of a component kernel (``qkernel``/``hkernel``). PHM's learned rules are
never pruned (:class:`qsparse.masks.PruneRule`). Each step removes
``round(fraction * alive units)`` units from the pool exactly; ties are broken by position
(leaf order, then flat index), so the result is deterministic. Pruned units score ``-inf`` and
are never revived. The step runs on the host with NumPy: it happens once per round, and exact,
stable top-k is simplest there.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from qsparse.masks import Masks, Params, PruneRule, is_hypercomplex, is_quaternion, path_str

METHODS = ("global", "layerwise")
GROUPINGS = ("element", "quaternion", "number")
SCORES = ("magnitude", "random")


class LayerCollapseError(ValueError):
    """A pruning step would remove every remaining weight of a layer."""


def _check(name: str, value: str, valid: tuple) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {list(valid)}")


def grouped(path, grouping: str) -> bool:
    """Whether leaf ``path`` is pruned by whole numbers (its component axis 0) under
    ``grouping``."""
    if grouping == "number":
        return is_hypercomplex(path)
    return grouping == "quaternion" and is_quaternion(path)


def _units(path, param: np.ndarray, mask: np.ndarray, grouping: str):
    """(values, alive) per scoring unit, flattened. Number groups reduce axis 0."""
    if grouped(path, grouping):
        values = np.sqrt(np.mean(np.square(np.where(mask, param, 0.0)), axis=0))
        return values.ravel(), mask.any(axis=0).ravel()
    return np.abs(param).ravel(), mask.ravel()


def _expand(keep_units: np.ndarray, path, mask: np.ndarray, grouping: str) -> np.ndarray:
    """Unit keep-flags back to a mask of the leaf's shape; pruned entries stay pruned."""
    if grouped(path, grouping):
        return mask & keep_units.reshape(mask.shape[1:])[None]
    return mask & keep_units.reshape(mask.shape)


def _select(scores: np.ndarray, alive: np.ndarray, n_remove: int) -> np.ndarray:
    """Keep-flags after removing the ``n_remove`` lowest-scoring alive units (stable ties)."""
    scores = np.where(alive, scores.astype(np.float64), -np.inf)
    order = np.argsort(scores, kind="stable")
    n_dead = int((~alive).sum())
    keep = np.ones(scores.shape, bool)
    keep[order[: n_dead + n_remove]] = False
    return keep


def prune(
    params: Params,
    masks: Masks,
    fraction: float,
    *,
    method: str = "global",
    grouping: str = "element",
    score: str = "magnitude",
    rule: PruneRule = PruneRule(),
    layer_fractions: Mapping[str, float] | None = None,
    key: jax.Array | None = None,
    allow_empty: bool = False,
) -> Masks:
    """Remove ``fraction`` of the *remaining* prunable units; returns the new masks.

    ``layer_fractions`` maps glob patterns on the leaf path, e.g. ``{"output/*": 0.1}``, to the
    fraction for matching leaves (the first match wins); under ``global`` those leaves are
    pruned on their own and the others share one threshold.
    """
    _check("pruning method", method, METHODS)
    _check("grouping", grouping, GROUPINGS)
    _check("score", score, SCORES)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"prune fraction must be in [0, 1), got {fraction}")
    if score == "random" and key is None:
        raise ValueError("score='random' needs a PRNG key")

    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    mask_leaves = [np.asarray(m, bool) for m in jax.tree.leaves(masks)]
    entries = _scored_units(flat, mask_leaves, rule, grouping, key if score == "random" else None)
    own = [_layer_fraction(path_str(e[1]), None, layer_fractions or {}) for e in entries]
    if method == "layerwise":
        own = [fraction if f is None else f for f in own]
    pooled = [e for e, f in zip(entries, own) if f is None]
    pool = iter(_keep_global(pooled, fraction) if pooled else [])
    keeps = [
        next(pool) if f is None else _select(values, alive, int(round(f * alive.sum())))
        for (_, _, values, alive), f in zip(entries, own)
    ]
    new = list(mask_leaves)
    for (i, path, _, alive), keep in zip(entries, keeps):
        if alive.any() and not (keep & alive).any() and not allow_empty:
            raise LayerCollapseError(
                f"pruning would remove every remaining weight of {path_str(path)} "
                f"({int(alive.sum())} alive); stop pruning here or pass allow_empty=True"
            )
        new[i] = _expand(keep, path, mask_leaves[i], grouping)
    return jax.tree.unflatten(treedef, [jnp.asarray(m) for m in new])


def _scored_units(flat, mask_leaves, rule: PruneRule, grouping: str, random_key) -> list[tuple]:
    """(index, path, scores, alive) for each prunable leaf; random scores when given a key."""
    if len(mask_leaves) != len(flat):
        raise ValueError("masks and params have different tree structures")
    entries = []
    for i, ((path, p), m) in enumerate(zip(flat, mask_leaves)):
        if p.shape != m.shape:
            raise ValueError(f"mask for {path_str(path)} has shape {m.shape}, param {p.shape}")
        if rule(path):
            values, alive = _units(path, np.asarray(p, np.float32), m, grouping)
            if random_key is not None:
                values = np.asarray(
                    jax.random.uniform(jax.random.fold_in(random_key, i), values.shape)
                )
            entries.append((i, path, values, alive))
    if not entries:
        raise ValueError("no prunable parameters under this rule")
    return entries


def _keep_global(entries: list[tuple], fraction: float) -> list[np.ndarray]:
    """One threshold over every prunable unit, split back into per-leaf keep-flags."""
    scores = np.concatenate([e[2] for e in entries])
    alive = np.concatenate([e[3] for e in entries])
    keep = _select(scores, alive, int(round(fraction * alive.sum())))
    offsets = np.cumsum([0] + [e[2].size for e in entries])
    return [keep[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def _layer_fraction(
    path: str, default: float | None, overrides: Mapping[str, float]
) -> float | None:
    for pattern, f in overrides.items():
        if fnmatch.fnmatch(path, pattern):
            if not 0.0 <= f < 1.0:
                raise ValueError(f"layer fraction for {pattern!r} must be in [0, 1), got {f}")
            return f
    return default


def shuffle(
    key: jax.Array,
    masks: Masks,
    *,
    within: Masks | None = None,
    grouping: str = "element",
    rule: PruneRule = PruneRule(),
) -> Masks:
    """A random mask with as many alive units in every prunable leaf as ``masks`` (a control).

    Survivors are drawn uniformly among the alive units of ``within`` (default: all units), so
    random pruning along an IMP run keeps masks nested while matching the per-layer densities
    that magnitude pruning chose.
    """
    _check("grouping", grouping, GROUPINGS)
    flat, treedef = jax.tree_util.tree_flatten_with_path(masks)
    within_leaves = jax.tree.leaves(within) if within is not None else [None] * len(flat)
    out = []
    for i, ((path, m), w) in enumerate(zip(flat, within_leaves)):
        m = np.asarray(m, bool)
        if rule(path):
            whole = grouped(path, grouping)
            unit = (lambda a: a.any(axis=0).ravel()) if whole else (lambda a: a.ravel())
            pool = unit(np.asarray(w, bool)) if w is not None else np.ones(unit(m).shape, bool)
            candidates = np.flatnonzero(pool)
            n_keep = int(unit(m).sum())
            if n_keep > candidates.size:
                raise ValueError(
                    f"{path_str(path)}: {n_keep} survivors requested from {candidates.size} alive "
                    "units"
                )
            perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, i), candidates.size))
            keep = np.zeros(pool.shape, bool)
            keep[candidates[perm[:n_keep]]] = True
            m = (
                np.broadcast_to(keep.reshape(m.shape[1:]), m.shape).copy()
                if whole
                else keep.reshape(m.shape)
            )
        out.append(jnp.asarray(m))
    return jax.tree.unflatten(treedef, out)
