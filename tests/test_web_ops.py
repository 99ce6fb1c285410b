"""The operators' console API against a real node: studies sent with dcmtk ``storescu`` to a
``dicomnode serve`` process (routes, a real plugin, one that raises, one that hangs, a
destination where nothing listens), and the console on the node's database.

The node's quiet period is an hour, so every study stays ``receiving`` until a test forces it
complete through the API: that is what starts its route, job and (dead) delivery.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from sqlalchemy import func, select

from dicomnode.config import WebConfig, load_settings
from dicomnode.schema import AuditEvent, Completion, Delivery, Job, User
from dicomnode.simulate import write_ct_series
from tests.helpers import IN_CI, NodeProc, free_port, storescu, wait_until
from tests.web import PASSWORD, WebNode, start_web

PLUGINS = '''
import time
from dicomnode.plugin import Code, Needs, Plugin
FAMILY = Code("123110", "DCM", "Artificial Intelligence")

class Raises(Plugin):
    name, version, algorithm_family = "raises", "0.1", FAMILY
    def run(self, inputs, params, ctx):
        raise RuntimeError("model weights missing")

class Hangs(Plugin):
    name, version, algorithm_family = "hangs", "0.1", FAMILY
    needs = Needs(timeout_seconds=600)
    def run(self, inputs, params, ctx):
        time.sleep(600)

class NotAPlugin:
    pass
'''

ROUTES = [
    {"name": "ct-threshold", "match": {"Modality": "CT", "SeriesDescription": "SYNTHETIC CT"},
     "pipeline": [{"plugin": "threshold", "params": {"hu_min": 300}}], "send_to": ["pacs"]},
    {"name": "fails", "match": {"SeriesDescription": "FAILS"},
     "pipeline": [{"plugin": "raises"}], "send_to": ["pacs"]},
    {"name": "hangs", "match": {"SeriesDescription": {"regex": "^HANG"}},
     "pipeline": [{"plugin": "hangs"}], "send_to": ["pacs"]},
]


@dataclass
class Ops:
    node: NodeProc
    web: WebNode
    studies: dict[str, str]  # key → Study Instance UID
    instances: int
    pacs_port: int


def plugin_dist(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "ops_plugins.py").write_text(textwrap.dedent(PLUGINS))
    info = root / "ops_plugins-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ops-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[dicomnode.plugins]\nraises = ops_plugins:Raises\nhangs = ops_plugins:Hangs\n"
        "broken = ops_plugins:NotAPlugin\n")
    return root


def study_files(out: Path, *, description: str, patient: tuple[str, str], date: str,
                accession: str, n: int = 6) -> tuple[str, list[Path]]:
    files = write_ct_series(out, n=n, size=32, series_description=description,
                            patient_name=patient[0], patient_id=patient[1])
    for f in files:
        ds = pydicom.dcmread(f)
        ds.StudyDate, ds.AccessionNumber = date, accession
        ds.save_as(f)
    return str(pydicom.dcmread(files[0]).StudyInstanceUID), files


def console_for(node: NodeProc) -> WebNode:
    """The console on the node's database and configuration (routes, destinations)."""
    settings = load_settings(node.config_path)
    settings = settings.model_copy(update={"web": WebConfig(
        host="127.0.0.1", port=free_port(), failure_delay_seconds=0)})
    return start_web(settings)


@pytest.fixture(scope="module",
                params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def ops_db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[str]:
    """One database for the module: SQLite, or a new PostgreSQL database (as ``db_url``)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('opsdb') / 'index.sqlite3'}"
        return
    from tests.conftest import PG_ADMIN_URL, _pg_connect

    try:
        admin = _pg_connect()
    except Exception as e:
        if IN_CI:
            raise AssertionError(f"PostgreSQL must be reachable in CI ({PG_ADMIN_URL}): "
                                 f"{e}") from e
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {e}")
    name = f"dicomnode_t_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with _pg_connect() as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
            admin.execute(f'DROP DATABASE IF EXISTS "{name}"')


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory, ops_db: str) -> Iterator[Ops]:
    tmp = tmp_path_factory.mktemp("ops")
    plugins = plugin_dist(tmp / "plugins")
    sys.path.insert(0, str(plugins))  # the console lists what the node has installed
    pacs_port = free_port()  # nothing listens here: deliveries go dead
    node = NodeProc(tmp / "node", ops_db, overrides={
        "assemble": {"quiet_seconds": 3600},
        "web": {"enabled": False},
        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port,
                                  "max_retries": 0, "timeout_seconds": 5}},
        "routes": ROUTES,
        "runner": {"processes": 2, "max_attempts": 1, "poll_seconds": 0.2},
    }, env={"PYTHONPATH": os.pathsep.join([str(plugins), os.environ.get("PYTHONPATH", "")])})
    node.start()
    web = None
    try:
        studies, total = {}, 0
        for key, desc, patient, date, acc in [
                ("a", "SYNTHETIC CT", ("Doe^Jane", "PAT-A"), "20240115", "ACC-A"),
                ("b", "FAILS", ("Roe^Richard", "PAT-B"), "20240301", "ACC-B"),
                ("c", "HANG ME", ("Poe^Edgar", "PAT-C"), "20250101", "ACC-C"),
                ("d", "SYNTHETIC CT", ("Still^Receiving", "PAT-D"), "20250601", "ACC-D")]:
            uid, files = study_files(tmp / key, description=desc, patient=patient, date=date,
                                     accession=acc)
            storescu(node.port, files, aet="CT_SCANNER")
            studies[key], total = uid, total + len(files)
        web = console_for(node)
        with web.api("admin") as c:
            wait_until(lambda: len(c.get("/api/studies").json()["items"]) == 4, timeout=60,
                       what="4 studies stored")
        yield Ops(node, web, studies, total, pacs_port)
    finally:
        if web is not None:
            web.stop()
        node.stop()
        sys.path.remove(str(plugins))


def events(web: WebNode, kind: str) -> list[dict[str, Any]]:
    with web.sessions() as s:
        return [{"user": e.user, "outcome": e.outcome, **json.loads(e.detail)}
                for e in s.execute(select(AuditEvent).where(AuditEvent.event_type == kind)
                                   .order_by(AuditEvent.seq)).scalars()]


def job_of(web: WebNode, study_uid: str) -> Job:
    with web.sessions() as s:
        return s.execute(select(Job).where(Job.study_uid == study_uid)).scalar_one()


# -- studies --------------------------------------------------------------------------------------


def test_studies_search_filters(ops: Ops) -> None:
    uid = ops.studies
    with ops.web.api("admin") as c:
        def found(**q: Any) -> list[str]:
            r = c.get("/api/studies", params=q)
            assert r.status_code == 200, r.text
            return [s["study_uid"] for s in r.json()["items"]]

        everything = found()
        assert everything == [uid["d"], uid["c"], uid["b"], uid["a"]]  # newest first
        assert found(patient="doe") == [uid["a"]]  # name, any case
        assert found(patient="pat-b") == [uid["b"]]  # patient ID
        assert found(accession="ACC-C") == [uid["c"]]
        assert found(date_from="20240201", date_to="2024-12-31") == [uid["b"]]
        assert found(date_from="2025-01-01") == [uid["d"], uid["c"]]
        assert found(modality="ct") == everything and found(modality="MR") == []
        assert found(state="receiving") == everything and found(state="complete") == []
        first = c.get("/api/studies", params={"limit": 3}).json()
        assert len(first["items"]) == 3 and first["next_cursor"] is not None
        rest = c.get("/api/studies", params={"limit": 3, "cursor": first["next_cursor"]}).json()
        assert [s["study_uid"] for s in rest["items"]] == [uid["a"]]
        assert rest["next_cursor"] is None
        row = first["items"][0]
        assert row["patient_name"] == "Still^Receiving" and row["modalities"] == ["CT"]
        assert row["instances"] == 6 and row["state"] == "receiving"
        bad = c.get("/api/studies", params={"date_from": "last week"})
        assert bad.status_code == 422 and "YYYYMMDD" in bad.json()["detail"]
        assert c.get("/api/studies", params={"state": "done"}).status_code == 422
    with ops.web.api("auditor") as c:
        assert c.get("/api/studies").status_code == 403


def completions(web: WebNode, study_uid: str) -> int:
    with web.sessions() as s:
        return s.execute(select(func.count()).select_from(Completion)
                         .where(Completion.study_uid == study_uid)).scalar_one()


def test_force_complete_once_then_409(ops: Ops) -> None:
    uid = ops.studies["a"]
    with ops.web.api("radiologist") as c:
        r = c.post(f"/api/studies/{uid}/complete")
        assert r.status_code == 403 and "studies:write" in r.json()["detail"]
    with ops.web.api("admin") as c:
        r = c.post(f"/api/studies/{uid}/complete")
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "complete" and r.json()["instances"] == 6
        assert completions(ops.web, uid) == 1
        again = c.post(f"/api/studies/{uid}/complete")
        assert again.status_code == 409 and "complete already" in again.json()["detail"]
        assert completions(ops.web, uid) == 1
        assert c.post("/api/studies/1.2.3.999/complete").status_code == 404
        for key in ("b", "c"):  # their routes start their jobs
            assert c.post(f"/api/studies/{ops.studies[key]}/complete").status_code == 200
        assert found_state(c, "complete") == {ops.studies[k] for k in "abc"}
    forced = [e for e in events(ops.web, "study-forced-complete") if e["study_uid"] == uid]
    assert len(forced) == 1 and forced[0]["user"] == "admin"
    done = [e for e in events(ops.web, "study-completed") if e["study_uid"] == uid]
    assert len(done) == 1 and done[0]["forced_by"] == "admin"


def found_state(c: Any, state: str) -> set[str]:
    return {s["study_uid"] for s in c.get("/api/studies", params={"state": state}).json()["items"]}


def dead_delivery(ops: Ops, key: str) -> dict[str, Any]:
    def dead() -> dict[str, Any] | None:
        with ops.web.api("admin") as c:
            items = c.get("/api/deliveries", params={"state": "dead",
                                                     "destination": "pacs"}).json()["items"]
        with ops.web.sessions() as s:  # the router makes the job a moment after completion
            job = s.execute(select(Job).where(Job.study_uid == ops.studies[key])
                            ).scalar_one_or_none()
        if job is None or str(job.state) != "succeeded":
            return None
        return next((d for d in items if d["job_id"] == job.id), None)

    return wait_until(dead, timeout=90, interval=0.5, what=f"study {key}'s delivery dead")  # type: ignore[no-any-return]


def test_study_detail_has_series_jobs_deliveries_and_audit(ops: Ops) -> None:
    uid = ops.studies["a"]
    dead = dead_delivery(ops, "a")
    with ops.web.api("admin") as c:
        r = c.get(f"/api/studies/{uid}")
        assert r.status_code == 200, r.text
        d = r.json()
        assert c.get("/api/studies/1.2.3.999").status_code == 404
    assert d["study"]["state"] == "complete" and d["patient"]["patient_id"] == "PAT-A"
    [series] = d["series"]
    assert series["modality"] == "CT" and series["instances"] == 6
    assert series["state"] == "complete"
    [job] = d["jobs"]
    assert job["route"] == "ct-threshold" and job["state"] == "succeeded"
    assert [x["plugin"] for x in job["pipeline"]] == ["threshold"]
    assert [x["id"] for x in d["deliveries"]] == [dead["id"]]
    assert d["deliveries"][0]["state"] == "dead" and d["deliveries"][0]["last_error"]
    assert d["results"] and d["results"][0]["files"]
    [completion] = d["completions"]
    assert completion["routed_at"] is not None
    kinds = [e["event_type"] for e in d["audit"]]
    for kind in ("instances-received", "study-forced-complete", "study-completed",
                 "route-matched", "job-state", "job-finished", "send-failed"):
        assert kind in kinds, kind
    seqs = [e["seq"] for e in d["audit"]]
    assert seqs == sorted(seqs)
    timeline = [(t["kind"], t["state"]) for t in d["timeline"]]
    assert timeline[0] == ("received", "")
    for step in (("completed", ""), ("routed", ""), ("job", "succeeded"), ("delivery", "dead")):
        assert step in timeline, step
    ats = [t["at"] for t in d["timeline"]]
    assert ats == sorted(ats)
    viewed = [e for e in events(ops.web, "study-viewed") if e["study_uid"] == uid]
    assert viewed and viewed[-1]["user"] == "admin"


# -- jobs and deliveries --------------------------------------------------------------------------


def test_jobs_list_retry_cancel(ops: Ops) -> None:
    failing = job_of(ops.web, ops.studies["b"])
    wait_until(lambda: str(job_of(ops.web, ops.studies["b"]).state) in ("failed", "dead"),
               timeout=90, interval=0.5, what="the raising plugin's job to fail")
    wait_until(lambda: str(job_of(ops.web, ops.studies["c"]).state) == "running",
               timeout=90, interval=0.5, what="the hanging plugin's job to run")
    hanging = job_of(ops.web, ops.studies["c"])
    failing = job_of(ops.web, ops.studies["b"])
    with ops.web.api("admin") as c:
        listed = c.get("/api/jobs", params={"route": "fails"}).json()["items"]
        assert [j["id"] for j in listed] == [failing.id]
        assert "model weights missing" in listed[0]["reason"]
        by_study = c.get("/api/jobs", params={"study": ops.studies["c"]}).json()["items"]
        assert [j["id"] for j in by_study] == [hanging.id]
        running = c.get("/api/jobs", params={"state": "running"}).json()["items"]
        assert hanging.id in [j["id"] for j in running]
        page = c.get("/api/jobs", params={"limit": 1}).json()
        assert len(page["items"]) == 1 and page["next_cursor"] is not None
        one = c.get(f"/api/jobs/{failing.id}").json()
        assert one["study_uid"] == ops.studies["b"]
        assert "job-finished" in [e["event_type"] for e in one["audit"]]
        assert c.get("/api/jobs/999999").status_code == 404
        # retry: the failed job is queued again (and fails again: no weights)
        r = c.post(f"/api/jobs/{failing.id}/retry")
        assert r.status_code == 200, r.text
        assert r.json()["job_requeued"] is True
        # cancel: the running job is asked to stop, then it ends cancelled
        r = c.post(f"/api/jobs/{hanging.id}/cancel")
        assert r.status_code == 200 and r.json()["state"] == "cancelling", r.text
        wait_until(lambda: str(job_of(ops.web, ops.studies["c"]).state) == "cancelled",
                   timeout=60, interval=0.5, what="the job to be cancelled")
        again = c.post(f"/api/jobs/{hanging.id}/cancel")
        assert again.status_code == 409 and "cannot become" in again.json()["detail"]
        done = job_of(ops.web, ops.studies["a"])  # succeeded, and its delivery is dead
        illegal = c.post(f"/api/jobs/{done.id}/cancel")
        assert illegal.status_code == 409 and "succeeded" in illegal.json()["detail"]
        assert c.post("/api/jobs/999999/retry").status_code == 404
    with ops.web.api("radiologist") as c:
        assert c.post(f"/api/jobs/{failing.id}/retry").status_code == 403
        assert c.get("/api/jobs").status_code == 403
    moves = [(e["job_id"], e["from"], e["to"], e["user"]) for e in events(ops.web, "job-state")
             if e["user"]]
    assert (failing.id, str(failing.state), "queued", "admin") in moves
    assert (hanging.id, "running", "cancelling", "admin") in moves


def test_dead_delivery_retry(ops: Ops) -> None:
    dead = dead_delivery(ops, "a")
    with ops.web.api("admin") as c:
        r = c.post(f"/api/deliveries/{dead['id']}/retry")
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "pending" and r.json()["attempts"] == 0
        assert c.post("/api/deliveries/999999/retry").status_code == 404
    moved = [e for e in events(ops.web, "delivery-state")
             if e["delivery_id"] == dead["id"] and e["user"] == "admin"]
    assert [(e["from"], e["to"]) for e in moved] == [("dead", "pending")]
    # nothing listens yet: the sender tries once more and it is dead again
    wait_until(lambda: len([e for e in events(ops.web, "send-failed")
                            if e["job_id"] == dead["job_id"]]) == 2, timeout=60,
               what="a second failed attempt")
    with ops.web.sessions() as s:
        row = s.get_one(Delivery, dead["id"])
        assert str(row.state) == "dead" and row.attempts == 1
    with ops.web.api("radiologist") as c:
        assert c.post(f"/api/deliveries/{dead['id']}/retry").status_code == 403


def test_destinations_backlog_and_retry_all_dead(ops: Ops) -> None:
    dead_delivery(ops, "a")
    with ops.web.api("admin") as c:
        [pacs] = c.get("/api/destinations").json()["items"]
        assert (pacs["name"], pacs["ae_title"], pacs["port"]) == ("pacs", "PACS", ops.pacs_port)
        assert pacs["dead"] >= 1 and pacs["pending"] == 0
        assert pacs["last_error"] and pacs["last_sent_at"] is None
        r = c.post("/api/destinations/pacs/retry-dead")
        assert r.status_code == 200 and r.json()["requeued"] == pacs["dead"]
        assert c.post("/api/destinations/nowhere/retry-dead").status_code == 404
    bulk = [e for e in events(ops.web, "delivery-state") if e.get("bulk")]
    assert len(bulk) == pacs["dead"] and all(e["user"] == "admin" for e in bulk)


# -- routes and plugins ---------------------------------------------------------------------------


def test_routes_and_dry_run(ops: Ops) -> None:
    with ops.web.sessions() as s:
        jobs_before = s.execute(select(func.count()).select_from(Job)).scalar_one()
    with ops.web.api("admin") as c:
        routes = c.get("/api/routes").json()["items"]
        assert [r["name"] for r in routes] == ["ct-threshold", "fails", "hangs"]
        assert routes[0]["match"] == {"Modality": "CT", "SeriesDescription": "SYNTHETIC CT"}
        assert routes[0]["pipeline"][0]["plugin"] == "threshold"
        assert routes[0]["send_to"] == ["pacs"]
        r = c.post("/api/routes/test", json={"tags": {"Modality": "CT",
                                                       "SeriesDescription": "FAILS"}})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["matched"] == ["fails"] and out["queued"] is False
        why = {x["route"]: x["why_not"] for x in out["routes"]}
        assert why["fails"] == []
        assert why["ct-threshold"] == ["SeriesDescription is 'FAILS': the route wants "
                                       "'SYNTHETIC CT'"]
        assert "regex" not in why["hangs"][0] and "/^HANG/" in why["hangs"][0]
        hang = c.post("/api/routes/test", json={"tags": {"SeriesDescription": "HANG 2"}})
        assert hang.json()["matched"] == ["hangs"]
        # a stored study that is still receiving: what its completion would start
        study = c.post("/api/routes/test", json={"study_uid": ops.studies["d"]}).json()
        assert study["matched"] == ["ct-threshold"] and study["source"] == "study"
        [series] = study["series"]
        assert series["CallingAETitle"] == "CT_SCANNER" and series["Modality"] == "CT"
        assert c.post("/api/routes/test", json={"study_uid": "1.2.3.999"}).status_code == 404
        assert c.post("/api/routes/test", json={}).status_code == 422
    with ops.web.sessions() as s:  # a dry run queues nothing
        assert s.execute(select(func.count()).select_from(Job)).scalar_one() == jobs_before
    with ops.web.api("auditor") as c:
        assert c.post("/api/routes/test", json={"tags": {}}).status_code == 403


def test_plugins_list(ops: Ops) -> None:
    with ops.web.api("admin") as c:
        items = {p["name"]: p for p in c.get("/api/plugins").json()["items"]}
    assert items["threshold"]["ok"] and items["threshold"]["version"]
    assert items["threshold"]["api_version"] and "CT" in items["threshold"]["modalities"]
    assert items["raises"]["ok"] and items["raises"]["distribution"] == "ops-plugins"
    assert not items["broken"]["ok"] and "not a subclass" in items["broken"]["error"]


# -- users ----------------------------------------------------------------------------------------


def test_users_crud_and_no_self_harm(ops: Ops) -> None:
    web = ops.web
    with web.api("admin") as c:
        r = c.post("/api/users", json={"name": "op1", "role": "radiologist",
                                       "password": PASSWORD, "display_name": "Op One"})
        assert r.status_code == 201, r.text
        assert r.json()["state"] == "active" and r.json()["role"] == "radiologist"
        dup = c.post("/api/users", json={"name": "op1", "role": "admin", "password": PASSWORD})
        assert dup.status_code == 409 and "exists already" in dup.json()["detail"]
        weak = c.post("/api/users", json={"name": "op2", "role": "admin", "password": "short"})
        assert weak.status_code == 422 and "too short" in weak.json()["detail"]
        assert c.post("/api/users", json={"name": "op3", "role": "boss",
                                          "password": PASSWORD}).status_code == 422
        names = [u["name"] for u in c.get("/api/users").json()["items"]]
        assert "op1" in names and "admin" in names
        assert web.token("op1")
        # locked by failed logins, unlocked by the admin
        for _ in range(web.settings.web.lockout_failures):
            web.tokens.pop("op1", None)
            httpx.post(f"{web.url}/api/token", data={"username": "op1", "password": "wrong!"})
        users = {u["name"]: u for u in c.get("/api/users").json()["items"]}
        assert users["op1"]["state"] == "locked"
        assert c.post("/api/users/op1/unlock").json()["state"] == "active"
        assert c.post("/api/users/op1/disable").json()["state"] == "disabled"
        assert c.post("/api/users/op1/enable").json()["state"] == "active"
        r = c.post("/api/users/op1/role", json={"role": "auditor"})
        assert r.status_code == 200 and r.json()["role"] == "auditor"
        assert c.post("/api/users/op1/password", json={"password": "a new passphrase"}
                      ).status_code == 200
        assert web.token("op1", "a new passphrase")
        assert c.post("/api/users/ghost/disable").status_code == 404
        me = c.post("/api/users/admin/disable")
        assert me.status_code == 409 and "cannot disable yourself" in me.json()["detail"]
        demote = c.post("/api/users/admin/role", json={"role": "auditor"})
        assert demote.status_code == 409 and "cannot demote yourself" in demote.json()["detail"]
    with web.sessions() as s:
        admin = s.execute(select(User).where(User.name == "admin")).scalar_one()
        assert not admin.disabled and str(admin.role) == "admin"
    changes = [(e["change"], e["target"]) for e in events(web, "user-changed")
               if e["user"] == "admin"]
    for change in ("added", "unlocked", "disabled", "enabled", "role", "password"):
        assert (change, "op1") in changes, change
    with web.api("radiologist") as c:
        assert c.get("/api/users").status_code == 403
        assert c.post("/api/users/op1/disable").status_code == 403


# -- dashboard and pages --------------------------------------------------------------------------


def test_dashboard_figures(ops: Ops) -> None:
    dead_delivery(ops, "a")
    with ops.web.api("admin") as c:
        d = c.get("/api/dashboard").json()
    assert sum(h["count"] for h in d["instances_per_hour"]) == ops.instances
    assert sum(h["count"] for h in d["studies_per_hour"]) == 4
    assert len(d["instances_per_hour"]) == 24
    assert d["deliveries"]["dead"] >= 1 and d["jobs"]["succeeded"] >= 1
    assert [x["name"] for x in d["failing_destinations"]] == ["pacs"]
    assert d["disk"]["free_mb"] > 0
    assert "send-failed" in [e["event_type"] for e in d["last_errors"]]
    assert all(e["outcome"] >= 8 for e in d["last_errors"])


def test_pages_render_for_admin_only_where_allowed(ops: Ops) -> None:
    uid, receiving = ops.studies["a"], ops.studies["d"]
    with ops.web.api("admin") as c:
        assert "Force complete" in c.get(f"/studies/{receiving}").text
        for path, text in [("/", "Instances received per hour"), ("/studies", "Doe^Jane"),
                           (f"/studies/{uid}", "Timeline"), ("/jobs", "Dead letters"),
                           ("/destinations", "PACS"), ("/routes", "ct-threshold"),
                           ("/plugins", "threshold"), ("/users", "Add a user")]:
            r = c.get(path)
            assert r.status_code == 200, (path, r.status_code)
            assert text in r.text, path
        assert "<svg" in c.get("/").text
    with ops.web.api("radiologist") as c:
        study = c.get(f"/studies/{receiving}")
        assert study.status_code == 200 and "Force complete" not in study.text
        assert c.get("/jobs").status_code == 403
