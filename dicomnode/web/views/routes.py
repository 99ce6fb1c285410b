"""Routes and plugins: the configured routes as the configuration has them, a dry run that
says which routes a study (or a set of tags) would take and why the others would not, and the
installed plugins (the same facts as ``dicomnode plugins``).

The dry run matches with the router's own rules (:mod:`dicomnode.route.rules`) and queues
nothing.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field
from sqlalchemy import select

from dicomnode.schema import Study
from dicomnode.web.auth import Principal
from dicomnode.web.deps import WebState, node, require

api = APIRouter(tags=["routes"])
pages = APIRouter(include_in_schema=False)


def routes_of(st: WebState) -> list[dict[str, Any]]:
    level = st.settings.assemble.level
    out = []
    for r in st.settings.routes:
        d = r.model_dump(mode="json")
        d["level"] = r.level or level
        d["destinations_unknown"] = [x for x in r.send_to if x not in st.settings.destinations]
        out.append(d)
    return out


@api.get("/routes", summary="The configured routes: match rules, pipeline, destinations")
def routes_api(_: Principal = Depends(require("routes:read")),
               st: WebState = Depends(node)) -> dict[str, Any]:
    return {"level": st.settings.assemble.level, "items": routes_of(st)}


class RouteTest(BaseModel):
    """Either a stored study's UID or a set of tags (DICOM keyword → value)."""

    study_uid: str | None = None
    tags: dict[str, Any] | None = Field(None, examples=[{"Modality": "CT",
                                                          "BodyPartExamined": "HEAD"}])


def _why_not(expected: Any, actual: Any, key: str) -> str:
    shown = "absent" if actual in (None, "") else repr(actual)
    if isinstance(expected, dict):
        return f"{key} is {shown}: the route wants it to match /{expected.get('regex')}/"
    if isinstance(expected, list):
        return f"{key} is {shown}: the route wants one of {expected!r}"
    return f"{key} is {shown}: the route wants {expected!r}"


def dry_run(st: WebState, body: RouteTest) -> dict[str, Any]:
    if (body.study_uid is None) == (body.tags is None):
        raise HTTPException(422, 'send either {"study_uid": "…"} or {"tags": {"Modality": '
                                 '"CT", …}}')
    from dicomnode.route.rules import match_rule, select_series  # heavy: not at start-up

    default = st.settings.assemble.level
    if body.tags is not None:
        series = [{str(k): v for k, v in body.tags.items()}]
        source = "tags"
    else:
        from dicomnode.route.router import series_attributes

        uid = (body.study_uid or "").strip()
        with st.reads() as s:
            if s.execute(select(Study.id).where(Study.study_uid == uid)).first() is None:
                raise HTTPException(404, f"no stored study {uid}: check the UID, or test "
                                         "with tags")
        try:
            series = series_attributes(st.reads, st.settings.storage.path, uid, None)
        except OSError as e:
            raise HTTPException(409, f"cannot read the study's files from "
                                     f"{st.settings.storage.path}: {e}") from None
        source = "study"
    results = []
    for route in st.settings.routes:
        rule = match_rule(route, default)
        picked = select_series(rule, series)
        why: list[str] = []
        if not picked:
            # the reasons for the series that comes closest (fewest refusing keys)
            best = min((rule.refusing(a) for a in series), key=len, default=[])
            a = series[0] if len(series) == 1 else next(
                (x for x in series if rule.refusing(x) == best), {})
            why = [_why_not(route.match[k], a.get(k), k) for k in best]
        results.append({
            "route": route.name, "level": rule.level, "matches": bool(picked),
            "series": [str(series[i].get("SeriesInstanceUID", "")) for i in picked]
            if source == "study" else [],
            "pipeline": [step.plugin for step in route.pipeline],
            "send_to": list(route.send_to), "why_not": why})
    shown = ("Modality", "BodyPartExamined", "SeriesDescription", "CallingAETitle",
             "SeriesInstanceUID")
    return {"source": source, "queued": False,
            "series": [{k: str(a.get(k, "")) for k in shown} for a in series]
            if source == "study" else [],
            "matched": [r["route"] for r in results if r["matches"]], "routes": results}


@api.post("/routes/test", summary="Dry run: which routes would a study or tags take")
async def routes_test(body: RouteTest, _: Principal = Depends(require("routes:test")),
                      st: WebState = Depends(node)) -> dict[str, Any]:
    """Nothing is queued. For a stored study the router's own attributes are used (each
    series' first header and the calling AE title)."""
    return await run_in_threadpool(dry_run, st, body)


def plugins_of() -> list[dict[str, Any]]:
    from dicomnode.run.registry import describe

    return describe()


@api.get("/plugins", summary="Installed plugins: version, API version, needs, problems")
def plugins_api(_: Principal = Depends(require("plugins:read"))) -> dict[str, Any]:
    return {"items": plugins_of()}


# -- pages --------------------------------------------------------------------------------------


def parse_tags(text: str) -> dict[str, Any]:
    """``Keyword = value`` (or ``Keyword: value``) per line; ``a, b`` is a list of values."""
    tags: dict[str, Any] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        sep = "=" if "=" in line else ":" if ":" in line else None
        if sep is None:
            raise HTTPException(422, f"line {n}: write Keyword = value (e.g. Modality = CT)")
        key, value = (x.strip() for x in line.split(sep, 1))
        tags[key] = [v.strip() for v in value.split(",")] if "," in value else value
    return tags


@pages.get("/routes", response_class=HTMLResponse)
def routes_page(request: Request, _: Principal = Depends(require("routes:read")),
                st: WebState = Depends(node)) -> HTMLResponse:
    from dicomnode.web.app import render

    return render(request, "routes.html", routes=routes_of(st), result=None, error="",
                  form={"tags": "Modality = CT\nBodyPartExamined = HEAD", "study_uid": ""})


@pages.post("/routes/test", response_class=HTMLResponse)
async def routes_test_page(request: Request, _: Principal = Depends(require("routes:test")),
                           st: WebState = Depends(node)) -> HTMLResponse:
    from dicomnode.web.app import render

    form = await request.form()
    tags_text, uid = str(form.get("tags", "")), str(form.get("study_uid", "")).strip()
    result, error = None, ""
    try:
        body = RouteTest(study_uid=uid) if uid else RouteTest(tags=parse_tags(tags_text))
        result = await run_in_threadpool(dry_run, st, body)
    except HTTPException as e:
        error = str(e.detail)
    if request.headers.get("hx-request"):
        return render(request, "_route_test.html", result=result, error=error)
    return render(request, "routes.html", routes=routes_of(st), result=result, error=error,
                  form={"tags": tags_text, "study_uid": uid})


@pages.get("/plugins", response_class=HTMLResponse)
def plugins_page(request: Request, _: Principal = Depends(require("plugins:read"))
                 ) -> HTMLResponse:
    from dicomnode.web.app import render

    return render(request, "plugins.html", plugins=plugins_of())
