"""Reading a config: YAML or a mapping into the typed sections, relative paths resolved against the
config file's folder, then validated (`datm.config.validation`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from datm.config.schema import SECTIONS, AutoConfig, CometConfig, Config, ConfigError, PilotConfig
from datm.config.validation import validate
from datm.log import get_logger

log = get_logger(__name__)


def _auto_section(raw: Any, source: str) -> AutoConfig:
    auto = _section(AutoConfig, raw, f"{source}: auto")
    if not isinstance(auto.pilot, PilotConfig):
        auto.pilot = _section(PilotConfig, auto.pilot, f"{source}: auto.pilot")
    return auto


def _section(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(names)}")
    return cls(**raw)


def _resolve_path(value: str | None, base: Path) -> str | None:
    """Relative paths resolve against the config file's folder; hub ids (no such path) stay as given."""
    if value is None:
        return None
    if value.startswith("flores:"):
        return "flores:" + str(_resolve_path(value.removeprefix("flores:"), base))
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    candidate = base / p
    if value.startswith((".", "..")) or "{" in value or candidate.exists() or "/" not in value:
        return str(candidate)
    return value  # e.g. 'haoranxu/X-ALMA-13B-Pretrain'


def from_dict(raw: dict[str, Any], source: str = "<dict>", base_dir: Path | None = None) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a YAML mapping at top level")
    top = {f.name for f in dataclasses.fields(Config)} - {"source"}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; expected some of {sorted(top)}")
    if "languages" not in raw or not raw["languages"]:
        raise ConfigError(
            f"{source}: key 'languages' is required (a list of non-English codes, e.g. [de, cs])"
        )
    if "data" not in raw:
        raise ConfigError(f"{source}: key 'data' is required (with at least 'train' and 'test' patterns)")
    kwargs: dict[str, Any] = {k: v for k, v in raw.items() if k not in SECTIONS}
    for key, cls in SECTIONS.items():
        kwargs[key] = _section(cls, raw.get(key), f"{source}: {key}")
    kwargs["auto"] = _auto_section(raw.get("auto"), source)
    cfg = Config(**kwargs, source=source)
    base = base_dir or Path.cwd()
    cfg.data.train = _resolve_path(cfg.data.train, base) if cfg.data.format != "datasets" else cfg.data.train
    cfg.data.test = _resolve_path(cfg.data.test, base) if cfg.data.format != "datasets" else cfg.data.test
    cfg.data.valid = _resolve_path(cfg.data.valid, base) if cfg.data.format != "datasets" else cfg.data.valid
    cfg.output_dir = str(
        (base / cfg.output_dir) if not Path(cfg.output_dir).is_absolute() else cfg.output_dir
    )
    if cfg.base_model is not None:
        cfg.base_model = _resolve_path(cfg.base_model, base)
    if cfg.adapter_cache is not None:
        if not isinstance(cfg.adapter_cache, str) or not cfg.adapter_cache:
            raise ConfigError(f"{source}: adapter_cache must be a directory path, got {cfg.adapter_cache!r}")
        cfg.adapter_cache = str(base / Path(cfg.adapter_cache).expanduser())
    cfg.eval.comet = comet_config(cfg.eval.comet, f"{source}: eval.comet", base)
    if cfg.auto.measurements is not None:
        if not isinstance(cfg.auto.measurements, str):
            raise ConfigError(
                f"{source}: auto.measurements must be a file path, got {cfg.auto.measurements!r}"
            )
        cfg.auto.measurements = str(base / Path(cfg.auto.measurements).expanduser())
    validate(cfg)
    return cfg


def comet_config(raw: Any, where: str, base: Path) -> CometConfig | None:
    """`eval.comet` as given (a model, or a mapping), with paths resolved against `base`."""
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = {"model": raw}
    comet = _section(CometConfig, raw, where) if isinstance(raw, dict) and "model" in raw else None
    if comet is None or not isinstance(comet.model, str) or not comet.model:
        raise ConfigError(
            f"{where}: expected a COMET model (name or path) or a mapping with 'model' and optionally "
            "'python', 'batch_size', 'device'"
        )
    comet.model = str(_resolve_path(comet.model, base))
    if comet.python is not None:
        # a path (relative to the config's folder), or a command looked up on PATH
        python = Path(comet.python).expanduser()
        comet.python = str(base / python) if "/" in comet.python else comet.python
    if comet.device not in ("cpu", "cuda"):
        raise ConfigError(f"{where}: device must be 'cpu' or 'cuda', got {comet.device!r}")
    if not isinstance(comet.batch_size, int) or comet.batch_size < 1:
        raise ConfigError(f"{where}: batch_size must be an integer >= 1, got {comet.batch_size!r}")
    return comet


def load(path: str | Path, auto_overrides: dict[str, Any] | None = None) -> Config:
    """The config in a YAML file. `auto_overrides` (the command line's `--measurements`,
    `--threshold`) replace keys of its `auto` section before it is parsed and validated, so every
    command builds its plan from the same keys."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; give the path of a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if auto_overrides:
        if not isinstance(raw, dict) or raw.get("strategy") != "auto":
            keys = ", ".join(f"auto.{k}" for k in sorted(auto_overrides))
            strategy = raw.get("strategy", "datm") if isinstance(raw, dict) else None
            raise ConfigError(
                f"{path}: --measurements and --threshold (overriding {keys}) are for strategy auto; "
                f"the config has strategy {strategy!r}"
            )
        section = raw.get("auto") or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: auto: expected a mapping, got {type(section).__name__}")
        raw = {**raw, "auto": {**section, **auto_overrides}}
    cfg = from_dict(raw, source=str(path), base_dir=path.resolve().parent)
    keys = ", ".join(f"auto.{k}" for k in sorted(auto_overrides or {}))
    overridden = f" (command line: {keys})" if keys else ""
    log.debug(f"config {path}{overridden}: strategy {cfg.strategy}, output_dir {cfg.output_dir}")
    return cfg
