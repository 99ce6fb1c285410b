"""Find installed plugins through the ``dicomnode.plugins`` entry-point group.

A broken plugin (import error, wrong base class, unsupported api_version, name mismatch) is
reported with its reason and left out; it never takes the node down with it.
"""

from __future__ import annotations

import importlib.metadata as md
from dataclasses import dataclass
from typing import Any

from dicomnode.plugin import ENTRY_POINT_GROUP, Code, Params, Plugin, api_mismatch


@dataclass(frozen=True)
class PluginInfo:
    name: str
    distribution: str
    entry_point: str
    cls: type[Plugin[Any]] | None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.cls is not None and not self.error


def _check(name: str, obj: object) -> str:
    if not (isinstance(obj, type) and issubclass(obj, Plugin)):
        return "not a subclass of dicomnode.plugin.Plugin"
    for attr in ("name", "version"):
        if not isinstance(getattr(obj, attr, None), str) or not getattr(obj, attr):
            return f"class attribute {attr!r} missing"
    if obj.name != name:
        return f"entry point is named {name!r} but the plugin calls itself {obj.name!r}"
    family = getattr(obj, "algorithm_family", None)
    if family is not None and not isinstance(family, Code):
        return "class attribute 'algorithm_family' must be a Code from CID 7162 (or None)"
    mismatch = api_mismatch(name, obj.api_version)
    if mismatch:
        return mismatch
    if not (isinstance(obj.params_model, type) and issubclass(obj.params_model, Params)):
        return "params_model must subclass dicomnode.plugin.Params"
    if getattr(obj.run, "__isabstractmethod__", False):
        return "run() is not implemented"
    return ""


def discover(group: str = ENTRY_POINT_GROUP) -> dict[str, PluginInfo]:
    """All plugins registered in ``group``, working or not, by name."""
    found: dict[str, PluginInfo] = {}
    for ep in md.entry_points(group=group):
        dist = ep.dist.name if ep.dist is not None else "?"
        if ep.name in found:
            found[ep.name] = PluginInfo(ep.name, dist, ep.value, None,
                                        f"name also registered by {found[ep.name].distribution}")
            continue
        try:
            obj = ep.load()
        except Exception as e:  # a third-party import can fail in any way
            found[ep.name] = PluginInfo(ep.name, dist, ep.value, None,
                                        f"cannot import: {type(e).__name__}: {e}")
            continue
        error = _check(ep.name, obj)
        cls = obj if not error and isinstance(obj, type) and issubclass(obj, Plugin) else None
        found[ep.name] = PluginInfo(ep.name, dist, ep.value, cls, error)
    return found


def describe(with_params: bool = False) -> list[dict[str, Any]]:
    """Every installed plugin as plain data, by name (``dicomnode plugins``, the console's
    plugins page and API): version, plugin API, needs, accepted modalities, and why it was
    refused if it was; ``with_params``: the JSON schema of its parameters too."""
    rows: list[dict[str, Any]] = []
    for name, info in sorted(discover().items()):
        cls = info.cls
        row: dict[str, Any] = {
            "name": name, "distribution": info.distribution, "entry_point": info.entry_point,
            "ok": info.ok, "error": info.error,
            "version": cls.version if cls else None,
            "api_version": cls.api_version if cls else None,
            "gpu": str(cls.needs.gpu) if cls else None,
            "memory_mb": cls.needs.memory_mb if cls else None,
            "timeout_seconds": cls.needs.timeout_seconds if cls else None,
            "modalities": list(cls.accepts.modalities) if cls else None,
            "description": cls.description if cls else ""}
        if with_params:
            row["params"] = cls.params_model.model_json_schema() if cls else None
        rows.append(row)
    return rows
