"""The ``dicomnode`` command line (typer + rich). Every command takes ``--config FILE``."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from dicomnode.config import ConfigError, Settings, load_settings

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="dicomnode: durable DICOM ingest, completion, routing and audit.")
audit_app = typer.Typer(no_args_is_help=True, help="Review and verify the audit trail.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema (Alembic migrations).")
app.add_typer(audit_app, name="audit")
app.add_typer(db_app, name="db")
simulate_app = typer.Typer(no_args_is_help=True,
                           help="Write synthetic studies (labelled synthetic) for tests and demos.")
app.add_typer(simulate_app, name="simulate")

console = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar="DICOMNODE_CONFIG",
                 help="YAML configuration file (see dicomnode.example.yaml)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as e:
        err.print(f"[red]error:[/red] {e}", markup=True, highlight=False)
        raise typer.Exit(2) from None


def _sessions(settings: Settings) -> Any:
    from dicomnode.database import make_engine, make_sessionmaker

    return make_sessionmaker(make_engine(settings.database_url), readonly=True)


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


@app.command()
def serve(config: ConfigOpt = None) -> None:
    """Run the node until SIGTERM/SIGINT (then finish in-flight instances and stop)."""
    settings = _settings(config)
    from dicomnode.node import Node
    from dicomnode.runtime.memory import tune_allocator
    from dicomnode.runtime.process import configure_logging

    configure_logging(settings.logging.level)
    tune_allocator()
    try:
        node = Node(settings)
    except ConfigError as e:  # routes checked against the installed plugins
        err.print(f"[red]error:[/red] {e}", markup=True, highlight=False)
        raise typer.Exit(2) from None
    except OSError as e:
        err.print(f"[red]error:[/red] cannot start: {e}")
        raise typer.Exit(1) from None
    web = None
    if settings.web.enabled:
        from dicomnode.web.server import WebThread

        _hint_first_user(settings, node.sessions)
        web = WebThread(settings, node.sessions, node.audit, node.store)
        try:
            web.start()
        except OSError as e:
            err.print(f"[red]error:[/red] {e} (web.port is {settings.web.port}; "
                      "web.enabled: false runs the node without its console)")
            raise typer.Exit(1) from None
    try:
        node.serve_forever()
    except OSError as e:  # e.g. port in use
        err.print(f"[red]error:[/red] {e} (node.port is {settings.node.port})")
        node.stop("start failed")
        raise typer.Exit(1) from None
    finally:
        if web is not None:
            web.stop()


def _hint_first_user(settings: Settings, sessions: Any) -> None:
    """No one can log in yet: say how to make the first user (there is no default one)."""
    from dicomnode.database import reading
    from dicomnode.web.auth import has_users

    with reading(sessions)() as s:
        if has_users(s):
            return
    cfg = os.environ.get("DICOMNODE_CONFIG")
    err.print(f"[yellow]No console user exists yet.[/yellow] Create one with\n"
              f"  dicomnode users add NAME --role admin{' --config ' + cfg if cfg else ''}\n"
              f"then log in at {settings.web.base_url}/login", highlight=False)


@app.command()
def web(config: ConfigOpt = None) -> None:
    """Run the web console and REST API alone (no DICOM listener), against the node's
    database: e.g. on another machine, or a second one behind a load balancer."""
    settings = _settings(config)
    from dicomnode.database import make_engine, make_sessionmaker, upgrade
    from dicomnode.runtime.process import configure_logging
    from dicomnode.web.server import run_web

    configure_logging(settings.logging.level)
    settings.storage.path.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    sessions = make_sessionmaker(make_engine(settings.database_url))
    _hint_first_user(settings, sessions)
    run_web(settings, sessions)


@app.command()
def echo(
    host: str,
    port: int,
    aet: Annotated[str, typer.Option("--aet", help="Called AE title (the peer's).")] = "ANY-SCP",
    calling_aet: Annotated[str | None, typer.Option(
        "--calling-aet", help="Our AE title; default node.ae_title.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Send a C-ECHO (verification) to HOST PORT; exit 0 on success."""
    settings = _settings(config)
    from pynetdicom import AE

    from dicomnode.receive.scp import VERIFICATION

    ae = AE(ae_title=calling_aet or settings.node.ae_title)
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = ae.network_timeout = 10
    assoc = ae.associate(host, port, ae_title=aet)
    if not assoc.is_established:
        err.print(f"[red]echo failed:[/red] association with {aet}@{host}:{port} "
                  "rejected, aborted or never connected")
        raise typer.Exit(1)
    status = assoc.send_c_echo()
    assoc.release()
    code = getattr(status, "Status", None)
    if code != 0:
        err.print(f"[red]echo failed:[/red] status {code!r}")
        raise typer.Exit(1)
    console.print(f"echo {aet}@{host}:{port}: [green]success[/green]")


@app.command()
def studies(
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    all_instances: Annotated[bool, typer.Option(
        "--all", help="List every instance (the table shows 10 per series).")] = False,
) -> None:
    """Studies with their series and instances, and completion state."""
    from sqlalchemy import select
    from sqlalchemy.orm import selectinload

    from dicomnode.schema import Series, Study

    settings = _settings(config)
    with _sessions(settings)() as s:
        rows = s.execute(
            select(Study).options(selectinload(Study.patient),
                                  selectinload(Study.series).selectinload(Series.instances))
            .order_by(Study.first_received_at)
        ).scalars().all()
        data = [{
            "study_uid": st.study_uid, "patient_id": st.patient.patient_id,
            "patient_name": st.patient.patient_name, "study_date": st.study_date,
            "accession_number": st.accession_number, "description": st.study_description,
            "state": st.state, "revision": st.revision, "num_instances": st.num_instances,
            "completed_at": st.completed_at,
            "series": [{
                "series_uid": se.series_uid, "modality": se.modality,
                "series_number": se.series_number, "description": se.series_description,
                "state": se.state, "revision": se.revision, "num_instances": se.num_instances,
                "instances": [{
                    "sop_instance_uid": i.sop_instance_uid, "sop_class_uid": i.sop_class_uid,
                    "transfer_syntax_uid": i.transfer_syntax_uid, "size": i.size,
                    "instance_number": i.instance_number, "study_revision": i.study_revision,
                    "path": i.path, "digest": i.digest,
                } for i in se.instances],
            } for se in st.series],
        } for st in rows]
    if as_json:
        _print_json(data)
        return
    if not data:
        console.print("no studies")
        return
    for st in data:
        color = "green" if st["state"] == "complete" else "yellow"
        tree = Tree(f"[bold]{st['study_uid']}[/bold]  {st['patient_name']} ({st['patient_id']})"
                    f"  {st['study_date']}  [{color}]{st['state']}[/{color}] rev {st['revision']}"
                    f"  {st['num_instances']} instances")
        for se in st["series"]:
            branch = tree.add(f"{se['modality']} #{se['series_number']} {se['description']}  "
                              f"{se['series_uid']}  {se['state']}  {se['num_instances']} inst.")
            shown = se["instances"] if all_instances else se["instances"][:10]
            for i in shown:
                branch.add(f"{i['sop_instance_uid']}  {i['sop_class_uid']}  "
                           f"{i['transfer_syntax_uid']}  {i['size']} B")
            if len(shown) < len(se["instances"]):
                branch.add(f"… {len(se['instances']) - len(shown)} more (--all)")
        console.print(tree)


def _parse_since(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        err.print(f"[red]error:[/red] --since {value!r}: use ISO 8601, e.g. 2026-11-21T08:00")
        raise typer.Exit(2) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).isoformat(timespec="microseconds")


_OUTCOME_WORDS = {0: "ok", 4: "minor", 8: "serious", 12: "major"}


def _audit_table(data: list[dict[str, Any]]) -> Table:
    """The default `audit list`: what an operator scans for in an 80-column terminal. Times
    are HH:MM:SS (UTC) under a date row whenever the day changes; the summary wraps, the
    event type never does."""
    table = Table(box=None, pad_edge=False, padding=(0, 1, 0, 0), header_style="bold")
    table.add_column("time (UTC)", no_wrap=True)
    table.add_column("event", no_wrap=True)
    table.add_column("outcome", no_wrap=True)
    table.add_column("who", max_width=16, overflow="fold")  # an AE title: 16 at most
    table.add_column("summary", overflow="fold", ratio=1)
    day = ""
    for d in data:
        ts = str(d["ts"])
        if ts[:10] != day:
            day = ts[:10]
            table.add_row(f"[bold]{day}[/bold]", "", "", "", "")
        outcome = int(d["outcome"])
        word = _OUTCOME_WORDS.get(outcome, str(outcome))
        if outcome >= 8:
            word = f"[red]{word}[/red]"
        elif outcome:
            word = f"[yellow]{word}[/yellow]"
        who = d["user"] or d["source_aet"] or d["source_host"] or ""
        table.add_row(ts[11:19], d["event_type"], word, _plain(who),
                      _plain(_audit_summary(d["event_type"], d["detail"])))
    return table


def _plain(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _audit_summary(kind: str, d: dict[str, Any]) -> str:
    """One line that says what happened (shared with the console: dicomnode.audit.summary)."""
    from dicomnode.audit.summary import summary

    return summary(kind, d)


@audit_app.command("list")
def audit_list(
    config: ConfigOpt = None,
    since: Annotated[str | None, typer.Option(help="Only events at or after (ISO 8601, UTC "
                                              "unless a zone is given).")] = None,
    event: Annotated[str | None, typer.Option(help="Event type (e.g. store-refused) or "
                                              "code (e.g. 110104).")] = None,
    limit: Annotated[int, typer.Option(help="At most this many (newest last).")] = 1000,
    wide: Annotated[bool, typer.Option("--wide", help="Every column (seq, code, host, full "
                                       "detail); needs a wide terminal.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List audit events: time, event, outcome, who and a one-line summary (fits 80
    columns); --wide for every column, --json for everything."""
    from sqlalchemy import or_, select

    from dicomnode.schema import AuditEvent

    settings = _settings(config)
    q = select(AuditEvent)
    cutoff = _parse_since(since)
    if cutoff:
        q = q.where(AuditEvent.ts >= cutoff)
    if event:
        q = q.where(or_(AuditEvent.event_type == event, AuditEvent.event_code == event))
    q = q.order_by(AuditEvent.seq.desc()).limit(limit)
    with _sessions(settings)() as s:
        rows = list(reversed(s.execute(q).scalars().all()))
        data = [{
            "seq": r.seq, "ts": r.ts, "event_code": r.event_code, "event_name": r.event_name,
            "event_type": r.event_type, "action": r.action, "outcome": r.outcome,
            "source_aet": r.source_aet, "source_host": r.source_host, "dest_aet": r.dest_aet,
            "user": r.user, "detail": json.loads(r.detail), "hash": r.hash,
        } for r in rows]
    if as_json:
        _print_json(data)
        return
    if not wide:
        console.print(_audit_table(data))
        return
    table = Table("seq", "time (UTC)", "event", "type", "outcome", "who", "detail")
    for d in data:
        who = " ".join(x for x in (d["source_aet"], d["source_host"]) if x)
        table.add_row(str(d["seq"]), d["ts"][:23], f"{d['event_code']} {d['event_name']}",
                      d["event_type"], str(d["outcome"]), who,
                      json.dumps(d["detail"], default=str)[:120])
    console.print(table)


@audit_app.command("verify")
def audit_verify(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Recompute the hash chain; exit 1 and name the first broken row if any was altered."""
    from dicomnode.audit import verify_chain

    result = verify_chain(_sessions(_settings(config)))
    if as_json:
        _print_json({"ok": result.ok, "checked": result.checked,
                     "first_bad_seq": result.first_bad_seq, "reason": result.reason})
    elif result.ok:
        console.print(f"audit chain [green]intact[/green]: {result.checked} events verified")
    else:
        err.print(f"[red]audit chain BROKEN[/red] at seq {result.first_bad_seq}: "
                  f"{result.reason} ({result.checked} events verified before it)")
    if not result.ok:
        raise typer.Exit(1)


@db_app.command("upgrade")
def db_upgrade(config: ConfigOpt = None,
               revision: Annotated[str, typer.Option(help="Target revision.")] = "head") -> None:
    """Apply schema migrations (safe to run repeatedly; `serve` runs it too)."""
    from dicomnode.database import current_revision, upgrade

    settings = _settings(config)
    upgrade(settings.database_url, revision)
    console.print(f"database at revision {current_revision(settings.database_url)}")


@db_app.command("current")
def db_current(config: ConfigOpt = None) -> None:
    """Show the schema revision of the configured database."""
    from dicomnode.database import current_revision

    console.print(str(current_revision(_settings(config).database_url)))


jobs_app = typer.Typer(help="Pipeline jobs, their deliveries and dead letters.",
                       invoke_without_command=True)
app.add_typer(jobs_app, name="jobs")


@jobs_app.callback()
def jobs_list(ctx: typer.Context, config: ConfigOpt = None, as_json: JsonOpt = False,
              limit: Annotated[int, typer.Option(help="Newest this many.")] = 100) -> None:
    """List jobs (state, attempts, reason) with their deliveries; dead letters stand out."""
    if ctx.invoked_subcommand is not None:
        return
    from sqlalchemy import select

    from dicomnode.schema import Delivery, Job

    settings = _settings(config)
    with _sessions(settings)() as s:
        jobs = s.execute(select(Job).order_by(Job.id.desc()).limit(limit)).scalars().all()
        deliveries = s.execute(select(Delivery).where(Delivery.job_fk.in_([j.id for j in jobs]))
                               ).scalars().all()
        data = [{
            "id": j.id, "uid": j.uid, "route": j.route, "study_uid": j.study_uid,
            "revision": j.revision, "state": j.state, "attempts": j.attempts,
            "max_attempts": j.max_attempts, "reason": j.reason, "summary": j.summary,
            "results": json.loads(j.results), "created_at": j.created_at,
            "started_at": j.started_at, "finished_at": j.finished_at,
            "deliveries": [{"id": d.id, "destination": d.destination, "step": d.step,
                            "state": d.state,
                            "attempts": d.attempts, "next_attempt_at": d.next_attempt_at,
                            "last_error": d.last_error, "sent_at": d.sent_at}
                           for d in deliveries if d.job_fk == j.id],
        } for j in jobs]
    if as_json:
        _print_json(data)
        return
    table = Table("job", "route", "study", "state", "tries", "deliveries", "reason / summary")
    for j in data:
        dl = ", ".join(f"{d['destination']}" + (f" (step {d['step']})" if d["step"] >= 0 else "")
                       + f": {d['state']}" for d in j["deliveries"])
        color = {"succeeded": "green", "dead": "red", "failed": "red"}.get(j["state"], "yellow")
        table.add_row(str(j["id"]), j["route"], j["study_uid"][-24:],
                      f"[{color}]{j['state']}[/{color}]", f"{j['attempts']}/{j['max_attempts']}",
                      dl, (j["reason"] or j["summary"])[:80])
    console.print(table)


@contextmanager
def _job_for_update(config: Path | None, job_id: int) -> Iterator[tuple[Any, Any, Any]]:
    """(session, job, audit log) in a write transaction; exit 1 with a message if there is no
    such job. Nothing is written when the body raises."""
    from dicomnode.audit import AuditLog
    from dicomnode.database import make_engine, make_sessionmaker
    from dicomnode.schema import Job

    settings = _settings(config)
    sessions = make_sessionmaker(make_engine(settings.database_url))
    with sessions() as s, s.begin():
        job = s.get(Job, job_id)
        if job is None:
            err.print(f"[red]error:[/red] no job {job_id}")
            raise typer.Exit(1)
        yield s, job, AuditLog(sessions)


@jobs_app.command("retry")
def jobs_retry(job_id: int, config: ConfigOpt = None) -> None:
    """Re-queue job ID: its dead deliveries are sent again; a failed or dead job runs again.
    Audited with your operating-system user name."""
    from dicomnode.run.jobs import retry
    from dicomnode.state import Actor

    with _job_for_update(config, job_id) as (s, job, audit):
        n, requeued = retry(s, audit, job, Actor.os_user())
    console.print(f"job {job_id}: {n} dead deliver{'y' if n == 1 else 'ies'} re-queued"
                  + ("; job queued to run again" if requeued else ""))


@jobs_app.command("cancel")
def jobs_cancel(job_id: int, config: ConfigOpt = None) -> None:
    """Cancel job ID: a queued job never runs; a running one is stopped (nothing is sent).
    Audited with your operating-system user name."""
    from dicomnode.run.jobs import request_cancel
    from dicomnode.state import Actor, IllegalTransition

    try:
        with _job_for_update(config, job_id) as (s, job, audit):
            state = request_cancel(s, audit, job, Actor.os_user())
    except IllegalTransition as e:
        err.print(f"nothing to cancel: {e}")
        raise typer.Exit(1) from None
    console.print(f"job {job_id}: {state}")


@app.command()
def plugins(as_json: JsonOpt = False) -> None:
    """Installed plugins (entry-point group dicomnode.plugins): version, needs, problems."""
    from dicomnode.run.registry import discover

    rows: list[dict[str, Any]] = []
    for name, info in sorted(discover().items()):
        cls = info.cls
        rows.append({
            "name": name, "distribution": info.distribution, "entry_point": info.entry_point,
            "ok": info.ok, "error": info.error,
            "version": cls.version if cls else None,
            "api_version": cls.api_version if cls else None,
            "gpu": str(cls.needs.gpu) if cls else None,
            "memory_mb": cls.needs.memory_mb if cls else None,
            "timeout_seconds": cls.needs.timeout_seconds if cls else None,
            "modalities": list(cls.accepts.modalities) if cls else None,
            "description": cls.description if cls else "",
            "params": cls.params_model.model_json_schema() if cls else None,
        })
    if as_json:
        _print_json(rows)
        return
    if not rows:
        console.print("no plugins installed (entry-point group dicomnode.plugins)")
        return
    table = Table("name", "version", "api", "gpu", "memory", "accepts", "distribution", "status")
    for r in rows:
        table.add_row(r["name"], r["version"] or "", str(r["api_version"] or ""),
                      r["gpu"] or "", f"{r['memory_mb']} MB" if r["memory_mb"] else "",
                      ",".join(r["modalities"] or []) or "any", r["distribution"],
                      "[green]ok[/green]" if r["ok"] else f"[red]{r['error']}[/red]")
    console.print(table)


@app.command()
def check(config: ConfigOpt = None) -> None:
    """Validate the configuration and its routes against the installed plugins; exit 2 if bad."""
    from dicomnode.route import compile_routes
    from dicomnode.run.registry import discover

    settings = _settings(config)
    try:
        rules = compile_routes(settings, discover())
    except ConfigError as e:
        err.print(f"[red]error:[/red] {e}", markup=True, highlight=False)
        raise typer.Exit(2) from None
    console.print(f"configuration ok: {len(settings.destinations)} destination(s), "
                  f"{len(rules)} route(s)")


@simulate_app.command("ct")
def simulate_ct(
    out: Annotated[Path, typer.Option("--out", help="Directory for the projection files.")],
    phantom: Annotated[str, typer.Option(
        help="shepp-logan (analytic, exact line integrals) or a FILE.npy HU volume (2D or 3D, "
             "centred on the isocentre).")] = "shepp-logan",
    geometry: Annotated[str, typer.Option(
        help="parallel | fan | cone (circular) | helical (cone beam, moving table)")] = "fan",
    views: Annotated[int, typer.Option(
        min=2, help="Projections over the arc (helical: per turn).")] = 720,
    detector_pixels: Annotated[int, typer.Option(min=2, help="Detector columns.")] = 736,
    rows: Annotated[int, typer.Option(min=1, help="Detector rows (cone beam: > 1).")] = 1,
    detector: Annotated[str, typer.Option(help="cylindrical | flat")] = "cylindrical",
    arc_deg: Annotated[float, typer.Option(
        help="Scan arc (default: 360; parallel 180). Fan/cone short scans need ≥ 180 + fan "
             "angle.")] = 360.0,
    noise_i0: Annotated[float | None, typer.Option(
        help="Incident photons per detector element (Poisson noise); none: noise-free.")] = None,
    voxel_mm: Annotated[float, typer.Option(help="Voxel size of a FILE.npy phantom.")] = 0.5,
    fov_mm: Annotated[float, typer.Option(help="Field the detector covers.")] = 250.0,
    seed: Annotated[int, typer.Option(help="Noise seed.")] = 0,
    pitch: Annotated[float, typer.Option(
        help="Helical: table feed per turn ÷ detector z coverage at the isocentre.")] = 0.5,
    turns: Annotated[float, typer.Option(help="Helical: number of turns.")] = 4.0,
) -> None:
    """Simulate a CT scan and write it as DICOM-CT-PD raw data (one file per projection)."""
    from dicomnode.simulate.ct import simulate_ct as run

    if geometry not in ("parallel", "fan", "cone", "helical") or \
            detector not in ("cylindrical", "flat"):
        err.print("error: --geometry is parallel, fan, cone or helical; --detector cylindrical "
                  "or flat")
        raise typer.Exit(2)
    if phantom != "shepp-logan" and not Path(phantom).is_file():
        err.print(f"error: phantom {phantom!r} is neither shepp-logan nor a .npy file")
        raise typer.Exit(2)
    try:
        g, _ = run(out, phantom, geometry, views, detector_pixels, rows, detector=detector,
                   noise_i0=noise_i0, voxel_mm=voxel_mm, arc_deg=arc_deg, seed=seed,
                   fov_mm=fov_mm, pitch=pitch, turns=turns)
    except ValueError as e:
        err.print(f"error: {e}")
        raise typer.Exit(2) from None
    shape = f"helical {g.kind}-beam" if g.helical else f"{g.kind}-beam"
    pitch_note = f", pitch {g.pitch:.2f}" if g.helical else ""
    console.print(f"wrote {g.views} {shape} projections ({g.rows}×{g.columns}{pitch_note}, "
                  f"{g.detector}) to {out}")


@simulate_app.command("head-ct")
def simulate_head_ct(
    out: Annotated[Path, typer.Option("--out", help="Directory for the series and truth.json.")],
    seed: Annotated[int, typer.Option(help="Random seed (the study is a function of it).")] = 0,
    hemorrhage: Annotated[str, typer.Option(
        help="random (none in ~40 %) | none | iph | sdh | edh")] = "random",
    volume_ml: Annotated[float | None, typer.Option(
        help="Lesion volume (default: random, 0.5–50 mL).")] = None,
    slices: Annotated[int, typer.Option(min=1)] = 40,
    slice_mm: Annotated[float, typer.Option(help="Slice thickness = spacing.")] = 4.0,
    size: Annotated[int, typer.Option(help="Matrix (pixels per side).")] = 256,
    pixel_mm: Annotated[float, typer.Option()] = 0.9,
    orientation: Annotated[str, typer.Option(
        help="axial | tilted (gantry tilt 10–25°: a sheared stack) | oblique | coronal | "
             "sagittal")] = "axial",
) -> None:
    """Write a synthetic head CT (with or without hemorrhage) and its ground truth."""
    from dicomnode.simulate.head import write_head_ct

    try:
        files, truth = write_head_ct(out, seed, kind=hemorrhage, volume_ml=volume_ml,
                                     slices=slices, slice_mm=slice_mm, size=size,
                                     pixel_mm=pixel_mm, orientation=orientation)
    except ValueError as e:
        err.print(f"error: {e}")
        raise typer.Exit(2) from None
    what = ", ".join(f"{les.kind} {les.volume_ml:.1f} mL" for les in truth.lesions) or \
        "no hemorrhage"
    console.print(f"wrote {len(files)} slices ({what}) and truth.json to {out}")


@simulate_app.command("chest-ct")
def simulate_chest_ct(
    out: Annotated[Path, typer.Option("--out", help="Directory for the series and truth.json.")],
    seed: Annotated[int, typer.Option(help="Random seed (the study is a function of it).")] = 0,
    nodules: Annotated[int | None, typer.Option(
        help="Number of nodules (default: random 0–4).")] = None,
    slices: Annotated[int, typer.Option(min=1)] = 120,
    slice_mm: Annotated[float, typer.Option(help="Slice thickness = spacing.")] = 1.25,
    size: Annotated[int, typer.Option(help="Matrix (pixels per side).")] = 320,
    pixel_mm: Annotated[float, typer.Option()] = 0.8,
    orientation: Annotated[str, typer.Option(
        help="axial | tilted (gantry tilt 10–25°: a sheared stack) | oblique | coronal | "
             "sagittal")] = "axial",
) -> None:
    """Write a synthetic chest CT (vessels, 0–4 solid or ground-glass nodules) + ground truth."""
    from dicomnode.simulate.chest import write_chest_ct

    try:
        files, truth = write_chest_ct(out, seed, nodules=nodules, slices=slices,
                                      slice_mm=slice_mm, size=size, pixel_mm=pixel_mm,
                                      orientation=orientation)
    except ValueError as e:
        err.print(f"error: {e}")
        raise typer.Exit(2) from None
    what = ", ".join(f"{n.kind} {n.diameter_mm:.1f} mm" for n in truth.nodules) or "no nodule"
    console.print(f"wrote {len(files)} slices ({what}) and truth.json to {out}")


@app.command()
def version() -> None:
    """Print the dicomnode version."""
    from dicomnode import __version__

    console.print(__version__)


# -- users of the web console and REST API -------------------------------------------------------

users_app = typer.Typer(no_args_is_help=True,
                        help="People who use the web console and REST API (docs/console.md).")
app.add_typer(users_app, name="users")

RoleArg = Annotated[str, typer.Option("--role", help="admin | radiologist | auditor")]
StdinOpt = Annotated[bool, typer.Option("--password-stdin",
                                        help="Read the password from standard input (one line)"
                                             " instead of asking for it.")]


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return str(typer.prompt("Password", hide_input=True, confirmation_prompt=True))


@contextmanager
def _users_tx(config: Path | None) -> Iterator[tuple[Any, Any, str]]:
    """(session, audit log, acting OS user) in a write transaction, on a schema brought up to
    date first (so this works on a fresh installation before the first ``serve``). A refused
    change exits 1 with the reason, writing nothing."""
    from dicomnode.audit import AuditLog
    from dicomnode.database import make_engine, make_sessionmaker, upgrade
    from dicomnode.state import Actor
    from dicomnode.web.auth import UserError

    settings = _settings(config)
    settings.storage.path.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    sessions = make_sessionmaker(make_engine(settings.database_url))
    try:
        with sessions() as s, s.begin():
            yield s, AuditLog(sessions), Actor.os_user().name
    except UserError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(1) from None


@users_app.command("add")
def users_add(name: str, role: RoleArg, password_stdin: StdinOpt = False,
              display_name: Annotated[str, typer.Option(
                  help="Full name, e.g. for the verifying observer of a verified SR.")] = "",
              config: ConfigOpt = None) -> None:
    """Create a user with a password (at least 10 characters). Audited."""
    from dicomnode.web.auth import add_user, check_role, hash_password

    try:
        check_role(role)
        password = _read_password(password_stdin)
        hash_password(password)  # refuse a weak password before touching the database
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(1) from None
    with _users_tx(config) as (s, audit, by):
        add_user(s, audit, name, role, password, by=by, display_name=display_name)
    console.print(f"user {name} added ({role})")


@users_app.command("list")
def users_list(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Every user, their role and whether they can log in."""
    from sqlalchemy import select

    from dicomnode.schema import User

    with _users_tx(config) as (s, _audit, _by):
        rows = [{"name": u.name, "display_name": u.display_name, "role": str(u.role),
                 "disabled": u.disabled, "locked": u.locked_at is not None,
                 "sso": u.sso_subject is not None,
                 "last_login_at": u.last_login_at.isoformat() if u.last_login_at else None}
                for u in s.execute(select(User).order_by(User.name)).scalars()]
    if as_json:
        _print_json(rows)
        return
    table = Table("name", "role", "state", "last login", "full name")
    for r in rows:
        state = ("disabled" if r["disabled"] else "locked" if r["locked"] else "active") + \
            (" (sso)" if r["sso"] else "")
        table.add_row(r["name"], r["role"], state, r["last_login_at"] or "never",
                      r["display_name"])
    console.print(table)


@users_app.command("disable")
def users_disable(name: str, config: ConfigOpt = None) -> None:
    """Stop NAME from logging in; their sessions and tokens end now. Audited."""
    from dicomnode.web.auth import set_disabled

    with _users_tx(config) as (s, audit, by):
        set_disabled(s, audit, name, True, by=by)
    console.print(f"user {name} disabled")


@users_app.command("enable")
def users_enable(name: str, config: ConfigOpt = None) -> None:
    """Let a disabled user log in again. Audited."""
    from dicomnode.web.auth import set_disabled

    with _users_tx(config) as (s, audit, by):
        set_disabled(s, audit, name, False, by=by)
    console.print(f"user {name} enabled")


@users_app.command("passwd")
def users_passwd(name: str, password_stdin: StdinOpt = False,
                 config: ConfigOpt = None) -> None:
    """Set NAME's password (also unlocks a locked account; their sessions end). Audited."""
    from dicomnode.web.auth import hash_password, set_password

    password = _read_password(password_stdin)
    try:
        hash_password(password)
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(1) from None
    with _users_tx(config) as (s, audit, by):
        set_password(s, audit, name, password, by=by)
    console.print(f"password of {name} changed")


@users_app.command("unlock")
def users_unlock(name: str, config: ConfigOpt = None) -> None:
    """Unlock an account locked after repeated failed logins. Audited."""
    from dicomnode.web.auth import unlock

    with _users_tx(config) as (s, audit, by):
        unlock(s, audit, name, by=by)
    console.print(f"user {name} unlocked")


@users_app.command("role")
def users_role(name: str, role: Annotated[str, typer.Argument(
        help="admin | radiologist | auditor")], config: ConfigOpt = None) -> None:
    """Change NAME's role (from their next login). Audited."""
    from dicomnode.web.auth import set_role

    with _users_tx(config) as (s, audit, by):
        set_role(s, audit, name, role, by=by)
    console.print(f"user {name} is now {role}")
