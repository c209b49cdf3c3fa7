"""One configuration object for an IMP experiment, validated in one place.

Library functions take a :class:`Config`; only ``experiments/imp.py`` reads flags. Fields left
``None`` take the paper's value for the model (paper.md §3, Table 1) when resolved.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re

from qsparse import initializers, models, pruning, quaternion

PROTOCOLS = ("lottery", "paper")
OPTIMIZER_STATES = ("fresh", "carry")
CONTROLS = ("none", "reinit", "shuffle")
DATASET_NAMES = ("mnist", "fashion_mnist", "cifar10", "cifar100")
ENCODINGS = ("auto", "flat", *quaternion.ENCODINGS)

# Fields that do not change results: excluded from the run name's hash and from the check that
# a run directory holds the same experiment.
NON_SEMANTIC = ("data_dir", "manual_dir", "checkpoint_every_secs", "eval_batch", "log_every")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names it and the valid choices."""


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = "lenet300_100"
    algebra: str = "real"
    hidden: tuple[int, ...] = ()  # real widths of the hidden dense layers; () = the model's own
    dataset: str | None = None  # default: the paper's dataset for the model
    # pruning
    rounds: int = 20
    prune_fraction: float = 0.2
    pruning: str = "global"
    grouping: str = "element"
    prune_output: bool = True  # the paper prunes the output layer too
    layer_fractions: tuple[tuple[str, float], ...] = ()  # layerwise overrides: (glob, fraction)
    rewind: str = "init"  # 'init', '<N>it' (steps) or '<N>ep' (epochs): late resetting
    protocol: str = "lottery"
    optimizer_state: str = "fresh"
    control: str = "none"  # lottery-ticket controls: random re-init or shuffled masks
    stop_accuracy: float = 0.0  # stop a replicate after two rounds below this test accuracy
    # training
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    optimizer: str = "adam"
    quat_init: str = "htorch"
    encoding: str = "auto"
    seed: int = 0
    replicates: int = 1
    # data
    validation_size: int = 0
    train_subset: int | None = None
    test_subset: int | None = None
    eval_every: int = 1
    data_dir: str | None = None
    manual_dir: str | None = None
    # bookkeeping
    checkpoint_every_secs: float = 0.0  # 0: a checkpoint after every epoch
    eval_batch: int = 1000
    log_every: int = 1

    def resolve(self) -> "Config":
        """Fill the model's paper defaults and validate every field; raises ConfigError."""
        _choice("model", self.model, tuple(models.REGISTRY))
        _choice("algebra", self.algebra, models.ALGEBRAS)
        spec = models.spec(self.model)
        resolved = dataclasses.replace(
            self,
            dataset=self.dataset or spec.dataset,
            epochs=spec.epochs if self.epochs is None else self.epochs,
            batch_size=spec.batch_size if self.batch_size is None else self.batch_size,
            lr=spec.lr if self.lr is None else self.lr,
            layer_fractions=tuple((str(k), float(v)) for k, v in self.layer_fractions),
            hidden=tuple(self.hidden),
        )
        resolved._validate()
        return resolved

    def _validate(self) -> None:
        _choice("dataset", self.dataset, DATASET_NAMES)
        _choice("pruning", self.pruning, pruning.METHODS)
        _choice("grouping", self.grouping, pruning.GROUPINGS)
        _choice("protocol", self.protocol, PROTOCOLS)
        _choice("optimizer_state", self.optimizer_state, OPTIMIZER_STATES)
        _choice("control", self.control, CONTROLS)
        _choice("optimizer", self.optimizer, ("adam", "sgd"))
        _choice("quat_init", self.quat_init, tuple(initializers.QUATERNION_INITS))
        _choice("encoding", self.encoding, ENCODINGS)
        if not 0.0 < self.prune_fraction < 1.0:
            raise ConfigError(f"prune_fraction={self.prune_fraction} must be in (0, 1)")
        for name in ("epochs", "batch_size", "replicates", "eval_every", "eval_batch", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive integer")
        for name in ("rounds", "validation_size", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("train_subset", "test_subset"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive integer (or unset)")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr={self.lr} must be a positive number")
        if not 0.0 <= self.stop_accuracy < 1.0:
            raise ConfigError(f"stop_accuracy={self.stop_accuracy} must be in [0, 1)")
        for pattern, fraction in self.layer_fractions:
            if not 0.0 <= fraction < 1.0:
                raise ConfigError(f"layer fraction {fraction} for {pattern!r} must be in [0, 1)")
        if not all(isinstance(w, int) and w > 0 for w in self.hidden):
            raise ConfigError(f"hidden={list(self.hidden)} must be positive integer widths")
        if self.algebra == "quat" and any(w % 4 for w in self.hidden):
            raise ConfigError(f"hidden={list(self.hidden)}: a quaternion model needs real widths that are "
                              "multiples of 4 (4, 8, 12, ...)")
        if self.layer_fractions and self.pruning != "layerwise":
            raise ConfigError("layer_fractions need pruning='layerwise'")
        parse_rewind(self.rewind)
        if self.rewind != "init" and self.protocol == "paper":
            raise ConfigError("protocol='paper' always retrains from the initial weights; use rewind='init'")
        try:
            models.create(self.model, self.algebra, 10, **self.model_overrides())
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def width_overrides(self) -> dict:
        """``hidden`` as the model's own field: a LeNet's hidden layers, a conv net's dense layers."""
        if not self.hidden:
            return {}
        return {"features" if "features" in models.spec(self.model).kwargs else "dense_features": self.hidden}

    def model_overrides(self) -> dict:
        """Keyword arguments of ``models.create`` for this config."""
        quat = {"quat_init": self.quat_init, "encoding": self.encoding} if self.algebra == "quat" else {}
        return {**self.width_overrides(), **quat}

    def semantic(self) -> dict:
        """The fields that define the experiment, as JSON-able values."""
        d = dataclasses.asdict(self)
        for k in NON_SEMANTIC:
            d.pop(k)
        d["layer_fractions"] = [list(x) for x in d["layer_fractions"]]
        d["hidden"] = list(d["hidden"])
        return d

    def run_name(self) -> str:
        """Readable prefix + hash of the fields that differ from the class defaults.

        Hashing only non-default fields (open_lth's trick) keeps old run names valid when a new
        field with a default is added.
        """
        defaults = Config().semantic()
        changed = {k: v for k, v in self.semantic().items() if v != defaults[k]}
        digest = hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.model}_{self.algebra}_{self.dataset}_{digest}"

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer_fractions"] = [list(x) for x in d["layer_fractions"]]
        d["hidden"] = list(d["hidden"])
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Config":
        d = dict(d)
        d["layer_fractions"] = tuple(tuple(x) for x in d.get("layer_fractions", ()))
        d["hidden"] = tuple(d.get("hidden", ()))
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown config fields {sorted(unknown)}")
        return cls(**d)


def _choice(name: str, value, valid: tuple) -> None:
    if value not in valid:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {list(valid)}")


_REWIND = re.compile(r"^(\d+)(it|ep)$")


def parse_rewind(rewind: str) -> tuple[int, str] | None:
    """None for 'init', else (amount, 'it'|'ep')."""
    if rewind == "init":
        return None
    m = _REWIND.match(rewind)
    if not m:
        raise ConfigError(f"rewind={rewind!r} is not valid; use 'init', '<N>it' (steps) or '<N>ep' (epochs)")
    return int(m.group(1)), m.group(2)
