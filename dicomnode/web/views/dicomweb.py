"""DICOMweb (PS3.18) under ``/dicomweb``: QIDO-RS, WADO-RS (and rendered), STOW-RS.

Authentication: a console bearer token (``POST /api/token``), HTTP Basic (name and password,
checked and counted towards lock-out on every request: nothing is cached), or the console's
session cookie for GET (the viewer the node serves). Reads need ``studies:read``, STOW needs
``studies:store``.

Retrieval answers in the transfer syntax the instance was stored in (``transfer-syntax=*``, or
none asked, or the stored one asked; anything else: 406). Instances are streamed from disk in
1 MiB chunks. STOW-RS stores each part through the same :class:`InstanceStore` path as C-STORE
(validation, dedup, fsync, index, audit).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
import secrets
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydicom import datadict, dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_preamble
from pydicom.tag import Tag
from pydicom.uid import UID
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from dicomnode.audit import EventKind, Outcome
from dicomnode.query import ATTRS, Level, Query, QueryError, run_query
from dicomnode.schema import Instance, Series, Study
from dicomnode.store import Received
from dicomnode.store.meta import part10_header
from dicomnode.web.auth import LoginRefused, Principal, authenticate, principal_for
from dicomnode.web.deps import SAFE_METHODS, SESSION_COOKIE, WebState, node, remote_of

PREFIX = "/dicomweb"
CHUNK = 1 << 20
DICOM_JSON = "application/dicom+json"
STOW_AE = "DICOMWEB"  # the "calling AE" recorded for instances stored over STOW-RS

dicomweb = APIRouter(prefix=PREFIX, tags=["dicomweb"])


# -- authentication -----------------------------------------------------------------------------


class Unauthorized(HTTPException):
    def __init__(self, detail: str) -> None:
        super().__init__(401, detail, headers={
            "WWW-Authenticate": 'Basic realm="dicomnode", Bearer'})


def _who(request: Request, st: WebState) -> Principal:
    auth = request.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    remote = remote_of(request)
    if scheme.lower() == "bearer" and value.strip():
        with st.reads() as s:
            who = principal_for(s, value.strip(), "bearer")
        if who is None:
            raise Unauthorized("bearer token unknown, expired or revoked")
        return who
    if scheme.lower() == "basic":
        try:
            name, sep, password = base64.b64decode(value.strip(), validate=True
                                                   ).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise Unauthorized("malformed Basic credentials") from None
        if not sep or not name:
            raise Unauthorized("malformed Basic credentials")
        # checked (argon2) and counted every time: nothing about the password is kept
        with st.sessions() as s:
            try:
                user = authenticate(s, st.audit, st.settings.web, name, password,
                                    remote=remote, via="basic")
            except LoginRefused as e:
                s.commit()  # the failure count must be kept
                raise BasicRefused(str(e)) from None
            s.commit()
            return Principal(user.id, user.name, user.display_name or user.name, user.role,
                             0, "", "basic")
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie and request.method in SAFE_METHODS:
        with st.reads() as s:
            who = principal_for(s, cookie, "cookie")
        if who is not None:
            return who
    raise Unauthorized("not authenticated: send HTTP Basic credentials or an "
                       "Authorization: Bearer token from POST /api/token")


class BasicRefused(Unauthorized):
    """Wrong name or password over HTTP Basic (counted towards the lock-out)."""


def allowed(permission: str) -> Any:
    async def dependency(request: Request, st: WebState = Depends(node)) -> Principal:
        try:
            who = await run_in_threadpool(_who, request, st)
        except BasicRefused:
            # as for the login page: each failure costs the guesser time, not a thread
            await asyncio.sleep(st.settings.web.failure_delay_seconds)
            raise
        request.state.principal = who
        if not who.can(permission):
            await run_in_threadpool(  # off the event loop: the audit write commits
                st.audit.record, EventKind.ACCESS_DENIED, Outcome.MINOR_FAILURE,
                user=who.name, source_host=remote_of(request), method=request.method,
                path=request.url.path, needs=permission, role=str(who.role))
            raise HTTPException(403, f"your role ({who.role}) may not do this "
                                     f"(needs {permission})")
        return who

    dependency.permission = permission  # type: ignore[attr-defined]  # read by the tests
    return Depends(dependency)


READ = allowed("studies:read")
STORE = allowed("studies:store")


# -- finding instances ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: Path
    size: int


def _instances(st: WebState, study: str, series: str | None = None,
               instance: str | None = None) -> list[Stored]:
    q = (select(Study.study_uid, Series.series_uid, Instance.sop_instance_uid,
                Instance.sop_class_uid, Instance.transfer_syntax_uid, Instance.path,
                Instance.size)
         .join(Series, Instance.series_fk == Series.id)
         .join(Study, Instance.study_fk == Study.id)
         .where(Study.study_uid == study))
    if series is not None:
        q = q.where(Series.series_uid == series)
    if instance is not None:
        q = q.where(Instance.sop_instance_uid == instance)
    q = q.order_by(Series.id, Instance.instance_number, Instance.id)
    root = st.settings.storage.path
    with st.reads() as s:
        rows = s.execute(q).all()
    if not rows:
        what = ("instance " + instance if instance else "series " + series if series
                else "study " + study)
        raise HTTPException(404, f"no such {what} here")
    return [Stored(r[0], r[1], r[2], r[3], r[4], root / r[5], r[6]) for r in rows]


def _audit_retrieve(request: Request, st: WebState, who: Principal, items: Sequence[Stored],
                    what: str) -> None:
    studies = sorted({i.study_uid for i in items})
    st.audit.record(EventKind.DICOMWEB_RETRIEVE, user=who.name,
                    source_host=remote_of(request), what=what, instances=len(items),
                    studies=studies, path=request.url.path)


# -- Accept negotiation -----------------------------------------------------------------------


@dataclass(frozen=True)
class MediaRange:
    type: str
    params: dict[str, str]


def _accept(request: Request) -> list[MediaRange]:
    out = []
    for part in re.split(r",(?=(?:[^\"]*\"[^\"]*\")*[^\"]*$)",
                         request.headers.get("accept", "") or "*/*"):
        pieces = [p.strip() for p in part.split(";")]
        if not pieces[0]:
            continue
        params = {}
        for p in pieces[1:]:
            k, _, v = p.partition("=")
            params[k.strip().lower()] = v.strip().strip('"')
        out.append(MediaRange(pieces[0].lower(), params))
    return out


def _check_dicom_accept(request: Request, items: Sequence[Stored]) -> None:
    """406 unless the client accepts multipart/related application/dicom in the stored
    transfer syntaxes."""
    reasons = []
    for m in _accept(request):
        if m.type in ("*/*", "multipart/*") or (
                m.type == "multipart/related" and m.params.get("type", "application/dicom")
                in ("application/dicom", "*/*")):
            ts = m.params.get("transfer-syntax")
            if ts in (None, "*"):
                return
            stored = {i.transfer_syntax for i in items}
            if stored == {ts}:
                return
            reasons.append(f"transfer-syntax {ts} asked, stored as {', '.join(sorted(stored))}"
                           " (this node answers in the stored syntax; ask transfer-syntax=*)")
        else:
            reasons.append(f"{m.type} is not offered")
    raise HTTPException(406, "; ".join(reasons) or "nothing acceptable")


# -- WADO-RS: instances -------------------------------------------------------------------------


def _multipart(parts: Iterable[tuple[dict[str, str], Iterable[bytes]]], boundary: str
               ) -> Iterator[bytes]:
    for headers, body in parts:
        yield (f"--{boundary}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
               + "\r\n").encode()
        yield from body
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def _retrieve(request: Request, st: WebState, who: Principal, items: list[Stored],
              what: str) -> StreamingResponse:
    _check_dicom_accept(request, items)
    _audit_retrieve(request, st, who, items, what)
    boundary = secrets.token_hex(16)
    parts = ((({"Content-Type": f"application/dicom; transfer-syntax={i.transfer_syntax}",
                "Content-Length": str(i.size)}), _file_chunks(i.path)) for i in items)
    return StreamingResponse(
        _multipart(parts, boundary),
        media_type=f'multipart/related; type="application/dicom"; boundary={boundary}')


@dicomweb.get("/studies/{study}")
def retrieve_study(study: str, request: Request, who: Principal = READ,
                   st: WebState = Depends(node)) -> Response:
    return _retrieve(request, st, who, _instances(st, study), "study")


@dicomweb.get("/studies/{study}/series/{series}")
def retrieve_series(study: str, series: str, request: Request, who: Principal = READ,
                    st: WebState = Depends(node)) -> Response:
    return _retrieve(request, st, who, _instances(st, study, series), "series")


@dicomweb.get("/studies/{study}/series/{series}/instances/{instance}")
def retrieve_instance(study: str, series: str, instance: str, request: Request,
                      who: Principal = READ, st: WebState = Depends(node)) -> Response:
    return _retrieve(request, st, who, _instances(st, study, series, instance), "instance")


# -- WADO-RS: metadata ------------------------------------------------------------------------


def _base_url(request: Request, i: Stored) -> str:
    root = str(request.base_url).rstrip("/")
    return (f"{root}{PREFIX}/studies/{i.study_uid}/series/{i.series_uid}/instances/"
            f"{i.sop_instance_uid}")


def _metadata_of(request: Request, i: Stored) -> dict[str, Any]:
    # the header only: pixel data is never read here
    ds = dcmread(i.path, stop_before_pixels=True)
    base = _base_url(request, i)

    def bulk(elem: DataElement) -> str:
        return f"{base}/bulkdata/{elem.tag:08X}"

    out: dict[str, Any] = ds.to_json_dict(bulk_data_threshold=1024,
                                          bulk_data_element_handler=bulk)
    if "Rows" in ds and "PixelData" not in ds:
        encapsulated = UID(i.transfer_syntax).is_compressed
        vr = "OB" if encapsulated or int(ds.get("BitsAllocated", 16)) <= 8 else "OW"
        out["7FE00010"] = {"vr": vr, "BulkDataURI": f"{base}/bulkdata/7FE00010"}
    return out


def _metadata(request: Request, st: WebState, who: Principal, items: list[Stored]
              ) -> Response:
    _audit_retrieve(request, st, who, items, "metadata")
    return JSONResponse([_metadata_of(request, i) for i in items], media_type=DICOM_JSON)


@dicomweb.get("/studies/{study}/metadata")
def study_metadata(study: str, request: Request, who: Principal = READ,
                   st: WebState = Depends(node)) -> Response:
    return _metadata(request, st, who, _instances(st, study))


@dicomweb.get("/studies/{study}/series/{series}/metadata")
def series_metadata(study: str, series: str, request: Request, who: Principal = READ,
                    st: WebState = Depends(node)) -> Response:
    return _metadata(request, st, who, _instances(st, study, series))


@dicomweb.get("/studies/{study}/series/{series}/instances/{instance}/metadata")
def instance_metadata(study: str, series: str, instance: str, request: Request,
                      who: Principal = READ, st: WebState = Depends(node)) -> Response:
    return _metadata(request, st, who, _instances(st, study, series, instance))


# -- WADO-RS: frames, bulk data, rendered --------------------------------------------------------


def _frame_numbers(text: str) -> list[int]:
    try:
        numbers = [int(x) for x in text.split(",")]
    except ValueError:
        raise HTTPException(400, f"frame list {text!r}: comma-separated numbers from 1"
                            ) from None
    if not numbers or min(numbers) < 1:
        raise HTTPException(400, f"frame list {text!r}: frames are numbered from 1")
    return numbers


def _frames_of(ds: Dataset, transfer_syntax: str, numbers: list[int]) -> list[bytes]:
    """The raw (decoded, native) bytes of each frame."""
    if "PixelData" not in ds:
        raise HTTPException(404, "this instance has no pixel data")
    count = int(ds.get("NumberOfFrames", 1) or 1)
    bad = [n for n in numbers if n > count]
    if bad:
        raise HTTPException(404, f"frame(s) {bad} out of range: the instance has {count}")
    if not UID(transfer_syntax).is_compressed:
        bits = int(ds.BitsAllocated)
        if bits % 8:
            raise HTTPException(406, f"frames of {bits}-bit pixel data are not offered")
        size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * bits // 8
        data = ds.PixelData
        return [bytes(data[(n - 1) * size:n * size]) for n in numbers]
    try:
        arr = ds.pixel_array
    except Exception as e:  # no decoder for this syntax
        raise HTTPException(406, f"cannot decode {transfer_syntax}: {e}") from None
    if count == 1:
        arr = arr[None]
    return [arr[n - 1].tobytes() for n in numbers]


@dicomweb.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frames}")
def frames(study: str, series: str, instance: str, frames: str, request: Request,
           who: Principal = READ, st: WebState = Depends(node)) -> Response:
    numbers = _frame_numbers(frames)
    (item,) = _instances(st, study, series, instance)
    ok = any(m.type in ("*/*", "multipart/*") or (
        m.type == "multipart/related" and m.params.get("type", "application/octet-stream")
        in ("application/octet-stream", "*/*")) for m in _accept(request))
    if not ok:
        raise HTTPException(406, "frames are offered as multipart/related; "
                                 "type=\"application/octet-stream\" only")
    data = _frames_of(dcmread(item.path), item.transfer_syntax, numbers)
    _audit_retrieve(request, st, who, [item], f"frames {frames}")
    boundary = secrets.token_hex(16)
    body = b"".join(_multipart(((
        {"Content-Type": "application/octet-stream",
         "Content-Location": f"{_base_url(request, item)}/frames/{n}"}, [d])
        for n, d in zip(numbers, data, strict=True)), boundary))
    return Response(body, media_type='multipart/related; type="application/octet-stream"; '
                                     f"boundary={boundary}")


@dicomweb.get("/studies/{study}/series/{series}/instances/{instance}/bulkdata/{tag}")
def bulkdata(study: str, series: str, instance: str, tag: str, request: Request,
             who: Principal = READ, st: WebState = Depends(node)) -> Response:
    try:
        t = Tag(int(tag, 16))
    except ValueError:
        raise HTTPException(400, f"bulk data tag {tag!r}: 8 hex digits") from None
    (item,) = _instances(st, study, series, instance)
    ds = dcmread(item.path)
    if t not in ds:
        raise HTTPException(404, f"no element {tag} in this instance")
    value = ds[t].value
    data = value if isinstance(value, bytes) else bytes(str(value), "ascii", "replace")
    _audit_retrieve(request, st, who, [item], f"bulkdata {tag}")
    boundary = secrets.token_hex(16)
    body = b"".join(_multipart([({"Content-Type": "application/octet-stream"}, [data])],
                               boundary))
    return Response(body, media_type='multipart/related; type="application/octet-stream"; '
                                     f"boundary={boundary}")


def _window(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    parts = text.split(",")
    try:
        center, width = float(parts[0]), float(parts[1])
    except (ValueError, IndexError):
        raise HTTPException(400, f"window={text!r}: center,width[,linear]") from None
    if len(parts) > 2 and parts[2].strip().lower() not in ("linear", ""):
        raise HTTPException(400, f"window function {parts[2]!r}: only linear is offered")
    if width < 1:
        raise HTTPException(400, f"window width {width}: at least 1")
    return center, width


def _rendered(request: Request, st: WebState, who: Principal, item: Stored, frame: int
              ) -> Response:
    import numpy as np
    from PIL import Image
    from pydicom.pixels.processing import apply_modality_lut

    kinds = [m.type for m in _accept(request)]
    fmt = None
    for k in kinds:
        if k in ("image/png", "image/jpeg", "image/*", "*/*"):
            fmt = "png" if k == "image/png" else "jpeg"
            break
    if fmt is None:
        raise HTTPException(406, "rendered images are offered as image/jpeg or image/png")
    window = _window(request.query_params.get("window"))
    ds = dcmread(item.path)
    if "PixelData" not in ds:
        raise HTTPException(404, "this instance has no pixel data")
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if frame > count:
        raise HTTPException(404, f"frame {frame} out of range: the instance has {count}")
    try:
        arr = ds.pixel_array
    except Exception as e:
        raise HTTPException(406, f"cannot decode {item.transfer_syntax}: {e}") from None
    if count > 1:
        arr = arr[frame - 1]
    if arr.ndim == 3 and arr.shape[-1] == 3:  # colour: as stored
        img = Image.fromarray(arr.astype(np.uint8), "RGB")
    else:
        values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
        if window is None and "WindowCenter" in ds and "WindowWidth" in ds:
            wc, ww = ds.WindowCenter, ds.WindowWidth
            window = (float(wc[0] if isinstance(wc, Sequence) else wc),
                      float(ww[0] if isinstance(ww, Sequence) else ww))
        if window is None:
            lo, hi = float(values.min()), float(values.max())
            window = ((lo + hi) / 2, max(hi - lo, 1.0))
        c, w = window
        # PS3.3 C.11.2.1.2.1 linear
        out = ((values - (c - 0.5)) / (w - 1) + 0.5) * 255
        pixels = np.clip(out, 0, 255).astype(np.uint8)
        if ds.get("PhotometricInterpretation") == "MONOCHROME1":
            pixels = 255 - pixels
        img = Image.fromarray(pixels, "L")
    buf = io.BytesIO()
    img.save(buf, format=fmt.upper())
    _audit_retrieve(request, st, who, [item], "rendered")
    return Response(buf.getvalue(), media_type=f"image/{fmt}")


@dicomweb.get("/studies/{study}/series/{series}/instances/{instance}/rendered")
def rendered_instance(study: str, series: str, instance: str, request: Request,
                      who: Principal = READ, st: WebState = Depends(node)) -> Response:
    (item,) = _instances(st, study, series, instance)
    return _rendered(request, st, who, item, 1)


@dicomweb.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frame}/rendered")
def rendered_frame(study: str, series: str, instance: str, frame: str, request: Request,
                   who: Principal = READ, st: WebState = Depends(node)) -> Response:
    numbers = _frame_numbers(frame)
    if len(numbers) != 1:
        raise HTTPException(400, "rendered: one frame at a time")
    (item,) = _instances(st, study, series, instance)
    return _rendered(request, st, who, item, numbers[0])


# -- QIDO-RS ------------------------------------------------------------------------------------
# Matching is the node's (dicomnode.query, PS3.4 C.2.2.2, shared with C-FIND): this part only
# turns QIDO parameters into a Query and its rows into DICOM JSON.

QIDO_LEVEL = {"study": Level.STUDY, "series": Level.SERIES, "instance": Level.IMAGE}
DEFAULT = {  # PS3.18 Tables 6.7.1-2, -2a, -2b: those the index holds
    Level.STUDY: ["StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName",
                  "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                  "StudyInstanceUID", "StudyID", "StudyDescription", "ModalitiesInStudy",
                  "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"],
    Level.SERIES: ["Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber",
                   "BodyPartExamined", "NumberOfSeriesRelatedInstances"],
    Level.IMAGE: ["SOPClassUID", "SOPInstanceUID", "InstanceNumber"],
}
MAX_RESULTS = 1000  # a page holds at most this many; ask again with offset


def _keyword(key: str) -> str:
    """A QIDO attribute key (keyword or 8 hex digits) as a keyword; 400 if neither."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", key):
        kw = datadict.keyword_for_tag(int(key, 16))
        if kw:
            return kw
    elif datadict.tag_for_keyword(key) is not None:
        return key
    raise HTTPException(400, f"{key!r} is not a DICOM attribute keyword or tag, nor a QIDO-RS "
                             "parameter (includefield, limit, offset, fuzzymatching)")


def _qido(request: Request, st: WebState, who: Principal, what: str,
          fixed: dict[str, str]) -> Response:
    try:
        return _search(request, st, who, what, fixed)
    except HTTPException as e:
        st.audit.record(EventKind.DICOMWEB_QUERY, Outcome.MINOR_FAILURE, user=who.name,
                        source_host=remote_of(request), level=what,
                        query=dict(request.query_params), fixed=fixed, refused=str(e.detail))
        raise


def _search(request: Request, st: WebState, who: Principal, what: str,
            fixed: dict[str, str]) -> Response:
    level = QIDO_LEVEL[what]
    keys: dict[str, str] = {}
    extra = [k for lv in (Level.STUDY, Level.SERIES, Level.IMAGE) if lv.depth <= level.depth
             for k in DEFAULT[lv]]
    limit: int | None = None
    offset = 0
    fuzzy = False
    for key, value in request.query_params.multi_items():
        if key == "includefield":
            for f in value.split(","):
                f = f.strip()
                if f == "all":
                    extra += [a.keyword for a in ATTRS.values()
                              if a.level.depth <= level.depth]
                elif f:
                    extra.append(_keyword(f))
        elif key in ("limit", "offset"):
            if not re.fullmatch(r"\d{1,9}", value):
                raise HTTPException(400, f"{key}={value!r}: a whole number ≥ 0")
            if key == "limit":
                limit = int(value)
            else:
                offset = int(value)
        elif key == "fuzzymatching":
            if value not in ("true", "false"):
                raise HTTPException(400, f"fuzzymatching={value!r}: true or false")
            fuzzy = value == "true"
        else:
            kw = _keyword(key)
            attr = ATTRS.get(kw)
            if attr is None:
                raise HTTPException(400, f"{kw} is not an attribute this node can match on "
                                         f"(matchable: {', '.join(ATTRS)})")
            if attr.level.depth > level.depth:
                raise HTTPException(400, f"{kw} is a {attr.level.value.lower()}-level "
                                         f"attribute: not matchable in a {what} query")
            if kw in keys or kw in fixed:
                raise HTTPException(400, f"{kw} given twice")
            keys[kw] = value
    keys.update(fixed)
    try:
        query = Query(level=level, keys=keys, fuzzy=fuzzy)
        with st.reads() as s:
            result = run_query(s, query, limit=min(limit, MAX_RESULTS) if limit is not None
                               else MAX_RESULTS, offset=offset, max_results=MAX_RESULTS,
                               extra=list(dict.fromkeys(extra)))
    except QueryError as e:
        raise HTTPException(400, str(e)) from None
    root = str(request.base_url).rstrip("/") + PREFIX
    out = [_qido_json(row, level, root) for row in result.rows]
    st.audit.record(EventKind.DICOMWEB_QUERY, user=who.name, source_host=remote_of(request),
                    level=what, query=dict(request.query_params), fixed=fixed,
                    matches=len(out))
    headers = {}
    if limit is None and len(out) == MAX_RESULTS:
        headers["Warning"] = (f'299 dicomnode "the first {MAX_RESULTS} matches: page with '
                              'limit and offset"')
    return JSONResponse(out, media_type=DICOM_JSON, headers=headers)


def _json_attr(keyword: str, value: Any) -> tuple[str, dict[str, Any]]:
    tag = datadict.tag_for_keyword(keyword)
    assert tag is not None
    vr = datadict.dictionary_VR(keyword).split(" ")[0]
    key = f"{tag:08X}"
    if value is None or value == "" or value == []:
        return key, {"vr": vr}
    values = value if isinstance(value, list) else [value]
    if vr == "PN":
        return key, {"vr": vr, "Value": [{"Alphabetic": str(v)} for v in values]}
    if vr in ("IS", "US", "UL", "SL", "SS"):
        try:
            return key, {"vr": vr, "Value": [int(v) for v in values]}
        except ValueError:
            return key, {"vr": vr}
    return key, {"vr": vr, "Value": [str(v) for v in values]}


def _qido_json(row: dict[str, Any], level: Level, root: str) -> dict[str, Any]:
    item = dict(_json_attr(k, v) for k, v in row.items() if k != "QueryRetrieveLevel")
    url = f"{root}/studies/{row['StudyInstanceUID']}"
    if level.depth >= Level.SERIES.depth:
        url += f"/series/{row['SeriesInstanceUID']}"
    if level is Level.IMAGE:
        url += f"/instances/{row['SOPInstanceUID']}"
    item["00081190"] = {"vr": "UR", "Value": [url]}
    return dict(sorted(item.items()))


@dicomweb.get("/studies")
def search_studies(request: Request, who: Principal = READ, st: WebState = Depends(node)
                   ) -> Response:
    return _qido(request, st, who, "study", {})


@dicomweb.get("/series")
def search_series(request: Request, who: Principal = READ, st: WebState = Depends(node)
                  ) -> Response:
    return _qido(request, st, who, "series", {})


@dicomweb.get("/instances")
def search_instances(request: Request, who: Principal = READ, st: WebState = Depends(node)
                     ) -> Response:
    return _qido(request, st, who, "instance", {})


@dicomweb.get("/studies/{study}/series")
def search_study_series(study: str, request: Request, who: Principal = READ,
                        st: WebState = Depends(node)) -> Response:
    _instances(st, study)  # 404 for an unknown study
    return _qido(request, st, who, "series", {"StudyInstanceUID": study})


@dicomweb.get("/studies/{study}/instances")
def search_study_instances(study: str, request: Request, who: Principal = READ,
                           st: WebState = Depends(node)) -> Response:
    _instances(st, study)
    return _qido(request, st, who, "instance", {"StudyInstanceUID": study})


@dicomweb.get("/studies/{study}/series/{series}/instances")
def search_series_instances(study: str, series: str, request: Request, who: Principal = READ,
                            st: WebState = Depends(node)) -> Response:
    _instances(st, study, series)
    return _qido(request, st, who, "instance",
                 {"StudyInstanceUID": study, "SeriesInstanceUID": series})


# -- STOW-RS -----------------------------------------------------------------------------------

FAILED_PROCESSING = 0xC000  # PS3.18 Table I.2-1 / PS3.4 C.5: processing failure
NOT_SUPPORTED = 0x0122  # SOP class not supported / not a DICOM part
STUDY_MISMATCH = 0xA900  # the part's Study Instance UID is not the one in the URL


def _parts(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not content_type.lower().startswith("multipart/related") or m is None:
        raise HTTPException(415, "STOW-RS takes multipart/related; type=\"application/dicom\""
                                 " with a boundary")
    delimiter = b"--" + m.group(1).encode()
    chunks = body.split(delimiter)
    if len(chunks) < 3:
        raise HTTPException(400, "no parts found in the multipart body")
    parts = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break
        chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise HTTPException(400, "a part without a blank line after its headers")
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            k, _, v = line.partition(":")
            if k.strip():
                headers[k.strip().lower()] = v.strip()
        if data.endswith(b"\r\n"):
            data = data[:-2]
        parts.append((headers, data))
    return parts


@dataclass
class _PartOutcome:
    sop_class: str
    sop_instance: str
    study_uid: str
    series_uid: str
    failure: int | None
    reason: str
    warning: bool = False


def _store_part(st: WebState, who: Principal, remote: str, headers: dict[str, str],
                data: bytes, study: str | None) -> _PartOutcome:
    ctype = headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
    if ctype != "application/dicom":
        return _PartOutcome("", "", "", "", NOT_SUPPORTED,
                            f"part type {ctype}: only application/dicom is stored")
    try:
        f = io.BytesIO(data)
        read_preamble(f, force=False)
        meta = dcmread(io.BytesIO(data), stop_before_pixels=True)
        fm = meta.file_meta
        ts, cls, inst = (str(fm.TransferSyntaxUID), str(fm.MediaStorageSOPClassUID),
                         str(fm.MediaStorageSOPInstanceUID))
        group_end = 132 + 12 + int(fm.FileMetaInformationGroupLength)
        part_study = str(meta.get("StudyInstanceUID", ""))
        part_series = str(meta.get("SeriesInstanceUID", ""))
    except Exception as e:
        return _PartOutcome("", "", "", "", FAILED_PROCESSING,
                            f"not a DICOM Part 10 file: {e}"[:200])
    if study is not None and part_study != study:
        return _PartOutcome(cls, inst, part_study, part_series, STUDY_MISMATCH,
                            f"Study Instance UID {part_study} is not {study} (the URL's)")
    result = st.store.store(Received(
        meta=part10_header(cls, inst, ts, st.settings.node.ae_title, STOW_AE,
                           st.settings.node.ae_title),
        dataset=memoryview(data)[group_end:], transfer_syntax=ts, sop_class_uid=cls,
        sop_instance_uid=inst, calling_aet=STOW_AE, peer_host=remote))
    if result.ok:
        return _PartOutcome(cls, inst, result.study_uid or part_study,
                            result.series_uid or part_series, None, result.reason,
                            warning=result.outcome not in ("stored", "replaced"))
    return _PartOutcome(cls, inst, part_study, part_series, int(result.status), result.reason)


def _stow(request: Request, st: WebState, who: Principal, body: bytes, study: str | None
          ) -> Response:
    remote = remote_of(request)
    outcomes = [_store_part(st, who, remote, h, d, study)
                for h, d in _parts(body, request.headers.get("content-type", ""))]
    root = str(request.base_url).rstrip("/") + PREFIX
    ok = [o for o in outcomes if o.failure is None]
    failed = [o for o in outcomes if o.failure is not None]
    response: dict[str, Any] = {}
    if study is not None:
        response["00081190"] = {"vr": "UR", "Value": [f"{root}/studies/{study}"]}
    if ok:
        items = []
        for o in ok:
            item: dict[str, Any] = {
                "00081150": {"vr": "UI", "Value": [o.sop_class]},
                "00081155": {"vr": "UI", "Value": [o.sop_instance]},
                "00081190": {"vr": "UR", "Value": [
                    f"{root}/studies/{o.study_uid}/series/{o.series_uid}/instances/"
                    f"{o.sop_instance}"]},
            }
            if o.warning:
                item["00081196"] = {"vr": "US", "Value": [0xB000]}  # coercion/duplicate
            items.append(item)
        response["00081199"] = {"vr": "SQ", "Value": items}
    if failed:
        response["00081198"] = {"vr": "SQ", "Value": [{
            "00081150": {"vr": "UI", "Value": [o.sop_class]} if o.sop_class else {"vr": "UI"},
            "00081155": ({"vr": "UI", "Value": [o.sop_instance]} if o.sop_instance
                         else {"vr": "UI"}),
            "00081197": {"vr": "US", "Value": [o.failure]},
            "00000902": {"vr": "LO", "Value": [o.reason[:64]]},
        } for o in failed]}
    studies: dict[str, list[str]] = {}
    for o in ok:
        studies.setdefault(o.study_uid, [])
        if o.series_uid not in studies[o.study_uid]:
            studies[o.study_uid].append(o.series_uid)
    st.audit.record(EventKind.INSTANCES_RECEIVED,
                    Outcome.SUCCESS if not failed else Outcome.MINOR_FAILURE,
                    user=who.name, source_aet=STOW_AE, source_host=remote,
                    dest_aet=st.settings.node.ae_title, via="stow-rs",
                    instances=len(ok), failed=len(failed), studies=studies,
                    refusals={f"0x{o.failure:04X}": o.reason[:120] for o in failed
                              if o.failure is not None})
    status = 200 if not failed else 202 if ok else 409
    return JSONResponse(response, status_code=status, media_type=DICOM_JSON)


async def _stow_request(request: Request, st: WebState, who: Principal, study: str | None
                        ) -> Response:
    limit = st.settings.dicomweb.max_stow_mb << 20
    try:
        declared = int(request.headers.get("content-length") or 0)
        if declared > limit:
            raise HTTPException(413, f"request of {declared} bytes: dicomweb.max_stow_mb is "
                                     f"{st.settings.dicomweb.max_stow_mb}; send fewer "
                                     "instances per request")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"request over dicomweb.max_stow_mb "
                                         f"({st.settings.dicomweb.max_stow_mb} MiB); send "
                                         "fewer instances per request")
            chunks.append(chunk)
        body = b"".join(chunks)
        del chunks
        return await run_in_threadpool(_stow, request, st, who, body, study)
    except HTTPException as e:
        await run_in_threadpool(
            st.audit.record, EventKind.STORE_REFUSED, Outcome.MINOR_FAILURE, user=who.name,
            source_aet=STOW_AE, source_host=remote_of(request), via="stow-rs",
            status=f"HTTP {e.status_code}", reason=str(e.detail))
        raise


@dicomweb.post("/studies")
async def stow(request: Request, who: Principal = STORE, st: WebState = Depends(node)
               ) -> Response:
    return await _stow_request(request, st, who, None)


@dicomweb.post("/studies/{study}")
async def stow_study(study: str, request: Request, who: Principal = STORE,
                     st: WebState = Depends(node)) -> Response:
    return await _stow_request(request, st, who, study)
