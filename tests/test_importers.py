"""Importers: a user's CSV/TSV/Parquet export and the Complete Journey transforms, on tiny hand-written files."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest
from pydantic import ValidationError

from nextbest.features.completejourney import (
    age_band_midpoint,
    cj_action_catalog,
    cj_actions,
    cj_customers,
    cj_events,
)
from nextbest.features.dataset import Dataset
from nextbest.features.importers import (
    EventImportConfig,
    ImportFileError,
    ImportMappingError,
    epoch_to_timestamp,
    import_events,
    parse_mapping,
    sniff_delimiter,
    validate_with_checks,
)
from nextbest.features.schema import TIMESTAMP, SchemaError


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _quarantine(ds: Dataset, table: str = "events") -> pl.DataFrame:
    return pl.read_parquet(ds.quarantine_path(table)).sort("source", "row")


# --- mapping and config -----------------------------------------------------------------------------------


def test_parse_mapping_reads_pairs_and_ignores_spaces():
    assert parse_mapping(" customer_id = user, item_id=movie ,timestamp=ts,") == {
        "customer_id": "user",
        "item_id": "movie",
        "timestamp": "ts",
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("customer_id=user,item_id", "'item_id' is not of the form"),
        ("customer_id=user,customer_id=u2", "names 'customer_id' twice"),
        ("=user", "is not of the form"),
        ("", "the mapping is empty"),
    ],
)
def test_parse_mapping_rejects_malformed_text(text, message):
    with pytest.raises(ImportMappingError, match=message) as info:
        parse_mapping(text)
    assert isinstance(info.value, SchemaError)


def test_config_round_trips_through_json():
    config = EventImportConfig(
        mapping={"customer_id": "u", "item_id": "i", "timestamp": "t"},
        event_type="purchase",
        value_column="rating",
        threshold=4.0,
        delimiter="\\t",
        event_type_map={},
    )
    assert config.delimiter == "\t"
    assert EventImportConfig.model_validate_json(config.model_dump_json()) == config


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"mapping": {"customer_id": "u", "timestamp": "t", "event_type": "e"}}, "mapping lacks item_id"),
        ({"mapping": {"customer_id": "u", "item_id": "i", "timestamp": "t"}}, "implicit event_type"),
        (
            {
                "mapping": {"customer_id": "u", "item_id": "i", "timestamp": "t", "event_type": "e"},
                "event_type": "view",
            },
            "choose one",
        ),
        (
            {
                "mapping": {"customer_id": "u", "item_id": "i", "timestamp": "t", "rating": "r"},
                "event_type": "view",
            },
            "'rating', not event column",
        ),
        (
            {"mapping": {"customer_id": "u", "item_id": "i", "timestamp": "t"}, "event_type": "rate"},
            "'rate' are not accepted",
        ),
        (
            {
                "mapping": {"customer_id": "u", "item_id": "i", "timestamp": "t"},
                "event_type": "view",
                "threshold": 4,
            },
            "value_column and threshold go together",
        ),
        (
            {
                "mapping": {"customer_id": "u", "item_id": "i", "timestamp": "t"},
                "event_type": "view",
                "delimiter": ",;",
            },
            "single character",
        ),
    ],
)
def test_config_rejects_inconsistent_fields(fields, message):
    with pytest.raises(ValidationError, match=message):
        EventImportConfig(**fields)


def test_extra_event_types_are_accepted_for_an_implicit_type():
    config = EventImportConfig(
        mapping={"customer_id": "u", "item_id": "i", "timestamp": "t"},
        event_type="rate",
        extra_event_types=["rate"],
    )
    assert config.event_types[-1] == "rate"


def test_sniff_delimiter_counts_outside_quotes(tmp_path):
    assert sniff_delimiter(_write(tmp_path / "a.csv", 'name,"x\ty\tz",w\n')) == ","
    assert sniff_delimiter(_write(tmp_path / "b.txt", "a\tb\tc\n1\t2\t3\n")) == "\t"
    assert sniff_delimiter(_write(tmp_path / "c.csv", "a;b;c\n")) == ";"
    assert sniff_delimiter(_write(tmp_path / "d.tsv", "only\n")) == "\t"


# --- reading the shapes people have -----------------------------------------------------------------------


def test_csv_with_header_maps_columns_and_lists_ignored_ones(tmp_path):
    src = _write(
        tmp_path / "export.csv",
        "user,sku,action,when,basket,amount,notes\n"
        "007,A1,pv,2026-01-01T10:00:00,s1,,hello\n"
        "007,A2,buy,2026-01-01T10:05:00,s1,9.5,\n"
        "008,A1,click,2026-01-02 08:00,s2,,\n",
    )
    config = EventImportConfig(
        mapping=parse_mapping(
            "customer_id=user,item_id=sku,event_type=action,timestamp=when,session_id=basket,price=amount"
        ),
        event_type_map={"pv": "view", "buy": "purchase"},
    )
    ds = Dataset.at(tmp_path / "ds")
    summary = import_events([src], ds, config)
    events = ds.read("events")
    assert events["customer_id"].to_list() == ["007", "007", "008"]  # leading zeros kept: ids are text
    assert events["event_type"].to_list() == ["view", "purchase", "click"]
    assert events["timestamp"].to_list() == [
        datetime(2026, 1, 1, 10),
        datetime(2026, 1, 1, 10, 5),
        datetime(2026, 1, 2, 8),
    ]
    assert events["price"].to_list() == [None, 9.5, None]
    assert events["session_id"].to_list() == ["s1", "s1", "s2"]
    (file_summary,) = summary["files"]
    assert file_summary["ignored_columns"] == ["notes"]
    assert file_summary["format"] == "csv"
    assert file_summary["delimiter"] == ","
    assert summary["tables"]["events"]["rows_in"] == 3
    assert summary["tables"]["events"]["rows_accepted"] == 3
    assert summary["tables"]["events"]["quarantine"] is None


def test_tsv_without_header_maps_by_position(tmp_path):
    src = _write(tmp_path / "clicks.tsv", "u1\titem9\tx\t1767261600\tview\nu2\titem8\ty\t1767265200\tclick\n")
    config = EventImportConfig(
        mapping=parse_mapping("customer_id=1,item_id=column_2,timestamp=4,event_type=5"), header=False
    )
    ds = Dataset.at(tmp_path / "ds")
    summary = import_events([src], ds, config)
    events = ds.read("events")
    assert events.select("customer_id", "item_id", "event_type").rows() == [
        ("u1", "item9", "view"),
        ("u2", "item8", "click"),
    ]
    # 1767261600 s = 2026-01-01 10:00 UTC
    assert events["timestamp"].to_list() == [datetime(2026, 1, 1, 10), datetime(2026, 1, 1, 11)]
    assert summary["files"][0]["format"] == "tsv"
    assert summary["files"][0]["ignored_columns"] == ["column_3"]


def test_parquet_with_native_types(tmp_path):
    src = tmp_path / "events.parquet"
    pl.DataFrame(
        {
            "uid": [1, 2],
            "pid": [10, 20],
            "kind": ["view", "purchase"],
            "ts_ms": [1767261600000, 1767261600500],
            "qty": [None, 3],
        }
    ).write_parquet(src)
    config = EventImportConfig(
        mapping=parse_mapping("customer_id=uid,item_id=pid,event_type=kind,timestamp=ts_ms,quantity=qty")
    )
    ds = Dataset.at(tmp_path / "ds")
    summary = import_events([src], ds, config)
    events = ds.read("events")
    assert events["customer_id"].to_list() == ["1", "2"]
    assert events["item_id"].to_list() == ["10", "20"]
    assert events["quantity"].to_list() == [None, 3]
    assert events["timestamp"].to_list() == [datetime(2026, 1, 1, 10), datetime(2026, 1, 1, 10, 0, 0, 500000)]
    assert summary["files"][0]["format"] == "parquet"


INSTANTS = [datetime(2026, 1, 1, 10), datetime(2026, 3, 1, 23, 59, 59), datetime(1999, 12, 31, 12, 30)]
EPOCH_S = [1767261600, 1772409599, 946643400]
ISO_WITH_OFFSETS = ["2026-01-01T12:00:00+02:00", "2026-03-01T23:59:59Z", "1999-12-31 07:30:00-05:00"]


@pytest.mark.parametrize(
    ("values", "unit"),
    [
        ([str(v) for v in EPOCH_S], "auto"),
        ([str(v * 1000) for v in EPOCH_S], "auto"),
        ([str(v * 1_000_000) for v in EPOCH_S], "auto"),
        ([str(v * 1000) for v in EPOCH_S], "ms"),
        ([f"{v}.0" for v in EPOCH_S], "s"),
        (ISO_WITH_OFFSETS, "auto"),
        (ISO_WITH_OFFSETS, "iso"),
    ],
)
def test_epochs_and_iso_with_offsets_give_the_same_timestamps(tmp_path, values, unit):
    src = _write(tmp_path / "e.csv", "c,i,t\n" + "".join(f"C{k},I{k},{v}\n" for k, v in enumerate(values)))
    config = EventImportConfig(
        mapping=parse_mapping("customer_id=c,item_id=i,timestamp=t"), event_type="view", timestamp_unit=unit
    )
    ds = Dataset.at(tmp_path / "ds")
    summary = import_events([src], ds, config)
    assert summary["tables"]["events"]["rows_quarantined"] == 0
    assert ds.read("events")["timestamp"].to_list() == INSTANTS


def test_epoch_to_timestamp_detects_the_unit_by_magnitude():
    s = 1767261600
    df = pl.DataFrame({"v": [s, s * 1000, s * 1_000_000, s * 1_000_000_000]})
    out = df.select(epoch_to_timestamp(pl.col("v"))).to_series()
    assert out.dtype == TIMESTAMP
    assert out.to_list() == [datetime(2026, 1, 1, 10)] * 4


def test_iso_unit_rejects_epoch_numbers_and_mixed_files_quote_the_raw_value(tmp_path):
    src = _write(tmp_path / "e.csv", "c,i,t\nC1,I1,1767261600\nC2,I2,yesterday\nC3,I3,2026-01-01T10:00:00\n")
    ds = Dataset.at(tmp_path / "ds")
    mapping = parse_mapping("customer_id=c,item_id=i,timestamp=t")
    import_events([src], ds, EventImportConfig(mapping=mapping, event_type="view"))
    assert ds.read("events")["timestamp"].to_list() == [datetime(2026, 1, 1, 10)] * 2
    assert _quarantine(ds)["reason"].to_list() == [
        "e.csv row 2: timestamp 'yesterday' is not a valid timestamp"
    ]
    import_events([src], ds, EventImportConfig(mapping=mapping, event_type="view", timestamp_unit="iso"))
    assert ds.read("events")["customer_id"].to_list() == ["C3"]
    assert _quarantine(ds)["reason"].to_list() == [
        "e.csv row 1: timestamp '1767261600' is not a valid timestamp",
        "e.csv row 2: timestamp 'yesterday' is not a valid timestamp",
    ]


# --- implicit event type and threshold --------------------------------------------------------------------


def test_ratings_below_threshold_are_quarantined_and_counted(tmp_path):
    src = _write(
        tmp_path / "ratings.csv",
        "userId,movieId,rating,timestamp\n"
        "1,31,5,1767261600\n"  # kept
        "1,32,3,1767261601\n"  # below
        "2,31,4,1767261602\n"  # kept: the threshold is inclusive
        "2,33,1.5,oops\n"  # below and a bad timestamp
        "3,34,,1767261604\n"  # no rating
        "3,35,4.5,1767261605\n",  # kept
    )
    config = EventImportConfig(
        mapping=parse_mapping("customer_id=userId,item_id=movieId,timestamp=timestamp"),
        event_type="purchase",
        value_column="rating",
        threshold=4.0,
    )
    ds = Dataset.at(tmp_path / "ds")
    summary = import_events([src], ds, config, progress=False)
    counts = summary["tables"]["events"]
    assert counts["rows_in"] == 6
    assert counts["rows_accepted"] == 3
    assert counts["rows_quarantined"] == 3
    assert counts["rows_below_threshold"] == 2
    assert counts["rows_in"] == counts["rows_accepted"] + counts["rows_quarantined"]
    assert summary["files"][0]["ignored_columns"] == []
    events = ds.read("events")
    assert events.select("customer_id", "item_id").rows() == [("1", "31"), ("2", "31"), ("3", "35")]
    assert set(events["event_type"]) == {"purchase"}
    q = _quarantine(ds)
    assert q["row"].to_list() == [2, 4, 5]
    assert q["reason"].to_list() == [
        "ratings.csv row 2: rating 3.0 is below the threshold 4.0",
        "ratings.csv row 4: timestamp 'oops' is not a valid timestamp; rating 1.5 is below the threshold 4.0",
        "ratings.csv row 5: rating is missing (needed for the threshold 4.0)",
    ]
    assert q["customer_id"].to_list() == ["1", "2", "3"]


def test_validate_with_checks_keeps_row_numbers_file_wide():
    frame = pl.DataFrame(
        {
            "customer_id": ["A", None, "C"],
            "item_id": ["1", "2", "3"],
            "event_type": ["view"] * 3,
            "timestamp": ["2026-01-01"] * 3,
        }
    )
    checks = pl.Series([None, "flag b", "flag c"], dtype=pl.String)
    result = validate_with_checks(frame, checks, "events", source="f.csv", row_offset=100)
    assert result.accepted["customer_id"].to_list() == ["A"]
    assert result.quarantined["reason"].to_list() == [
        "f.csv row 102: customer_id is missing; flag b",
        "f.csv row 103: flag c",
    ]
    assert result.rows_in == result.rows_accepted + result.rows_quarantined


# --- bad rows ---------------------------------------------------------------------------------------------


def test_bad_rows_are_quarantined_with_file_row_and_value_across_batches(tmp_path):
    src = _write(
        tmp_path / "events.csv",
        "cust,item,type,ts,price\n"
        "C1,I1,view,2026-01-01T00:00:00,\n"
        "C1,I2,purchse,2026-01-01T00:01:00,3.0\n"
        "C2,I1,view,2026-02-30T00:00:00,\n"
        ",I3,click,2026-01-02T00:00:00,\n"
        "C3,I3,purchase,2026-01-02T00:00:00,-4.5\n"
        "C3,I4,purchase,2026-01-03T00:00:00,2.25\n"
        "C4,I5,add_to_cart,2026-01-03T00:00:00,abc\n",
    )
    config = EventImportConfig(
        mapping=parse_mapping("customer_id=cust,item_id=item,event_type=type,timestamp=ts,price=price"),
        batch_rows=2,  # row numbers must stay file-wide across batches
    )
    ds = Dataset.at(tmp_path / "ds")
    summary = import_events([src], ds, config)
    assert summary["tables"]["events"]["rows_accepted"] == 2
    assert summary["tables"]["events"]["rows_quarantined"] == 5
    assert len(summary["tables"]["events"]["parts"]) == 4
    assert ds.read("events")["item_id"].to_list() == ["I1", "I4"]
    assert _quarantine(ds)["reason"].to_list() == [
        "events.csv row 2: event_type 'purchse' is not one of view, click, add_to_cart, purchase",
        "events.csv row 3: timestamp '2026-02-30T00:00:00' is not a valid timestamp",
        "events.csv row 4: customer_id is missing",
        "events.csv row 5: price '-4.5' is below 0",
        "events.csv row 7: price 'abc' is not a valid number",
    ]


def test_missing_mapped_column_names_the_columns_found(tmp_path):
    src = _write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n")
    config = EventImportConfig(
        mapping=parse_mapping("customer_id=user,item_id=movieId,timestamp=ts"), event_type="view"
    )
    ds = Dataset.at(tmp_path / "ds")
    with pytest.raises(ImportMappingError) as info:
        import_events([src], ds, config)
    message = str(info.value)
    assert "ratings.csv: mapped column(s) 'user' (for customer_id), 'ts' (for timestamp) not found" in message
    assert "userId, movieId, rating, timestamp" in message
    assert not ds.root.exists()  # checked before anything is written


def test_missing_position_without_header_suggests_positions(tmp_path):
    src = _write(tmp_path / "e.tsv", "a\tb\n")
    config = EventImportConfig(
        mapping=parse_mapping("customer_id=1,item_id=2,timestamp=4"), event_type="view", header=False
    )
    with pytest.raises(
        ImportMappingError,
        match=r"'column_4' \(for timestamp\) not found.*column_1, column_2 \(without a header, refer to them by position 1–2",
    ):
        import_events([src], Dataset.at(tmp_path / "ds"), config)


def test_empty_file_is_a_named_error(tmp_path):
    src = _write(tmp_path / "empty.csv", "")
    config = EventImportConfig(
        mapping=parse_mapping("customer_id=a,item_id=b,timestamp=c"), event_type="view"
    )
    with pytest.raises(ImportFileError, match=re.escape("empty.csv: the file is empty")):
        import_events([src], Dataset.at(tmp_path / "ds"), config)


def test_several_files_number_rows_per_file_and_a_reimport_replaces_events(tmp_path):
    a = _write(tmp_path / "a.csv", "c,i,t\nC1,I1,2026-01-01\nC2,I2,bad\n")
    b = _write(tmp_path / "b.csv", "c,i,t\nC3,I3,bad\nC4,I4,2026-01-02\n")
    config = EventImportConfig(
        mapping=parse_mapping("customer_id=c,item_id=i,timestamp=t"), event_type="view"
    )
    ds = Dataset.at(tmp_path / "ds")
    summary = import_events([a, b], ds, config)
    assert [f["rows_accepted"] for f in summary["files"]] == [1, 1]
    assert sorted(ds.read("events")["customer_id"].to_list()) == ["C1", "C4"]
    assert _quarantine(ds)["reason"].to_list() == [
        "a.csv row 2: timestamp 'bad' is not a valid timestamp",
        "b.csv row 1: timestamp 'bad' is not a valid timestamp",
    ]
    import_events([b], ds, config)
    assert ds.read("events")["customer_id"].to_list() == ["C4"]
    assert len(ds.table_files("events")) == 1


# --- items and customers ----------------------------------------------------------------------------------


def test_items_and_customers_files_are_imported_with_key_mapping(tmp_path):
    events = _write(tmp_path / "e.csv", "c,i,t\nU1,S1,2026-01-01\n")
    items = _write(
        tmp_path / "products.tsv", "sku\tcolour\tprice\nS1\tred\t10\nS2\tblue\t-1\nS1\tgreen\t12\n"
    )
    customers = _write(
        tmp_path / "people.csv", "customer_id;age;region;tier\nU1;34;north;gold\nU2;abc;;silver\n"
    )
    config = EventImportConfig(
        mapping=parse_mapping("customer_id=c,item_id=i,timestamp=t"),
        event_type="view",
        items_mapping=parse_mapping("item_id=sku"),
    )
    ds = Dataset.at(tmp_path / "ds")
    summary = import_events([events], ds, config, items=items, customers=customers)
    assert summary["tables"]["items"]["rows_in"] == 3
    assert summary["tables"]["items"]["rows_accepted"] == 1
    assert summary["tables"]["customers"]["rows_accepted"] == 1
    item_rows = ds.read("items")
    assert item_rows.select("item_id", "colour", "price").rows() == [("S1", "red", 10.0)]
    assert _quarantine(ds, "items")["reason"].to_list() == [
        "products.tsv row 2: price '-1.0' is below 0",
        "products.tsv row 3: duplicate item_id 'S1' (first at row 1)",
    ]
    people = ds.read("customers")
    assert people.select("customer_id", "age", "region", "tier").rows() == [("U1", 34, "north", "gold")]
    assert _quarantine(ds, "customers")["reason"].to_list() == [
        "people.csv row 2: age 'abc' is not a valid integer"
    ]


def test_items_file_without_an_item_id_column_asks_for_a_mapping(tmp_path):
    events = _write(tmp_path / "e.csv", "c,i,t\nU1,S1,2026-01-01\n")
    items = _write(tmp_path / "products.csv", "sku,colour\nS1,red\n")
    config = EventImportConfig(
        mapping=parse_mapping("customer_id=c,item_id=i,timestamp=t"), event_type="view"
    )
    with pytest.raises(
        ImportMappingError, match=re.escape("products.csv: no 'item_id' column; map one with item_id=COLUMN")
    ):
        import_events([events], Dataset.at(tmp_path / "ds"), config, items=items)


# --- Complete Journey transforms (the full import is in test_completejourney.py, marked slow) ----------


def test_age_band_midpoints():
    bands = pl.Series(["19-24", "25-34", "35-44", "45-54", "55-64", "65+", "unknown", None])
    out = pl.DataFrame({"b": bands}).select(age_band_midpoint(pl.col("b"))).to_series()
    assert out.dtype == pl.Int32
    assert out.to_list() == [22, 30, 40, 50, 60, 70, None, None]


def test_cj_events_unit_price_and_zero_quantity_flag():
    tx = pl.DataFrame(
        {
            "household_id": [1, 2],
            "store_id": [9, 9],
            "basket_id": [100, 101],
            "product_id": [5, 6],
            "quantity": [4, 0],
            "sales_value": [10.0, 0.5],
            "retail_disc": [0.0, 0.0],
            "coupon_disc": [0.0, 0.0],
            "coupon_match_disc": [0.0, 0.0],
            "week": [1, 1],
            "transaction_timestamp": [datetime(2017, 1, 1, 9), datetime(2017, 1, 2, 9)],
        }
    )
    frame, checks = cj_events(tx)
    result = validate_with_checks(frame, checks, "events", source="transactions.parquet")
    assert result.accepted.select(
        "customer_id", "item_id", "session_id", "channel", "quantity", "price"
    ).rows() == [("1", "5", "100", "store", 4, 2.5)]
    assert result.quarantined["reason"].to_list() == [
        "transactions.parquet row 2: quantity 0 is not a purchase (sales_value 0.5)"
    ]


def test_cj_customers_actions_and_catalog():
    demo = pl.DataFrame(
        {
            "household_id": [7],
            "age": ["19-24"],
            "income": ["35-49K"],
            "home_ownership": [None],
            "marital_status": ["Married"],
            "household_size": ["5+"],
            "household_comp": ["2 Adults Kids"],
            "kids_count": ["3+"],
        },
        schema_overrides={"home_ownership": pl.String},
    )
    customers = cj_customers(demo)
    assert customers.row(0, named=True) == {
        "customer_id": "7",
        "age": 22,
        "gender": None,
        "region": None,
        "age_band": "19-24",
        "income": "35-49K",
        "home_ownership": None,
        "marital_status": "Married",
        "household_size": "5+",
        "household_comp": "2 Adults Kids",
        "kids_count": "3+",
    }
    descriptions = pl.DataFrame(
        {
            "campaign_id": [1, 2],
            "campaign_type": ["Type A", "Type B"],
            "start_date": [datetime(2017, 3, 1), datetime(2017, 4, 1)],
            "end_date": [datetime(2017, 4, 1), datetime(2017, 5, 1)],
        }
    )
    campaigns = pl.DataFrame({"campaign_id": [1, 1, 2], "household_id": [7, 8, 7]})
    redemptions = pl.DataFrame(
        {
            "household_id": [8, 8, 7],
            "coupon_upc": [11, 12, 11],
            "campaign_id": [1, 1, 3],
            "redemption_date": [datetime(2017, 3, 5)] * 3,
        }
    )
    actions = cj_actions(campaigns, descriptions, redemptions)
    assert actions.rows() == [
        ("1-7", "7", "campaign_1", "mail", datetime(2017, 3, 1), False, None),
        ("1-8", "8", "campaign_1", "mail", datetime(2017, 3, 1), True, datetime(2017, 3, 6)),
        ("2-7", "7", "campaign_2", "mail", datetime(2017, 4, 1), False, None),  # redeemed campaign 3, not 2
    ]
    coupons = pl.DataFrame(
        {"coupon_upc": [11, 11, 12], "product_id": [100, 101, 100], "campaign_id": [1, 1, 1]}
    )
    catalog = cj_action_catalog(descriptions, coupons)
    assert catalog.select("action_id", "kind", "value", "n_coupons", "n_products").rows() == [
        ("campaign_1", "Type A", None, 2, 2),
        ("campaign_2", "Type B", None, 0, 0),
    ]
    assert catalog["start_date"].dtype == pl.Date
