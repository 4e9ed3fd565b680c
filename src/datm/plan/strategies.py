"""Plans: which adapters to train on which directions, which merges to make, and which module
serves each direction. Pure functions of (strategy, languages, groups); the runner executes a plan
and never decides what to train.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from datm.config import names
from datm.errors import DatmError
from datm.languages import EN_XX, ENGLISH, XX_EN, Direction, directions_for

BASE = "__base__"  # route target meaning "the base model, no module" (peft's name for it)


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    directions: list[str]


@dataclass(frozen=True)
class MergeSpec:
    name: str
    sources: list[str]  # adapter names
    method: str = "ties"


@dataclass
class Plan:
    strategy: str
    languages: list[str]
    groups: dict[str, list[str]]
    adapters: list[AdapterSpec]
    merges: list[MergeSpec] = field(default_factory=list)
    routes: dict[str, str] = field(default_factory=dict)  # "de-en" -> module name
    notes: dict[str, str] = field(default_factory=dict)  # direction -> why (used by `auto`)
    # `auto` only: what decided it (source, threshold, the measurements file and its fingerprint)
    decided_by: dict[str, Any] = field(default_factory=dict)
    # where the dev pairs the run decides on come from (`datm.data.dev.record`); empty: it uses none
    dev: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.dev:  # a run that decides nothing on dev data: plan.json as before
            del out["dev"]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        return cls(
            strategy=d["strategy"],
            languages=list(d["languages"]),
            groups={k: list(v) for k, v in d["groups"].items()},
            adapters=[AdapterSpec(a["name"], list(a["directions"])) for a in d["adapters"]],
            merges=[
                MergeSpec(m["name"], list(m["sources"]), m.get("method", "ties")) for m in d.get("merges", [])
            ],
            routes=dict(d["routes"]),
            notes=dict(d.get("notes", {})),
            decided_by=dict(d.get("decided_by", {})),
            dev=dict(d.get("dev", {})),
        )

    @property
    def shipped(self) -> list[str]:
        """Modules a user needs at translation time (what the routes point to), in plan order."""
        order = [a.name for a in self.adapters] + [m.name for m in self.merges]
        used = set(self.routes.values()) - {BASE}
        return [n for n in order if n in used]

    def kind(self, module: str) -> str:
        return "merge" if any(m.name == module for m in self.merges) else "adapter"

    def directions(self) -> list[Direction]:
        return [Direction.parse(d) for d in self.routes]


def _xx_en(x: str) -> str:
    return f"{x}-{ENGLISH}"


def _en_xx(x: str) -> str:
    return f"{ENGLISH}-{x}"


# Each family (languages.FAMILIES, XX→En first) and the direction it gives a non-English language.
_FAMILY_DIRECTION: tuple[tuple[str, Callable[[str], str]], ...] = ((XX_EN, _xx_en), (EN_XX, _en_xx))


def multilingual(langs: list[str], groups: dict[str, list[str]], method: str) -> Plan:
    dirs = [str(d) for d in directions_for(langs)]
    return Plan(
        "multilingual",
        langs,
        groups,
        [AdapterSpec("multilingual", dirs)],
        [],
        dict.fromkeys(dirs, "multilingual"),
    )


def separate(langs: list[str], groups: dict[str, list[str]], method: str) -> Plan:
    dirs = [str(d) for d in directions_for(langs)]
    return Plan("separate", langs, groups, [AdapterSpec(d, [d]) for d in dirs], [], {d: d for d in dirs})


def group(langs: list[str], groups: dict[str, list[str]], method: str) -> Plan:
    adapters, routes = [], {}
    for g, members in groups.items():
        dirs = [_xx_en(x) for x in members] + [_en_xx(x) for x in members]
        adapters.append(AdapterSpec(f"group-{g}", dirs))
        routes.update(dict.fromkeys(dirs, f"group-{g}"))
    return Plan("group", langs, groups, adapters, [], _ordered(routes, langs))


def group_family(langs: list[str], groups: dict[str, list[str]], method: str) -> Plan:
    """One adapter per group and family (XX→En, En→XX): what `auto` means by training jointly, and
    the joint half of its pilot. A family with one language in a group trains that direction alone,
    under the direction's name (as `separate` and `auto` name it)."""
    adapters, routes = [], {}
    for g, members in groups.items():
        for family, direction_of in _FAMILY_DIRECTION:
            dirs = [direction_of(x) for x in members]
            name = f"{family}.{g}.joint" if len(dirs) >= 2 else dirs[0]
            adapters.append(AdapterSpec(name, dirs))
            routes.update(dict.fromkeys(dirs, name))
    return Plan("group_family", langs, groups, adapters, [], _ordered(routes, langs))


def dat(langs: list[str], groups: dict[str, list[str]], method: str) -> Plan:
    adapters = [AdapterSpec(_xx_en(x), [_xx_en(x)]) for x in langs]
    routes = {_xx_en(x): _xx_en(x) for x in langs}
    for g, members in groups.items():
        name = f"{EN_XX}.{g}"
        adapters.append(AdapterSpec(name, [_en_xx(x) for x in members]))
        routes.update({_en_xx(x): name for x in members})
    return Plan("dat", langs, groups, adapters, [], _ordered(routes, langs))


def datm(langs: list[str], groups: dict[str, list[str]], method: str) -> Plan:
    p = dat(langs, groups, method)
    merges = []
    for g, members in groups.items():
        if len(members) < 2:
            continue  # a one-language group ships its adapter as is: merging one model only trims it
        name = f"{XX_EN}.{g}"
        merges.append(MergeSpec(name, [_xx_en(x) for x in members], method))
        p.routes.update({_xx_en(x): name for x in members})
    return Plan("datm", langs, groups, p.adapters, merges, p.routes)


def separate_merged(langs: list[str], groups: dict[str, list[str]], method: str) -> Plan:
    """Ablation: separate adapters per direction, merged per group in *both* families, so the merge
    degradation of XX→En and En→XX can be compared side by side."""
    p = separate(langs, groups, method)
    merges, routes = [], dict(p.routes)
    for g, members in groups.items():
        if len(members) < 2:
            continue  # nothing to merge with
        for fam, fn in _FAMILY_DIRECTION:
            name = f"{fam}.{g}"
            merges.append(MergeSpec(name, [fn(x) for x in members], method))
            routes.update({fn(x): name for x in members})
    return Plan("separate_merged", langs, groups, p.adapters, merges, _ordered(routes, langs))


def zero_shot(langs: list[str], groups: dict[str, list[str]], method: str) -> Plan:
    """The base model with no adapter: the reference every strategy should beat."""
    dirs = [str(d) for d in directions_for(langs)]
    return Plan("zero_shot", langs, groups, [], [], dict.fromkeys(dirs, BASE))


def _ordered(routes: dict[str, str], langs: list[str]) -> dict[str, str]:
    return {str(d): routes[str(d)] for d in directions_for(langs)}


class PlanError(DatmError):
    """A plan that cannot be built from what it was given."""


class MeasurementsRequired(PlanError):
    """Strategy `auto` was asked for without the measurements it decides from."""


# How a measurement reads in plan notes, per source.
_MEASUREMENT_LABELS = {"probe": "probe cos", "pilot": "pilot Δ"}

# The paper's finding (Zheng et al. 2025), where a measurement does not decide: XX→En conflict
# (separate adapters), En→XX synergy (joint). True: joint.
PRIOR = {XX_EN: False, EN_XX: True}
PRIOR_TEXT = "the paper's prior: XX→En separate, En→XX joint"

AUTO_RULE = (
    "a direction whose measurement is > {threshold:.2f} is trained jointly with the other such directions "
    "of its group and family (one adapter per group and family); any other direction, or one with no "
    "partner to train with, gets its own adapter; a group's own XX→En adapters are merged ({method}, "
    "if 2 or more); own En→XX adapters ship unmerged (merging hurts En→XX)"
)


def auto_plan(
    languages: list[str],
    groups: dict[str, list[str]],
    measurements: dict[str, float],
    threshold: float = 0.0,
    source: str = "probe",
    method: str = "ties",
    undecided: frozenset[str] = frozenset(),
) -> Plan:
    """A plan decided per direction from measurements, where positive means joint training helps.

    `measurements` maps every direction ("de-en", "en-de", ...) to a number: e.g. a pilot's
    Δ = score(joint) − score(separate), or (`source="probe"`) the direction's mean LoRA-gradient cosine
    with the other directions of its group and family (`datm.probe.auto_measurements_from_probe`).

    Rule, per group and family (XX→En, En→XX):
      - a direction with measurement > `threshold` is "joint": the joint directions of one group and
        family share one adapter, named `{family}.{group}.joint`;
      - any other direction gets its own adapter (named after the direction); so does a joint
        direction that is the only joint one of its group and family (there is nobody to share with);
      - as DATM does, the own-adapter XX→En directions of a group are merged into `xx-en.{group}`
        (when there are 2 or more); own-adapter En→XX directions ship unmerged, because merging hurts
        En→XX (Zheng et al., 2025).
    A direction in `undecided` (its measurement's interval includes the threshold) follows `PRIOR`
    instead: XX→En separate, En→XX joint.
    `plan.notes` holds, per direction, the decision with its measured value, and the rule under "rule".
    """
    langs = list(languages)
    expected = [str(d) for d in directions_for(langs)]
    _check_measurements(expected, measurements)
    label = _MEASUREMENT_LABELS.get(source, source)

    def is_joint(d: str) -> bool:
        return PRIOR[Direction.parse(d).family] if d in undecided else measurements[d] > threshold

    def measured(d: str) -> str:
        if d in undecided:
            return f"{label} {measurements[d]:.2f}, its interval includes {threshold:.2f}: {PRIOR_TEXT}"
        op = ">" if measurements[d] > threshold else "<="
        return f"{label} {measurements[d]:.2f} {op} {threshold:.2f}"

    plan = Plan("auto", langs, groups, adapters=[], merges=[], routes={}, notes={})  # filled per group
    for g, members in groups.items():
        for family, direction_of in _FAMILY_DIRECTION:
            dirs = [direction_of(x) for x in members]
            joint = [d for d in dirs if is_joint(d)]
            _add_group_family(plan, g, family, dirs, joint, measured, method)
    plan.notes = {d: plan.notes[d] for d in expected}
    plan.notes["rule"] = AUTO_RULE.format(threshold=threshold, method=method)
    plan.routes = _ordered(plan.routes, langs)
    return plan


def _check_measurements(expected: list[str], measurements: dict[str, float]) -> None:
    """`measurements` must hold a finite number for every `expected` direction, and nothing else."""
    missing = [d for d in expected if d not in measurements]
    extra = sorted(set(measurements) - set(expected))
    if missing or extra:
        raise PlanError(
            f"auto plan: measurements must cover exactly the directions {expected}; "
            + (f"missing {missing}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"not in this config {extra}" if extra else "")
        )
    for d, value in measurements.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise PlanError(f"auto plan: measurement for {d} must be a finite number, got {value!r}")


def _add_group_family(
    plan: Plan,
    g: str,
    family: str,
    dirs: list[str],
    joint: list[str],
    measured: Callable[[str], str],
    method: str,
) -> None:
    """Add the adapters, merge, routes and notes of group `g`'s directions `dirs` of one family to `plan`
    (see `auto_plan`'s rule); `joint` are those whose measurement is above the threshold, and
    `measured(d)` says so in a note."""
    if len(joint) >= 2:
        name = f"{family}.{g}.joint"
        plan.adapters.append(AdapterSpec(name, joint))
        for d in joint:
            plan.routes[d] = name
            plan.notes[d] = f"joint ({measured(d)}) in {name}"
    own = [d for d in dirs if d not in plan.routes]
    for d in own:
        plan.adapters.append(AdapterSpec(d, [d]))
        plan.routes[d] = d
        if d in joint:
            plan.notes[d] = f"own adapter: joint ({measured(d)}) but no other {family} direction of {g} is"
        else:
            plan.notes[d] = f"separate ({measured(d)})"
    if family == XX_EN and len(own) >= 2:
        name = f"{XX_EN}.{g}"
        plan.merges.append(MergeSpec(name, own, method))
        for d in own:
            plan.routes[d] = name
            plan.notes[d] += f"; merged into {name} ({method})"
    elif family == EN_XX:
        for d in own:
            plan.notes[d] += "; shipped unmerged"


def _auto_without_measurements(langs: list[str], groups: dict[str, list[str]], method: str) -> Plan:
    raise MeasurementsRequired(
        "strategy 'auto' decides per direction from measurements (a pilot by default, see the config's "
        "`auto` section): build it with datm.auto.build_plan(config), or call datm.plan.auto_plan with "
        "the measurements"
    )


STRATEGIES: dict[str, Callable[[list[str], dict[str, list[str]], str], Plan]] = {
    "zero_shot": zero_shot,
    "multilingual": multilingual,
    "separate": separate,
    "group": group,
    "group_family": group_family,
    "dat": dat,
    "datm": datm,
    "separate_merged": separate_merged,
    # `auto` needs measurements that a (strategy, languages, groups) call cannot carry: make_plan
    # raises MeasurementsRequired; auto_plan builds it.
    "auto": _auto_without_measurements,
}
names.check_registry("strategy", names.STRATEGIES, STRATEGIES)


def make_plan(
    strategy: str, languages: list[str], groups: dict[str, list[str]], method: str = "ties"
) -> Plan:
    if strategy not in STRATEGIES:
        raise PlanError(f"unknown strategy {strategy!r}; expected one of {sorted(STRATEGIES)}")
    return STRATEGIES[strategy](list(languages), groups, method)


def shipped_parameters(
    plan: Plan, base_params: int, module_params: int, merge_params: dict[str, int] | None = None
) -> int:
    """The paper's efficiency measure: base + every shipped module (merged modules may differ in
    size from adapters, depending on the merge form)."""
    merge_params = merge_params or {}
    return base_params + sum(merge_params.get(m, module_params) for m in plan.shipped)
