"""Plans: which adapters a strategy trains, which merges it makes, which module serves each direction
(`strategies`, the auto rule included), and the checks of a config that need its plan (`checks`)."""

from datm.plan.checks import validate
from datm.plan.dev import dev_directions
from datm.plan.strategies import (
    AUTO_RULE,
    BASE,
    STRATEGIES,
    AdapterSpec,
    MeasurementsRequired,
    MergeSpec,
    Plan,
    PlanError,
    auto_plan,
    make_plan,
    shipped_parameters,
)

__all__ = [
    "AUTO_RULE",
    "AdapterSpec",
    "BASE",
    "MeasurementsRequired",
    "MergeSpec",
    "Plan",
    "PlanError",
    "STRATEGIES",
    "auto_plan",
    "dev_directions",
    "make_plan",
    "shipped_parameters",
    "validate",
]
