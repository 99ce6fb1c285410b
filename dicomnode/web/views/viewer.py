"""The OHIF viewer at ``/viewer``: the built ``dist/`` of the npm package ``@ohif/app``,
installed at install time by ``scripts/install-ohif.sh`` (never committed, never fetched at run
time), served by the console with an ``app-config.js`` written here that points OHIF at the
node's own DICOMweb (``/dicomweb``, same origin, so the console's session cookie
authenticates every QIDO/WADO request; OHIF has no login of its own).

- Where: ``web.viewer_dir``, else ``$DICOMNODE_VIEWER_DIR``, else ``dicomnode/web/viewer``
  (git-ignored). Not there: ``/viewer`` answers 503 and says how to install it.
- Who: a logged-in user with ``studies:read``, for every file (a person who is not logged in
  goes to the login page and comes back).
- The single-page app's routes (``/viewer/viewer?StudyInstanceUIDs=…``, ``/viewer/segmentation``
  …) answer its ``index.html``, rewritten for ``/viewer/`` (OHIF is built for ``/``); a missing
  file (a name with a dot) is a 404.
- Its own Content-Security-Policy, only under ``/viewer``: OHIF compiles WebAssembly codecs
  (``'wasm-unsafe-eval'``), compiles array kernels with ``new Function`` when it reads a SEG
  (ndarray's cwise, in dcmjs: ``'unsafe-eval'``; without it the SEG fails with an EvalError),
  starts web workers from blob URLs and draws into blob/data images; the inline scripts of
  ``index.html`` are allowed by their hashes, not by ``'unsafe-inline'``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, HTMLResponse, Response

from dicomnode.config import Settings
from dicomnode.web.auth import Principal
from dicomnode.web.deps import WebState, node, require

pages = APIRouter(include_in_schema=False)

PREFIX = "/viewer"
#: where scripts/install-ohif.sh puts OHIF when neither web.viewer_dir nor the variable is set
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "viewer"
MARK = ".dicomnode-ohif"  # "<version> <integrity>", written last by the install script
NOT_INSTALLED = "the viewer is not installed: run scripts/install-ohif.sh"
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.S)


def viewer_dir(settings: Settings) -> Path:
    configured = settings.web.viewer_dir or os.environ.get("DICOMNODE_VIEWER_DIR")
    return Path(configured) if configured else DEFAULT_DIR


def installed_version(root: Path) -> str | None:
    """The installed @ohif/app version, or None when the viewer is not (fully) installed."""
    try:
        mark = (root / MARK).read_text().split()
    except OSError:
        return None
    return mark[0] if mark and (root / "index.html").is_file() else None


def csp(script_hashes: tuple[str, ...] = ()) -> str:
    """The viewer's policy: its own origin only, plus what OHIF's engine needs to run."""
    scripts = " ".join(f"'{h}'" for h in script_hashes)
    return ("default-src 'self'; "
            f"script-src 'self' 'unsafe-eval' 'wasm-unsafe-eval' {scripts}".rstrip() + "; "
            "worker-src 'self' blob:; "
            "img-src 'self' data: blob:; "
            "media-src 'self' blob:; "
            "font-src 'self' data:; "
            "style-src 'self' 'unsafe-inline'; "
            "connect-src 'self' blob: data:; "
            "object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'")


@lru_cache(maxsize=4)
def _index(path: Path, mtime: float) -> tuple[bytes, tuple[str, ...]]:
    """OHIF's index.html for /viewer/ (it is built for /), and its inline scripts' hashes."""
    html = path.read_bytes()
    html = html.replace(b'window.PUBLIC_URL="/"', f'window.PUBLIC_URL="{PREFIX}/"'.encode())
    html = re.sub(rb'(href|src|content)="/(?!/)', rb'\1="' + PREFIX.encode() + rb"/", html)
    hashes = tuple(
        "sha256-" + base64.b64encode(hashlib.sha256(m.group(1)).digest()).decode()
        for m in _INLINE_SCRIPT.finditer(html))
    return html, hashes


def app_config() -> str:
    """OHIF's configuration: the node's DICOMweb as its only data source, same origin."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "dicomnode",
        "configuration": {
            "friendlyName": "dicomnode",
            "name": "dicomnode",
            "qidoRoot": "@ORIGIN@/dicomweb",
            "wadoRoot": "@ORIGIN@/dicomweb",
            "wadoUriRoot": "@ORIGIN@/dicomweb",
            "qidoSupportsIncludeField": True,
            "supportsFuzzyMatching": True,
            "supportsWildcard": True,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "dicomUploadEnabled": False,
            "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
        },
    }
    config = {
        "routerBasename": PREFIX,
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 3,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "defaultDataSourceName": "dicomnode",
        "dataSources": [source],
    }
    body = json.dumps(config, indent=2).replace('"@ORIGIN@', 'window.location.origin + "')
    return ("/** Written by dicomnode (dicomnode/web/views/viewer.py): OHIF reads the node's own "
            "DICOMweb, same origin (the console's session cookie authenticates). */\n"
            f"window.config = {body};\n"
            "// a session that ended: log in again and come back\n"
            "window.config.httpErrorHandler = function (error) {\n"
            "  if (error && error.status === 401) {\n"
            "    window.location.href = '/login?next=' + encodeURIComponent(\n"
            "      window.location.pathname + window.location.search);\n"
            "  }\n"
            "};\n")


def _not_installed(request: Request) -> Response:
    from dicomnode.web.app import render

    return render(request, "error.html", status_code=503, status=503, message=NOT_INSTALLED)


def _index_response(root: Path) -> Response:
    path = root / "index.html"
    html, hashes = _index(path, path.stat().st_mtime)
    return HTMLResponse(html, headers={"Content-Security-Policy": csp(hashes),
                                       "Cache-Control": "no-store"})


@pages.get(PREFIX)
@pages.get(PREFIX + "/")
def viewer_home(request: Request, st: WebState = Depends(node),
                _: Principal = Depends(require("studies:read"))) -> Response:
    """OHIF's study list (the node's studies, through QIDO)."""
    root = viewer_dir(st.settings)
    if installed_version(root) is None:
        return _not_installed(request)
    return _index_response(root)


@pages.get(PREFIX + "/app-config.js")
def viewer_config(request: Request, st: WebState = Depends(node),
                  _: Principal = Depends(require("studies:read"))) -> Response:
    if installed_version(viewer_dir(st.settings)) is None:
        return _not_installed(request)
    return Response(app_config(), media_type="text/javascript",
                    headers={"Cache-Control": "no-store"})


@pages.get(PREFIX + "/{path:path}")
def viewer_file(path: str, request: Request, st: WebState = Depends(node),
                _: Principal = Depends(require("studies:read"))) -> Response:
    """A file of OHIF's build, or (for the app's own routes) its index.html."""
    root = viewer_dir(st.settings)
    if installed_version(root) is None:
        return _not_installed(request)
    parts = [p for p in path.split("/") if p]
    if any(p.startswith(".") for p in parts):
        return Response("not found", status_code=404, media_type="text/plain")
    target = (root / "/".join(parts)).resolve()
    if parts and target.is_relative_to(root.resolve()) and target.is_file():
        if target.name == "index.html":
            return _index_response(root)
        # file names carry content hashes; the rest changes only with a new install
        return FileResponse(target, headers={"Cache-Control": "private, max-age=3600",
                                             "Content-Security-Policy": csp()})
    if parts and "." in parts[-1]:
        return Response(f"not found: {PREFIX}/{path}", status_code=404,
                        media_type="text/plain")
    return _index_response(root)  # a route of the single-page app
