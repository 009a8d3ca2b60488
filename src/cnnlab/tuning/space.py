"""SPACE.yaml: the base configuration and the settings a study searches.

    base: tutorial                   # a preset, or a config file (a path relative to this file)
    settings:                        # fixed for every trial (optional), by dotted name
      train.epochs: 2
    space:                           # what the study searches
      train.lr: {low: 1.0e-4, high: 1.0e-1, log: true}
      train.optimizer: {choices: [adam, sgd]}
      model.4.out_channels: {low: 16, high: 64, step: 16}
    pruner: {startup_trials: 5, warmup_epochs: 1}   # optional: MedianPruner settings

Names are the dotted setting names `cnnlab compare` shows: `train.KEY`, `model.LAYER.KEY` with
layers numbered from 1 as in `cnnlab summary`. `low`/`high` whole numbers search whole numbers
(with `step`), otherwise real numbers; `log: true` searches on a log scale. Data settings are
fixed (each worker loads the data once). Every mistake is found before any trial starts and
is reported in one line naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, config_from_dict, read_config_file, resolve_config, set_setting
from ..errors import CnnlabError, shorten

TOP_KEYS = ("base", "settings", "space", "pruner")
PARAM_KEYS = ("low", "high", "log", "step", "choices")
PRUNER_KEYS = ("startup_trials", "warmup_epochs")


@dataclass(frozen=True)
class Param:
    """One searched setting: a range of real or whole numbers, or a list of choices."""

    name: str                     # dotted setting name
    kind: str                     # "float", "int" or "choice"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        """The value an Optuna trial proposes (or the fixed one of a re-run trial)."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def extremes(self) -> list[Any]:
        """The values every other value lies between: checked before any trial."""
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]

    def describe(self) -> str:
        if self.kind == "choice":
            return f"one of {', '.join(map(str, self.choices))}"
        text = f"{self.low:g} to {self.high:g}"
        return text + (", log scale" if self.log else "") + (f", step {self.step:g}" if self.step else "")


@dataclass
class SearchSpace:
    path: Path
    base: dict[str, Any]          # the resolved base config with `settings` applied (Config.to_dict())
    base_name: str                # the preset or config file it came from
    settings: dict[str, Any]      # fixed settings, by dotted name
    params: list[Param]
    startup_trials: int = 5
    warmup_epochs: int = 0

    def config(self, values: dict[str, Any]) -> Config:
        """The full configuration of a trial with these searched values."""
        raw = copy.deepcopy(self.base)
        for name, value in values.items():
            set_setting(raw, name, value)
        return config_from_dict(raw)

    def suggest(self, trial) -> dict[str, Any]:
        return {param.name: param.suggest(trial) for param in self.params}

    def fingerprint(self) -> str:
        """What makes two runs of `tune` the same study: base, settings and space (not the pruner, nor
        where this machine keeps the data)."""
        base = copy.deepcopy(self.base)
        base["data"].pop("root", None)
        return json.dumps({"base": base, "params": [dataclasses.asdict(p) for p in self.params]}, sort_keys=True,
                          default=str)

    def check_shapes(self, input_shape: tuple[int, int, int], classes: int) -> None:
        """Build the network at every extreme of every layer setting: a value that cannot work is named now."""
        from ..layers import build_model, parse_layers

        where = self.path.name
        try:
            build_model(parse_layers(self.config({}).model), input_shape, classes)
        except CnnlabError as exc:
            raise CnnlabError(f"{where}: the base network does not fit the data: {exc}") from None
        for param in self.params:
            if not param.name.startswith("model."):
                continue
            for value in param.extremes():
                try:
                    build_model(parse_layers(self.config({param.name: value}).model), input_shape, classes)
                except CnnlabError as exc:
                    raise CnnlabError(f"{where}: space.{param.name} = {shorten(value)}: {exc}") from None


def load_space(path: str | Path) -> SearchSpace:
    """Read and check SPACE.yaml; every mistake is a CnnlabError naming the key."""
    path = Path(path)
    where = path.name
    raw = read_config_file(path)
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        raise CnnlabError(f"{where}: {unknown[0]}: unknown key{_did_you_mean(unknown[0], TOP_KEYS)}")
    base_name, base = _base(path, raw.get("base"))
    settings = raw.get("settings") or {}
    if not isinstance(settings, dict):
        raise CnnlabError(f"{where}: settings: expected a mapping of dotted setting names to values")
    for name, value in settings.items():
        base = _with(base, where, f"settings.{name}", str(name), value, data_allowed=True)
    space = raw.get("space")
    if not isinstance(space, dict) or not space:
        raise CnnlabError(f"{where}: space: expected a mapping of settings to search, e.g. "
                          "train.lr: {low: 1.0e-4, high: 1.0e-1, log: true}")
    params = [_param(where, str(name), spec) for name, spec in space.items()]
    for param in params:
        if param.name in settings:
            raise CnnlabError(f"{where}: space.{param.name}: also fixed under settings; keep one")
        for value in param.extremes():
            _with(base, where, f"space.{param.name}", param.name, value)
    pruner = raw.get("pruner") or {}
    if not isinstance(pruner, dict):
        raise CnnlabError(f"{where}: pruner: expected a mapping (startup_trials, warmup_epochs)")
    for key, value in pruner.items():
        if key not in PRUNER_KEYS:
            raise CnnlabError(f"{where}: pruner.{key}: unknown key{_did_you_mean(key, PRUNER_KEYS)}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CnnlabError(f"{where}: pruner.{key}: expected a whole number >= 0, got {shorten(value)}")
    return SearchSpace(path=path, base=base, base_name=base_name, settings=dict(settings), params=params,
                       startup_trials=pruner.get("startup_trials", 5), warmup_epochs=pruner.get("warmup_epochs", 0))


def _base(path: Path, base: Any) -> tuple[str, dict[str, Any]]:
    from ..presets import PRESETS

    where = path.name
    if not isinstance(base, str) or not base:
        raise CnnlabError(f"{where}: base: expected a preset name ({', '.join(PRESETS)}) or a config file")
    if base in PRESETS:
        return base, resolve_config(base).to_dict()
    file = (path.parent / base).expanduser()
    if file.suffix.lower() not in (".yaml", ".yml", ".toml", ".json"):
        raise CnnlabError(f"{where}: base: {shorten(base)} is neither a preset ({', '.join(PRESETS)}) nor a config file")
    if not file.is_file():
        raise CnnlabError(f"{where}: base: config file {file} not found")
    try:
        return base, resolve_config(None, file).to_dict()
    except CnnlabError as exc:
        raise CnnlabError(f"{where}: base: {exc}") from None


def _with(base: dict[str, Any], where: str, key: str, name: str, value: Any, data_allowed: bool = False) -> dict[str, Any]:
    """`base` with one setting changed, checked as `cnnlab train` checks a config; errors name `key`."""
    if name.startswith("data.") and not data_allowed:
        raise CnnlabError(f"{where}: {key}: data settings cannot be searched (each worker loads the data once); "
                          "fix them under settings")
    changed = copy.deepcopy(base)
    try:
        set_setting(changed, name, value)
        config_from_dict(changed)
    except CnnlabError as exc:
        text = str(exc)
        if text.startswith(f"{name}:"):  # the message names the setting already (and the value)
            raise CnnlabError(f"{where}: {key}:{text[len(name) + 1:]}") from None
        raise CnnlabError(f"{where}: {key} = {shorten(value)}: {text}") from None
    return changed


def _param(where: str, name: str, spec: Any) -> Param:
    key = f"space.{name}"
    if not isinstance(spec, dict):
        raise CnnlabError(f"{where}: {key}: expected {{low: .., high: ..}} or {{choices: [..]}}, got {shorten(spec)}")
    unknown = [k for k in spec if k not in PARAM_KEYS]
    if unknown:
        raise CnnlabError(f"{where}: {key}.{unknown[0]}: unknown key{_did_you_mean(str(unknown[0]), PARAM_KEYS)}")
    if "choices" in spec:
        if set(spec) - {"choices"}:
            raise CnnlabError(f"{where}: {key}: choices cannot be combined with {sorted(set(spec) - {'choices'})[0]}")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise CnnlabError(f"{where}: {key}.choices: expected a non-empty list, got {shorten(choices)}")
        for choice in choices:
            if not isinstance(choice, (str, int, float, bool)) and choice is not None:
                raise CnnlabError(f"{where}: {key}.choices: expected numbers, text or true/false, got {shorten(choice)}")
        return Param(name=name, kind="choice", choices=tuple(choices))
    for bound in ("low", "high"):
        if bound not in spec:
            raise CnnlabError(f"{where}: {key}: missing {shorten(bound)} (or give choices: [...])")
    low, high = (_number(where, f"{key}.{b}", spec[b]) for b in ("low", "high"))
    step = _number(where, f"{key}.step", spec["step"]) if spec.get("step") is not None else None
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise CnnlabError(f"{where}: {key}.log: expected true or false, got {shorten(log)}")
    if not low < high:
        raise CnnlabError(f"{where}: {key}: low must be below high (got {low:g} and {high:g})")
    if log and low <= 0:
        raise CnnlabError(f"{where}: {key}: a log scale needs low > 0 (got {low:g})")
    if step is not None and (step <= 0 or log):
        raise CnnlabError(f"{where}: {key}.step: " + ("cannot be combined with log: true" if log else "must be > 0"))
    whole = all(isinstance(v, int) for v in (low, high)) and (step is None or isinstance(step, int))
    return Param(name=name, kind="int" if whole else "float", low=low, high=high, log=log, step=step)


def _number(where: str, key: str, value: Any) -> int | float:
    # YAML reads 1e-4 (no dot) as text: accept the numbers people write
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CnnlabError(f"{where}: {key}: expected a number, got {shorten(value)}")
    return value


def _did_you_mean(key: str, known) -> str:
    guess = difflib.get_close_matches(str(key), list(known), n=1)
    return f" (did you mean '{guess[0]}'?)" if guess else f" (known: {', '.join(known)})"
