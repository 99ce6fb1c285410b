#!/usr/bin/env bash
# Prepare the GPU check (issue 20): download, HERE (PyPI reachable), the wheels for Python 3.12
# x86-64 of every package the node and its plugins need that the lent GPU machine lacks (it has
# no package registry; its own packages are listed in /work/.library/device/KINDS.md: numpy,
# scipy, numba, scikit-image, torch, cupy, PyYAML, typer, rich, click, psutil, pillow, pytest,
# onnx, onnxruntime … are there and are NOT downloaded). The node and the plugins themselves
# are installed on the device from the carried source tree (bench/gpu.sh); as a fallback their
# pure-Python wheels are built here into .whl/local/.
#
#   bash scripts/gpu-wheels.sh            # → .whl/*.whl (+ .whl/local/*.whl), prints the size
#
# .whl/ is git-ignored; the device call carries it: run(command="bash bench/gpu.sh",
# carry=[".whl"]). One version of each package only: two stop the device's install.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
PY=${PYTHON:-python3}
rm -rf "$DEST"
mkdir -p "$DEST/local"

# name==version: the versions this project is tested with here (pip list), so the device runs
# what CI runs; pure-Python unless noted
PACKAGES=(
  pydicom==3.0.2
  pynetdicom==3.0.4
  highdicom==0.28.2
  pyjpegls==1.5.1             # highdicom's JPEG-LS codec, needed at import (binary)
  SQLAlchemy==2.1.9           # binary (C extensions)
  alembic==1.20.1
  Mako==1.4.3
  pydantic==2.13.4
  pydantic-core==2.46.4       # binary
  annotated-types==0.7.0
  typing-inspection==0.4.2
  typing-extensions==4.15.0   # pydantic needs a recent one; the device's may be older
  pydantic-settings==2.14.1
  python-dotenv==1.2.2
  blake3==1.0.11              # binary
  trimesh==5.2.0              # surface plugin (imported by the plugin registry and its test)
  fast-simplification==0.2.0  # binary
  monai==1.6.1                # model-runner (torch is on the device)
)

PLATFORMS=()
for n in 2_28 2_27 2_24 2_17 2_5; do PLATFORMS+=(--platform "manylinux_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)

"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --abi cp312 --abi abi3 --abi none "${PLATFORMS[@]}" \
  --platform any -d "$DEST" "${PACKAGES[@]}"

# the node and its plugins as wheels (fallback when the device cannot build from source)
"$PY" -m pip wheel -q --no-deps --no-build-isolation --no-index -w "$DEST/local" \
  . plugins/ct-recon plugins/ich-triage plugins/lung-nodules plugins/reformat \
  plugins/surface plugins/model-runner plugins/example-threshold >/dev/null
rm -rf build plugins/*/build ./*.egg-info plugins/*/src/*.egg-info

# one version of each distribution
dupes=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dupes" ]; then echo "two versions of: $dupes" >&2; exit 1; fi
ls -l "$DEST" "$DEST/local" | awk 'NF > 5 {print $5, $9}'
echo "total: $(du -sh "$DEST" | cut -f1) in $DEST ($(ls "$DEST"/*.whl "$DEST"/local/*.whl | wc -l) wheels; the device call carries at most 64 MiB with the tree)"
