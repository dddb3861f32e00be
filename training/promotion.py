"""The promotion gate: ``champion`` moves to the challenger of a registered model only when it is better on the
logged validation metric, and the decision says why either way.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from nextbest.training.registry import CHAMPION, PREVIOUS_CHAMPION, version_by_alias
from nextbest.training.tracking import TrackingConfig, resolve_tracking_uri, sync_alias_tags


class PromotionDecision(BaseModel):
    """The outcome of :func:`promote_recommender`.

    Attributes:
        promoted: whether ``champion`` now points at the challenger.
        reason: one human-readable sentence saying why.
        metric: the validation metric compared.
        challenger_version, champion_version: registry versions (``champion_version`` before the decision).
        challenger_value, champion_value: their logged validation values.
    """

    promoted: bool
    reason: str
    metric: str
    registered_model: str
    challenger_version: str | None = None
    champion_version: str | None = None
    challenger_value: float | None = None
    champion_value: float | None = None


def _logged_metric(client: Any, version: Any, metric: str) -> float | None:
    if not version.run_id:
        return None
    value = client.get_run(version.run_id).data.metrics.get(metric)
    return None if value is None or not math.isfinite(value) else float(value)


def promote(
    tracking: TrackingConfig,
    *,
    metric: str,
    higher: bool,
    train_command: str,
    min_improvement: float = 0.0,
    data: str | Path | None = None,
) -> PromotionDecision:
    """Move ``champion`` to the challenger of ``tracking.registered_model`` only if it beats the champion on
    the logged validation ``metric`` (``higher``: larger is better), and say why either way.

    When ``champion`` moves, the runs' ``nextbest.alias`` tags follow (``champion`` on the new champion's run,
    ``previous-champion`` on the old one's; see :func:`sync_alias_tags`).

    Args:
        tracking: where the registry is and which registered model.
        metric: logged validation metric to compare.
        higher: whether a larger value is better (AUC, NDCG) or worse (losses, ECE).
        train_command: the command named when there is no model yet.
        min_improvement: relative margin the challenger must win by (0.05 = 5 %).
        data: if given, the challenger must have been trained on this dataset directory.

    Returns:
        the decision and its reason; the previous champion keeps the alias ``previous-champion``.
    """
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking)
    client = MlflowClient(uri, uri)
    decision = _decide_and_move(
        client,
        tracking,
        metric=metric,
        higher=higher,
        train_command=train_command,
        min_improvement=min_improvement,
        data=data,
    )
    if decision.promoted:
        sync_alias_tags(client, tracking.registered_model)
    return decision


def _decide_and_move(
    client: Any,
    tracking: TrackingConfig,
    *,
    metric: str,
    higher: bool,
    train_command: str,
    min_improvement: float,
    data: str | Path | None,
) -> PromotionDecision:
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(tracking)
    name = tracking.registered_model

    def decide(promoted: bool, reason: str, **kw: Any) -> PromotionDecision:
        return PromotionDecision(promoted=promoted, reason=reason, metric=metric, registered_model=name, **kw)

    def by_alias(alias: str) -> Any | None:
        return version_by_alias(client, name, alias)

    def logged(version: Any) -> float | None:
        return _logged_metric(client, version, metric)

    try:
        client.get_registered_model(name)
    except MlflowException:
        return decide(False, f"no registered model {name!r} at {uri}: train one with '{train_command}' first")
    challenger = by_alias(tracking.alias)
    if challenger is None:
        return decide(False, f"{name} has no {tracking.alias!r} version to promote")
    cv = str(challenger.version)
    c_value = logged(challenger)
    if data is not None:
        trained_on = (challenger.tags or {}).get("dataset")
        wanted = str(Path(data).resolve())
        if trained_on is not None and trained_on != wanted:
            return decide(
                False,
                f"challenger v{cv} was trained on {trained_on}, not on {wanted}",
                challenger_version=cv,
                challenger_value=c_value,
            )
    if c_value is None:
        return decide(False, f"challenger v{cv} has no logged {metric}", challenger_version=cv)
    champion = by_alias(CHAMPION)
    if champion is None:
        client.set_registered_model_alias(name, CHAMPION, cv)
        return decide(
            True,
            f"no champion yet: challenger v{cv} ({metric} {c_value:.4f}) becomes champion",
            challenger_version=cv,
            challenger_value=c_value,
        )
    pv = str(champion.version)
    p_value = logged(champion)
    common = {
        "challenger_version": cv,
        "champion_version": pv,
        "challenger_value": c_value,
        "champion_value": p_value,
    }
    if pv == cv:
        return decide(False, f"challenger v{cv} is already the champion", **common)
    if p_value is None:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, pv)
        client.set_registered_model_alias(name, CHAMPION, cv)
        return decide(
            True,
            f"champion v{pv} has no logged {metric}; challenger v{cv} ({c_value:.4f}) replaces it",
            **common,
        )
    if higher:
        threshold = p_value * (1 + min_improvement)
        better, relation = c_value > threshold, ">"
    else:
        threshold = p_value * (1 - min_improvement)
        better, relation = c_value < threshold, "<"
    margin = f" (champion {p_value:.4f} with a {min_improvement:.0%} margin)" if min_improvement else ""
    if better:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, pv)
        client.set_registered_model_alias(name, CHAMPION, cv)
        return decide(
            True,
            f"challenger v{cv} beats champion v{pv} on {metric}: {c_value:.4f} {relation} {threshold:.4f}{margin}",
            **common,
        )
    return decide(
        False,
        f"challenger v{cv} does not beat champion v{pv} on {metric}: {c_value:.4f} is not {relation} "
        f"{threshold:.4f}{margin}; champion unchanged",
        **common,
    )


def promote_recommender(
    tracking: TrackingConfig | None = None,
    *,
    metric: str = "ndcg_at_10",
    min_improvement: float = 0.0,
    data: str | Path | None = None,
) -> PromotionDecision:
    """Promote the recommender challenger if it beats the champion on ``metric`` (higher is better); see
    :func:`promote`."""
    return promote(
        tracking or TrackingConfig(),
        metric=metric,
        higher=True,
        train_command="nextbest train cf",
        min_improvement=min_improvement,
        data=data,
    )
