"""The data contract: every validation error path quarantines with a reason, and the counts add up."""

from __future__ import annotations

from datetime import datetime

import polars as pl
import pytest

from nextbest.features.dataset import Dataset
from nextbest.features.schema import (
    TABLES,
    TIMESTAMP,
    SchemaError,
    Vocabulary,
    empty_frame,
    parse_timestamp,
    table_spec,
    validate,
)


def _events(**overrides):
    base = {
        "customer_id": ["C1"],
        "item_id": ["I1"],
        "event_type": ["view"],
        "timestamp": ["2026-01-01T10:00:00"],
    }
    base.update(overrides)
    return pl.DataFrame(base)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (
            {"event_type": ["purchse"]},
            "event_type 'purchse' is not one of view, click, add_to_cart, purchase",
        ),
        ({"customer_id": [None]}, "customer_id is missing"),
        ({"customer_id": ["  "]}, "customer_id is missing"),
        ({"item_id": [""]}, "item_id is missing"),
        ({"timestamp": ["yesterday"]}, "timestamp 'yesterday' is not a valid timestamp"),
        ({"timestamp": [None]}, "timestamp is missing"),
        ({"quantity": ["two"]}, "quantity 'two' is not a valid integer"),
        ({"quantity": [-1]}, "quantity '-1' is below 0"),
        ({"price": [-5.0]}, "price '-5.0' is below 0"),
        ({"price": ["cheap"]}, "price 'cheap' is not a valid number"),
    ],
)
def test_each_event_error_is_quarantined_with_file_row_and_value(overrides, reason):
    df = pl.concat([_events(), _events(**overrides)], how="diagonal_relaxed")
    result = validate(df, "events", source="events.csv")
    assert result.rows_in == 2
    assert result.rows_accepted == 1
    assert result.rows_quarantined == 1
    assert result.quarantined["reason"][0] == f"events.csv row 2: {reason}"
    assert result.quarantined["row"][0] == 2
    assert result.quarantined["source"][0] == "events.csv"


def test_several_problems_in_one_row_are_all_named():
    df = _events(customer_id=[None], event_type=["buy"], timestamp=["never"])
    reason = validate(df, "events", source="e.csv").quarantined["reason"][0]
    assert reason == (
        "e.csv row 1: customer_id is missing; event_type 'buy' is not one of view, click, add_to_cart, purchase; "
        "timestamp 'never' is not a valid timestamp"
    )


def test_quarantine_keeps_the_original_values_as_text():
    df = _events(quantity=["lots"])
    q = validate(df, "events", source="e.csv").quarantined
    assert q["quantity"][0] == "lots"
    assert q["customer_id"][0] == "C1"


def test_counts_add_up_on_a_mixed_file(rng):
    n = 500
    types = rng.choice(["view", "purchase", "purchse", "add_to_cart"], size=n)
    ids = rng.choice(["C1", "C2", None], size=n, p=[0.45, 0.45, 0.1])
    df = pl.DataFrame(
        {
            "customer_id": ids,
            "item_id": ["I1"] * n,
            "event_type": types,
            "timestamp": ["2026-01-01"] * n,
        }
    )
    r = validate(df, "events", source="e.csv")
    expected_bad = int(((types == "purchse") | (ids == None)).sum())  # noqa: E711
    assert r.rows_in == n == r.rows_accepted + r.rows_quarantined
    assert r.rows_quarantined == expected_bad


def test_row_offset_keeps_row_numbers_file_wide():
    r = validate(_events(event_type=["nope"]), "events", source="big.csv", row_offset=1_000_000)
    assert r.quarantined["reason"][0].startswith("big.csv row 1000001: ")


def test_accepted_rows_have_contract_dtypes_and_all_columns():
    r = validate(_events(quantity=["3"], price=["9.5"]), "events", source="e.csv")
    assert r.accepted.schema == pl.Schema(TABLES["events"].dtypes)
    assert r.accepted["quantity"][0] == 3
    assert r.accepted["timestamp"][0] == datetime(2026, 1, 1, 10)


def test_extra_event_types_are_configurable():
    df = _events(event_type=["wishlist"])
    assert validate(df, "events", source="e").rows_quarantined == 1
    r = validate(df, "events", source="e", event_types=["view", "purchase", "wishlist"])
    assert r.rows_accepted == 1


def test_missing_required_column_is_a_schema_error_naming_it():
    with pytest.raises(SchemaError, match=r"events.csv: table 'events' needs column\(s\) item_id"):
        validate(_events().drop("item_id"), "events", source="events.csv")


def test_unknown_column_in_closed_table_is_a_schema_error():
    with pytest.raises(SchemaError, match="does not take column"):
        validate(_events(colour=["red"]), "events", source="events.csv")


def test_unknown_table_is_a_schema_error():
    with pytest.raises(SchemaError, match="unknown table 'orders'"):
        table_spec("orders")


def test_items_keep_attribute_columns_and_quarantine_duplicates():
    df = pl.DataFrame(
        {"item_id": ["a", "b", "a"], "colour": ["red", "blue", "green"], "price": [1.0, 2.0, 3.0]}
    )
    r = validate(df, "items", source="items.csv")
    assert r.accepted.columns == ["item_id", "price", "colour"]
    assert r.accepted["item_id"].to_list() == ["a", "b"]
    assert r.quarantined["reason"].to_list() == ["items.csv row 3: duplicate item_id 'a' (first at row 1)"]


@pytest.mark.parametrize(
    ("table", "df", "reason"),
    [
        (
            "customers",
            pl.DataFrame({"customer_id": ["C1"], "age": [130]}),
            "age '130' is above 120",
        ),
        (
            "customers",
            pl.DataFrame({"customer_id": ["C1"], "signup_date": ["31/12/2025"]}),
            "signup_date '31/12/2025' is not a valid date",
        ),
        (
            "consent",
            pl.DataFrame(
                {"customer_id": ["C1"], "purpose": ["sales"], "granted": [True], "timestamp": ["2026-01-01"]}
            ),
            "purpose 'sales' is not one of personalisation, profiling, marketing",
        ),
        (
            "consent",
            pl.DataFrame(
                {
                    "customer_id": ["C1"],
                    "purpose": ["profiling"],
                    "granted": ["maybe"],
                    "timestamp": ["2026-01-01"],
                }
            ),
            "granted 'maybe' is not a valid boolean",
        ),
        (
            "identities",
            pl.DataFrame({"source_system": [None], "source_id": ["W1"], "customer_id": ["C1"]}),
            "source_system is missing",
        ),
        (
            "actions",
            pl.DataFrame(
                {
                    "exposure_id": ["X1"],
                    "customer_id": ["C1"],
                    "action_id": ["A1"],
                    "timestamp": ["2026-01-01"],
                    "responded": [None],
                }
            ),
            "responded is missing",
        ),
        (
            "action_catalog",
            pl.DataFrame({"action_id": ["A1"], "kind": ["discount"], "value": ["a lot"]}),
            "value 'a lot' is not a valid number",
        ),
    ],
)
def test_other_tables_error_paths(table, df, reason):
    r = validate(df, table, source=f"{table}.csv")
    assert r.rows_quarantined == 1
    assert r.quarantined["reason"][0] == f"{table}.csv row 1: {reason}"


def test_booleans_and_dates_parse_from_text():
    df = pl.DataFrame(
        {
            "customer_id": ["C1", "C1"],
            "purpose": ["profiling"] * 2,
            "granted": ["yes", "0"],
            "timestamp": ["2026-01-01"] * 2,
        }
    )
    r = validate(df, "consent", source="c")
    assert r.accepted["granted"].to_list() == [True, False]


def test_parse_timestamp_mixed_formats_to_naive_utc():
    s = pl.DataFrame(
        {
            "t": [
                "2026-01-01T10:00:00",
                "2026-01-01 10:00:00.5",
                "2026-01-01T12:00:00+02:00",
                "2026-01-01T10:00:00Z",
                "2026-01-01",
            ]
        }
    )
    out = s.select(parse_timestamp(pl.col("t")))["t"].to_list()
    assert out[0] == out[2] == out[3] == datetime(2026, 1, 1, 10)
    assert out[1] == datetime(2026, 1, 1, 10, 0, 0, 500_000)
    assert out[4] == datetime(2026, 1, 1)
    assert s.select(parse_timestamp(pl.col("t"))).schema["t"] == TIMESTAMP


def test_tz_aware_datetimes_become_naive_utc():
    df = _events().with_columns(
        pl.lit(datetime(2026, 1, 1, 12)).dt.replace_time_zone("Europe/Paris").alias("timestamp")
    )
    r = validate(df, "events", source="e")
    assert r.accepted["timestamp"][0] == datetime(2026, 1, 1, 11)


def test_vocabulary_round_trip(tmp_path):
    v = Vocabulary.from_ids(["b", "a", "c", "a"])
    assert v.ids == ("a", "b", "c")
    assert v.index("c") == 2 and v.get("zz") == -1 and "b" in v
    assert v.indices(["c", "x", "a"]).tolist() == [2, -1, 0]
    v.save(tmp_path / "v.parquet", "item_id")
    assert Vocabulary.load(tmp_path / "v.parquet", "item_id") == v


def test_dataset_write_validated_reports_counts(tmp_path):
    ds = Dataset.at(tmp_path / "d").ensure()
    results = [
        validate(
            _events(
                event_type=["view", "nope"],
                customer_id=["C1", "C2"],
                item_id=["I1", "I2"],
                timestamp=["2026-01-01"] * 2,
            ),
            "events",
            source="a.csv",
        )
    ]
    summary = ds.write_validated(results, "events")
    assert summary["rows_in"] == 2 and summary["rows_accepted"] == 1 and summary["rows_quarantined"] == 1
    assert pl.read_parquet(ds.quarantine_path("events"))["reason"][0].startswith(
        "a.csv row 2: event_type 'nope'"
    )
    assert ds.read("events").height == 1
    assert empty_frame("consent").columns == ["customer_id", "purpose", "granted", "timestamp"]
