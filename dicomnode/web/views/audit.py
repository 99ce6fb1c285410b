"""The audit trail in the console and the API: filter, page, export (CSV) and verify.

- ``GET /api/audit``: filters ``since``/``until`` (ISO 8601; a time without a zone is UTC;
  ``until`` is exclusive), ``event`` (type as ``dicomnode audit list`` shows it, e.g.
  ``store-refused``, or a PS3.15 event code such as ``110104``), ``user``, ``ae`` (source or
  destination AE title), ``study`` (Study Instance UID named in the detail), ``outcome``
  (0/4/8/12, success, failure = any non-zero, minor/serious/major), ``q`` (free text in
  detail, user and host). Newest first; ``cursor`` = the last seq seen (older page), ``after``
  = the first seq seen (newer page); ``limit`` ≤ 500. A study's or a user's trail is this
  endpoint with ``study=`` or ``user=``.
- ``GET /api/audit.csv``: the same filters, every hashed column and the hash, oldest first,
  streamed from a server-side cursor (flat memory). The export is audited when it starts,
  with the filters and the number of rows it will hold (counted in the same snapshot).
- ``GET /api/audit/verify``: :func:`dicomnode.audit.verify_chain` over the whole trail.

Every view, export and verification is itself an audit event (one per request). Each page
query walks an index newest first and stops after ``limit`` rows, so its cost does not grow
with the table: ``(event_type, seq)``, ``(user, seq)``, ``(outcome, seq)``, ``(source_aet,
seq)``/``(dest_aet, seq)`` and, for a study, ``audit_event_studies (study_uid, seq)`` (a
search index beside the chain, filled at append time; see migration 0009). Free text (``q``)
is the one filter without an index: it scans newest first until it has a page; combine it
with another filter or a date range on a big trail.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from sqlalchemy import Select, func, or_, select
from sqlalchemy.orm import Session

from dicomnode.audit import EventKind, Outcome, verify_chain
from dicomnode.audit.log import study_uids
from dicomnode.audit.summary import summary
from dicomnode.schema import AuditEvent, AuditEventStudy
from dicomnode.web.auth import Principal
from dicomnode.web.deps import WebState, node, remote_of, require

api = APIRouter(tags=["audit"])
pages = APIRouter(include_in_schema=False)

MAX_LIMIT = 500
DEFAULT_LIMIT = 50
CSV_BATCH = 5000
#: every event type the node writes, for the filter's select
EVENT_TYPES = sorted(k.type_name for k in EventKind)
#: the CSV's columns: exactly the hashed content and the hash, so an unfiltered export can be
#: re-verified outside the node (``dicomnode.audit.log.row_hash``)
CSV_COLUMNS = ("seq", "ts", "event_type", "event_code", "event_name", "action", "outcome",
               "user", "source_aet", "source_host", "dest_aet", "detail", "prev_hash",
               "hash")
_COLS = [getattr(AuditEvent, c) for c in CSV_COLUMNS]
_OUTCOMES: dict[str, list[int]] = {
    "success": [0], "ok": [0], "failure": [4, 8, 12], "minor": [4], "serious": [8],
    "major": [12], "0": [0], "4": [4], "8": [8], "12": [12]}
OUTCOME_WORDS = {0: "ok", 4: "minor", 8: "serious", 12: "major"}


class FilterError(ValueError):
    """A filter that cannot be applied; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class AuditFilter:
    """The filters of the audit page, API and export, as given (strings)."""

    since: str = ""
    until: str = ""
    event: str = ""
    user: str = ""
    ae: str = ""
    study: str = ""
    outcome: str = ""
    q: str = ""

    def given(self) -> dict[str, str]:
        """The filters that are set (what the audit event of a view records)."""
        return {k: v for k, v in asdict(self).items() if v}

    def query_string(self, **extra: Any) -> str:
        return urlencode({**self.given(), **{k: v for k, v in extra.items()
                                             if v is not None}})


def _when(field: str, value: str) -> str:
    try:
        dt = datetime.fromisoformat(value.strip())
    except ValueError:
        raise FilterError(field, f"{value!r} is not an ISO 8601 date and time (e.g. "
                                 "2026-12-01T08:00:00Z; without a zone it is UTC)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    # the stored form (AuditLog: UTC, µs, +00:00) compares as text in time order
    return dt.astimezone(UTC).isoformat(timespec="microseconds")


def _conditions(f: AuditFilter) -> list[Any]:
    """WHERE clauses for every filter but ``study`` (a join) and ``ae`` (see _ae_clause)."""
    where: list[Any] = []
    # exact, but not by the ts index (``ts || ''``): the range is walked by seq (_seq_range)
    if f.since:
        where.append(AuditEvent.ts.concat("") >= _when("since", f.since))
    if f.until:
        where.append(AuditEvent.ts.concat("") < _when("until", f.until))
    if f.event:
        e = f.event.strip()
        if e in EVENT_TYPES or not any(c.isdigit() for c in e):
            where.append(AuditEvent.event_type == e)
        else:  # a PS3.15 (110104) or private (DN0001) event code, as `audit list` takes
            where.append(AuditEvent.event_code == e)
    if f.user:
        where.append(AuditEvent.user == f.user.strip())
    if f.outcome:
        codes = _OUTCOMES.get(f.outcome.strip().lower())
        if codes is None:
            raise FilterError("outcome", f"{f.outcome!r}: use 0, 4, 8, 12, success, "
                                         "failure, minor, serious or major")
        where.append(AuditEvent.outcome == codes[0] if len(codes) == 1
                     else AuditEvent.outcome.in_(codes))
    if f.q:
        like = "%" + f.q.strip().replace("\\", "\\\\").replace("%", "\\%").replace(
            "_", "\\_") + "%"
        where.append(or_(AuditEvent.detail.ilike(like, escape="\\"),
                         AuditEvent.user.ilike(like, escape="\\"),
                         AuditEvent.source_host.ilike(like, escape="\\")))
    return where


def _seq_range(s: Session, f: AuditFilter) -> tuple[int, int] | None:
    """A date range as a range of seq: the first event at or after ``since`` and the last
    before ``until``, each one probe of the ts index. Events are stamped while the chain's
    head is locked, so ts follows seq; walking seq newest first then stops after a page,
    where sorting every event of the range by seq would cost as many rows as the range
    holds. The ts conditions still apply to each row (exact)."""
    if not (f.since or f.until):
        return None
    lo, hi = 0, 2**62
    if f.since:
        first = s.execute(select(AuditEvent.seq).where(AuditEvent.ts >= _when("since", f.since))
                          .order_by(AuditEvent.ts.asc()).limit(1)).scalar()
        lo = first if first is not None else hi
    if f.until:
        last = s.execute(select(AuditEvent.seq).where(AuditEvent.ts < _when("until", f.until))
                         .order_by(AuditEvent.ts.desc()).limit(1)).scalar()
        hi = last if last is not None else -1
    return lo, hi


def _select(f: AuditFilter, ae_column: Any = None, seqs: tuple[int, int] | None = None
            ) -> tuple[Select[Any], Any]:
    """The filtered query and the seq column to order and page by: the study index's own
    seq when filtering by study, so the walk goes down ``(study_uid, seq)``."""
    q = select(*_COLS)
    key = AuditEvent.seq
    if f.study:
        q = q.join(AuditEventStudy, AuditEventStudy.seq == AuditEvent.seq).where(
            AuditEventStudy.study_uid == f.study.strip())
        key = AuditEventStudy.seq
    where = _conditions(f)
    if seqs is not None:
        where += [key >= seqs[0], key <= seqs[1]]
    if f.ae:
        ae = f.ae.strip()
        where.append(ae_column == ae if ae_column is not None
                     else or_(AuditEvent.source_aet == ae, AuditEvent.dest_aet == ae))
    return q.where(*where), key


def check(f: AuditFilter) -> None:
    """Raise :class:`FilterError` for a filter that cannot be applied."""
    _select(f)


@dataclass
class Page:
    rows: list[dict[str, Any]]
    older: int | None  # cursor for the next (older) page
    newer: int | None  # 'after' for the previous (newer) page


def page(s: Session, f: AuditFilter, *, cursor: int | None = None,
         after: int | None = None, limit: int = DEFAULT_LIMIT) -> Page:
    """One page, newest first: before ``cursor`` (older) or after ``after`` (newer).

    An AE is a source or a destination: two index walks (``(source_aet, seq)`` and
    ``(dest_aet, seq)``) merged here, instead of one OR that neither index can order."""
    branches = ([AuditEvent.source_aet, AuditEvent.dest_aet] if f.ae else [None])
    found: dict[int, dict[str, Any]] = {}
    bounds = _seq_range(s, f)
    for ae_column in branches:
        q, key = _select(f, ae_column, bounds)
        if after is not None:
            q = q.where(key > after).order_by(key.asc())
        else:
            if cursor is not None:
                q = q.where(key < cursor)
            q = q.order_by(key.desc())
        for r in s.execute(q.limit(limit + 1)).mappings():
            found[r["seq"]] = dict(r)
    ordered = sorted(found, reverse=after is None)
    more = len(ordered) > limit
    seqs = ordered[:limit]
    if after is not None:
        seqs.reverse()
    rows = [found[n] for n in seqs]
    if not rows:
        return Page([], None, None)
    if after is not None:
        return Page(rows, rows[-1]["seq"], rows[0]["seq"] if more else None)
    return Page(rows, rows[-1]["seq"] if more else None,
                rows[0]["seq"] if cursor is not None else None)


def _item(r: dict[str, Any]) -> dict[str, Any]:
    detail = _detail(r["detail"])
    return {**{k: r[k] for k in CSV_COLUMNS if k not in ("detail", "prev_hash")},
            "detail": detail, "summary": summary(r["event_type"], detail),
            "studies": study_uids(detail)}


def _detail(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {"unparsed": text}
    return value if isinstance(value, dict) else {"value": value}


def _filters(since: str = "", until: str = "", event: str = "", user: str = "",
             ae: str = "", study: str = "", outcome: str = "", q: str = "") -> AuditFilter:
    """The filter query parameters (documented in the module docstring)."""
    return AuditFilter(since=since, until=until, event=event, user=user, ae=ae, study=study,
                       outcome=outcome, q=q)


def _checked(f: AuditFilter) -> AuditFilter:
    try:
        check(f)
    except FilterError as e:
        raise HTTPException(422, str(e)) from None
    return f


def _record_view(st: WebState, request: Request, who: Principal, f: AuditFilter,
                 via: str, shown: int) -> None:
    st.audit.record(EventKind.AUDIT_VIEWED, user=who.name, source_host=remote_of(request),
                    via=via, filters=f.given(), shown=shown)


# -- API -----------------------------------------------------------------------------------


@api.get("/audit", summary="Audit events, filtered, newest first")
def list_events(request: Request, f: AuditFilter = Depends(_filters),
                cursor: int | None = Query(None, ge=0, description="last seq seen: older"),
                after: int | None = Query(None, ge=0, description="first seq seen: newer"),
                limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT),
                who: Principal = Depends(require("audit:read")),
                st: WebState = Depends(node)) -> dict[str, Any]:
    """A page of audit events (``{"items", "next_cursor", "prev_cursor"}``); pass
    ``next_cursor`` back as ``cursor`` for the next (older) page, ``prev_cursor`` as
    ``after`` for the newer one. Viewing is audited (``audit-viewed``, with the filters)."""
    _checked(f)
    with st.reads() as s:
        p = page(s, f, cursor=cursor, after=after, limit=limit)
    _record_view(st, request, who, f, "api", len(p.rows))
    return {"items": [_item(r) for r in p.rows], "next_cursor": p.older,
            "prev_cursor": p.newer}


@api.get("/audit.csv", summary="Export audit events as CSV (streamed)",
         response_class=StreamingResponse,
         responses={200: {"content": {"text/csv": {}}}})
def export_csv(request: Request, f: AuditFilter = Depends(_filters),
               who: Principal = Depends(require("audit:export")),
               st: WebState = Depends(node)) -> StreamingResponse:
    """Every filtered event, oldest first, with every hashed column and the hash. Audited
    as ``audit-exported`` when the export starts, with the filters and the row count."""
    _checked(f)
    s = st.reads()
    try:
        if s.get_bind().dialect.name == "postgresql":  # the count and the rows: one snapshot
            s.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        q, key = _select(f, seqs=_seq_range(s, f))
        count = s.execute(select(func.count()).select_from(q.subquery())).scalar_one()
        st.audit.record(EventKind.AUDIT_EXPORTED, user=who.name,
                        source_host=remote_of(request), filters=f.given(), rows=count,
                        format="csv")
        # Core rows (no ORM), fetched CSV_BATCH at a time (PostgreSQL: a server-side cursor)
        rows = s.connection().execute(q.order_by(key.asc()).execution_options(
            yield_per=CSV_BATCH))
    except BaseException:
        s.close()
        raise
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return StreamingResponse(
        _csv_stream(s, rows), media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="audit-{stamp}.csv"',
                 "X-Audit-Rows": str(count)})


def _csv_stream(s: Session, rows: Any) -> Iterator[bytes]:
    """The CSV in chunks of :data:`CSV_BATCH` rows; the session closes at the end (or when
    the client goes away)."""
    try:
        buf = io.StringIO()
        out = csv.writer(buf, lineterminator="\r\n")
        out.writerow(CSV_COLUMNS)
        for part in rows.partitions(CSV_BATCH):
            out.writerows(part)
            yield buf.getvalue().encode("utf-8")
            buf.seek(0)
            buf.truncate()
        if buf.tell():  # no rows: the header alone
            yield buf.getvalue().encode("utf-8")
    finally:
        s.close()


def _verify(st: WebState, request: Request, who: Principal) -> dict[str, Any]:
    result = verify_chain(st.reads)
    body = {"ok": result.ok, "checked": result.checked,
            "first_bad_seq": result.first_bad_seq, "reason": result.reason}
    st.audit.record(EventKind.AUDIT_VERIFIED,
                    Outcome.SUCCESS if result.ok else Outcome.SERIOUS_FAILURE,
                    user=who.name, source_host=remote_of(request), ok=result.ok,
                    checked=result.checked, first_bad_seq=result.first_bad_seq,
                    reason=result.reason)
    return body


@api.get("/audit/verify", summary="Verify the audit trail's hash chain")
def verify(request: Request, who: Principal = Depends(require("audit:verify")),
           st: WebState = Depends(node)) -> dict[str, Any]:
    """Recompute the whole chain: ``ok``, rows ``checked``, and for a broken chain the
    ``first_bad_seq`` and the ``reason``. Audited as ``audit-verified`` (outcome 8 when the
    chain is broken)."""
    return _verify(st, request, who)


# -- pages -----------------------------------------------------------------------------------


@pages.get("/audit", response_class=HTMLResponse)
def audit_page(request: Request, f: AuditFilter = Depends(_filters),
               cursor: int | None = Query(None, ge=0), after: int | None = Query(None, ge=0),
               who: Principal = Depends(require("audit:read")),
               st: WebState = Depends(node)) -> Response:
    """The audit page; an htmx request gets the results table only."""
    from dicomnode.web.app import render

    h = request.headers
    fragment = bool(h.get("hx-request")) and not h.get("hx-boosted") and not h.get(
        "hx-history-restore-request")
    error = ""
    p = Page([], None, None)
    try:
        check(f)
    except FilterError as e:
        error = str(e)
    if not error:
        with st.reads() as s:
            p = page(s, f, cursor=cursor, after=after, limit=DEFAULT_LIMIT)
        _record_view(st, request, who, f, "page", len(p.rows))
    rows = []
    for r in p.rows:
        item = _item(r)
        item["outcome_word"] = OUTCOME_WORDS.get(item["outcome"], str(item["outcome"]))
        item["outcome_class"] = ("ok" if item["outcome"] == 0
                                 else "warn" if item["outcome"] < 8 else "bad")
        rows.append(item)
    ctx = {"f": f, "rows": rows, "error": error, "event_types": EVENT_TYPES,
           "older": f.query_string(cursor=p.older) if p.older is not None else None,
           "newer": f.query_string(after=p.newer) if p.newer is not None else None,
           "csv": "/api/audit.csv" + (f"?{f.query_string()}" if f.given() else ""),
           "since_local": _local(f.since), "until_local": _local(f.until)}
    status = 422 if error and not fragment else 200
    return render(request, "audit_rows.html" if fragment else "audit.html",
                  status_code=status, **ctx)


def _local(value: str) -> str:
    """A filter time as a ``datetime-local`` input shows it (UTC, minutes)."""
    if not value:
        return ""
    try:
        return _when("", value)[:16]
    except FilterError:
        return ""


@pages.get("/audit/verify", response_class=HTMLResponse)
def verify_fragment(request: Request, who: Principal = Depends(require("audit:verify")),
                    st: WebState = Depends(node)) -> Response:
    """The "Verify chain" button's answer (an htmx fragment)."""
    from dicomnode.web.app import render

    return render(request, "audit_verify.html", result=_verify(st, request, who))
