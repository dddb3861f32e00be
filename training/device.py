"""The one place that decides which torch device (CPU or CUDA) training and scoring run on."""

from __future__ import annotations

import torch

from nextbest.features.errors import NextbestError

DEVICE_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda")


class DeviceError(NextbestError, ValueError):
    """A device was asked for that does not exist here (or is not one of :data:`DEVICE_CHOICES`)."""


def cuda_available() -> bool:
    """Whether a usable CUDA device is present (False on CPU-only builds of torch)."""
    try:
        return bool(torch.cuda.is_available()) and torch.cuda.device_count() > 0
    except (RuntimeError, AssertionError):
        # Broken driver installs raise instead of answering False; treat them as "no GPU".
        return False


def select_device(prefer: str = "auto") -> torch.device:
    """The torch device to run on.

    Args:
        prefer: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Returns:
        the device.

    Raises:
        DeviceError: ``prefer`` is not a known choice, or CUDA is asked for explicitly and there is none.
    """
    choice = prefer.strip().lower()
    if choice == "auto":
        return torch.device("cuda") if cuda_available() else torch.device("cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" or choice.startswith("cuda:"):
        if not cuda_available():
            raise DeviceError(f"device {prefer!r} was asked for, but no CUDA device is available here")
        device = torch.device(choice)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {prefer!r} was asked for, but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return device
    raise DeviceError(f"device {prefer!r} is not one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")
