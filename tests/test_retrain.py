"""``nextbest retrain``: what the service saw is folded into the dataset once (validated, erasure-checked), the
features are swapped in whole, one retrain runs at a time, and the challengers are refit on all data, tagged with
the data they saw and promoted only through the gate."""

from __future__ import annotations

import json
import shutil
import threading
import uuid
from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from nextbest.features.dataset import write_parquet_atomic
from nextbest.features.dataset_lock import (
    DatasetLock,
    RetrainLockedError,
    build_features_atomically,
    erase_customers_atomically,
)
from nextbest.features.live_exposures import exposures_from_decisions
from nextbest.features.live_fold import (
    FoldState,
    features_watermark,
    read_fold_state,
    roll_back_pending,
    scrub_parts,
    write_fold_state,
)
from nextbest.features.privacy import erased_digests, erasure_key, id_digest, log_erasure
from nextbest.serving.retrain import fold_service_data, retrain
from nextbest.serving.state_store import StateStore, default_state_url, store_key
from tests.conftest import T0, write

LAST_DAY = 61.0
"""After the tiny dataset's last event (day 60)."""


def open_store(folder) -> StateStore:
    folder.mkdir(parents=True, exist_ok=True)
    return StateStore(default_state_url(folder))


def live(customer: str, item: str, event_type: str = "view", day: float = LAST_DAY, **kw) -> dict:
    return {
        "customer_id": customer,
        "item_id": item,
        "event_type": event_type,
        "timestamp": T0 + timedelta(days=day),
        "session_id": None,
        "channel": "web",
        "quantity": 1 if event_type == "purchase" else None,
        "price": 10.0 if event_type == "purchase" else None,
        **kw,
    }


def decision(decision_id: str, customer: str, chosen: str | None, day: float, channel: str = "web") -> dict:
    return {
        "decision_id": decision_id,
        "customer_id": customer,
        "timestamp": (T0 + timedelta(days=day)).isoformat(),
        "channel": channel,
        "arm": "champion",
        "chosen": chosen,
        "chosen_kind": None if chosen is None else "discount",
    }


def response(decision_id: str, customer: str, action: str, kind: str, day: float) -> dict:
    return {
        "response_id": f"{decision_id}-{kind}",
        "decision_id": decision_id,
        "customer_id": customer,
        "action_id": action,
        "kind": kind,
        "value": None,
        "timestamp": T0 + timedelta(days=day),
        "channel": "web",
    }


# --- events --------------------------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def store_urls(request, tmp_path) -> list[str]:
    """Two empty stores of one kind: the embedded SQLite file, or databases on a real PostgreSQL."""
    if request.param == "sqlite":
        return [open_store(tmp_path / name).url for name in ("state", "other")]
    postgres = request.getfixturevalue("postgres")
    return [postgres.database(f"retrain_{uuid.uuid4().hex[:12]}") for _ in range(2)]


def test_live_events_are_folded_once_and_deduplicated_by_event_id(tiny_dataset, store_urls):
    ds = tiny_dataset
    before = ds.read("events").height
    store = StateStore(store_urls[0])
    store.append_events([live("C1", "I3"), live("C2", "I1", "purchase")], ["e1", "e2"])

    first = fold_service_data(ds, store)
    assert first["events"] | {"quarantine_reasons": None} == {
        "rows_in": 2,
        "folded": 2,
        "quarantined": 0,
        "duplicates": 0,
        "erased": 0,
        "quarantine_reasons": None,
    }
    assert first["parts"] == {"events": "raw/events-00000.parquet"}
    events = ds.read("events")
    assert events.height == before + 2
    folded = pl.read_parquet(ds.root / first["parts"]["events"])
    assert folded.select("customer_id", "item_id", "event_type").rows() == [
        ("C1", "I3", "view"),
        ("C2", "I1", "purchase"),
    ]
    assert folded["source_system"].null_count() == 2  # ids arrive resolved

    second = fold_service_data(ds, store)
    assert second["events"]["rows_in"] == 0 and second["parts"] == {}
    assert ds.read("events").height == before + 2

    store.append_events([live("C1", "I4", day=62), live("C1", "I3")], ["e3", "e1"])  # e1 again: a retry
    third = fold_service_data(ds, store)
    assert third["events"]["folded"] == 1 and third["parts"] == {"events": "raw/events-00001.parquet"}

    # Another store (a move to PostgreSQL, say) holding e1 again: what earlier folds took is skipped by id.
    other = StateStore(store_urls[1])
    other.append_events([live("C1", "I3"), live("C4", "I2", day=63)], ["e1", "e4"])
    moved = fold_service_data(ds, other)
    assert (moved["events"]["folded"], moved["events"]["duplicates"]) == (1, 1)
    assert ds.read("events").height == before + 4
    assert len(read_fold_state(ds).watermarks) == 2


def test_the_service_replays_only_the_events_the_rebuilt_features_do_not_count(tiny_dataset, tmp_path):
    ds = tiny_dataset
    store = open_store(tmp_path / "state")
    key = store_key(store.url)
    store.append_events([live("C1", "I3"), live("C2", "I1", "purchase")], ["e1", "e2"])
    first = build_features_atomically(ds)
    assert features_watermark(ds, key, first["built_at"]) == 0  # nothing folded yet: replay everything

    fold_service_data(ds, store)
    # Folded, but the features are still the old ones (a retrain that stopped after folding): replay everything.
    assert features_watermark(ds, key, first["built_at"]) == 0
    store.append_events([live("C1", "I4", day=62)], ["e3"])  # arrives while the features build
    rebuilt = build_features_atomically(ds)
    watermark = features_watermark(ds, key, rebuilt["built_at"])
    assert watermark > 0
    stored = {r["event_id"]: r["seq"] for r in store.snapshot()[1]}
    assert store.events_through(watermark) == {stored["e1"], stored["e2"]}  # e3 is still live only
    assert features_watermark(ds, "sqlite:///elsewhere.db", rebuilt["built_at"]) == 0


def test_an_invalid_live_event_is_quarantined_with_its_reason_and_only_once(tiny_dataset, tmp_path):
    ds = tiny_dataset
    store = open_store(tmp_path / "state")
    store.append_events(
        [live("C1", "I1", "purchse"), live("C2", "I2", "purchase", price=-5.0), live("C3", "I1")],
        ["bad-1", "bad-2", "good-1"],
    )
    report = fold_service_data(ds, store)
    assert (report["events"]["folded"], report["events"]["quarantined"]) == (1, 2)
    assert report["events"]["quarantine_reasons"] == {
        "event_type 'purchse' is not one of view, click, add_to_cart, purchase": 1,
        "price '-5.0' is below 0": 1,
    }
    quarantine = pl.read_parquet(ds.quarantine_path("events")).sort("event_id")
    assert quarantine["reason"].to_list() == [
        "state store event 'bad-1' (seq 1): event_type 'purchse' is not one of view, click, add_to_cart, purchase",
        "state store event 'bad-2' (seq 2): price '-5.0' is below 0",
    ]
    assert set(quarantine.columns) >= {"customer_id", "event_type", "row", "source", "reason", "event_id"}
    fold_service_data(ds, store)
    assert pl.read_parquet(ds.quarantine_path("events")).height == 2


def test_events_of_erased_customers_are_never_folded(tiny_dataset, tmp_path):
    ds = tiny_dataset
    store = open_store(tmp_path / "state")
    log_erasure(ds, ["C2"])  # erased from the dataset (nextbest forget)
    store.forget(["C4"], [id_digest("C4", erasure_key(create=True))])  # erased through the service
    store.append_events(
        [live("C1", "I1"), live("C2", "I2"), live("C4", "I3")], ["e1", "e2", "e3"]
    )  # C2's and C4's arrived anyway (a replica that had not heard yet)
    report = fold_service_data(ds, store)
    assert (report["events"]["folded"], report["events"]["erased"]) == (1, 2)
    folded = pl.read_parquet(ds.root / report["parts"]["events"])
    assert folded["customer_id"].to_list() == ["C1"]


def test_an_erasure_that_lands_during_a_fold_is_scrubbed_from_its_new_part(tiny_dataset, tmp_path):
    ds = tiny_dataset
    store = open_store(tmp_path / "state")
    store.append_events([live("C1", "I1"), live("C3", "I2")], ["e1", "e2"])
    part = fold_service_data(ds, store)["parts"]["events"]
    log_erasure(ds, ["C3"])  # after the rows were read and written
    assert scrub_parts(ds, [part], erased_digests(ds)) == 1
    assert pl.read_parquet(ds.root / part)["customer_id"].to_list() == ["C1"]


# --- exposures -----------------------------------------------------------------------------------------------


def test_exposures_follow_the_responses_rule_on_a_known_answer():
    now = T0 + timedelta(days=20)
    rows = [  # id, customer, chosen, days before now, channel
        ("D1", "C1", "A", 1, "web"),  # shown, accepted → responded
        ("D2", "C1", "B", 1, "web"),  # shown only, within the window → waits
        ("D3", "C2", "A", 1, "web"),  # dismissed → not responded
        ("D4", "C2", "A", 10, "web"),  # no response, window over → not shown
        ("D5", "C3", None, 1, "web"),  # nothing chosen
        ("D6", "C3", "B", 8, "web"),  # shown only, window over → not responded
        ("D7", "C4", "A", 2, "app"),  # converted (no "shown" logged) → responded
        ("D8", "C4", "B", 9, "email"),  # delivered by its channel, no response → not responded
    ]
    decisions = pl.DataFrame(
        [
            {
                "decision_id": d,
                "customer_id": c,
                "timestamp": now - timedelta(days=ago),
                "channel": ch,
                "chosen": a,
                "chosen_kind": "discount" if a else None,
            }
            for d, c, a, ago, ch in rows
        ]
    )
    responses = pl.DataFrame(
        [
            response(d, c, a, k, 19)
            for d, c, a, k in [
                ("D1", "C1", "A", "shown"),
                ("D1", "C1", "A", "accepted"),
                ("D1", "C1", "B", "accepted"),  # another action than the chosen one: ignored
                ("D2", "C1", "B", "shown"),
                ("D3", "C2", "A", "shown"),
                ("D3", "C2", "A", "dismissed"),
                ("D3", "C9", "A", "accepted"),  # another customer: ignored
                ("D6", "C3", "B", "shown"),
                ("D7", "C4", "A", "converted"),
            ]
        ]
    )
    split = exposures_from_decisions(
        decisions, responses, as_of=now, window=timedelta(days=7), delivered_channels={"email"}
    )
    got = split.exposures.sort("exposure_id").select("exposure_id", "action_id", "channel", "responded")
    assert got.rows() == [
        ("D1", "A", "web", True),
        ("D3", "A", "web", False),
        ("D6", "B", "web", False),
        ("D7", "A", "app", True),
        ("D8", "B", "email", False),
    ]
    assert (split.pending, split.not_shown, split.no_choice, split.responses_ignored) == (1, 1, 1, 2)
    # When each outcome became known: the final response, else the end of the window.
    known = dict(split.exposures.select("exposure_id", "responded_at").rows())
    assert known["D1"] == known["D3"] == known["D7"] == T0 + timedelta(days=19)
    assert known["D6"] == now - timedelta(days=8) + timedelta(days=7)


def test_decisions_and_responses_in_the_store_become_exposures_once(tiny_dataset, tmp_path):
    ds = tiny_dataset
    write(
        ds,
        "action_catalog",
        pl.DataFrame({"action_id": ["A", "B"], "kind": ["discount", "discount"], "value": [5.0, 3.0]}),
    )
    store = open_store(tmp_path / "state")
    for d in [
        decision("D1", "C1", "A", 61),
        decision("D2", "C2", "B", 61),
        decision("D3", "C4", "A", 61),
        decision("D4", "C1", "Z", 61),  # an action the catalogue does not know
    ]:
        store.add_decision(d)
    for r in [
        response("D1", "C1", "A", "shown", 61.1),
        response("D1", "C1", "A", "accepted", 61.2),
        response("D2", "C2", "B", "shown", 61.1),  # waits: no final response, window not over
        response("D3", "C4", "A", "dismissed", 61.3),
        response("D4", "C1", "Z", "accepted", 61.3),
    ]:
        assert store.add_response(r)
    first = fold_service_data(ds, store)
    ex = first["exposures"]
    assert (ex["folded"], ex["quarantined"], ex["pending"]) == (2, 1, 1)
    assert ex["quarantine_reasons"] == {"action_id 'Z' is not in the action catalogue": 1}
    actions = ds.read("actions").sort("exposure_id")
    assert actions.select("exposure_id", "customer_id", "action_id", "responded").rows() == [
        ("D1", "C1", "A", True),
        ("D3", "C4", "A", False),
    ]
    assert pl.read_parquet(ds.quarantine_path("actions"))["reason"].to_list() == [
        "decision log decision 'D4': action_id 'Z' is not in the action catalogue"
    ]

    assert fold_service_data(ds, store)["exposures"]["folded"] == 0  # nothing twice
    store.add_response(response("D2", "C2", "B", "converted", 62))
    third = fold_service_data(ds, store)
    assert third["exposures"]["folded"] == 1
    assert ds.read("actions").filter(pl.col("exposure_id") == "D2")["responded"].to_list() == [True]
    assert ds.read("actions").height == 3


# --- safety --------------------------------------------------------------------------------------------------


def test_the_lock_refuses_a_second_concurrent_retrain(tiny_dataset, tmp_path):
    store = open_store(tmp_path / "state")
    with (
        DatasetLock(tiny_dataset, "retrain"),
        pytest.raises(RetrainLockedError, match=r"another retrain of .* is running \(pid \d+"),
    ):
        retrain(tiny_dataset, store, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert not tiny_dataset.has_table("actions")  # it did nothing
    with DatasetLock(tiny_dataset):  # free again
        pass


def test_nothing_new_to_fold_leaves_features_and_models_alone(tiny_dataset, tmp_path):
    report = retrain(tiny_dataset, open_store(tmp_path / "state"), tracking_uri=f"sqlite:///{tmp_path}/m.db")
    assert report.skipped is not None and "nothing new" in report.skipped
    assert report.models == {} and not tiny_dataset.features_dir.exists()
    assert not (tmp_path / "m.db").exists()


def test_features_are_built_beside_the_live_ones_and_swapped_in_whole(tiny_dataset):
    ds = tiny_dataset
    first = build_features_atomically(ds)
    assert first["dataset"] == str(ds.root) and ds.read_manifest()["as_of"] == first["as_of"]
    (ds.features_dir / "stale.txt").write_text("from the build before")
    second = build_features_atomically(ds)
    assert not (ds.features_dir / "stale.txt").exists()  # a whole new folder, not files over the old ones
    assert second["row_counts"] == first["row_counts"]
    assert sorted(p.name for p in ds.root.iterdir() if p.name.startswith(".features")) == []


def test_writers_of_one_file_at_the_same_moment_never_leave_half_a_file(tmp_path):
    """Two processes (here threads) writing one file each finish their own temporary file; the last rename
    wins whole, a reader never meets half a file, and no temporary file is left."""
    path = tmp_path / "profiles.parquet"
    frames = [pl.DataFrame({"customer_id": [f"{w}-{i}" for i in range(20_000)]}) for w in "AB"]
    write_parquet_atomic(frames[0], path)
    failures: list[BaseException] = []
    stop = threading.Event()

    def writer(df: pl.DataFrame) -> None:
        try:
            for _ in range(25):
                write_parquet_atomic(df, path)
        except BaseException as e:  # reported by the assertion below
            failures.append(e)

    def reader() -> None:
        while not stop.is_set():
            try:
                first = pl.read_parquet(path)["customer_id"][0]
                assert first in ("A-0", "B-0")
            except BaseException as e:  # reported by the assertion below
                failures.append(e)
                return

    threads = [threading.Thread(target=writer, args=(df,)) for df in frames]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert failures == []
    assert pl.read_parquet(path).height == 20_000
    assert [p.name for p in tmp_path.iterdir()] == ["profiles.parquet"]


def test_two_workers_erasing_one_dataset_at_once_lose_neither_erasure(tiny_dataset):
    """The workers and replicas of one service share the dataset: their erasures and a retrain's feature build
    wait for each other (the write lock), so both customers are gone from every file and the features, the build
    never reads a file replaced under it, and nothing is left in the dataset's folder."""
    ds = tiny_dataset
    build_features_atomically(ds)
    reports: dict[str, dict] = {}
    failures: list[BaseException] = []

    def erase(customer_id: str) -> None:
        try:
            reports[customer_id] = erase_customers_atomically(ds, [customer_id])
        except BaseException as e:  # reported by the assertion below
            failures.append(e)

    builder = threading.Thread(target=build_features_atomically, args=(ds,))  # a retrain's build beside them
    workers = [threading.Thread(target=erase, args=(c,)) for c in ("C1", "C2")]
    for t in [builder, *workers]:
        t.start()
    for t in [builder, *workers]:
        t.join()
    assert failures == []
    assert all(r["features_rebuilt"] and r["total_rows_removed"] > 0 for r in reports.values())
    left = set(ds.read("events")["customer_id"].to_list())
    assert not left & {"C1", "C2", "W1"}  # W1: C1's linked cookie
    assert {"C3", "C4"} <= left
    profiled = set(pl.read_parquet(ds.features_dir / "profiles.parquet")["customer_id"].to_list())
    assert not profiled & {"C1", "C2"} and profiled
    assert {p.name for p in ds.root.iterdir() if not p.name.startswith(".")} >= {"raw", "features"}
    assert not [p for p in ds.root.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".features-")]


def test_a_fold_interrupted_before_its_commit_is_rolled_back(tiny_dataset):
    ds = tiny_dataset
    orphan = ds.part_path("events", 7)
    shutil.copy(ds.table_files("events")[0], orphan)
    write_fold_state(ds, FoldState(pending=[str(orphan.relative_to(ds.root))]))
    assert roll_back_pending(ds) == ["raw/events-00007.parquet"]
    assert not orphan.exists() and read_fold_state(ds).pending == []


# --- the whole job -------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_retrain_folds_refits_on_all_data_tags_the_version_and_goes_through_the_gate(
    trained_world, tmp_path, capsys
):
    from mlflow import MlflowClient

    from nextbest.features.pipeline import built_config, clean_events
    from nextbest.serving.cli import main

    ds = trained_world.copy(tmp_path / "world")
    (tmp_path / "mlruns").mkdir()
    shutil.copy(trained_world.tracking_uri.removeprefix("sqlite:///"), tmp_path / "mlruns" / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"

    # A planted shift: for a week after the data ends, 150 customers buy the items of one brand.
    last = ds.scan("events").select(pl.col("timestamp").max()).collect().item()
    items = ds.read("items")
    brand = items["brand"].mode()[0]
    shifted = items.filter(pl.col("brand") == brand)["item_id"].to_list()
    customers = ds.read("customers")["customer_id"].to_list()[:150]
    rng = np.random.default_rng(7)
    rows, ids = [], []
    for k, c in enumerate(customers):
        for j in range(3):
            when = last + timedelta(days=float(rng.uniform(0.1, 7)))
            item = shifted[int(rng.integers(len(shifted)))]
            rows.append({**live(c, item, "purchase"), "timestamp": when})
            ids.append(f"shift-{k}-{j}")
    store = open_store(tmp_path / "state")
    store.append_events(rows, ids)
    actions = ds.read("action_catalog").filter(pl.col("kind") != "none")["action_id"].to_list()
    for k, c in enumerate(customers[:40]):
        when = last + timedelta(days=1 + k / 40)
        store.add_decision(
            {**decision(f"dec-{k}", c, actions[k % len(actions)], 0), "timestamp": when.isoformat()}
        )
        kind = "accepted" if k % 3 == 0 else "dismissed"
        store.add_response({**response(f"dec-{k}", c, actions[k % len(actions)], kind, 0), "timestamp": when})

    args = ["--data", str(ds.root), "--state-url", store.url, "--tracking-uri", uri]
    code = main(["retrain", *args, "--no-bento", "--json", "--quiet"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0, summary
    assert summary["fold"]["events"]["folded"] == len(rows)
    assert summary["fold"]["exposures"]["folded"] == 40
    as_of = ds.read_manifest()["as_of"]
    assert datetime.fromisoformat(as_of) == max(r["timestamp"] for r in rows)

    # The served recommender saw every consented event up to now, the latest period included.
    seen = clean_events(ds, built_config(ds)).select(pl.col("timestamp").max()).collect().item()
    assert seen > last + timedelta(days=6)
    rec = summary["models"]["recommender"]
    assert rec["trained"] and rec["tags"] == {"refit": "all", "data_until": seen.isoformat()}
    version = MlflowClient(uri, uri).get_model_version("nextbest-recommender", rec["version"])
    assert version.tags["refit"] == "all" and version.tags["data_until"] == seen.isoformat()
    prop = summary["models"]["propensity"]
    assert prop["trained"] and prop["tags"]["refit"] == "train"
    for kind in ("recommender", "propensity"):
        gate = summary["models"][kind]["promotion"]
        # Only the gate decides, and says why either way.
        assert gate["promoted"] or "does not beat" in gate["reason"], gate
        assert gate["challenger_version"] == summary["models"][kind]["version"]
    assert summary["models"]["recommender"]["config_from"].startswith("champion nextbest-recommender/")

    # The service replays only the stored events the rebuilt features do not count: none is counted twice.
    from nextbest.serving.engine import Engine, EngineConfig

    late = {**live(customers[0], shifted[0]), "timestamp": last + timedelta(days=7.5)}
    store.append_events([late], ["after-retrain"])
    engine = Engine.load(
        EngineConfig(data=ds.root, state_dir=tmp_path / "state", tracking_uri=uri, model_poll_seconds=0)
    )
    try:
        assert engine.live_customers() == [customers[0]]
    finally:
        engine.close()
