"""The notebooks: stored without outputs, and each executed top to bottom on its own copy of a small generated
world, with a registry of its own (slow).

No notebook depends on another having run first: notebook 03 registers and promotes quick models when its
registry holds no champions, and its decisions are checked against the engine's answers computed here.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import nbformat
import pytest

from nextbest.features.dataset import Dataset
from nextbest.features.generate import WorldConfig, generate_world
from nextbest.features.pipeline import build_features

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = ("01_explore.ipynb", "02_train_and_compare.ipynb", "03_decisions.ipynb")
CELL_TIMEOUT_S = 300
DECISIONS_STATE = "notebook-service"
"""Notebook 03's state store folder, inside the dataset."""
PRINTED_DECISION = re.compile(
    r"^(?P<customer>\S+) \((?P<label>regular|at risk|forming a need)\): (?P<action>\S+) "
    r"P=(?P<p>[0-9.]+) V=(?P<v>[0-9.]+) L=(?P<lever>[0-9.e+-]+) score=(?P<score>[0-9.]+)",
    re.MULTILINE,
)
"""How notebook 03 prints the first action of each customer's next best action."""


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{name} has no code"
    assert all(c.outputs == [] and c.execution_count is None for c in code), f"{name} holds outputs"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A small world with features built, generated once; each notebook runs on a copy of its own."""
    ds = Dataset.at(tmp_path_factory.mktemp("notebook-world") / "world")
    generate_world(WorldConfig(customers=600, days=120, seed=3), ds)
    build_features(ds)
    return ds.root


@pytest.fixture
def notebook_env(world, tmp_path) -> dict[str, str]:
    """A copy of the world and an empty MLflow registry, both in this test's own directory (the kernel's working
    directory): a notebook sees nothing another one wrote."""
    data = tmp_path / "world"
    shutil.copytree(world, data)
    return {
        "DATA_DIR": str(data),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}",
        "TUNE_TRIALS": "3",
        "PROPENSITY_TRIALS": "2",
        "PROPENSITY_EPOCHS": "5",
        "OPENBLAS_NUM_THREADS": "1",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "cwd": str(tmp_path),
    }


def printed(nb: nbformat.NotebookNode) -> str:
    """Everything the notebook's cells printed."""
    return "".join(
        o.text for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "stream"
    )


def check_training(nb: nbformat.NotebookNode, env: dict[str, str], tmp_path: Path) -> None:
    assert Path(env["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")).exists()


def check_decisions(nb: nbformat.NotebookNode, env: dict[str, str], tmp_path: Path) -> None:
    """Notebook 03 on an empty registry: it registered champions of its own, every decision it prints is the
    engine's answer, its decision log holds the engine's records, and the dashboard shows them."""
    from threadpoolctl import threadpool_limits

    from nextbest.serving import api
    from nextbest.serving.decision_log import DecisionRecord
    from nextbest.serving.engine import Engine, EngineConfig
    from nextbest.serving.state_store import StateStore, default_state_url

    data = Path(env["DATA_DIR"])
    shown = {m["customer"]: m for m in PRINTED_DECISION.finditer(printed(nb))}
    assert {m["label"] for m in shown.values()} == {"regular", "at risk", "forming a need"}, printed(nb)

    # The same question asked of a fresh engine on the notebook's dataset and registry (a state store of its
    # own, so nothing the notebook recorded afterwards changes the answer). One BLAS thread, as the service runs
    # implicit (this process loaded numpy before OPENBLAS_NUM_THREADS could say so).
    with threadpool_limits(1, "blas"):
        engine = Engine.load(
            EngineConfig(
                data=data,
                tracking_uri=env["MLFLOW_TRACKING_URI"],
                model_source="mlflow",
                model_poll_seconds=0,
                state_dir=tmp_path / "check-state",
            )
        )
    try:
        champions = {kind: arms["champion"] for kind, arms in engine.model_versions().items()}
        policy_version = engine.policy.version
        for cid, line in shown.items():
            answer = engine.next_best_action(
                api.NextBestActionRequest(
                    customer_id=cid,
                    channel="web",
                    n=3,
                    explain=True,
                    record_contact=False,
                    context={"now": engine.data.as_of.isoformat()},
                )
            )
            top = answer.actions[0]
            assert top.action_id == line["action"], line[0]
            assert top.propensity == pytest.approx(float(line["p"]), abs=1e-4), line[0]
            assert top.value == pytest.approx(float(line["v"]), abs=1e-2), line[0]
            assert top.score == pytest.approx(float(line["score"]), abs=1e-3), line[0]
    finally:
        engine.close()
    assert champions == {"recommender": "nextbest-recommender/1", "propensity": "nextbest-propensity/1"}

    store = StateStore(default_state_url(data / DECISIONS_STATE), create=False)
    try:
        records = [DecisionRecord.model_validate(r) for r in store.all_decisions()]
        events = store.events_after()
    finally:
        store.close()
    assert len(records) >= 200  # the batch, and the decisions of the contact-limit section
    for r in records:
        assert r.model_versions == champions and r.policy_version == policy_version
        assert r.candidates and r.arm == "champion" and r.decision_id
    assert sorted(e["event_type"] for e in events) == ["add_to_cart", "view"]  # "an event moves the answer"

    page = (data / "dashboard.html").read_text()
    assert 'data-source="model"' in page  # the champion the notebook registered ranks the segments
    assert 'data-table="acceptance"' in page  # the notebook's decisions reached the dashboard


CHECKS: dict[str, Callable[[nbformat.NotebookNode, dict[str, str], Path], None]] = {
    "02_train_and_compare.ipynb": check_training,
    "03_decisions.ipynb": check_decisions,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, notebook_env, tmp_path, monkeypatch, capsys):
    from nbclient import NotebookClient

    for key, value in notebook_env.items():
        if key != "cwd":
            monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        # The kernel runs in the test's directory, so nothing is written into the repository.
        resources={"metadata": {"path": notebook_env["cwd"]}},
    )
    started = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    with capsys.disabled():
        print(f"\n{name}: {time.perf_counter() - started:.1f} s")

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert images, f"{name} drew no plot"
    if name in CHECKS:
        CHECKS[name](nb, notebook_env, tmp_path)
