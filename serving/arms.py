"""Champion/challenger assignment: a stable share of customers, chosen by a hash of their id, gets the challenger."""

from __future__ import annotations

import hashlib
import math
from typing import Literal

Arm = Literal["champion", "challenger"]
CHAMPION: Arm = "champion"  # the registry aliases (nextbest.training.registry) name the arms
CHALLENGER: Arm = "challenger"


def arm_position(customer_id: str, salt: str = "") -> float:
    """Where ``customer_id`` falls in [0, 1): the first 8 bytes of SHA-256(salt, id) as a fraction.

    SHA-256 rather than ``hash()``: Python salts ``hash`` per process, and a customer must see the same arm
    in every worker, after every restart and in the offline report.
    """
    digest = hashlib.sha256(f"{salt}\x1f{customer_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_arm(customer_id: str, challenger_share: float, salt: str = "") -> Arm:
    """The arm serving ``customer_id``: ``challenger`` for a ``challenger_share`` of ids, else ``champion``.

    Args:
        customer_id: the (canonical) customer id.
        challenger_share: the share of customers served by the challenger, in [0, 1].
        salt: change it to draw a fresh, independent split (e.g. per experiment).

    Raises:
        ValueError: ``challenger_share`` outside [0, 1].
    """
    if (
        isinstance(challenger_share, bool)
        or not math.isfinite(challenger_share)
        or not 0 <= challenger_share <= 1
    ):
        raise ValueError(f"challenger_share must be in [0, 1], got {challenger_share!r}")
    return CHALLENGER if arm_position(customer_id, salt) < challenger_share else CHAMPION
