"""The command line: --json summaries as the last line, one-line user errors with exit status 2, internal
errors with exit status 1 and where they came from, and the main job as a plain function."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from nextbest.features.errors import NextbestError
from nextbest.serving.cli import main
from nextbest.serving.engine_config import RECOMMENDER_MODEL


def _last_json(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def test_features_build_json_summary(tiny_dataset, capsys):
    config = tiny_dataset.root / "f.json"
    config.write_text(json.dumps({"validation_days": 3, "test_days": 3}))
    assert (
        main(
            [
                "features",
                "build",
                "--data",
                str(tiny_dataset.root),
                "--config",
                str(config),
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    summary = _last_json(capsys)
    assert summary["command"] == "features build"
    assert summary["row_counts"]["interaction_customers"] == 4  # C1, C2, C4 and the unlinked web:W9
    assert summary["splits"]["test_start"] == "2026-02-28T00:00:00"  # last event 2026-03-02; three test days


def test_forget_json_summary(tiny_dataset, capsys):
    assert main(["forget", "C2", "--data", str(tiny_dataset.root), "--json", "--quiet"]) == 0
    summary = _last_json(capsys)
    assert summary["ids_erased"] == 2  # C2 and crm:C2
    assert summary["rows_removed"]["raw/events.parquet"] == 3
    assert "C2" not in tiny_dataset.read("events")["customer_id"].to_list()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["features", "build", "--data", "{root}/nowhere"], "is not a nextbest dataset (no raw/ folder)"),
        (["features", "build", "--data", "{root}", "--config", "{root}/missing.json"], "config file"),
        (["features", "build", "--data", "{root}", "--config", "{root}/bad.json"], "retention_days"),
        (["features", "build", "--data", "{root}", "--config", "{root}"], "is not a file"),
        (["data", "generate", "--out", "{root}/bad.json"], "is a file, not a dataset folder"),
        (["tune", "cf", "--data", "{root}", "--metric", "nonsense"], "unknown metric 'nonsense'"),
        (
            ["tune", "cf", "--data", "{root}", "--storage", "bogus://x"],
            "--storage bogus://x is not a database",
        ),
        (["report", "decisions", "--data", "{root}", "--window-days", "nan"], "--window-days must be"),
        (
            [
                "data",
                "import",
                "events",
                "{root}/no.csv",
                "--map",
                "customer_id=u,item_id=i,timestamp=t",
                "--event-type",
                "purchase",
            ],
            "no.csv does not exist",
        ),
    ],
)
def test_user_errors_are_one_line_with_exit_2(tiny_dataset, capsys, argv, message):
    (tiny_dataset.root / "bad.json").write_text(json.dumps({"retention_days": -3}))
    argv = [a.format(root=tiny_dataset.root) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nextbest: error: ") and message in err[0]


def test_a_dataset_without_events_is_a_user_error(tiny_dataset, capsys):
    # An import whose every row was quarantined leaves an events table with no rows.
    events = tiny_dataset.read("events")
    tiny_dataset.write_table("events", events.clear())
    assert main(["features", "build", "--data", str(tiny_dataset.root)]) == 2
    assert capsys.readouterr().err.strip() == "nextbest: error: the dataset has no events"


def _line_of(function, text: str) -> int:
    """The line number of the one line of ``function``'s source holding ``text``."""
    lines, first = inspect.getsourcelines(function)
    (offset,) = [i for i, line in enumerate(lines) if text in line]
    return first + offset


def _broken_build(exc: Exception):
    def build_features(*args, **kwargs):
        if isinstance(exc, KeyError):
            return {}  # the command then fails in our code, reading a key the manifest lacks
        raise exc

    return build_features


@pytest.mark.parametrize(
    ("exc", "headline", "raised_at"),
    [
        # A bug in the command itself: the frame that raised.
        (KeyError("row_counts"), "KeyError: 'row_counts'", 'rc = manifest["row_counts"]'),
        # A bug below it, outside our code: the innermost frame of ours, the call.
        (ValueError("boom"), "ValueError: boom", "manifest = build_features("),
    ],
)
def test_an_internal_error_exits_1_and_says_where_it_came_from(
    tiny_dataset, capsys, monkeypatch, exc, headline, raised_at
):
    from nextbest.serving.cli import data

    monkeypatch.delenv("NEXTBEST_DEBUG", raising=False)
    monkeypatch.setattr("nextbest.features.pipeline.build_features", _broken_build(exc))
    assert main(["features", "build", "--data", str(tiny_dataset.root), "--quiet"]) == 1
    err = capsys.readouterr().err
    line = _line_of(data.cmd_features_build, raised_at)
    assert err.splitlines() == [
        f"nextbest: internal error (a bug, please report it): {headline}",
        f"  at serving/cli/data.py:{line} in cmd_features_build",
        "  (NEXTBEST_DEBUG=1 shows the whole traceback)",
    ]
    assert "Traceback" not in err


def test_nextbest_debug_raises_internal_and_user_errors(tiny_dataset, monkeypatch):
    monkeypatch.setenv("NEXTBEST_DEBUG", "1")
    monkeypatch.setattr("nextbest.features.pipeline.build_features", _broken_build(KeyError("row_counts")))
    with pytest.raises(KeyError, match="row_counts"):
        main(["features", "build", "--data", str(tiny_dataset.root), "--quiet"])
    with pytest.raises(NextbestError, match="is not a nextbest dataset"):
        main(["features", "build", "--data", str(tiny_dataset.root / "nowhere")])


def _named_errors() -> list[tuple[str, str]]:
    """(module, class) of every ``class …Error`` defined at the top of a module of features/, training/ and
    serving/ (the command line's package included)."""
    import nextbest.features

    root = Path(next(iter(nextbest.features.__path__))).parent
    found = []
    for package in ("features", "training", "serving"):
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            module = ".".join(("nextbest", *path.relative_to(root).with_suffix("").parts))
            found += [
                (module, n.name)
                for n in tree.body
                if isinstance(n, ast.ClassDef) and n.name.endswith("Error")
            ]
    return found


def test_every_named_error_is_a_nextbest_error_except_the_services_http_error():
    named = _named_errors()
    assert len(named) >= 35 and ("nextbest.serving.cli.common", "UsageError") in named
    not_ours = [
        f"{module}.{name}"
        for module, name in named
        if not issubclass(getattr(importlib.import_module(module), name), NextbestError)
    ]
    # ServiceError is the engine's HTTP error (its subclasses carry a status code), not a command-line error.
    assert not_ours == ["nextbest.serving.engine_config.ServiceError"]


def test_named_errors_keep_their_old_base():
    from nextbest.features.dataset import DatasetError
    from nextbest.features.schema import SchemaError
    from nextbest.serving.state_store import StateStoreError

    assert issubclass(SchemaError, ValueError) and issubclass(DatasetError, FileNotFoundError)
    assert issubclass(StateStoreError, RuntimeError)


def test_the_main_job_is_a_plain_function(tiny_dataset, capsys):
    from nextbest.serving.cli.run import RunConfig, RunReport, run_main_job

    config = RunConfig(data=tiny_dataset.root, train=False)
    assert RunConfig.model_validate_json(config.model_dump_json()) == config
    said: list[str] = []
    report = run_main_job(config, progress=False, say=said.append)
    assert isinstance(report, RunReport) and said == []  # the dataset has events: nothing generated
    summary = report.to_dict()
    assert list(summary) == ["command", "data", "features"]
    assert summary["features"]["row_counts"]["interaction_customers"] == 4
    assert report.lines()[0] == f"dataset: {tiny_dataset.root}"
    # `nextbest run` prints the same summary.
    argv = ["run", "--data", str(tiny_dataset.root), "--skip-training", "--json", "--quiet"]
    assert main(argv) == 0
    assert _last_json(capsys) == json.loads(json.dumps(summary, default=str))


@pytest.mark.slow  # a subprocess
def test_console_script_runs_as_a_program(tiny_dataset):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nextbest.serving.cli",
            "features",
            "build",
            "--data",
            str(tiny_dataset.root / "nope"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "is not a nextbest dataset" in proc.stderr


@pytest.mark.slow  # the whole pipeline through the CLI
def test_generate_build_train_and_promote_through_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = str(tmp_path / "world")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert (
        main(["data", "generate", "--customers", "300", "--days", "120", "--out", data, "--json", "--quiet"])
        == 0
    )
    generated = _last_json(capsys)
    assert generated["tables"]["customers"]["rows"] == 300
    assert main(["features", "build", "--data", data, "--json", "--quiet"]) == 0
    assert _last_json(capsys)["row_counts"]["profiles"] > 0
    assert (
        main(["train", "cf", "--data", data, "--model", "repeat", "--tracking-uri", uri, "--json", "--quiet"])
        == 0
    )
    trained = _last_json(capsys)
    # What the command prints is what the version's MLflow run logged (the model's quality is tested elsewhere,
    # on planted ground truth; here, that repeat beats popularity decides the promotions below).
    client = MlflowClient(uri, uri)
    logged = client.get_run(
        client.get_model_version(RECOMMENDER_MODEL, trained["version"]).run_id
    ).data.metrics
    for name in ("precision_at_10", "recall_at_20", "ndcg_at_10", "map_at_10", "new_ndcg_at_10"):
        assert trained[name] == pytest.approx(logged[name]), name
    assert trained["version"] == "1" and trained["alias"] == "challenger"
    assert main(["promote", "recommender", "--tracking-uri", uri, "--json", "--quiet", "--no-bento"]) == 0
    first = _last_json(capsys)
    assert first["promoted"] is True and first["challenger_version"] == "1"
    assert (
        main(
            [
                "train",
                "cf",
                "--data",
                data,
                "--model",
                "popularity",
                "--tracking-uri",
                uri,
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    assert main(["promote", "recommender", "--tracking-uri", uri, "--json", "--quiet", "--no-bento"]) == 0
    second = _last_json(capsys)
    assert second["promoted"] is False and "does not beat" in second["reason"]


@pytest.mark.slow  # trains and registers through the CLI
def test_train_and_promote_propensity_through_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = str(tmp_path / "world")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["data", "generate", "--customers", "400", "--days", "120", "--out", data, "--quiet"]) == 0
    assert main(["features", "build", "--data", data, "--quiet"]) == 0
    capsys.readouterr()
    config = tmp_path / "p.json"
    config.write_text(json.dumps({"epochs": 3}))
    argv = [
        "train",
        "propensity",
        "--data",
        data,
        "--config",
        str(config),
        "--tracking-uri",
        uri,
        "--json",
        "--quiet",
    ]
    assert main(argv) == 0
    trained = _last_json(capsys)
    for key in ("auc", "log_loss", "brier", "ece", "baseline_auc_logreg", "oracle_auc"):
        assert isinstance(trained[key], float), key
    assert 0.5 < trained["oracle_auc"] <= 1.0 and trained["version"] == "1"
    flags = ["--json", "--quiet", "--no-bento"]
    assert main(["promote", "propensity", "--data", data, "--tracking-uri", uri, *flags]) == 0
    assert _last_json(capsys)["promoted"] is True


def test_report_decisions_counts_acceptance_by_arm_and_action(tmp_path, capsys, monkeypatch):
    from datetime import datetime, timedelta

    from nextbest.serving.contact import ContactLedger
    from nextbest.serving.decision_log import DecisionLog
    from nextbest.serving.state_store import StateStore, default_state_url
    from tests.test_decision_log import POLICY, record

    monkeypatch.delenv("NEXTBEST_STATE_URL", raising=False)
    state = tmp_path / "service"
    url = default_state_url(state)
    store = StateStore(url)
    t0 = datetime(2026, 3, 1, 9)
    log = DecisionLog(store)
    log.append(record("C1", "champion", "a", t0))
    log.append(record("C2", "champion", "a", t0))
    log.append(record("C3", "challenger", "b", t0))
    ledger = ContactLedger(store, POLICY)
    ledger.record_response("C1", "a", True, t0 + timedelta(days=1))  # accepted within the window
    ledger.record_response("C2", "a", True, t0 + timedelta(days=30))  # too late
    ledger.record_response("C3", "b", False, t0 + timedelta(hours=1))  # a rejection
    store.close()

    def check(rows):
        rows = {(r["arm"], r["action_id"]): r for r in rows}
        assert rows[("champion", "a")]["decisions"] == 2 and rows[("champion", "a")]["accepted"] == 1
        assert rows[("champion", "a")]["acceptance_rate"] == 0.5
        assert rows[("challenger", "b")]["accepted"] == 0

    # The store in STATE_DIR/state.db, one named by --state-url, or by NEXTBEST_STATE_URL.
    assert main(["report", "decisions", "--state-dir", str(state), "--json", "--quiet"]) == 0
    check(_last_json(capsys)["rows"])
    # The URL wins over the store of the state directory (an empty one here).
    elsewhere = tmp_path / "other"
    StateStore(default_state_url(elsewhere)).close()
    assert (
        main(["report", "decisions", "--state-dir", str(elsewhere), "--state-url", url, "--json", "--quiet"])
        == 0
    )
    check(_last_json(capsys)["rows"])
    monkeypatch.setenv("NEXTBEST_STATE_URL", url)
    assert main(["report", "decisions", "--state-dir", str(elsewhere), "--json", "--quiet"]) == 0
    check(_last_json(capsys)["rows"])
    monkeypatch.delenv("NEXTBEST_STATE_URL")
    assert main(["report", "decisions", "--state-dir", str(elsewhere), "--json", "--quiet"]) == 0
    assert _last_json(capsys)["rows"] == []
    # No store: a usage error, and none is created.
    assert main(["report", "decisions", "--state-dir", str(tmp_path / "none")]) == 2
    assert not (tmp_path / "none").exists()
