"""The schema of an IMP experiment: every field with its type, default and help text.

Library functions take a :class:`Config`; only ``experiments/imp.py`` reads flags, one per field
(flag type from the field type, help from the field's metadata; a tuple field's items are read by
:func:`parse_field`). Fields left ``None`` take the
paper's value for the model (Table 1 of the paper) when :func:`qsparse.experiment.resolve` fills
and validates them. Jax-free and importing nothing from qsparse, so the readers of run
directories share this vocabulary with the driver.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing

PROTOCOLS = ("lottery", "paper")
OPTIMIZER_STATES = ("fresh", "carry")
SEARCH_WEIGHTS = ("continue", "rewind")
TICKET_OPTIMIZERS = ("fresh", "search")
CONTROLS = ("none", "reinit", "shuffle")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "warmup_cosine", "step")
OUTPUT_LAYERS = ("auto", "hyper", "real")
BN_FORMS = ("split", "shared", "whiten")
MODEL_DEFAULTS = {
    "optimizer": "adam",
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": 0.0,
    "schedule": "constant",
    "warmup_epochs": 0,
    "prune_fraction": 0.2,
    "pruning": "global",
    "rewind": "init",
    "prune_output": True,
    "output_layer": "real",
    "bn_form": None,
}
"""What a field left at None (``the model's``) resolves to for the paper's models; a model's
recipe (:attr:`qsparse.models.Spec.recipe`) replaces some. Run names hash a field only where it
differs from this value, so the names of runs made before these fields existed hold."""
DATASET_NAMES = ("mnist", "fashion_mnist", "cifar10", "cifar100")

# Fields that do not change results: excluded from the run name's hash and from the check that
# a run directory holds the same experiment.
NON_SEMANTIC = (
    "data_dir",
    "manual_dir",
    "offline",
    "checkpoint_every_secs",
    "eval_batch",
    "log_every",
)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names it and the valid choices."""


def _field(default: typing.Any, help: str) -> typing.Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = _field(
        "lenet300_100",
        "lenet300_100 | lenet12 | conv2 | conv4 | conv6 (the paper's) | resnet20 | resnet18 | "
        "resnet34 | resnet50 | resnet101 | resnet152 (CIFAR ResNets with batch norm)",
    )
    algebra: str = _field(
        "real",
        "real | complex | quat | tessarine | klein4 | phm2 | phm4 | hashed4 (or a registered "
        "algebra of dimension 1, 2 or 4): same real widths, about 1/n of the weights, a real "
        "output layer",
    )
    hidden: tuple[int, ...] = _field(
        (),
        "real widths of the hidden dense layers, e.g. '300,100' (multiples of the algebra's "
        "dimension n; default: the model's)",
    )
    dataset: str | None = _field(
        None,
        "mnist | fashion_mnist | cifar10 | cifar100 (default: the paper's dataset for the model)",
    )
    # pruning
    rounds: int = _field(20, "pruning rounds after the dense round 0")
    prune_fraction: float | None = _field(
        None,
        "fraction of the *remaining* prunable weights removed per round, in (0, 1) (default: "
        "the model's: 0.2; the CIFAR-100 ResNets 0.3)",
    )
    pruning: str | None = _field(
        None,
        "global (one threshold over all layers) | layerwise (the fraction per layer) (default: "
        "the model's: global; the ResNet-18 to -152 recipe layerwise)",
    )
    grouping: str = _field(
        "element",
        "element (each real component, as the paper) | number (whole hypercomplex numbers, by "
        "norm) | quaternion (the same, for algebra quat only)",
    )
    prune_output: bool | None = _field(
        None, "also prune the output layer's weights (default: yes, as the paper; resnet20 no)"
    )
    layer_fractions: tuple[tuple[str, float], ...] = _field(
        (),
        "per-layer fractions as glob=fraction, e.g. 'output/*=0.1' (the output at half rate); "
        "with global pruning those layers leave the global pool",
    )
    rewind: str | None = _field(
        None,
        "init | <N>it | <N>ep: where survivors are reset to (late resetting; default: the "
        "model's: init; resnet20 1ep)",
    )
    protocol: str = _field(
        "lottery",
        "lottery (prune, rewind, retrain) | paper (masks from prune-and-continue training)",
    )
    optimizer_state: str = _field(
        "fresh", "fresh (new optimizer each round) | carry (keep the previous round's state)"
    )
    search_weights: str = _field(
        "continue",
        "protocol paper: the search's weights each round: continue (prune-and-continue, the "
        "paper's) | rewind (restart from the initial weights, keeping the carried optimizer)",
    )
    search_optimizer: str = _field(
        "carry",
        "protocol paper: the search's optimizer: carry (one optimizer across rounds, the paper's "
        "code) | fresh (a new one each round)",
    )
    ticket_optimizer: str = _field(
        "fresh",
        "protocol paper: each ticket's optimizer: fresh | search (the search's state when the "
        "ticket's mask was pruned, as the paper's code reused its one Adam)",
    )
    control: str = _field(
        "none",
        "none | reinit (new random weights) | shuffle (random masks from the initial weights): "
        "with --ticket_run, on the ticket run's masks at every round (Frankle & Carbin's "
        "controls); without, the control's own IMP (new weights / random masks at every round)",
    )
    ticket_run: str | None = _field(
        None,
        "the lottery run directory a control branches from: round L takes its replicate r's "
        "round-L masks (reinit) or their per-layer counts (shuffle)",
    )
    stop_accuracy: float = _field(
        0.0, "stop a replicate after two rounds below this test accuracy (paper: 0.3; 0 = never)"
    )
    # training
    epochs: int | None = _field(None, "epochs per round (default: paper, 40 or 60 or 20)")
    batch_size: int | None = _field(
        None, "global batch size, split over local devices (default: 60)"
    )
    lr: float | None = _field(
        None, "learning rate, the peak of a schedule (default: the model's, e.g. the paper's Adam)"
    )
    optimizer: str | None = _field(
        None, "adam | sgd (default: the model's: adam for the paper's models, sgd for ResNets)"
    )
    momentum: float | None = _field(None, "sgd's momentum (default: 0.9)")
    nesterov: bool | None = _field(None, "sgd with Nesterov momentum (default: the model's)")
    weight_decay: float | None = _field(
        None, "L2 weight decay added to the gradient, as PyTorch's (default: the model's; 0)"
    )
    schedule: str | None = _field(
        None,
        "learning rate schedule: constant | warmup_cosine (linear warm-up, then cosine to 0) | "
        "step (x0.1 at half and at three quarters of the epochs) (default: the model's)",
    )
    warmup_epochs: int | None = _field(None, "warm-up epochs of warmup_cosine (default: model's)")
    quat_init: str = _field(
        "htorch",
        "htorch (the paper's: a kxk conv kernel's fan-in counts k, as hTorch did) | "
        "htorch_consistent (fan-in counts k*k) | parcollet_he | parcollet_glorot | isotropic "
        "(algebra quat only)",
    )
    phm_init: str = _field(
        "zhang", "phm2/phm4: the learned rules start as Zhang et al. draw them | hamilton (phm4)"
    )
    hash_seed: int = _field(0, "hashed4: the seed of the weight tying (every layer, replicate)")
    output_layer: str | None = _field(
        None,
        "ResNets: hyper (a hypercomplex classifier, as the authors') | real | auto (hyper "
        "where the class count is a multiple of n) (default: auto; the paper's models: real)",
    )
    bn_form: str | None = _field(
        None, "ResNets' batch norm: split (the authors') | shared | whiten (default: split)"
    )
    encoding: str = _field(
        "auto",
        "hypercomplex input encoding: auto | flat | rgb_gray | rgb_pure | gray_pure | none",
    )
    seed: int = _field(0, "root seed: init, data order and controls derive from it")
    replicates: int = _field(
        1,
        "independent replicates (seeds derived from --seed), trained together in "
        "one compiled epoch",
    )
    # data
    validation_size: int = _field(0, "examples held out from train as a validation split")
    train_subset: int | None = _field(
        None, "use only this many training examples (for a small CPU run)"
    )
    test_subset: int | None = _field(None, "use only this many test examples")
    eval_every: int = _field(1, "evaluate every N epochs (and always after the last)")
    data_dir: str | None = _field(
        None, "tfds data directory (default $QSPARSE_DATA_DIR or ~/.cache/qsparse/tfds)"
    )
    manual_dir: str | None = _field(
        None, "folder with the original dataset archives (MNIST ships with qsparse)"
    )
    offline: bool = _field(
        False,
        "never download a dataset's absent archives, refuse instead (also when $QSPARSE_OFFLINE "
        "is set; otherwise they are downloaded once)",
    )
    # bookkeeping
    checkpoint_every_secs: float = _field(
        0.0, "checkpoint at most this often within a round (0: every epoch)"
    )
    eval_batch: int = _field(1000, "evaluation batch size")
    log_every: int = _field(1, "print a progress line every N epochs")

    def semantic(self) -> dict:
        """The fields that define the experiment, as JSON-able values."""
        d = self.to_json()
        for k in NON_SEMANTIC:
            d.pop(k)
        return d

    def run_name(self) -> str:
        """Readable prefix + hash of the fields that differ from the class defaults.

        Hashing only non-default fields (open_lth's trick) keeps old run names valid when a new
        field with a default is added.
        """
        defaults = {**Config().semantic(), **MODEL_DEFAULTS}
        changed = {k: v for k, v in self.semantic().items() if v != defaults[k]}
        digest = hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.model}_{self.algebra}_{self.dataset}_{digest}"

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples become lists

    @classmethod
    def from_json(cls, d: dict) -> Config:
        unknown = set(d) - set(field_types())
        if unknown:
            raise ConfigError(f"unknown config fields {sorted(unknown)}")
        return cls(**{k: _tuples(v) if field_types()[k] is tuple else v for k, v in d.items()})


def field_types() -> dict[str, type]:
    """Each field's value type without ``None``: bool, int, float, str or tuple."""
    out = {}
    for name, hint in typing.get_type_hints(Config).items():
        origin = typing.get_origin(hint)
        if origin in (typing.Union, types.UnionType):
            (hint,) = (a for a in typing.get_args(hint) if a is not type(None))
        out[name] = tuple if typing.get_origin(hint) is tuple else hint
    return out


def parse_field(name: str, items: typing.Sequence[str]) -> tuple:
    """A tuple-valued field from the text of its items, as a comma-separated flag gives them."""
    if name not in _ITEM_PARSERS:
        raise ConfigError(f"{name} is not a tuple field; tuple fields: {sorted(_ITEM_PARSERS)}")
    return tuple(_ITEM_PARSERS[name](item) for item in items)


def _width(item: str) -> int:
    try:
        return int(item)
    except ValueError:
        raise ConfigError(
            f"hidden entry {item!r} is not an integer width, e.g. --hidden=300,100"
        ) from None


def _layer_fraction(item: str) -> tuple[str, float]:
    pattern, _, fraction = item.rpartition("=")
    try:
        if pattern:
            return pattern, float(fraction)
    except ValueError:
        pass
    raise ConfigError(
        f"layer_fractions entry {item!r} is not glob=fraction, e.g. --layer_fractions=output/*=0.1"
    )


_ITEM_PARSERS: dict[str, typing.Callable[[str], typing.Any]] = {
    "hidden": _width,
    "layer_fractions": _layer_fraction,
}


def _tuples(v: typing.Any) -> typing.Any:
    return tuple(_tuples(x) for x in v) if isinstance(v, list | tuple) else v


_REWIND = re.compile(r"^(\d+)(it|ep)$")


def parse_rewind(rewind: str) -> tuple[int, str] | None:
    """None for 'init', else (amount, 'it'|'ep')."""
    if rewind == "init":
        return None
    m = _REWIND.match(rewind)
    if not m:
        raise ConfigError(
            f"rewind={rewind!r} is not valid; use 'init', '<N>it' (steps) or '<N>ep' (epochs)"
        )
    return int(m.group(1)), m.group(2)
