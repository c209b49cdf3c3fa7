"""One experiment's setup: its config resolved and validated, its data, model and epoch loop.

Everything here is shared by the replicates and rounds of a run and is decided before anything
is written: a bad value stops the run with a :class:`ConfigError` naming it. The protocols that
use it are :mod:`qsparse.lottery`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from pathlib import Path

import jax
import optax
from jax.experimental import multihost_utils

from qsparse import (
    algebras,
    batchnorm,
    files,
    hyper,
    initializers,
    loop,
    models,
    pruning,
    quaternion,
    resnets,
    rundir,
    train,
)
from qsparse import data as qdata
from qsparse import masks as qmasks
from qsparse.config import (
    BN_FORMS,
    CONTROLS,
    DATASET_NAMES,
    MODEL_DEFAULTS,
    OPTIMIZER_STATES,
    OPTIMIZERS,
    OUTPUT_LAYERS,
    PROTOCOLS,
    SCHEDULES,
    SEARCH_WEIGHTS,
    TICKET_OPTIMIZERS,
    Config,
    ConfigError,
    parse_rewind,
)
from qsparse.cpu import onednn

ENCODINGS = ("auto", "flat", *quaternion.ENCODINGS)


def resolve(config: Config) -> Config:
    """The config with the model's paper defaults filled in, every field validated; raises
    ConfigError naming the bad value and the valid choices."""
    _choice("model", config.model, tuple(models.REGISTRY))
    _choice("algebra", config.algebra, tuple(models.algebra_names()))
    spec = models.spec(config.model)
    config = dataclasses.replace(
        config,
        dataset=config.dataset or spec.dataset,
        epochs=spec.epochs if config.epochs is None else config.epochs,
        batch_size=spec.batch_size if config.batch_size is None else config.batch_size,
        lr=spec.lr if config.lr is None else config.lr,
        layer_fractions=tuple((str(k), float(v)) for k, v in config.layer_fractions),
        hidden=tuple(config.hidden),
    )
    config = model_defaults(config)
    _choice("dataset", config.dataset, DATASET_NAMES)
    config = _check_recipe(config, spec)
    _choice("pruning", config.pruning, pruning.METHODS)
    _choice("grouping", config.grouping, pruning.GROUPINGS)
    _choice("protocol", config.protocol, PROTOCOLS)
    _choice("optimizer_state", config.optimizer_state, OPTIMIZER_STATES)
    _choice("search_weights", config.search_weights, SEARCH_WEIGHTS)
    _choice("search_optimizer", config.search_optimizer, OPTIMIZER_STATES)
    _choice("ticket_optimizer", config.ticket_optimizer, TICKET_OPTIMIZERS)
    _check_search(config)
    _choice("control", config.control, CONTROLS)
    _choice("optimizer", config.optimizer, OPTIMIZERS)
    _choice("quat_init", config.quat_init, tuple(initializers.QUATERNION_INITS))
    _choice("phm_init", config.phm_init, hyper.PHM_INITS)
    _choice("encoding", config.encoding, ENCODINGS)
    _check_algebra_options(config)
    if not 0.0 < config.prune_fraction < 1.0:
        raise ConfigError(f"prune_fraction={config.prune_fraction} must be in (0, 1)")
    for name in ("epochs", "batch_size", "replicates", "eval_every", "eval_batch", "log_every"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name}={getattr(config, name)} must be a positive integer")
    for name in ("rounds", "validation_size", "seed"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name}={getattr(config, name)} must be >= 0")
    for name in ("train_subset", "test_subset"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise ConfigError(
                f"{name}={getattr(config, name)} must be a positive integer (or unset)"
            )
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise ConfigError(f"lr={config.lr} must be a positive number")
    if not 0.0 <= config.stop_accuracy < 1.0:
        raise ConfigError(f"stop_accuracy={config.stop_accuracy} must be in [0, 1)")
    for pattern, fraction in config.layer_fractions:
        if not 0.0 <= fraction < 1.0:
            raise ConfigError(f"layer fraction {fraction} for {pattern!r} must be in [0, 1)")
    if not all(isinstance(w, int) and w > 0 for w in config.hidden):
        raise ConfigError(f"hidden={list(config.hidden)} must be positive integer widths")
    parse_rewind(config.rewind)
    if config.rewind != "init" and config.protocol == "paper":
        raise ConfigError(
            "protocol='paper' always retrains from the initial weights; use rewind='init'"
        )
    config = _check_ticket_run(config)
    try:
        create_model(config, 10)
    except ValueError as e:
        raise ConfigError(
            f"hidden={list(config.hidden)}: {e}" if config.hidden else str(e)
        ) from None
    return config


def _check_algebra_options(config: Config) -> None:
    """Options of one algebra are refused for another rather than ignored; the real baseline
    takes them all (it is run beside each, with the same flags)."""
    for name, value, anyone, owner, instead in (
        ("grouping", config.grouping, ("element", "number"), "quat", "; use grouping='number'"),
        ("quat_init", config.quat_init, ("htorch",), "quat", ""),
        ("phm_init", config.phm_init, ("zhang",), "phm4", ""),
    ):
        if value not in anyone and config.algebra not in ("real", owner):
            raise ConfigError(
                f"{name}={value!r} applies to algebra {owner!r}, not {config.algebra!r}{instead}"
            )


def _check_search(config: Config) -> None:
    """The switches of protocol 'paper's search and tickets: refused elsewhere, and where they
    would make the search the lottery protocol or give a ticket two optimizer states."""
    switched = [
        f"{k}={getattr(config, k)!r}"
        for k, default in (
            ("search_weights", "continue"),
            ("search_optimizer", "carry"),
            ("ticket_optimizer", "fresh"),
        )
        if getattr(config, k) != default
    ]
    if switched and config.protocol != "paper":
        raise ConfigError(f"{', '.join(switched)} apply to protocol='paper' only")
    if config.search_weights == "rewind" and config.search_optimizer == "fresh":
        raise ConfigError(
            "search_weights='rewind' with search_optimizer='fresh' is the lottery protocol; "
            "use protocol='lottery'"
        )
    if config.ticket_optimizer == "search" and config.optimizer_state == "carry":
        raise ConfigError(
            "ticket_optimizer='search' and optimizer_state='carry' both set the tickets' "
            "optimizer state; choose one"
        )


# A control may differ from its ticket run in these fields only.
TICKET_FREE = ("control", "ticket_run", "rounds", "replicates")


def _check_ticket_run(config: Config) -> Config:
    """A control branching from a ticket run: the run must be a finished lottery run (no control)
    of the same experiment but for :data:`TICKET_FREE`. Returns the config with the run's
    absolute path."""
    if config.ticket_run is None:
        return config
    name = f"ticket_run={config.ticket_run!r}"
    if config.control == "none" or config.protocol != "lottery":
        raise ConfigError(f"{name} needs control='reinit' or 'shuffle' and protocol='lottery'")
    ticket_run = rundir.Run(Path(config.ticket_run).resolve())
    if not ticket_run.config.exists():
        raise ConfigError(f"{name} holds no run: {ticket_run.config} does not exist")
    ticket = Config.from_json(rundir.read_json(ticket_run.config))
    if ticket.control != "none" or ticket.protocol != "lottery":
        raise ConfigError(f"{name} is not a lottery run without control: it is {ticket.run_name()}")
    mine, theirs = config.semantic(), ticket.semantic()
    diff = {k: (theirs[k], v) for k, v in mine.items() if k not in TICKET_FREE and v != theirs[k]}
    if diff:
        raise ConfigError(f"{name} is another experiment (ticket vs control: {diff})")
    for field in ("rounds", "replicates"):
        if getattr(config, field) > getattr(ticket, field):
            raise ConfigError(
                f"{field}={getattr(config, field)}: the ticket run {name} has only "
                f"{getattr(ticket, field)}"
            )
    if not ticket_run.summary_json.exists():
        raise ConfigError(
            f"{name} has not finished (no {ticket_run.summary_json}); finish it first"
        )
    return dataclasses.replace(config, ticket_run=str(ticket_run.path))


def _choice(name: str, value, valid: tuple) -> None:
    if value not in valid:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {list(valid)}")


def create_model(config: Config, num_classes: int, algebra: str | None = None, **overrides):
    """The config's model (or its ``algebra`` twin of the same real widths)."""
    algebra = algebra or config.algebra
    widths = {}
    if config.hidden:  # a LeNet's hidden layers, a conv net's dense layers
        name = "features" if "features" in models.spec(config.model).kwargs else "dense_features"
        widths = {name: config.hidden}
    options = {}
    if models.spec(config.model).module is resnets.ResNet:
        options = dict(output=config.output_layer or "auto", bn_form=config.bn_form or "split")
    if algebra != "real":
        options = dict(
            quat_init=config.quat_init,
            encoding=config.encoding,
            phm_init=config.phm_init,
            hash_seed=config.hash_seed,
            **options,
        )
    return models.create(config.model, algebra, num_classes, **widths, **{**options, **overrides})


def model_defaults(config: Config) -> Config:
    """The fields left at None (``the model's``) set to the model's recipe, else to
    :data:`qsparse.config.MODEL_DEFAULTS` (a warm-up keeps its share of the epochs); also how a
    stored config that predates a field reads."""
    spec = models.spec(config.model)
    recipe = {**MODEL_DEFAULTS, **spec.recipe}
    if config.optimizer not in (None, recipe["optimizer"]):  # another optimizer: not its momentum
        recipe.update({k: MODEL_DEFAULTS[k] for k in ("momentum", "nesterov")})
    if config.epochs is not None:  # the recipe's warm-up is that share of its epochs
        recipe["warmup_epochs"] = recipe["warmup_epochs"] * config.epochs // spec.epochs
    unset = {name: recipe[name] for name in MODEL_DEFAULTS if getattr(config, name) is None}
    return dataclasses.replace(config, **unset)


def make_tx(config: Config, steps_per_epoch: int) -> optax.GradientTransformationExtraArgs:
    """The optimizer of a resolved config, its schedule over ``epochs * steps_per_epoch``."""
    return train.make_optimizer(
        config.optimizer,
        config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
        schedule=config.schedule,
        warmup_steps=config.warmup_epochs * steps_per_epoch,
        total_steps=config.epochs * steps_per_epoch,
    )


def _check_recipe(config: Config, spec: models.Spec) -> Config:
    """The optimizer's and the ResNets' fields validated; ``output_layer`` resolved to the
    classifier the model gets (``auto``: ``hyper`` where the class count is a multiple of n)."""
    _choice("schedule", config.schedule, SCHEDULES)
    if not 0.0 <= config.momentum < 1.0:
        raise ConfigError(f"momentum={config.momentum} must be in [0, 1)")
    if not 0.0 <= config.weight_decay < math.inf:
        raise ConfigError(f"weight_decay={config.weight_decay} must be a number >= 0")
    if config.warmup_epochs < 0 or (config.warmup_epochs and config.warmup_epochs >= config.epochs):
        raise ConfigError(
            f"warmup_epochs={config.warmup_epochs} must be in [0, epochs={config.epochs})"
        )
    if config.nesterov and config.optimizer != "sgd":
        raise ConfigError(f"nesterov needs optimizer='sgd', got {config.optimizer!r}")
    if spec.module is not resnets.ResNet:
        for name, allowed in (("output_layer", "real"), ("bn_form", None)):
            if getattr(config, name) != allowed:
                raise ConfigError(
                    f"{name}={getattr(config, name)!r} applies to the ResNets only "
                    f"({', '.join(resnets.LAYOUTS)}); model {config.model} has "
                    + ("a real output layer" if allowed else "no batch norm")
                )
        return config
    _choice("output_layer", config.output_layer, OUTPUT_LAYERS)
    _choice("bn_form", config.bn_form, BN_FORMS)
    if config.hidden:
        raise ConfigError(f"hidden={list(config.hidden)} does not apply to {config.model}")
    try:
        batchnorm.check(config.algebra, config.bn_form, algebras.get(config.algebra).n)
        classes = qdata.DATASETS[config.dataset].num_classes
        output = resnets.output_kind(config.algebra, classes, config.output_layer)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return dataclasses.replace(config, output_layer=output)


def check_writable(path: Path) -> None:
    """Refuse a run directory that cannot be created or written, before anything is."""
    files.check_writable(path, ConfigError, f"the run directory {path}", action="create")


def create_run_dir(run: rundir.Run) -> None:
    """The run directory itself, the run's first write; a ConfigError if the system refuses it
    (what :func:`check_writable` cannot foresee, e.g. a read-only filesystem for root)."""
    if not rundir.is_writer():
        return
    try:
        run.path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the run directory {run.path}: {e.strerror}") from None


def check_run_dir(run: rundir.Run, config: Config) -> None:
    """Refuse a directory that holds another experiment, before anything is written."""
    if not run.config.exists():
        return
    try:
        old = Config.from_json(rundir.read_json(run.config))
    except (TypeError, ValueError) as e:
        raise rundir.CorruptFileError(f"{run.config} does not hold a config: {e}") from None
    try:
        old = resolve(old)  # fields added since it was written take the model's values
    except ConfigError:
        pass  # compared as stored: the difference is reported below
    if old.semantic() != config.semantic():
        diff = {
            k: (v, config.semantic()[k])
            for k, v in old.semantic().items()
            if v != config.semantic()[k]
        }
        raise ConfigError(
            f"{run.path} holds a run with a different config (stored vs requested: {diff}); "
            "use another --workdir or run directory"
        )


class Experiment:
    """Everything shared by the replicates and rounds of one run: data, model, optimizer, the epoch
    loop; built (and validated) before anything is written."""

    def __init__(self, config: Config, run: rundir.Run, log: Callable[[str], None]):
        self.config, self.run, self.log = config, run, log
        try:
            self.dataset = d = _load_dataset(config)
            trainer = train.Trainer(
                train.epoch_spec(d, config.batch_size),
                eval_batch=config.eval_batch,
                replicates=config.replicates,
            )
        except qdata.DatasetUnavailableError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.model = create_model(config, d.num_classes)
        self.input_shape = d.train_images.shape[1:]
        self.param_shapes = self._param_shapes()
        self.stats0 = models.init_batch_stats(self.model, self.input_shape)  # None: no batch norm
        self.tx = make_tx(config, trainer.spec.steps)
        train_data = trainer.put_data(d.train_images, d.train_labels)
        val_data = trainer.put_data(d.val_images, d.val_labels)
        eval_data = {"test": trainer.put_data(d.test_images, d.test_labels)}
        if val_data[0].shape[0]:
            eval_data["val"] = val_data
        self.loop = loop.Loop(
            trainer,
            train_data,
            eval_data,
            epochs=config.epochs,
            eval_every=config.eval_every,
            log_every=config.log_every,
            checkpoint_every_secs=config.checkpoint_every_secs,
            rewind_step=self._rewind_step(trainer.spec.steps),
            log=log,
        )
        self.real_total = models.count_params(
            _shapes(create_model(config, d.num_classes, "real"), self.input_shape)
        )
        self.rule = qmasks.PruneRule(prune_output=config.prune_output)

    def _param_shapes(self):
        """The parameters' shapes; if the input does not fit, a ConfigError naming the encodings
        that do."""
        cfg = self.config
        try:
            return _shapes(self.model, self.input_shape)
        except (ValueError, TypeError) as e:
            message = (
                f"model {cfg.model} ({cfg.algebra}) cannot take {cfg.dataset} images of shape "
                f"{self.input_shape}: {e}"
            )
        if cfg.algebra != "real":
            fitting = []
            for encoding in ENCODINGS:
                try:
                    _shapes(
                        create_model(cfg, self.dataset.num_classes, encoding=encoding),
                        self.input_shape,
                    )
                    fitting.append(encoding)
                except (ValueError, TypeError):
                    pass
            message += f"; encodings that fit: {fitting}"
        raise ConfigError(message)

    def _rewind_step(self, steps: int) -> int:
        rewind = parse_rewind(self.config.rewind)
        if rewind is None:
            return 0
        amount, unit = rewind
        step = amount * steps if unit == "ep" else amount
        total = self.config.epochs * steps
        if step >= total:
            raise ConfigError(
                f"rewind={self.config.rewind} is step {step}, not before the end of training "
                f"({total} steps)"
            )
        return step


def _load_dataset(config: Config) -> qdata.Dataset:
    """The dataset, built by process 0 first: the others then read its cache instead of
    building the same files at the same time."""
    load = functools.partial(
        qdata.load,
        config.dataset,
        data_dir=config.data_dir,
        manual_dir=config.manual_dir,
        offline=config.offline or None,  # not --offline: $QSPARSE_OFFLINE decides
        validation_size=config.validation_size,
        seed=config.seed,
        train_subset=config.train_subset,
        test_subset=config.test_subset,
    )
    dataset = load() if rundir.is_writer() else None
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("qsparse: dataset ready")
    return dataset if dataset is not None else load()


def _shapes(model, input_shape):
    return jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), input_shape))


def record_invocation(run: rundir.Run) -> dict:
    """This invocation's versions, devices and which CPU convolutions run (oneDNN or XLA),
    appended to runs.jsonl."""
    devices = jax.devices()
    entry = rundir.provenance(
        device_kind=devices[0].device_kind,
        platform=devices[0].platform,
        device_count=len(devices),
        process_count=jax.process_count(),
        cpu_conv=onednn.cpu_conv() if devices[0].platform == "cpu" else None,
    )
    rundir.append_invocation(run, entry)
    return entry
