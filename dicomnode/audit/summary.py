"""A readable one-line summary of an audit event, for `dicomnode audit list` and the console."""

from __future__ import annotations

from typing import Any


def _short_uid(uid: Any) -> str:
    text = str(uid or "")
    return text if len(text) <= 16 else "..." + text[-13:]


def summary(kind: str, d: dict[str, Any]) -> str:
    """One line that says what happened (at most 160 characters); the whole detail is in
    ``dicomnode audit list --wide``/``--json`` and the console's CSV export."""
    def g(key: str) -> Any:
        return d.get(key)

    text: str
    if kind == "application-start":
        recovered = ", ".join(f"{k.replace('_', ' ')} {v}"
                              for k, v in (g("recovered") or {}).items() if v)
        text = f"{g('version')} on port {g('port')}, {g('database')}"
        text += f"; recovered: {recovered}" if recovered else ""
    elif kind == "instances-received":
        parts = [f"{g('instances')} stored"]
        if g("failed"):
            refusals = ", ".join(f"{k} x{v}" for k, v in (g("refusals") or {}).items())
            parts.append(f"{g('failed')} refused" + (f" ({refusals})" if refusals else ""))
        if g("duplicates"):
            parts.append(f"{g('duplicates')} duplicate(s)")
        parts.append(f"{len(g('studies') or {})} study(ies), {g('ended')}")
        text = ", ".join(parts)
    elif kind == "store-refused":
        text = f"{g('status')} {g('reason')}"
    elif kind in ("study-completed", "series-completed"):
        uid = g("series_uid") if kind == "series-completed" else g("study_uid")
        text = f"{_short_uid(uid)} rev {g('revision')}, {g('instances')} instance(s)"
    elif kind == "route-matched":
        text = f"{', '.join(map(str, g('routes') or []))} -> job(s) " \
               f"{', '.join(map(str, g('jobs') or []))}"
    elif kind == "no-route":
        text = f"{_short_uid(g('study_uid'))} ({', '.join(g('modalities') or [])}): no route"
    elif kind == "job-finished":
        text = f"job {g('job_id')} {g('route')}: {g('state')} in {g('seconds')} s"
        text += f": {g('reason')}" if g("reason") else ""
    elif kind in ("results-sent", "send-failed"):
        what = (f"{g('instances')} sent" if kind == "results-sent"
                else f"{g('state')}: {g('reason')}")
        text = f"job {g('job_id')} -> {g('destination')}: {what}"
    elif kind == "critical-notified":
        text = f"{g('channel')}: {g('message')}"
    elif kind == "association-accepted":
        text = f"association {g('association_id')}, {g('contexts')} context(s)"
    elif kind == "receiver-process-died":
        text = f"worker {g('process')} exit {g('exitcode')}, removed {g('removed_partial')}"
    elif g("reason") or g("how"):
        text = str(g("reason") or g("how"))
    else:
        text = ", ".join(f"{k} {v}" for k, v in d.items() if not isinstance(v, dict | list))
    return text[:160]
