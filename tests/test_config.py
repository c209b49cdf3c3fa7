"""qsparse.config (the schema) and qsparse.experiment.resolve (defaults and validation)."""

import dataclasses
import json

import pytest

from qsparse import experiment, models
from qsparse.config import (
    NON_SEMANTIC,
    Config,
    ConfigError,
    field_types,
    parse_field,
    parse_rewind,
)


def test_every_field_has_help_and_a_flag_type():
    kinds = field_types()
    assert list(kinds) == [f.name for f in dataclasses.fields(Config)]
    assert all(f.metadata["help"].strip() for f in dataclasses.fields(Config))
    assert set(kinds.values()) == {bool, int, float, str, tuple}
    assert (kinds["lr"], kinds["dataset"], kinds["prune_output"], kinds["hidden"]) == (
        float,
        str,
        bool,
        tuple,
    )
    for f in dataclasses.fields(Config):  # a default is of the field's type, or None
        assert f.default is None or isinstance(f.default, kinds[f.name]), f.name


def test_json_round_trip_keeps_tuples():
    config = Config(hidden=(8, 4), layer_fractions=(("output/*", 0.1), ("Dense_0/*", 0.5)), lr=3e-4)
    text = json.dumps(config.to_json())
    assert Config.from_json(json.loads(text)) == config
    assert json.loads(text)["layer_fractions"] == [["output/*", 0.1], ["Dense_0/*", 0.5]]


def test_unknown_field_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"unknown config fields \['depth'\]"):
        Config.from_json({**Config().to_json(), "depth": 3})


def test_run_name_hashes_only_fields_that_change_results():
    base = Config(model="lenet12", algebra="quat", dataset="mnist")
    assert base.run_name().startswith("lenet12_quat_mnist_")
    assert set(base.semantic()) == {f.name for f in dataclasses.fields(Config)} - set(NON_SEMANTIC)
    for name in NON_SEMANTIC:  # bookkeeping does not rename a run
        other = dataclasses.replace(
            base, **{name: 7 if field_types()[name] in (int, float) else "x"}
        )
        assert other.run_name() == base.run_name(), name
    assert dataclasses.replace(base, seed=1).run_name() != base.run_name()
    assert dataclasses.replace(base, hidden=(8,)).run_name() != base.run_name()


@pytest.mark.parametrize(
    "text,parsed", [("init", None), ("500it", (500, "it")), ("2ep", (2, "ep"))]
)
def test_parse_rewind(text, parsed):
    assert parse_rewind(text) == parsed


def test_parse_field_reads_every_tuple_field_from_its_items():
    tuple_fields = sorted(name for name, kind in field_types().items() if kind is tuple)
    assert tuple_fields == ["hidden", "layer_fractions"]
    assert parse_field("hidden", ["300", "100"]) == (300, 100)
    assert parse_field("hidden", []) == ()
    # the glob may hold '=' itself: the fraction is what follows the last one
    assert parse_field("layer_fractions", ["output/*=0.1", "a=b/*=.5"]) == (
        ("output/*", 0.1),
        ("a=b/*", 0.5),
    )
    config = Config(**{name: parse_field(name, []) for name in tuple_fields})
    assert Config.from_json(config.to_json()) == config


@pytest.mark.parametrize(
    "name,items,message",
    [
        ("hidden", ["300", "1e2"], r"hidden entry '1e2' is not an integer width"),
        ("layer_fractions", ["output/*"], r"entry 'output/\*' is not glob=fraction"),
        ("layer_fractions", ["=0.1"], r"entry '=0.1' is not glob=fraction"),
        ("layer_fractions", ["out=x"], r"entry 'out=x' is not glob=fraction"),
        ("model", ["conv4"], r"model is not a tuple field; tuple fields: \['hidden', 'layer_f"),
    ],
)
def test_parse_field_names_the_bad_item(name, items, message):
    with pytest.raises(ConfigError, match=message):
        parse_field(name, items)


def test_resolve_fills_the_papers_values_for_the_model():
    for name, spec in models.REGISTRY.items():
        resolved = experiment.resolve(Config(model=name))
        assert (resolved.dataset, resolved.epochs, resolved.batch_size, resolved.lr) == (
            spec.dataset,
            spec.epochs,
            spec.batch_size,
            spec.lr,
        )
    given = experiment.resolve(Config(model="conv4", epochs=3, lr=0.1, dataset="cifar100"))
    assert (given.epochs, given.lr, given.dataset) == (3, 0.1, "cifar100")
    assert experiment.resolve(given) == given  # idempotent


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(model="conv5"), "model='conv5'.*conv4"),
        (dict(algebra="octonion"), "algebra='octonion'.*'real', 'complex', 'quat'"),
        (dict(algebra="tessarine", grouping="quaternion"), "grouping='quaternion'.*'number'"),
        (
            dict(algebra="complex", quat_init="isotropic"),
            "quat_init='isotropic' applies to algebra 'quat'",
        ),
        (
            dict(algebra="quat", phm_init="hamilton"),
            "phm_init='hamilton' applies to algebra 'phm4'",
        ),
        (dict(dataset="svhn"), "dataset='svhn'.*cifar10"),
        (dict(pruning="random"), "pruning='random'.*'global', 'layerwise'"),
        (dict(grouping="channel"), "grouping='channel'.*'element', 'quaternion'"),
        (dict(protocol="open_lth"), "protocol='open_lth'.*'lottery', 'paper'"),
        (dict(quat_init="zeros"), "quat_init='zeros'.*htorch"),
        (dict(prune_fraction=1.0), r"prune_fraction=1.0 must be in \(0, 1\)"),
        (dict(prune_fraction=0.0), r"prune_fraction=0.0 must be in \(0, 1\)"),
        (dict(epochs=0), "epochs=0 must be a positive integer"),
        (dict(batch_size=-5), "batch_size=-5 must be a positive integer"),
        (dict(lr=float("nan")), "lr=nan must be a positive number"),
        (dict(rewind="late"), "rewind='late'"),
        (
            dict(rewind="2ep", protocol="paper"),
            "protocol='paper' always retrains from the initial weights",
        ),
        (dict(search_optimizer="fresh"), "search_optimizer='fresh' apply to protocol='paper'"),
        (
            dict(protocol="paper", search_weights="rewind", search_optimizer="fresh"),
            "is the lottery protocol",
        ),
        (
            dict(protocol="paper", ticket_optimizer="search", optimizer_state="carry"),
            "choose one",
        ),
        (dict(algebra="quat", hidden=(6,)), r"hidden=\[6\]: .*multiples of 4"),
        (dict(algebra="quat", model="lenet12", encoding="rgb"), "encoding='rgb'"),
    ],
)
def test_resolve_refuses_bad_values_naming_them(overrides, match):
    with pytest.raises(ConfigError, match=match):
        experiment.resolve(Config(**overrides))
