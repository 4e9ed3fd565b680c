"""`strategy: auto`: measuring before planning (`probe`, `pilot`), the sources of measurements, and
the one plan builder of every command (`build_plan`)."""

from datm.auto.sources import (
    SOURCES,
    MeasurementsMissing,
    Runner,
    build_plan,
    describe,
    hand_over,
    measure,
    measurements_from_file,
    measurements_path,
    needs_measurements,
)

__all__ = [
    "MeasurementsMissing",
    "Runner",
    "SOURCES",
    "build_plan",
    "describe",
    "hand_over",
    "measure",
    "measurements_from_file",
    "measurements_path",
    "needs_measurements",
]
