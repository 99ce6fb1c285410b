"""The audit trail in the console and API: every filter returns exactly the matching rows,
cursor pages neither overlap nor skip, the CSV export holds the filtered rows (and the hash
chain), verification names a row altered behind the node's back, and who may see it.

The expected rows are computed here in Python from the table itself, independently of the
SQL the endpoint builds."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text

from dicomnode.audit import EventKind, Outcome
from dicomnode.audit.log import GENESIS, row_hash
from dicomnode.schema import AuditEvent
from tests.web import WebNode, login, screenshot, start_web, web_settings

STUDY_A = "1.2.826.0.1.3680043.8.498.100"
STUDY_B = "1.2.826.0.1.3680043.8.498.200"
COLUMNS = ["seq", "ts", "event_type", "event_code", "event_name", "action", "outcome",
           "user", "source_aet", "source_host", "dest_aet", "detail", "prev_hash", "hash"]


def _seed(w: WebNode, rounds: int = 6) -> int:
    """A varied trail; returns the last seeded seq."""
    a = w.audit
    for i in range(rounds):
        a.record(EventKind.INSTANCES_RECEIVED, source_aet="CT_SCANNER", source_host="10.0.0.7",
                 instances=10 + i, failed=0, studies={STUDY_A: [f"1.2.3.{i}"]},
                 ended="released")
        a.record(EventKind.STORE_REFUSED, Outcome.MINOR_FAILURE, source_aet="MR_ROOM",
                 source_host="10.0.0.8", status="0xA700", reason=f"disk full round {i}")
        a.record(EventKind.STUDY_COMPLETED, study_uid=STUDY_B if i % 2 else STUDY_A,
                 revision=i, instances=5)
        a.record(EventKind.RESULTS_SENT, dest_aet="PACS_MAIN", job_id=i, destination="pacs",
                 instances=3)
        a.record(EventKind.SEND_FAILED, Outcome.SERIOUS_FAILURE, dest_aet="CT_SCANNER",
                 job_id=i, destination="back", state="pending", reason="Connection refused")
        a.record(EventKind.LOGIN_FAILED, Outcome.MINOR_FAILURE, user="mallory",
                 source_host="192.0.2.66", via="cookie", reason="wrong password")
        a.record(EventKind.STUDY_VIEWED, user="radiologist", study_uid=STUDY_A,
                 studies={STUDY_B: 1})
    with w.sessions() as s:
        return int(s.execute(select(AuditEvent.seq).order_by(AuditEvent.seq.desc())
                             .limit(1)).scalar_one())


def _table(w: WebNode, upto: int) -> list[dict[str, Any]]:
    with w.sessions() as s:
        rows = s.execute(select(*[getattr(AuditEvent, c) for c in COLUMNS])
                         .where(AuditEvent.seq <= upto)).mappings().all()
    return [dict(r) for r in rows]


def _studies(detail: str) -> set[str]:
    d = json.loads(detail)
    out = {d["study_uid"]} if isinstance(d.get("study_uid"), str) else set()
    return out | set(d.get("studies") or {})


def _all_pages(c: httpx.Client, params: dict[str, Any], limit: int) -> list[list[int]]:
    pages: list[list[int]] = []
    cursor = None
    while True:
        r = c.get("/api/audit", params={**params, "limit": limit,
                                        **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        body = r.json()
        pages.append([i["seq"] for i in body["items"]])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 200


@pytest.fixture
def seeded(tmp_path: Path, db_url: str) -> Iterator[tuple[WebNode, int]]:
    w = start_web(web_settings(tmp_path, db_url))
    try:
        yield w, _seed(w)
    finally:
        w.stop()


def test_each_filter_returns_exactly_the_matching_rows(seeded: tuple[WebNode, int]) -> None:
    w, last = seeded
    rows = _table(w, last)
    by_seq = sorted(rows, key=lambda r: r["seq"])
    since, until = by_seq[10]["ts"], by_seq[30]["ts"]

    def t(value: str) -> datetime:
        return datetime.fromisoformat(value)

    cases: list[tuple[dict[str, str], Callable[[dict[str, Any]], bool]]] = [
        ({"event": "store-refused"}, lambda r: r["event_type"] == "store-refused"),
        ({"event": "110106"}, lambda r: r["event_code"] == "110106"),
        ({"user": "mallory"}, lambda r: r["user"] == "mallory"),
        ({"ae": "CT_SCANNER"}, lambda r: "CT_SCANNER" in (r["source_aet"], r["dest_aet"])),
        ({"study": STUDY_B}, lambda r: STUDY_B in _studies(r["detail"])),
        ({"outcome": "failure"}, lambda r: r["outcome"] != 0),
        ({"outcome": "8"}, lambda r: r["outcome"] == 8),
        ({"outcome": "success"}, lambda r: r["outcome"] == 0),
        ({"q": "connection REFUSED"}, lambda r: "connection refused" in r["detail"].lower()),
        ({"q": "192.0.2"}, lambda r: "192.0.2" in r["source_host"]),
        # a zone other than UTC is converted; since is inclusive, until exclusive
        ({"since": since, "until": until}, lambda r: t(since) <= t(r["ts"]) < t(until)),
        ({"since": t(since).astimezone(timezone(timedelta(hours=2))).isoformat()},
         lambda r: t(r["ts"]) >= t(since)),
        ({"event": "study-completed", "study": STUDY_A, "since": since},
         lambda r: r["event_type"] == "study-completed" and STUDY_A in _studies(r["detail"])
         and t(r["ts"]) >= t(since)),
        ({"ae": "CT_SCANNER", "outcome": "failure"},
         lambda r: "CT_SCANNER" in (r["source_aet"], r["dest_aet"]) and r["outcome"] != 0),
    ]
    with w.api("auditor") as c:
        for params, match in cases:
            expected = sorted((r["seq"] for r in rows if match(r)), reverse=True)
            assert expected, params
            pages = _all_pages(c, params, limit=4)
            got = [n for p in pages for n in p if n <= last]  # views of the trail add rows
            assert got == expected, params
            # newest first, and no page overlaps or skips another
            flat = [n for p in pages for n in p]
            assert flat == sorted(set(flat), reverse=True), params
        # the way back: a newer page from the second page's prev_cursor is the first page
        first = c.get("/api/audit", params={"event": "results-sent", "limit": 3}).json()
        second = c.get("/api/audit", params={"event": "results-sent", "limit": 3,
                                             "cursor": first["next_cursor"]}).json()
        back = c.get("/api/audit", params={"event": "results-sent", "limit": 3,
                                           "after": second["prev_cursor"]}).json()
        assert [i["seq"] for i in back["items"]] == [i["seq"] for i in first["items"]]
        assert back["prev_cursor"] is None  # nothing newer than the newest page
        item = second["items"][0]
        assert item["summary"].startswith(f"job {item['detail']['job_id']} -> pacs")
        # each call was one audit-viewed event, with its filters
        c.get("/api/audit", params={"user": "mallory", "limit": 1})
        viewed = c.get("/api/audit", params={"event": "audit-viewed", "user": "auditor",
                                             "limit": 2}).json()["items"]
        assert viewed[0]["detail"]["filters"] == {"user": "mallory"}
        assert viewed[0]["detail"]["shown"] == 1 and viewed[0]["detail"]["via"] == "api"


@pytest.fixture(scope="module")
def trail(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WebNode, int]]:
    w = start_web(web_settings(tmp_path_factory.mktemp("audit")))
    yield w, _seed(w, rounds=3)
    w.stop()


def test_bad_filters_say_which_field(trail: tuple[WebNode, int]) -> None:
    w, _ = trail
    with w.api("auditor") as c:
        for field in ("since", "until"):
            r = c.get("/api/audit", params={field: "yesterday"})
            assert r.status_code == 422
            assert r.json()["detail"].startswith(f"{field}: 'yesterday' is not an ISO 8601")
        r = c.get("/api/audit.csv", params={"until": "2026-13-01"})
        assert r.status_code == 422 and r.json()["detail"].startswith("until:")
        r = c.get("/api/audit", params={"outcome": "bad"})
        assert r.status_code == 422 and "outcome" in r.json()["detail"]
        r = c.get("/api/audit", params={"limit": 501})
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "limit"
        page = c.get("/audit", params={"since": "soon"})
        assert page.status_code == 422 and "since: &#39;soon&#39; is not" in page.text


def test_csv_export_has_the_filtered_rows_and_the_chain(trail: tuple[WebNode, int]) -> None:
    w, last = trail
    rows = _table(w, last)
    with w.api("auditor") as c:
        r = c.get("/api/audit.csv", params={"event": "send-failed"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        assert "attachment" in r.headers["content-disposition"]
        got = list(csv.DictReader(io.StringIO(r.text)))
        want = sorted((x for x in rows if x["event_type"] == "send-failed"),
                      key=lambda x: x["seq"])
        assert [int(g["seq"]) for g in got] == [x["seq"] for x in want]
        assert list(got[0]) == COLUMNS
        assert got[0]["hash"] == want[0]["hash"] and got[0]["detail"] == want[0]["detail"]
        assert int(r.headers["x-audit-rows"]) == len(want) == 3
        exported = c.get("/api/audit", params={"event": "audit-exported",
                                               "limit": 1}).json()["items"][0]
        assert exported["user"] == "auditor"
        assert exported["detail"] == {"filters": {"event": "send-failed"}, "rows": 3,
                                      "format": "csv"}
        # unfiltered: the whole chain, which verifies from the file alone
        full = list(csv.DictReader(io.StringIO(c.get("/api/audit.csv").text)))
    prev = GENESIS
    for n, row in enumerate(full, start=1):
        content: dict[str, Any] = {**row, "seq": int(row["seq"]),
                                   "outcome": int(row["outcome"])}
        assert content["seq"] == n and row["prev_hash"] == prev
        assert row_hash(content) == row["hash"]
        prev = row["hash"]
    assert len(full) > last


def test_who_may_see_the_trail(trail: tuple[WebNode, int]) -> None:
    w, _ = trail
    with w.api("radiologist") as c:
        for path in ("/api/audit", "/api/audit.csv", "/api/audit/verify", "/audit",
                     "/audit/verify"):
            r = c.get(path)
            assert r.status_code == 403, (path, r.status_code)
    with w.api("auditor") as c:
        for path in ("/api/audit", "/api/audit.csv", "/api/audit/verify", "/audit",
                     "/audit/verify"):
            assert c.get(path).status_code == 200, path
        denied = c.get("/api/audit", params={"event": "access-denied",
                                             "user": "radiologist"}).json()["items"]
        assert {d["detail"]["path"] for d in denied} >= {"/api/audit", "/api/audit.csv",
                                                         "/api/audit/verify"}


def _tamper(w: WebNode, seq: int) -> None:
    """What someone with write access to the database could do: the trigger refuses an
    UPDATE, so drop it, change a row, and put the trigger back."""
    with w.sessions() as s, s.begin(), pytest.raises(Exception, match="append-only"), \
            s.begin_nested():
        s.execute(text("UPDATE audit_events SET detail = '{}' WHERE seq = :n"), {"n": seq})
    with w.sessions() as s, s.begin():
        s.execute(text("DROP TRIGGER audit_events_no_update"))
        s.execute(text("UPDATE audit_events SET detail = :d WHERE seq = :n"),
                  {"d": '{"reason":"nothing to see"}', "n": seq})
        s.execute(text("CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events "
                       "BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END"))


def _rows_on_page(page: Any) -> list[int]:
    return [int(x) for x in page.eval_on_selector_all(
        "#audit-table tbody tr[data-seq]", "rows => rows.map(r => r.dataset.seq)")]


def test_browser_auditor_filters_downloads_and_verifies(browser: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    w = start_web(web_settings(tmp_path))
    try:
        last = _seed(w, rounds=8)
        rows = _table(w, last)
        page = login(browser, w, "auditor")
        assert page.url.endswith("/audit")
        nav = page.inner_text("header nav").split()
        assert nav == ["Audit"], nav  # no Jobs, no Users
        everything = _rows_on_page(page)
        assert len(everything) == 50

        # by event: the table changes without a page load (htmx), the URL follows
        page.select_option("select[name=event]", "store-refused")
        expect(page.locator("#audit-table tbody tr[data-seq]")).to_have_count(8)
        refused = sorted((r["seq"] for r in rows if r["event_type"] == "store-refused"),
                         reverse=True)
        assert _rows_on_page(page) == refused
        assert "event=store-refused" in page.url
        assert page.inner_text("#audit-table tbody").count("disk full round") == 8
        screenshot(page, "audit")

        # a date range (datetime-local: minutes, UTC) that ends before any seeded row
        page.select_option("select[name=event]", "")
        page.fill("input[name=since]", "2000-01-01T00:00")
        page.fill("input[name=until]", "2000-01-02T00:00")
        page.click("form#audit-filters button[type=submit]")
        page.wait_for_selector("text=No audit events match these filters.")
        assert _rows_on_page(page) == []
        page.fill("input[name=until]", "2999-01-01T00:00")
        page.click("form#audit-filters button[type=submit]")
        expect(page.locator("#audit-table tbody tr[data-seq]")).to_have_count(50)

        # a user's trail from their name in the table
        page.goto(f"{w.url}/audit?event=login-failed")
        page.click("#audit-table a[href='/audit?user=mallory']")
        page.wait_for_url(lambda u: u.endswith("/audit?user=mallory"))
        assert len(_rows_on_page(page)) == 8

        # the CSV of the same filters
        page.goto(f"{w.url}/audit?event=send-failed")
        with page.expect_download() as dl:
            page.click("#audit-csv")
        got = list(csv.DictReader(io.StringIO(Path(dl.value.path()).read_text())))
        assert [int(g["seq"]) for g in got] == sorted(
            r["seq"] for r in rows if r["event_type"] == "send-failed")
        assert list(got[0]) == COLUMNS

        # verify: ok, then a row altered behind the node's back is named
        page.click("#verify-chain")
        page.wait_for_selector("#verify-ok")
        assert "ok" in page.inner_text("#verify-result")
        assert "chain intact" in page.inner_text("#verify-result")
        _tamper(w, 5)
        page.click("#verify-chain")
        page.wait_for_selector("#verify-bad")
        bad = page.inner_text("#verify-bad")
        assert "seq 5" in bad and "altered" in bad
        assert page.eval_on_selector("#verify-bad", "e => getComputedStyle(e).color") == \
            "rgb(179, 38, 30)"  # red
        screenshot(page, "audit-verify-failed")
        page.context.close()

        with w.api("auditor") as c:
            v = c.get("/api/audit/verify").json()
            assert v["ok"] is False and v["first_bad_seq"] == 5
            assert v["checked"] == 4 and "altered" in v["reason"]
            verified = c.get("/api/audit", params={"event": "audit-verified",
                                                   "limit": 3}).json()["items"]
            assert [x["outcome"] for x in verified] == [8, 8, 0]
            assert verified[0]["detail"]["first_bad_seq"] == 5
    finally:
        w.stop()


def test_migration_0009_backfills_the_study_index(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Events written before 0009 are found by study after the upgrade; the chain still
    verifies (nothing hashed changed)."""
    from alembic import command

    import dicomnode.audit.log as audit_log
    from dicomnode.audit import AuditLog, verify_chain
    from dicomnode.database import _alembic_config, make_engine, make_sessionmaker, upgrade

    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    command.upgrade(_alembic_config(url), "0008")
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    with monkeypatch.context() as m:  # a node before 0009: no study index to fill
        m.setattr(audit_log, "study_uids", lambda detail: [])
        a = AuditLog(sessions)
        a.record(EventKind.STUDY_COMPLETED, study_uid=STUDY_A, revision=1)
        a.record(EventKind.INSTANCES_RECEIVED, studies={STUDY_A: [], STUDY_B: []})
        a.record(EventKind.USER_LOGIN, user="someone")
    engine.dispose()
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    with sessions() as s:
        got = s.execute(text("SELECT study_uid, seq FROM audit_event_studies "
                             "ORDER BY seq, study_uid")).all()
    assert [tuple(r) for r in got] == [(STUDY_A, 1), (STUDY_A, 2), (STUDY_B, 2)]
    assert verify_chain(sessions).ok
    engine.dispose()
