"""Compile ``routes:`` into rules, checked against the installed plugins, and match them.

Everything that can be wrong with a rule is found when the node starts (or by ``dicomnode
check``): unknown plugin, broken plugin, parameters the plugin's model refuses, unknown
destination, bad keyword or regex. Never at 3 a.m. when the first study arrives.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from dicomnode.config import ConfigError, RouteConfig, Settings
from dicomnode.plugin import GPU, Params
from dicomnode.run.registry import PluginInfo

Predicate = Callable[[Any], bool]


@dataclass(frozen=True)
class Step:
    plugin: str
    params: Params


@dataclass(frozen=True)
class Rule:
    name: str
    level: str
    predicates: tuple[tuple[str, Predicate], ...]
    steps: tuple[Step, ...]
    send_to: tuple[str, ...]

    def matches(self, attributes: Mapping[str, Any]) -> bool:
        """``attributes``: keyword → value for one series (a header, plus CallingAETitle)."""
        return all(pred(attributes.get(key)) for key, pred in self.predicates)

    def refusing(self, attributes: Mapping[str, Any]) -> list[str]:
        """The keywords whose condition ``attributes`` fails (empty: the rule matches); for
        a dry run that says why a route does not match."""
        return [key for key, pred in self.predicates if not pred(attributes.get(key))]


def _values(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v).strip() for v in value]
    return [str(value).strip()]


def _predicate(expected: Any) -> Predicate:
    if isinstance(expected, dict):
        rx = re.compile(expected["regex"])
        return lambda v: any(rx.search(x) for x in _values(v))
    wanted = {str(x).strip() for x in (expected if isinstance(expected, list) else [expected])}
    return lambda v: any(x in wanted for x in _values(v))


def _params_error(prefix: str, e: ValidationError) -> list[str]:
    out = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"])
        msg = "unknown parameter" if err["type"] == "extra_forbidden" else err["msg"]
        out.append(f"{prefix}.{key}: {msg}" if key else f"{prefix}: {msg}")
    return out


def compile_routes(settings: Settings, plugins: Mapping[str, PluginInfo]) -> list[Rule]:
    """Raise ConfigError listing every problem, by config key."""
    problems: list[str] = []
    rules: list[Rule] = []
    for i, route in enumerate(settings.routes):
        steps = []
        for j, step in enumerate(route.pipeline):
            where = f"routes.{i}.pipeline.{j}"
            info = plugins.get(step.plugin)
            if info is None:
                known = ", ".join(sorted(n for n, p in plugins.items() if p.ok)) or "none"
                problems.append(f"{where}.plugin: {step.plugin!r} is not installed "
                                f"(installed: {known})")
                continue
            if not info.ok or info.cls is None:
                problems.append(f"{where}.plugin: {step.plugin!r} is broken: {info.error}")
                continue
            if info.cls.needs.gpu == GPU.REQUIRED and settings.runner.gpu_slots == 0:
                problems.append(f"{where}.plugin: {step.plugin!r} requires a GPU but "
                                "runner.gpu_slots is 0")
            try:
                steps.append(Step(step.plugin, info.cls.params_model.model_validate(step.params)))
            except ValidationError as e:
                problems += _params_error(f"{where}.params", e)
        rules.append(_rule(route, settings.assemble.level, tuple(steps)))
    if problems:
        raise ConfigError("invalid routes\n  " + "\n  ".join(problems))
    return rules


def match_rule(route: RouteConfig, default_level: str) -> Rule:
    """A route's rule without its pipeline: enough to match (a dry run needs no plugin)."""
    return _rule(route, default_level, ())


def _rule(route: RouteConfig, default_level: str, steps: tuple[Step, ...]) -> Rule:
    return Rule(route.name, route.level or default_level,
                tuple((k, _predicate(v)) for k, v in route.match.items()), steps,
                tuple(route.send_to))


def select_series(rule: Rule, series: Sequence[Mapping[str, Any]]) -> list[int]:
    """Indices of the series a rule takes: the matching ones (empty = the rule does not match).

    At series level ``series`` holds the one completed series; at study level all of the
    study's series, of which the matching ones become the pipeline's inputs.
    """
    return [k for k, attrs in enumerate(series) if rule.matches(attrs)]
