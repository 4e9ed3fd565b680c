"""Plans: which adapters to train on which directions, which merges to make, and which module
serves each direction. Pure functions of (strategy, languages, groups); the runner executes a plan
and never decides what to train.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from datm.languages import ENGLISH, Direction, directions_for

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

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


def dat(langs: list[str], groups: dict[str, list[str]], method: str) -> Plan:
    adapters = [AdapterSpec(_xx_en(x), [_xx_en(x)]) for x in langs]
    routes = {_xx_en(x): _xx_en(x) for x in langs}
    for g, members in groups.items():
        name = f"en-xx.{g}"
        adapters.append(AdapterSpec(name, [_en_xx(x) for x in members]))
        routes.update({_en_xx(x): name for x in members})
    return Plan("dat", langs, groups, adapters, [], _ordered(routes, langs))


def datm(langs: list[str], groups: dict[str, list[str]], method: str) -> Plan:
    p = dat(langs, groups, method)
    merges = []
    for g, members in groups.items():
        if len(members) < 2:
            continue  # a one-language group ships its adapter as is: merging one model only trims it
        name = f"xx-en.{g}"
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
        for fam, fn in (("xx-en", _xx_en), ("en-xx", _en_xx)):
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


STRATEGIES: dict[str, Callable[[list[str], dict[str, list[str]], str], Plan]] = {
    "zero_shot": zero_shot,
    "multilingual": multilingual,
    "separate": separate,
    "group": group,
    "dat": dat,
    "datm": datm,
    "separate_merged": separate_merged,
}


def make_plan(
    strategy: str, languages: list[str], groups: dict[str, list[str]], method: str = "ties"
) -> Plan:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {sorted(STRATEGIES)}")
    return STRATEGIES[strategy](list(languages), groups, method)


def shipped_parameters(plan: Plan, base_params: int, module_params: int) -> int:
    """The paper's efficiency measure: base + every shipped module."""
    return base_params + module_params * len(plan.shipped)


def format_plan(plan: Plan, base_params: int | None = None, module_params: int | None = None) -> str:
    lines = [f"strategy: {plan.strategy}    groups: " + ", ".join(f"{g}={m}" for g, m in plan.groups.items())]
    lines.append("")
    lines.append(f"{'module':<22} {'kind':<8} {'built from':<40} serves")
    for a in plan.adapters:
        serves = [d for d, m in plan.routes.items() if m == a.name]
        lines.append(f"{a.name:<22} {'train':<8} {','.join(a.directions)[:40]:<40} {','.join(serves) or '-'}")
    for m in plan.merges:
        serves = [d for d, mod in plan.routes.items() if mod == m.name]
        lines.append(f"{m.name:<22} {m.method:<8} {','.join(m.sources)[:40]:<40} {','.join(serves)}")
    lines.append("")
    lines.append(
        f"adapters trained: {len(plan.adapters)}   merges: {len(plan.merges)}   "
        f"modules shipped: {len(plan.shipped)}"
    )
    if base_params is not None and module_params is not None:
        total = shipped_parameters(plan, base_params, module_params)
        lines.append(
            f"parameters shipped: {total:,} = base {base_params:,} + {len(plan.shipped)} x {module_params:,}"
        )
    for d, why in plan.notes.items():
        lines.append(f"  {d}: {why}")
    return "\n".join(lines)
