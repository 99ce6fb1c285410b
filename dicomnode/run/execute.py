"""Run one job in a child process: load inputs, run the pipeline, package, write results.

The child never changes the job's state: it writes ``outcome.json`` (state, reason, results)
and exits; the parent (:mod:`dicomnode.run.runner`) is the only writer of job state, so a child
that crashes, hangs or is killed can never leave a half-updated job. Result files are written
durably (see :class:`ResultWriter`) before the outcome says so; a retry overwrites them with
the same content and UIDs (UIDs derive from the job).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.filebase import DicomBytesIO
from sqlalchemy import select

from dicomnode.config import Settings
from dicomnode.database import make_engine, make_sessionmaker
from dicomnode.package import Provenance
from dicomnode.package.kos import key_images_to_kos
from dicomnode.package.seg import label_map_to_seg
from dicomnode.package.series import ct_series_part10, enhanced_ct_part10
from dicomnode.package.sr import findings_to_sr
from dicomnode.package.stl import mesh_to_stl
from dicomnode.plugin import (
    GPU,
    Context,
    Inputs,
    NotApplicable,
    Outputs,
    PluginError,
    SeriesInput,
)
from dicomnode.run.inputs import projection_input, series_input
from dicomnode.run.jobs import JobOutcome, read_step, step_record
from dicomnode.run.registry import discover
from dicomnode.runtime.memory import tune_allocator
from dicomnode.runtime.process import die_with_parent
from dicomnode.schema import Instance, Job, JobState, Series
from dicomnode.store.files import fsync_dir, start_writeback

log = logging.getLogger("dicomnode.job")


class ResultWriter:
    """Writes a step's result files and makes them durable together.

    Each file is written at its final name and its write-back started at once; :meth:`sync`
    (at the end of a step's packaging, before the outcome names the files) fsyncs every file,
    then every directory. The outcome file is the commit point: the runner reads results only
    from an outcome, so a file a crash left half-written is never sent, and the retry rewrites
    it (same content, UIDs from the job). One fsync per file after the disk already has the
    data instead of write → fsync → rename per file: the syncs no longer wait one by one.
    """

    def __init__(self, root: Path) -> None:
        self.root = root  # the job's folder: directories up to it (and its entry) are synced
        self.paths: list[Path] = []

    def write(self, path: Path, ds: Any = None, data: bytes | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if data is None:
            buf = DicomBytesIO()
            ds.save_as(buf, enforce_file_format=True)
            data = buf.getvalue()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            start_writeback(fd, 0, len(data))
        finally:
            os.close(fd)
        self.paths.append(path)

    def sync(self) -> None:
        for path in self.paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        dirs = {self.root.parent}
        for p in self.paths:
            d = p.parent
            while d != self.root.parent and d not in dirs:
                dirs.add(d)
                d = d.parent
        for d in sorted(dirs, key=lambda p: -len(p.parts)):  # deepest first
            fsync_dir(d)
        self.paths.clear()


def _load_inputs(settings: Settings, job: Job, sessions: Any, projections: bool = False) -> Inputs:
    uids = json.loads(job.series_uids)
    series: list[SeriesInput] = []
    patient: dict[str, str] = {}
    with sessions() as s:
        for uid in uids:
            paths = s.execute(select(Instance.path).join(Series, Instance.series_fk == Series.id)
                              .where(Series.series_uid == uid)
                              .where(Instance.study_revision <= job.revision)).scalars().all()
            datasets = [pydicom.dcmread(settings.storage.path / p) for p in paths]
            series.append(projection_input(datasets) if projections else series_input(datasets))
            first = datasets[0]
            patient = {k: str(first.get(k, "")) for k in ("PatientID", "PatientName",
                                                          "PatientBirthDate", "PatientSex")}
    return Inputs(job.study_uid, tuple(series), patient)


def _package(outputs: Outputs, inputs: Inputs, prov: Provenance, step: int,
             out_dir: Path, derived_series: str = "classic",
             source_references: str = "images") -> list[str]:
    """Write one step's outputs as DICOM files under ``out_dir/step<N>``, durably (synced
    before return)."""
    writer = ResultWriter(out_dir)
    by_uid = {s.series_uid: s for s in inputs.series}
    written: list[str] = []
    base = 9000 + 10 * step  # series numbers of results: 9000, 9010, … per pipeline step

    def source_of(uid: str) -> SeriesInput:
        if uid not in by_uid:
            raise PluginError(f"output refers to series {uid} which was not an input")
        return by_uid[uid]

    def emit(obj: Any, name: str, data: bytes | None = None) -> None:
        path = out_dir / f"step{step}" / name
        writer.write(path, obj, data)
        written.append(str(path))

    for i, vol in enumerate(outputs.volumes):
        src = source_of(vol.source_series_uid)
        if derived_series == "enhanced":
            emit(None, f"volume{i}.dcm",
                 enhanced_ct_part10(vol, src.datasets, prov, base + i, i))
            continue
        for k, data in enumerate(ct_series_part10(vol, src.datasets, prov, base + i, i,
                                                  source_references)):
            emit(None, f"volume{i}/{k:05d}.dcm", data)

    sources = [d for s in inputs.series for d in s.datasets]
    seg = None
    for i, lm in enumerate(outputs.label_maps):
        src = source_of(lm.source_series_uid)
        made = label_map_to_seg(lm, src.datasets, src.geometry, prov, base + 5 + i, i)
        seg = seg or made
        emit(made, f"seg{i}.dcm")
    if outputs.findings:
        emit(findings_to_sr(outputs.findings, sources, seg, prov, base + 8), "sr.dcm")
    for i, mesh in enumerate(outputs.meshes):
        emit(mesh_to_stl(mesh, sources, prov, base + 9, i), f"mesh{i}.dcm")
    for i, keys in enumerate(outputs.key_images):
        emit(key_images_to_kos(keys, sources, prov, base + 7, i), f"kos{i}.dcm")
    writer.sync()
    return written


def array_module(gpu_index: int | None) -> tuple[Any, str]:
    """(xp, device): CuPy on the job's GPU slot when it has one and CuPy works, else NumPy.

    CUDA is imported here, in the spawned job process, never in the node (prefork and CUDA do
    not mix); the slot is pinned with CUDA_VISIBLE_DEVICES before the import.
    """
    if gpu_index is None:
        return np, "cpu"
    os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_index)
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
        return cupy, f"cuda:{gpu_index}"
    except Exception as e:  # no CuPy, no driver, no device
        log.warning("GPU slot %d unusable (%s): running on the CPU", gpu_index, e)
        return np, "cpu"


def _write_step(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_suffix(".part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


@dataclass
class _Progress:
    """What the steps done so far came to: the outcome's results, summaries, criticals."""

    results: list[str] = field(default_factory=list)
    summaries: list[str] = field(default_factory=list)
    critical: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def add(self, record: dict[str, Any]) -> None:
        self.results += record["results"]
        self.summaries.append(str(record.get("summary", "")))
        if record.get("critical"):
            self.critical.append(str(record["critical"]))

    def outcome(self) -> JobOutcome:
        return JobOutcome(state=JobState.SUCCEEDED, results=self.results,
                          summary="; ".join(self.summaries), critical="; ".join(self.critical),
                          timings={k: round(v, 3) for k, v in self.timings.items()})


def _step_plugin(plugins: dict[str, Any], spec: dict[str, Any], inputs: Inputs) -> Any:
    """The plugin class of a pipeline step, checked against the inputs it will get."""
    info = plugins.get(spec["plugin"])
    if info is None or info.cls is None:
        raise PluginError(f"plugin {spec['plugin']!r} is not installed or broken")
    cls = info.cls
    for si in inputs.series:
        why = cls.accepts.check(si.modality, si.sop_class_uid, len(si.sop_instance_uids))
        if why:
            raise NotApplicable(f"{cls.name}: {why}")
    return cls


def _step_context(cls: Any, job: Job, xp: Any, device: str, work: Path) -> Context:
    """The plugin's context: CuPy on the job's GPU unless the plugin wants none."""
    if cls.needs.gpu == GPU.REQUIRED and device == "cpu":
        raise PluginError(f"{cls.name} requires a GPU and this job has none")
    use_gpu = device != "cpu" and cls.needs.gpu != GPU.NO
    return Context(job.uid, xp if use_gpu else np, device if use_gpu else "cpu", work,
                   logging.getLogger(f"dicomnode.plugin.{cls.name}"))


def _provenance(settings: Settings, cls: Any, job: Job, step: int,
                outputs: Outputs) -> Provenance:
    """Who made a step's results (UIDs derive from the job and step: a re-run re-creates
    them)."""
    family = cls.algorithm_family
    prov = Provenance(f"{job.uid}/{step}", cls.name, cls.version,
                      algorithm_family=None if family is None else (
                          family.value, family.scheme, family.meaning),
                      node_ae_title=settings.node.ae_title)
    if outputs.algorithm is not None:
        prov = replace(prov, plugin_name=outputs.algorithm[0][:64],
                       plugin_version=outputs.algorithm[1][:64])
    return prov


def _run_step(settings: Settings, job: Job, step: int, spec: dict[str, Any],
              plugins: dict[str, Any], inputs: Inputs, xp: Any, device: str, out_dir: Path,
              done: _Progress) -> None:
    """Run one pipeline step, package its outputs durably and leave its step record."""
    cls = _step_plugin(plugins, spec, inputs)
    params = cls.params_model.model_validate(spec.get("params", {}))
    work = out_dir / "work" / f"step{step}"
    work.mkdir(parents=True, exist_ok=True)
    ctx = _step_context(cls, job, xp, device, work)
    t = time.perf_counter()
    outputs = cls().run(inputs, params, ctx)
    done.timings[f"plugin:{cls.name}"] = time.perf_counter() - t
    if not isinstance(outputs, Outputs):
        raise PluginError(f"{cls.name} returned {type(outputs).__name__}, not Outputs")
    t = time.perf_counter()
    written = _package(outputs, inputs, _provenance(settings, cls, job, step, outputs), step,
                       out_dir, settings.package.derived_series,
                       settings.package.source_references)
    done.timings["package"] = done.timings.get("package", 0.0) + time.perf_counter() - t
    critical = f"{cls.name}: {outputs.critical}" if outputs.critical else ""
    record = {"plugin": cls.name, "results": written,
              "summary": f"{cls.name}: {outputs.summary or 'done'}", "critical": critical}
    done.add(record)
    _write_step(step_record(out_dir, step), record)
    # packaged: the caller drops the step's arrays before the next step allocates its own (it
    # then reuses this memory instead of faulting in fresh pages: surface 0.71 → 0.37 s after
    # reformat's two 150 MB volumes)


def _run_pipeline(settings: Settings, job: Job, sessions: Any, gpu_index: int | None,
                  plugins: dict[str, Any] | None,
                  progress: Callable[[int], None] | None) -> JobOutcome:
    done = _Progress()
    t = time.perf_counter()
    plugins = plugins if plugins is not None else discover()
    xp, device = array_module(gpu_index)
    pipeline = json.loads(job.pipeline)
    first = plugins.get(pipeline[0]["plugin"]) if pipeline else None
    # the first step decides how the series is read (images, or raw projections)
    projections = bool(first and first.cls and first.cls.accepts.projections)
    inputs = _load_inputs(settings, job, sessions, projections)
    done.timings["load"] = time.perf_counter() - t
    out_dir = settings.storage.path / "results" / job.uid
    for step, spec in enumerate(pipeline):
        kept = read_step(step_record(out_dir, step))
        if kept is not None:
            log.info("step %d (%s) finished in an earlier attempt: kept", step, spec["plugin"])
            done.add(kept)
        else:
            _run_step(settings, job, step, spec, plugins, inputs, xp, device, out_dir, done)
        if progress is not None:
            progress(step)
    return done.outcome()


def run_job(settings: Settings, job_id: int, outcome_path: Path,
            gpu_index: int | None = None,
            plugins: dict[str, Any] | None = None,
            progress: Callable[[int], None] | None = None) -> JobOutcome:
    """Execute the job and return (and write) its outcome. Never raises. ``plugins``: what
    :func:`discover` found, when the caller (a warm spare) already looked.

    Each step, once its results are packaged and synced, leaves a record
    (:func:`~dicomnode.run.jobs.step_record`) and calls ``progress(step)``: the runner delivers
    that step's results at once, while later steps run. A re-run (retry, restart after a
    crash) takes a recorded step as done — its files may be on their way to a PACS and are
    never rewritten.
    """
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine, readonly=True)
    outcome: JobOutcome
    try:
        with sessions() as s:
            job = s.get_one(Job, job_id)
        outcome = _run_pipeline(settings, job, sessions, gpu_index, plugins, progress)
    except NotApplicable as e:
        outcome = JobOutcome(state=JobState.NOT_APPLICABLE, reason=str(e))
    except (PluginError, ValueError) as e:
        # expected refusals and invalid outputs (API values check themselves): not retried
        outcome = JobOutcome.failed(f"{type(e).__name__}: {e}", retry=False)
    except Exception as e:
        outcome = JobOutcome(state=JobState.FAILED, retry=True, reason=f"{type(e).__name__}: {e}",
                             traceback=traceback.format_exc()[-4000:])
    finally:
        engine.dispose()
    tmp = outcome_path.with_suffix(".part")
    tmp.write_text(outcome.model_dump_json())
    os.replace(tmp, outcome_path)
    return outcome


def _child_setup(nice: int = 0) -> None:
    die_with_parent()
    # a job allocates and frees volume-sized arrays; fresh mmaps cost their page faults each
    # time (measured: 0.06 → 0.5 s to fill a 300 MB volume on this VM)
    tune_allocator()
    if nice:
        try:
            os.nice(nice)
        except OSError:
            log.warning("could not lower the job's CPU priority")
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # logs every copied module


def _exit_now() -> None:
    """Exit as soon as the outcome is written. The interpreter's teardown after a job (freeing
    every array, module finalisers) took 0.7 s in bench/e2e before the runner saw the exit;
    nothing in it matters: the outcome and the results are on disk and synced."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(0)


def _progress_to(conn: Any) -> Callable[[int], None]:
    """Tell the runner through ``conn`` that a step is done (best effort: the runner also
    looks for step records when the job ends)."""
    def progress(step: int) -> None:
        with contextlib.suppress(OSError, ValueError):
            conn.send(("step", step))
    return progress


def child_main(settings_json: str, job_id: int, outcome_path: str,
               gpu_index: int | None = None, conn: Any = None) -> None:
    """Entry point of a job process started for a job (cold)."""
    settings = Settings.model_validate_json(settings_json)
    _child_setup(settings.runner.nice)
    run_job(settings, job_id, Path(outcome_path), gpu_index,
            progress=_progress_to(conn) if conn is not None else None)
    _exit_now()


def _prewarm_highdicom() -> None:
    """Import highdicom (SEG, SR and enhanced packaging use it) and load the standard's tables
    it reads on first use (0.5 s of JSON parsing measured inside the first SEG of a job).
    Private highdicom helpers: if they move, the job pays the cost itself, nothing breaks."""
    import highdicom  # noqa: F401

    try:
        from highdicom import _standard_utils as su

        su.get_sop_class_iod_map()
        su.get_iod_module_map()
        su.get_module_attribute_map()
    except Exception:
        log.debug("highdicom tables not pre-loaded", exc_info=True)


def spare_main(settings_json: str, conn: Any) -> None:
    """Entry point of a warm spare: do the imports every job needs (the node's packaging, every
    installed plugin and what it imports — not CUDA, which needs the job's GPU slot first),
    then wait for one job, run it and exit. The parent closing the pipe ends it."""
    settings = Settings.model_validate_json(settings_json)
    _child_setup(settings.runner.nice)
    plugins = discover()  # imports every plugin module (a broken one is recorded, not raised)
    _prewarm_highdicom()
    try:
        job_id, outcome_path, gpu_index = conn.recv()
    except (EOFError, OSError):
        conn.close()
        return  # the runner stopped
    run_job(settings, int(job_id), Path(outcome_path), gpu_index, plugins, _progress_to(conn))
    _exit_now()
