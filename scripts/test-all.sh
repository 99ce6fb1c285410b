#!/usr/bin/env bash
# Install everything the test suite needs (Debian packages included) and run the whole suite.
# Used by .ci/run; safe to run repeatedly on a developer machine.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
need_apt=()
# chromium: the console's browser tests (Playwright drives it; it cannot download its own)
# npm: scripts/install-ohif.sh fetches the OHIF viewer's build (npm pack; nothing is built)
for pkg in dcmtk orthanc chromium; do dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg"); done
# npm may come with a nodejs that is not Debian's (it bundles npm): only ask apt when missing
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
if [ ${#need_apt[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

python3 -m pip install -q -e '.[test]'
# built-in plugins are their own distributions, registered by entry point
for plugin in plugins/*/pyproject.toml; do
  python3 -m pip install -q -e "$(dirname "$plugin")"
done

# the OHIF viewer served at /viewer (tests/test_viewer.py); skipped when already installed
scripts/install-ohif.sh

echo "== ruff"; python3 -m ruff check dicomnode plugins tests bench
echo "== mypy"; python3 -m mypy dicomnode plugins/*/src
echo "== pytest"; python3 -m pytest -q -p no:cacheprovider "$@"
