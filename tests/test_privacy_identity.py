"""Single customer view and privacy: identity resolution, consent, retention and erasure."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta

import polars as pl
import pytest

from nextbest.features.dataset import Dataset
from nextbest.features.identity import linked_ids, resolve_identities
from nextbest.features.pipeline import FeatureConfig, build_features, clean_events
from nextbest.features.privacy import (
    ERASURE_KEY_ENV,
    ERASURE_KEY_FILE_ENV,
    ERASURE_LOG,
    ConsentError,
    ErasureKeyError,
    apply_retention,
    consent_granted,
    consent_state,
    effective_consent,
    erased_digests,
    erasure_ids,
    erasure_key,
    filter_consented,
    forget,
    id_digest,
    log_erasure,
)
from tests.conftest import T0, events_frame


def test_identities_resolve_linked_cookies_and_keep_unlinked_ones(tiny_dataset):
    ds = tiny_dataset
    resolved = resolve_identities(ds.scan("events"), ds.scan("identities")).collect()
    assert resolved.height == ds.read("events").height  # nothing dropped
    c1_items = resolved.filter(pl.col("customer_id") == "C1")["item_id"].to_list()
    assert sorted(c1_items) == ["I1", "I1", "I1", "I2", "I2"]  # W1's view now belongs to C1
    assert "web:W9" in resolved["customer_id"].to_list()
    assert resolved.filter(pl.col("customer_id") == "C1")["source_system"].null_count() == 5
    assert linked_ids(ds.scan("identities"), "C1") == ["C1", "E1", "W1"]


def test_the_identity_report_lists_unlinked_ids_within_retention(tiny_dataset):
    ds = tiny_dataset

    def report(config: FeatureConfig) -> list[tuple]:
        manifest = build_features(ds, config)
        unlinked = pl.read_parquet(ds.features_dir / "unlinked_identities.parquet")
        assert manifest["row_counts"]["unlinked_ids"] == unlinked.height
        return unlinked.rows()

    # W9's one view on day 9 is the only event of an id no identity links; W1 is linked to C1.
    day9 = T0 + timedelta(days=9)
    assert report(FeatureConfig(validation_days=3, test_days=3)) == [("web", "W9", 1, day9, day9)]
    # As of day 60, a 30-day window has left W9's view out: the report only covers events still held.
    assert report(FeatureConfig(retention_days=30, validation_days=3, test_days=3)) == []


def test_latest_consent_record_wins_and_filters_by_purpose(tiny_dataset):
    ds = tiny_dataset
    state = consent_state(ds.scan("consent")).collect().sort("customer_id")
    assert state.rows() == [("C3", False, None, None), ("C4", None, False, None)]
    # Before C3's withdrawal on day 1, the earlier grant is in force.
    early = consent_state(ds.scan("consent"), as_of=T0).collect().sort("customer_id")
    assert early.filter(pl.col("customer_id") == "C3")["personalisation"][0] is True

    events = resolve_identities(ds.scan("events"), ds.scan("identities"))
    personal = filter_consented(events, state.lazy(), "personalisation", default=True).collect()
    assert "C3" not in personal["customer_id"].to_list()
    assert "C4" in personal["customer_id"].to_list()
    assert "web:W9" in personal["customer_id"].to_list()  # anonymous sessions may still be personalised
    profiling = filter_consented(events, state.lazy(), "profiling", default=True).collect()
    assert "C4" not in profiling["customer_id"].to_list()
    assert "web:W9" not in profiling["customer_id"].to_list()  # never profile an unknown person
    strict = filter_consented(events, state.lazy(), "personalisation", default=False).collect()
    assert strict["customer_id"].unique().to_list() == []
    with pytest.raises(ConsentError, match="purpose 'sales'"):
        filter_consented(events, state.lazy(), "sales", default=True)


def test_retention_drops_events_older_than_the_window():
    ev = events_frame([("A", "x", "view", d) for d in (0, 5, 10, 20)])
    kept = apply_retention(ev.lazy(), as_of=T0 + timedelta(days=20), days=10).collect()
    assert sorted(kept["timestamp"].to_list()) == [T0 + timedelta(days=10), T0 + timedelta(days=20)]
    with pytest.raises(ValueError, match="retention days must be > 0"):
        apply_retention(ev.lazy(), as_of=T0, days=0)


def test_pipeline_enforces_consent_and_retention(tiny_dataset):
    ds = tiny_dataset
    manifest = build_features(ds, FeatureConfig(retention_days=30, validation_days=3, test_days=3))
    profiles = pl.read_parquet(ds.features_dir / "profiles.parquet")
    customers = pl.read_parquet(ds.features_dir / "customers.parquet")["customer_id"].to_list()
    # As of day 60, a 30-day window keeps only C2's cart (day 59) and C1's view (day 60).
    assert manifest["row_counts"]["retained_events"] == 2
    assert sorted(customers) == ["C1", "C2"]
    assert sorted(profiles["customer_id"].to_list()) == ["C1", "C2"]
    full = build_features(ds, FeatureConfig(validation_days=3, test_days=3))
    customers = pl.read_parquet(ds.features_dir / "customers.parquet")["customer_id"].to_list()
    profiles = pl.read_parquet(ds.features_dir / "profiles.parquet")["customer_id"].to_list()
    assert "C3" not in customers and "C4" in customers  # C3 declined personalisation
    assert "C4" not in profiles and "C3" in profiles  # C4 declined profiling
    assert full["row_counts"]["customers_declined"] == {"personalisation": 1, "profiling": 1, "marketing": 0}
    assert set(clean_events(ds, FeatureConfig(), purpose="profiling").collect()["customer_id"]) == {
        "C1",
        "C2",
        "C3",
    }


def _all_text(ds) -> str:
    """Every string value in every parquet file, and every other file's bytes, under the dataset."""
    chunks = []
    for f in sorted(ds.root.rglob("*")):
        if not f.is_file():
            continue
        if f.suffix == ".parquet":
            df = pl.read_parquet(f)
            for name, dtype in df.schema.items():
                if dtype == pl.String:
                    chunks.extend(v for v in df[name].to_list() if v is not None)
        else:
            chunks.append(f.read_bytes().decode("latin-1"))
    return "\n".join(chunks)


def test_forget_leaves_no_trace_of_the_customer_or_linked_ids(tiny_dataset):
    ds = tiny_dataset
    # A quarantined row of C1 exists too: erasure must reach it.
    ds.write_quarantine("events", [pl.DataFrame({"customer_id": ["C1"], "reason": ["x row 1: bad"]})])
    build_features(ds, FeatureConfig(validation_days=3, test_days=3))
    before = _all_text(ds)
    assert "C1" in before and "W1" in before and "E1" in before
    report = forget(ds, "C1")
    assert report["ids_erased"] == 6  # C1, E1, W1 and their unlinked forms crm:C1, email:E1, web:W1
    build_features(ds, FeatureConfig(validation_days=3, test_days=3))
    after = _all_text(ds)
    for token in ("C1", "W1", "E1"):
        assert token not in after
    # Other customers are untouched.
    assert "C2" in after and "web:W9" in after
    # The erasure log holds keyed digests only, and keeps a re-imported copy of C1's rows out of features.
    log = (ds.root / "erasure_log.jsonl").read_text()
    assert "C1" not in log and len(log.splitlines()) == 6
    assert hashlib.sha256(b"C1").hexdigest() not in log and id_digest("C1", erasure_key()) in log
    ds.write_table("events", pl.concat([ds.read("events"), events_frame([("C1", "I1", "purchase", 30)])]))
    build_features(ds, FeatureConfig(validation_days=3, test_days=3))
    assert "C1" not in pl.read_parquet(ds.features_dir / "customers.parquet")["customer_id"].to_list()
    assert json.loads(ds.manifest_path.read_text())["row_counts"]["raw_events"] == ds.read("events").height


def test_consent_state_takes_the_latest_record_whatever_the_file_order_and_the_later_row_on_a_tie():
    t = [datetime(2026, 1, d) for d in (1, 2, 3)]
    records = pl.DataFrame(
        {
            "customer_id": ["A", "A", "A", "B", "B", "C"],
            "purpose": [
                "profiling",
                "profiling",
                "marketing",
                "personalisation",
                "personalisation",
                "marketing",
            ],
            # A's profiling: the grant of day 3 comes first in the file, the refusal of day 2 after it.
            "granted": [True, False, False, True, False, True],
            # B's two personalisation records share a timestamp: the row written later wins.
            "timestamp": [t[2], t[1], t[0], t[1], t[1], t[2]],
        }
    )
    state = consent_state(records.lazy()).collect().sort("customer_id")
    assert state.columns == ["customer_id", "personalisation", "profiling", "marketing"]
    assert state.rows() == [("A", None, True, False), ("B", False, None, None), ("C", None, None, True)]
    # As of day 2, A's later grant is not yet in force and C has no record at all.
    early = consent_state(records.lazy(), as_of=t[1]).collect().sort("customer_id")
    assert early.rows() == [("A", None, False, False), ("B", False, None, None)]


@pytest.mark.parametrize("default", [True, False])
def test_consent_is_one_rule_offline_and_online(default):
    """The same customers through the offline path (``consent_state`` + ``consent_granted`` over a frame, as the
    feature pipeline and the training rows apply it) and the online one (``effective_consent`` for one customer,
    as the service applies it) get the same consent, purpose by purpose: records win, then the default, and ids
    of unlinked source systems are never profiled or marketed to."""
    t = datetime(2026, 1, 1)
    records = pl.DataFrame(
        {
            "customer_id": ["A", "A", "A", "B", "C", "web:W7"],
            "purpose": ["personalisation", "profiling", "marketing", "marketing", "profiling", "marketing"],
            "granted": [True, True, True, False, False, True],
            "timestamp": [t] * 6,
        }
    )
    customers = ["A", "B", "C", "D", "web:W1", "web:W7"]
    state = consent_state(records.lazy()).collect()
    purposes = ("personalisation", "profiling", "marketing")
    offline = (
        pl.DataFrame({"customer_id": customers})
        .join(state, on="customer_id", how="left", maintain_order="left")
        .select("customer_id", *(consent_granted(p, default=default).alias(p) for p in purposes))
    )
    rows = {r["customer_id"]: r for r in state.iter_rows(named=True)}
    for row in offline.iter_rows(named=True):
        cid = row.pop("customer_id")
        assert effective_consent(cid, rows.get(cid), default=default) == row, cid
    # The known answer: a record wins; without one the default, except profiling and marketing of an unlinked id;
    # a record of an unlinked id (W7's marketing) still wins.
    got = {r[0]: r[1:] for r in offline.rows()}
    d = default
    assert got == {
        "A": (True, True, True),
        "B": (d, d, False),
        "C": (d, False, d),
        "D": (d, d, d),
        "web:W1": (d, False, False),
        "web:W7": (d, False, True),
    }


def test_erasure_ids_reach_the_owner_of_a_linked_id_and_every_form_of_their_ids():
    identities = pl.LazyFrame(
        {
            "source_system": ["web", "email", "web"],
            "source_id": ["W1", "E1", "W2"],
            "customer_id": ["C1", "C1", "C2"],
        }
    )
    expected = ["C1", "E1", "W1", "email:E1", "web:W1"]
    assert erasure_ids(identities, "C1") == expected
    # Asked by a linked id (a cookie), the erasure reaches the customer it belongs to.
    assert erasure_ids(identities, "W1") == expected
    assert erasure_ids(identities, "C9") == ["C9"]


def test_erased_ids_are_known_by_keyed_digest_and_legacy_digests_still_count(tmp_path, monkeypatch):
    ds = Dataset.at(tmp_path / "ds")
    ds.root.mkdir(parents=True)
    monkeypatch.setenv(ERASURE_KEY_FILE_ENV, str(tmp_path / "keys" / "erasure.key"))
    monkeypatch.delenv(ERASURE_KEY_ENV, raising=False)
    assert not erased_digests(ds)
    erased = log_erasure(ds, ["C1", "W1"])
    assert (tmp_path / "keys" / "erasure.key").stat().st_mode & 0o777 == 0o600
    assert "C1" in erased and "W1" in erased and "C2" not in erased and len(erased) == 2
    # Versions before the key wrote plain SHA-256 digests: still honoured.
    with (ds.root / ERASURE_LOG).open("a") as f:
        f.write(json.dumps({"sha256": hashlib.sha256(b"C7").hexdigest(), "erased_at": "2026-01-01"}) + "\n")
        f.write('{"hmac": "torn')  # a crash mid-write: never acknowledged
    again = erased_digests(ds)
    assert "C7" in again and "C1" in again and "C2" not in again
    # Without the key the keyed digests match nothing: refused, never ignored.
    monkeypatch.setenv(ERASURE_KEY_FILE_ENV, str(tmp_path / "elsewhere.key"))
    with pytest.raises(ErasureKeyError, match="NEXTBEST_ERASURE_KEY_FILE"):
        erased_digests(ds)
    monkeypatch.setenv(ERASURE_KEY_ENV, "short")
    with pytest.raises(ErasureKeyError, match="at least 16"):
        erasure_key()
