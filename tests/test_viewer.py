"""The OHIF viewer at /viewer: installed by scripts/install-ohif.sh (the real @ohif/app build),
served by the console with its own app-config.js, CSP, login and single-page-app routes."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import expect

from dicomnode.simulate.head import write_head_ct
from dicomnode.web.views.viewer import NOT_INSTALLED, installed_version, viewer_dir
from tests.helpers import (
    IN_CI,
    NodeProc,
    dcmtk,
    dcmtk_env,
    echoscu,
    free_port,
    storescu,
    wait_until,
)
from tests.web import PASSWORD, WebNode, login, screenshot, start_web, web_settings

INSTALL = "scripts/install-ohif.sh"


def _need_viewer(w: WebNode) -> Path:
    root = viewer_dir(w.settings)
    if installed_version(root) is None:
        if IN_CI:
            raise AssertionError(f"the viewer must be installed in CI ({INSTALL})")
        pytest.skip(f"the viewer is not installed in {root} (run {INSTALL})")
    return root


@contextlib.contextmanager
def cookie_client(w: WebNode, name: str) -> Iterator[httpx.Client]:
    """An httpx client logged in through the login form (the session cookie, as a browser)."""
    with httpx.Client(base_url=w.url, timeout=60, follow_redirects=False) as c:
        c.get("/login")
        r = c.post("/login", data={"username": name, "password": PASSWORD, "next": "/",
                                   "csrf_token": c.cookies["dn_login_csrf"]})
        assert r.status_code == 303, r.text
        yield c


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebNode]:
    w = start_web(web_settings(tmp_path_factory.mktemp("web")))
    yield w
    w.stop()


def test_viewer_wants_a_login_with_studies_read(web: WebNode) -> None:
    _need_viewer(web)
    with web.api(None) as c:
        for path in ("/viewer", "/viewer/viewer?StudyInstanceUIDs=1.2.3",
                     "/viewer/app-config.js"):
            r = c.get(path)
            assert r.status_code == 303, (path, r.status_code)
            loc = r.headers["location"]
            assert loc.startswith("/login?next="), loc
            assert unquote(loc.removeprefix("/login?next=")) == path
    with web.api("auditor") as c:  # no studies:read
        r = c.get("/viewer/viewer?StudyInstanceUIDs=1.2.3")
        assert r.status_code == 403 and "studies:read" in r.text


def test_spa_routes_answer_index_rewritten_for_viewer_with_its_csp(web: WebNode) -> None:
    _need_viewer(web)
    with cookie_client(web, "radiologist") as c:
        for path in ("/viewer", "/viewer/", "/viewer/viewer?StudyInstanceUIDs=1.2.3",
                     "/viewer/segmentation/dicomweb?StudyInstanceUIDs=1.2.3"):
            r = c.get(path)
            assert r.status_code == 200, (path, r.status_code)
            html = r.text
            assert 'window.PUBLIC_URL="/viewer/"' in html and 'PUBLIC_URL="/"' not in html
            assert re.search(r'src="/viewer/app\.bundle\.[0-9a-f]+\.js"', html), html[:500]
            assert 'src="/viewer/app-config.js"' in html
            assert not re.search(r'(src|href)="/(?!viewer/|/)', html)  # nothing outside
            policy = r.headers["content-security-policy"]
            directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
            assert "'wasm-unsafe-eval'" in directives["script-src"]
            # dcmjs reads a SEG with ndarray kernels compiled by new Function
            assert "'unsafe-eval'" in directives["script-src"]
            assert "'unsafe-inline'" not in directives["script-src"]
            assert "blob:" in directives["worker-src"]
            assert {"data:", "blob:"} <= set(directives["img-src"].split())
            assert directives["frame-ancestors"] == "'none'"
            # each inline script is allowed by its hash, and only those
            inline = re.findall(r"<script>(.*?)</script>", html, re.S)
            assert len(inline) >= 1
            for body in inline:
                digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
                assert f"'sha256-{digest}'" in directives["script-src"]
            assert r.headers["cache-control"] == "no-store"
        # the console keeps its own, stricter policy
        console = c.get("/studies").headers["content-security-policy"]
        assert "unsafe-eval" not in console and "blob:" not in console


def test_app_config_points_ohif_at_the_nodes_dicomweb(web: WebNode) -> None:
    _need_viewer(web)
    with cookie_client(web, "radiologist") as c:
        r = c.get("/viewer/app-config.js")
    assert r.status_code == 200 and "javascript" in r.headers["content-type"]
    node = shutil.which("node") or shutil.which("nodejs")
    assert node, "node.js comes with npm, which scripts/install-ohif.sh needs"
    # run it as the browser would, with the console's origin, and read window.config
    script = ("const window = {location: {origin: 'https://pacs.example:8443'}};\n"
              + r.text + "\nconsole.log(JSON.stringify({...window.config, "
              "httpErrorHandler: typeof window.config.httpErrorHandler}));")
    out = subprocess.run([node, "-e", script], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    config = json.loads(out)
    assert config["routerBasename"] == "/viewer"
    assert config["httpErrorHandler"] == "function"
    assert config["defaultDataSourceName"] == "dicomnode"
    (source,) = config["dataSources"]
    assert source["namespace"] == "@ohif/extension-default.dataSourcesModule.dicomweb"
    ds = source["configuration"]
    for root in ("qidoRoot", "wadoRoot", "wadoUriRoot"):
        assert ds[root] == "https://pacs.example:8443/dicomweb", (root, ds[root])
    assert ds["imageRendering"] == "wadors" and ds["thumbnailRendering"] == "wadors"
    assert ds["supportsFuzzyMatching"] is True and ds["enableStudyLazyLoad"] is True
    assert ds["dicomUploadEnabled"] is False
    assert "oidc" not in config  # the console's session is the login


def test_files_of_the_build_are_served_and_nothing_else(web: WebNode) -> None:
    root = _need_viewer(web)
    bundle = next(root.glob("app.bundle.*.js")).name
    wasm = next(root.glob("*.wasm")).name
    with cookie_client(web, "radiologist") as c:
        r = c.get(f"/viewer/{bundle}")
        assert r.status_code == 200 and "javascript" in r.headers["content-type"]
        assert '__webpack_require__.p = "/viewer/";' in r.text  # rewritten at install
        assert "max-age" in r.headers["cache-control"]
        r = c.get(f"/viewer/{wasm}")
        assert r.status_code == 200 and r.headers["content-type"] == "application/wasm"
        assert r.content[:4] == b"\0asm"
        assert c.get("/viewer/assets/favicon.ico").status_code == 200
        css = c.get("/viewer/app.bundle.css").text  # its font, under /viewer/ too
        assert "url(/viewer/" in css and not re.search(r"url\(/(?!viewer/|/)", css)
        for path in ("/viewer/no-such-chunk.js", "/viewer/.dicomnode-ohif",
                     "/viewer/..%2f..%2fconfig.py", "/viewer/%2e%2e/%2e%2e/config.py"):
            r = c.get(path)
            assert r.status_code == 404, (path, r.status_code)


def test_not_installed_says_how_to_install(tmp_path: Path) -> None:
    w = start_web(web_settings(tmp_path, viewer_dir=str(tmp_path / "no-viewer")))
    try:
        with cookie_client(w, "radiologist") as c:
            for path in ("/viewer", "/viewer/viewer?StudyInstanceUIDs=1.2.3",
                         "/viewer/app-config.js"):
                r = c.get(path)
                assert r.status_code == 503, (path, r.status_code)
                assert NOT_INSTALLED in r.text
    finally:
        w.stop()


def test_install_script_skips_what_is_already_there(web: WebNode, tmp_path: Path) -> None:
    root = _need_viewer(web)
    bin_dir = tmp_path / "bin"  # bash and dirname only: no npm, no network
    bin_dir.mkdir()
    for tool in ("bash", "dirname"):
        (bin_dir / tool).symlink_to(shutil.which(tool) or f"/usr/bin/{tool}")
    before = (root / "index.html").stat().st_mtime_ns
    # no npm on the PATH: an installed viewer is recognised without the network
    out = subprocess.run([INSTALL], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parent.parent,
                         env={**os.environ, "DICOMNODE_VIEWER_DIR": str(root),
                              "PATH": str(bin_dir)})
    assert out.returncode == 0, out.stderr
    assert "already in" in out.stdout
    assert (root / "index.html").stat().st_mtime_ns == before


# -- in the browser: a real node, its pipeline's SEG and SR, OHIF drawing them ----------------

ROUTE = {"name": "ich", "match": {"Modality": "CT", "SeriesDescription": {"regex": "HEAD"}},
         "pipeline": [{"plugin": "ich-triage"}], "send_to": ["pacs"]}


@dataclass
class Ward:
    node: NodeProc
    web: WebNode
    study_uid: str
    seg: pydicom.Dataset
    sr: pydicom.Dataset


@pytest.fixture(scope="module")
def ward(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ward]:
    """A node (console on) that ran ich-triage on a synthetic head CT with a bleed; its SEG and
    SR went to a dcmtk storescp (the PACS), which sends them back to the node (C-STORE) so
    that /dicomweb serves them beside the CT."""
    from dicomnode.audit import AuditLog
    from dicomnode.config import load_settings
    from dicomnode.database import make_engine, make_sessionmaker

    tmp = tmp_path_factory.mktemp("viewer")
    pacs_dir, pacs_port = tmp / "pacs", free_port()
    pacs_dir.mkdir()
    pacs = subprocess.Popen([dcmtk("storescp"), "-aet", "PACS", "-od", str(pacs_dir), "+xa",
                             str(pacs_port)], env=dcmtk_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    port = free_port()
    cfg = {"destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1",
                                     "port": pacs_port}},
           "routes": [ROUTE], "runner": {"processes": 2, "max_attempts": 2, "poll_seconds": 0.2},
           "web": {"enabled": True, "port": port, "failure_delay_seconds": 0}}
    node = NodeProc(tmp / "node", f"sqlite:///{tmp / 'index.sqlite3'}", overrides=cfg)
    try:
        wait_until(lambda: echoscu(pacs_port, aec="PACS").returncode == 0, what="storescp")
        node.start()
        settings = load_settings(node.config_path)
        sessions = make_sessionmaker(make_engine(node.db_url))
        web = WebNode(settings, sessions, AuditLog(sessions), f"http://127.0.0.1:{port}")
        _need_viewer(web)
        web.add_user("alice", "radiologist")
        files, _ = write_head_ct(tmp / "bleed", 41, kind="iph", volume_ml=6.0)
        storescu(node.port, files, aet="CT_SCANNER")

        def results() -> dict[str, Path] | None:
            found = {}
            for f in pacs_dir.iterdir():
                found[str(pydicom.dcmread(f, stop_before_pixels=True).Modality)] = f
            return found if {"SEG", "SR"} <= set(found) else None

        got = wait_until(results, timeout=180, interval=0.5, what="SEG and SR at the PACS")
        storescu(node.port, [got["SEG"], got["SR"]], aet="PACS")
        seg, sr = (pydicom.dcmread(got[m]) for m in ("SEG", "SR"))
        wait_until(lambda: {seg.SOPInstanceUID, sr.SOPInstanceUID} <= set(node.instances()),
                   timeout=60, what="SEG and SR in the node's index")
        yield Ward(node, web, str(seg.StudyInstanceUID), seg, sr)
    finally:
        node.stop()
        pacs.terminate()
        pacs.wait(10)


def _dismiss(page: Any, text: str) -> None:
    """OHIF's first-visit tour and its investigational-use notice, when they show."""
    with contextlib.suppress(PlaywrightTimeout):
        page.get_by_text(text, exact=True).click(timeout=5_000)


def _drawn(png: bytes) -> float:
    """The spread of grey levels in a screenshot: a blank (or flat) viewport has ~0."""
    return float(np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32).std())


def test_radiologist_opens_the_study_in_ohif_and_sees_the_seg(ward: Ward, browser: Any
                                                               ) -> None:
    page = login(browser, ward.web, "alice")
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text[:500])
            if m.type == "error" or "Error Boundary" in m.text else None)
    page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"[:500]))
    page.goto(f"{ward.web.url}/studies/{ward.study_uid}")
    link = page.locator("a.open-viewer")
    assert link.get_attribute("href") == f"/viewer/viewer?StudyInstanceUIDs={ward.study_uid}"
    link.click()
    page.wait_for_url(f"**/viewer/viewer?StudyInstanceUIDs={ward.study_uid}")
    # the study browser lists the CT and the pipeline's results, read over QIDO
    browser_panel = page.locator("[data-cy=studyBrowser-panel]")
    expect(browser_panel).to_contain_text(str(ward.seg.SeriesDescription), timeout=60_000)
    expect(browser_panel).to_contain_text(str(ward.sr.SeriesDescription))
    _dismiss(page, "Skip all")
    _dismiss(page, "Confirm and hide")
    # the CT draws (WADO-RS frames, decoded and rendered by WebGL through SwiftShader)
    viewport = page.locator("[data-cy=viewport-pane] canvas").first
    wait_until(lambda: _drawn(viewport.screenshot()) > 10, timeout=60, interval=1,
               what=f"the viewport to draw the CT (browser errors: {problems[-5:]})")
    # the SEG: open it on the CT, its segment is listed in the segmentation panel
    page.locator("[data-cy=studyBrowser-panel]").get_by_text(
        str(ward.seg.SeriesDescription)).dblclick()
    with contextlib.suppress(PlaywrightTimeout):  # OHIF asks before it overlays a SEG
        page.get_by_role("button", name="Yes").click(timeout=15_000)
    page.click("[data-cy=panelSegmentation-btn]")
    labels = [str(s.SegmentLabel) for s in ward.seg.SegmentSequence]
    for label in labels:
        expect(page.get_by_text(label, exact=True).first).to_be_visible(timeout=60_000)
    assert _drawn(viewport.screenshot()) > 10
    screenshot(page, "viewer")
    # the SR: OHIF 3.13 lists a TID 1500 measurement only when its group has a SCOORD or
    # SCOORD3D; ours reference the SEG segment (TID 1411) instead, so OHIF lists none of them
    # (docs/query-retrieve.md). Opening it must not take the viewer down (OHIF threw a TypeError
    # on such a group, after the SEG was opened too, until install-ohif.sh guarded it).
    page.locator("[data-cy=studyBrowser-panel]").get_by_text(
        str(ward.sr.SeriesDescription)).dblclick()
    page.click("[data-cy=trackedMeasurements-btn]")
    expect(page.get_by_text("Measurements (")).to_be_visible(timeout=30_000)
    expect(page.get_by_text("Something went wrong")).to_have_count(0)
    assert not [p for p in problems if "pageerror" in p or "Error Boundary" in p], problems
    assert not [p for p in problems if "Content Security Policy" in p], problems


def test_finding_page_links_to_the_viewer(ward: Ward, browser: Any) -> None:
    with ward.web.api("alice") as c:
        (finding, *_) = c.get("/api/findings").json()["items"]
    page = login(browser, ward.web, "alice")
    page.goto(f"{ward.web.url}/findings/{finding['id']}")
    href = page.locator("a.open-viewer").get_attribute("href")
    assert href == f"/viewer/viewer?StudyInstanceUIDs={ward.study_uid}"
    # OHIF's own study list (/viewer) finds the study through QIDO-RS
    accession = str(ward.sr.AccessionNumber)
    assert accession
    page.goto(f"{ward.web.url}/viewer")
    _dismiss(page, "Confirm and hide")
    expect(page.locator("body")).to_contain_text(accession, timeout=60_000)
    page.context.close()
