"""The experiment config: one YAML file, parsed into typed sections with errors that name the key.

`schema`: the sections (dataclasses) and their defaults; `loading`: YAML or a mapping into them,
relative paths resolved; `validation`: every setting checked when the config loads.
"""

from __future__ import annotations

from datm.config.loading import comet_config, from_dict, load
from datm.config.schema import (
    AutoConfig,
    CometConfig,
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    LoraConfig,
    MergeConfig,
    PilotConfig,
    TrainConfig,
)
from datm.config.validation import (
    ATTN_IMPLEMENTATIONS,
    MERGE_WEIGHT,
    NUMERIC_SETTINGS,
    POSITIVE_INT,
    POSITIVE_INT_OR_NULL,
    RESOURCE_KEYS,
    Number,
    check_merge_weights,
    validate,
    validate_auto,
    validate_scaleout,
)

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "MERGE_WEIGHT",
    "NUMERIC_SETTINGS",
    "POSITIVE_INT",
    "POSITIVE_INT_OR_NULL",
    "RESOURCE_KEYS",
    "AutoConfig",
    "CometConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LoraConfig",
    "MergeConfig",
    "Number",
    "PilotConfig",
    "TrainConfig",
    "check_merge_weights",
    "comet_config",
    "from_dict",
    "load",
    "validate",
    "validate_auto",
    "validate_scaleout",
]
