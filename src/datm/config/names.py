"""The names a config may use for what higher stages register: strategies, merge methods and forms,
executors, task kinds and auto's measurement sources.

A config is checked when it loads, before any stage is imported, so it reads these plain lists; each
registry (`datm.plan.STRATEGIES`, `datm.merge.METHODS`, `datm.merge.forms.FORMS`,
`datm.run.executors.EXECUTORS`, `datm.eval.engines.ENGINES`, `datm.run.graph.KINDS`,
`datm.auto.SOURCES`) is built from them and
refuses a name missing here, and a test holds each registry equal to its list.
"""

from __future__ import annotations

STRATEGIES = (
    "zero_shot",
    "multilingual",
    "separate",
    "group",
    "group_family",
    "dat",
    "datm",
    "separate_merged",
    "auto",
)
# Strategies whose plan trains no adapter (every other one needs a training budget).
UNTRAINED_STRATEGIES = ("zero_shot",)
MERGE_METHODS = ("ties", "linear", "cat", "dare_ties", "knots", "tsv", "iso_c", "iso_c_core", "core_space")
# Merge methods that can average (merge.normalize: true) or sum the agreeing entries.
NORMALIZING_METHODS = ("ties", "dare_ties")
MERGE_AUTO = "auto"  # merge.method: choose among candidates on the dev set
MERGE_FORMS = ("lowrank", "factor", "dense", "sparse")
EXECUTORS = ("local", "ray")
TASK_KINDS = ("train", "merge", "translate", "score", "report")
AUTO_SOURCES = ("pilot", "full_pilot", "probe", "file")
PILOT_SOURCES = ("pilot", "full_pilot")  # the sources that run auto's pilot (datm.auto.pilot)
# Translation engines (`datm.eval.engines.ENGINES`); eval.engine also takes "auto".
ENGINES = ("transformers", "vllm")


def check_registry(kind: str, names: tuple[str, ...], registered: object) -> None:
    """A registry's keys are exactly its names here (in order): a stage cannot drift from the config."""
    keys = tuple(registered)  # type: ignore[call-overload]
    if keys != names:
        raise AssertionError(f"{kind} registry {keys} differs from datm.config.names {names}")
