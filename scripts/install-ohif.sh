#!/usr/bin/env bash
# Install the OHIF viewer (the built dist/ of the npm package @ohif/app) where the console
# serves it at /viewer. Run at install time (scripts/test-all.sh runs it); the node never
# fetches it at run time and the repository never holds it.
#
#   scripts/install-ohif.sh            # into $DICOMNODE_VIEWER_DIR, default dicomnode/web/viewer
#   DICOMNODE_VIEWER_DIR=/opt/dicomnode/viewer scripts/install-ohif.sh
#
# Needs npm (only for `npm pack`/`npm view`: no node_modules, nothing is built) and python3.
# Idempotent: does nothing when that version is already installed there. The tarball's
# sha512 must match the registry's dist.integrity. OHIF's build assumes it is served at "/";
# the webpack public path in its bundles is rewritten to /viewer/ (the console rewrites
# index.html and writes app-config.js itself, see dicomnode/web/views/viewer.py).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION="${OHIF_VERSION:-3.13.2}"
DEST="${DICOMNODE_VIEWER_DIR:-dicomnode/web/viewer}"
PUBLIC_PATH="/viewer/"
PATCH=4                        # how this script adapts the build; a change reinstalls
MARK="$DEST/.dicomnode-ohif"   # "<version> <integrity> <patch>" once complete

# already there (checked without the network: the mark was written after the integrity check)
if [ -f "$MARK" ] && [ -f "$DEST/index.html" ] \
   && read -r have_version _ have_patch < "$MARK" \
   && [ "$have_version" = "$VERSION" ] && [ "$have_patch" = "$PATCH" ]; then
  echo "install-ohif: @ohif/app $VERSION already in $DEST"
  exit 0
fi

command -v npm >/dev/null || { echo "install-ohif: npm is needed (apt-get install npm)" >&2; exit 1; }

integrity="$(npm view "@ohif/app@$VERSION" dist.integrity)"
case "$integrity" in sha512-*) ;; *) echo "install-ohif: no sha512 integrity for @ohif/app@$VERSION: '$integrity'" >&2; exit 1;; esac

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "install-ohif: fetching @ohif/app@$VERSION"
(cd "$tmp" && npm pack --silent "@ohif/app@$VERSION" >/dev/null)
tgz="$(ls "$tmp"/*.tgz)"
got="sha512-$(python3 -c 'import base64,hashlib,sys; h=hashlib.sha512(); f=open(sys.argv[1],"rb"); [h.update(b) for b in iter(lambda: f.read(1<<20), b"")]; print(base64.b64encode(h.digest()).decode())' "$tgz")"
if [ "$got" != "$integrity" ]; then
  echo "install-ohif: integrity mismatch for $tgz: registry says $integrity, file is $got" >&2
  exit 1
fi
tar -xzf "$tgz" -C "$tmp" package/dist
[ -f "$tmp/package/dist/index.html" ] || { echo "install-ohif: no dist/index.html in the package" >&2; exit 1; }

# OHIF's webpack runtime loads chunks, workers and wasm from an absolute "/" public path, and
# its CSS names its font as url(/…)
python3 - "$tmp/package/dist" "$PUBLIC_PATH" <<'EOF'
import pathlib, sys
dist, public = pathlib.Path(sys.argv[1]), sys.argv[2]
old = b'__webpack_require__.p = "/";'
n = 0
for f in dist.glob("*.js"):
    data = f.read_bytes()
    if old in data:
        f.write_bytes(data.replace(old, b'__webpack_require__.p = "%s";' % public.encode()))
        n += 1
if n == 0:
    sys.exit("install-ohif: found no webpack public path to rewrite: has OHIF's build changed?")
print(f"install-ohif: public path {public} in {n} bundles")
# OHIF 3.13's SR loader keeps every TID 1500 measurement group it cannot place as "unloaded"
# and retries it against each display set: a group without a SCOORD/SCOORD3D (ours: TID 1411
# referencing a SEG segment, or findings only) then throws a TypeError (coords[0] undefined, or
# a SEG's derived image ids without UIDs) that takes the whole viewer route down. Such a group
# can never be placed, so it is left out of the retries.
bug = (b"const unloadedMeasurements = srDisplaySet.measurements.filter("
       b"measurement => measurement.loaded === false);")
hits = [f for f in dist.glob("*.js") if bug in f.read_bytes()]
if len(hits) != 1:
    sys.exit(f"install-ohif: expected OHIF's SR loader in one bundle, found {len(hits)}")
hits[0].write_bytes(hits[0].read_bytes().replace(bug, bug.replace(
    b"measurement.loaded === false", b"measurement.loaded === false && measurement.coords?.length")))
for f in dist.glob("*.css"):
    data = f.read_bytes()
    fixed = data.replace(b"url(/", b"url(" + public.encode()).replace(
        b"url(" + public.encode() + b"/", b"url(//")
    if fixed != data:
        f.write_bytes(fixed)
EOF
# the console writes app-config.js itself; the package's default points at a public demo
rm -f "$tmp/package/dist/app-config.js"
echo "$VERSION $integrity $PATCH" > "$tmp/package/dist/.dicomnode-ohif"

# swap in whole: a half-copied viewer is never served
mkdir -p "$(dirname "$DEST")"
rm -rf "$DEST.old"
[ -e "$DEST" ] && mv "$DEST" "$DEST.old"
mv "$tmp/package/dist" "$DEST"
rm -rf "$DEST.old"
echo "install-ohif: @ohif/app $VERSION installed in $DEST"
