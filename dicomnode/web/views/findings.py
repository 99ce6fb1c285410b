"""The radiologist's worklist of AI findings and the review page (accept / reject / amend).

Critical findings (a hemorrhage: the plugin raised ``critical``) come first, then the oldest.
A finding opens on a page with its key images (the SEG outline drawn over them), the SR's
measurements and the three decisions; each decision sends a verified SR back to PACS
(``dicomnode.review.review_finding``, docs/review.md) and is audited with the radiologist's
name. Opening a finding is audited as a view of its study.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from dicomnode.audit import EventKind
from dicomnode.review import (
    AlreadyReviewed,
    FindingNotFound,
    InvalidDecision,
    finding_detail,
    render_key_images,
    review_finding,
    worklist,
)
from dicomnode.schema import Finding, FindingReview, FindingStatus, Patient, Study
from dicomnode.web.auth import Principal
from dicomnode.web.deps import WebState, node, read_session, remote_of, require

api = APIRouter(tags=["findings"])
pages = APIRouter(include_in_schema=False)


class ReviewIn(BaseModel):
    decision: str = Field(description="accept | reject | amend")
    comment: str = Field("", max_length=2000,
                         description="Why (required to amend; kept with a rejection)")


def _cursor(value: str | None) -> tuple[int, str, int] | None:
    """``priority:created_at:id`` of the last finding seen (the worklist's order)."""
    if not value:
        return None
    try:
        p, created, i = value.split("~")
        return int(p), created, int(i)
    except ValueError:
        raise HTTPException(422, "bad cursor: use next_cursor from the previous page") from None


def _page(s: Session, status: str | None, study: str | None, cursor: str | None, limit: int
          ) -> tuple[list[Finding], str | None]:
    try:
        st = None if status in (None, "", "all") else FindingStatus(status)
    except ValueError:
        raise HTTPException(422, f"status: one of {', '.join(x.value for x in FindingStatus)}"
                                 " or all") from None
    q = worklist(st, study or None)
    after = _cursor(cursor)
    if after is not None:
        from datetime import datetime

        p, created_s, i = after
        created = datetime.fromisoformat(created_s)
        q = q.where(or_(Finding.priority > p,
                        and_(Finding.priority == p, Finding.created_at > created),
                        and_(Finding.priority == p, Finding.created_at == created,
                             Finding.id > i)))
    rows = list(s.execute(q.limit(limit + 1)).scalars())
    nxt = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        nxt = f"{last.priority}~{last.created_at.isoformat()}~{last.id}"
    return rows, nxt


def _study_info(s: Session, uids: set[str]) -> dict[str, dict[str, str]]:
    if not uids:
        return {}
    rows = s.execute(select(Study.study_uid, Study.accession_number, Study.study_date,
                            Study.study_description, Patient.patient_name, Patient.patient_id)
                     .join(Patient, Study.patient_fk == Patient.id)
                     .where(Study.study_uid.in_(uids))).all()
    return {r[0]: {"accession": r[1], "study_date": r[2], "description": r[3],
                   "patient_name": str(r[4]).replace("^", " ").strip(), "patient_id": r[5]}
            for r in rows}


def _as_json(f: Finding, study: dict[str, str] | None = None) -> dict[str, Any]:
    return {"id": f.id, "job_id": f.job_fk, "study_uid": f.study_uid, "study": study or {},
            "finding": f.finding_meaning, "finding_code": [f.finding_value, f.finding_scheme],
            "site": f.site, "laterality": f.laterality, "confidence": f.confidence,
            "measurements": json.loads(f.measurements), "evaluations": json.loads(f.evaluations),
            "location": json.loads(f.location) if f.location else None,
            "key_images": json.loads(f.key_images), "priority": f.priority,
            "critical": f.critical, "status": str(f.status), "reviewed_by": f.reviewed_by,
            "reviewed_at": f.reviewed_at.isoformat() if f.reviewed_at else None,
            "created_at": f.created_at.isoformat(), "sr_sop_instance_uid": f.sr_sop_instance_uid,
            "seg_sop_instance_uid": f.seg_sop_instance_uid, "segment": f.segment_number}


@api.get("/findings", summary="The worklist of AI findings (critical first)")
def list_findings(status: str | None = "pending", study: str | None = None,
                  cursor: str | None = None, limit: int = 50,
                  _: Principal = Depends(require("findings:read")),
                  s: Session = Depends(read_session)) -> dict[str, Any]:
    """``status``: pending (default) | accepted | rejected | amended | all. Critical findings
    first, then the oldest; page with ``next_cursor``."""
    rows, nxt = _page(s, status, study, cursor, max(1, min(limit, 500)))
    info = _study_info(s, {f.study_uid for f in rows})
    return {"items": [_as_json(f, info.get(f.study_uid)) for f in rows], "next_cursor": nxt}


def _get(s: Session, finding_id: int) -> Finding:
    f = s.get(Finding, finding_id)
    if f is None:
        raise HTTPException(404, f"no finding {finding_id}")
    return f


def _viewed(st: WebState, request: Request, who: Principal, f: Finding) -> None:
    st.audit.record(EventKind.STUDY_VIEWED, user=who.name, source_host=remote_of(request),
                    study_uid=f.study_uid, finding_id=f.id, what="finding")


@api.get("/findings/{finding_id}", summary="One finding with its SR measurements and review")
def get_finding(finding_id: int, request: Request,
                who: Principal = Depends(require("findings:read")),
                st: WebState = Depends(node), s: Session = Depends(read_session)
                ) -> dict[str, Any]:
    f = _get(s, finding_id)
    out = _as_json(f, _study_info(s, {f.study_uid}).get(f.study_uid))
    try:
        d = finding_detail(s, f.id)
        out["sr"] = {"measurements": [{"name": m.name, "value": m.value, "unit": m.unit}
                                      for m in d.group.measurements],
                     "evaluations": [list(e) for e in d.group.evaluations],
                     "comments": list(d.group.comments)}
    except (LookupError, OSError) as e:
        out["sr"] = {"error": str(e)}
    review = s.execute(select(FindingReview).where(FindingReview.finding_fk == f.id)
                       ).scalar_one_or_none()
    out["review"] = None if review is None else {
        "decision": str(review.decision), "comment": review.comment, "user": review.user,
        "at": review.at.isoformat(), "verdict_sop_instance_uid": review.verdict_sop_instance_uid}
    _viewed(st, request, who, f)
    return out


@api.get("/findings/{finding_id}/images/{n}.png", summary="Key image N with the outline",
         response_class=Response, responses={200: {"content": {"image/png": {}}}})
def finding_image(finding_id: int, n: int, window: str | None = None,
                  _: Principal = Depends(require("findings:read")),
                  st: WebState = Depends(node), s: Session = Depends(read_session)
                  ) -> Response:
    """Key image ``n`` (0-based, largest lesion area first), windowed (``brain``, ``lung``,
    ``soft-tissue``, ``bone``; default from the body part) with the finding's segment outlined
    in amber."""
    _get(s, finding_id)
    try:
        images = render_key_images(s, st.settings, finding_id, window=window)
    except (LookupError, ValueError) as e:
        raise HTTPException(404, str(e)) from None
    if not 0 <= n < len(images):
        raise HTTPException(404, f"finding {finding_id} has {len(images)} key image(s)")
    return Response(images[n].png, media_type="image/png",
                    headers={"Cache-Control": "private, max-age=600",
                             "X-Frame-Label": images[n].frame_label.encode("ascii", "replace")
                             .decode()})


def _review(st: WebState, request: Request, who: Principal, finding_id: int, decision: str,
            comment: str) -> dict[str, Any]:
    with st.sessions() as s:
        try:
            with s.begin():
                r = review_finding(s, st.settings, st.audit, finding_id, decision, comment,
                                   who.name, who.display_name)
        except FindingNotFound as e:
            raise HTTPException(404, str(e)) from None
        except AlreadyReviewed as e:
            raise HTTPException(409, str(e)) from None
        except InvalidDecision as e:
            raise HTTPException(422, str(e)) from None
    return {"finding_id": r.finding_id, "review_id": r.review_id, "status": str(r.status),
            "verdict_sop_instance_uid": r.verdict_sop_instance_uid,
            "predecessor_sop_instance_uid": r.predecessor_sop_instance_uid,
            "sent_to": list(r.destinations)}


@api.post("/findings/{finding_id}/review", summary="Accept, reject or amend a finding",
          responses={404: {"description": "no such finding"},
                     409: {"description": "already reviewed"},
                     422: {"description": "bad decision, or amend without a comment"}})
def review(finding_id: int, body: ReviewIn, request: Request,
           who: Principal = Depends(require("findings:review")),
           st: WebState = Depends(node)) -> dict[str, Any]:
    """Accept: the SR is sent again as a new instance, VERIFIED, with you as verifying
    observer. Reject / amend: a corrected SR revision (the finding removed, or your comment
    added) that PACS shows beside the original. Audited with your name."""
    return _review(st, request, who, finding_id, body.decision, body.comment)


# -- pages ------------------------------------------------------------------------------------


@pages.get("/findings", response_class=HTMLResponse)
def worklist_page(request: Request, status: str = "pending", cursor: str | None = None,
                  _: Principal = Depends(require("findings:read")),
                  s: Session = Depends(read_session)) -> HTMLResponse:
    from dicomnode.web.app import render

    rows, nxt = _page(s, status, None, cursor, 50)
    info = _study_info(s, {f.study_uid for f in rows})
    return render(request, "findings.html", findings=[_as_json(f, info.get(f.study_uid))
                                                      for f in rows],
                  status=status, next_cursor=nxt, statuses=[x.value for x in FindingStatus])


def _finding_page(request: Request, st: WebState, who: Principal, finding_id: int,
                  message: str = "", error: str = "", status_code: int = 200) -> HTMLResponse:
    from dicomnode.web.app import render

    with st.reads() as s:
        f = _get(s, finding_id)
        data = _as_json(f, _study_info(s, {f.study_uid}).get(f.study_uid))
        try:
            detail = finding_detail(s, f.id)
        except (LookupError, OSError) as e:
            detail, error = None, error or str(e)
        try:
            images = render_key_images(s, st.settings, f.id)
        except (LookupError, ValueError, OSError):
            images = []
    return render(request, "finding.html", status_code=status_code, f=data, detail=detail,
                  images=[{"n": i, "label": im.frame_label} for i, im in enumerate(images)],
                  message=message, error=error)


@pages.get("/findings/{finding_id}", response_class=HTMLResponse)
def finding_page(finding_id: int, request: Request,
                 who: Principal = Depends(require("findings:read")),
                 st: WebState = Depends(node)) -> HTMLResponse:
    with st.reads() as s:
        _viewed(st, request, who, _get(s, finding_id))
    return _finding_page(request, st, who, finding_id)


@pages.post("/findings/{finding_id}/review", response_class=HTMLResponse)
def review_form(finding_id: int, request: Request, decision: Annotated[str, Form()],
                comment: Annotated[str, Form()] = "",
                who: Principal = Depends(require("findings:review")),
                st: WebState = Depends(node)) -> HTMLResponse:
    try:
        r = _review(st, request, who, finding_id, decision, comment)
    except HTTPException as e:
        return _finding_page(request, st, who, finding_id, error=str(e.detail),
                             status_code=e.status_code)
    sent = ", ".join(r["sent_to"]) or "no destination (the job has none)"
    return _finding_page(request, st, who, finding_id,
                         message=f"{r['status'].capitalize()}: verified SR "
                                 f"{r['verdict_sop_instance_uid']} queued for {sent}.")
