"""notebooks/inspect_masks.ipynb runs top to bottom on two tiny real runs (element and quaternion
grouping)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from qsparse import lottery, results
from qsparse.config import Config

pytestmark = (
    pytest.mark.subprocess
)  # starts Python processes: skipped by a quick run (-m "not subprocess")

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "inspect_masks.ipynb"


def test_notebook_is_saved_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_notebook_runs_on_tiny_runs(mnist_dir, tmp_path, monkeypatch):
    runs = {}
    for grouping in ("element", "quaternion"):
        config = Config(
            model="lenet12",
            algebra="quat",
            grouping=grouping,
            rounds=2,
            epochs=1,
            train_subset=300,
            test_subset=100,
            data_dir=str(mnist_dir),
        )
        runs[grouping] = lottery.run(config, tmp_path, log=lambda s: None)
    curves = results.load(
        runs.values()
    )  # one curve per run: no per-round value is taken for a config field
    assert [c.config["grouping"] for c in curves] == ["element", "quaternion"]
    assert all(c.rounds.tolist() == [0, 1, 2] and c.n.tolist() == [1, 1, 1] for c in curves)
    # what the notebook's grouping comparison shows, checked on the real masks
    assert results.quaternion_summary(runs["quaternion"])[-1]["partial"] == 0.0
    assert results.quaternion_summary(runs["element"])[-1]["partial"] > 0.0

    monkeypatch.setenv("QSPARSE_RUN_DIR", str(runs["element"]))
    monkeypatch.setenv("QSPARSE_COMPARE_DIR", str(runs["quaternion"]))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb,
        kernel_name="python3",
        timeout=120,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 5  # layer densities, heat map, components, grouping comparison, accuracy
    text = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "Q (grouping=element)" in text and "Q (grouping=quaternion)" in text
