"""Property-based fuzzing of DICOM header fields on a tiny 3-slice 16 x 16 CT series.

Each example rewrites a few header fields (or the pixel data, or the transfer
syntax) of one or all slices with hostile raw values (written as raw bytes,
so pydicom's own value checks do not filter them) and reads the folder with
``glance.io.read_volume``: it must return a Volume or raise GlanceError,
nothing else. A few examples also go through the whole ``glance segment``.
"""

from __future__ import annotations

import io
import tempfile
import warnings
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.datadict import dictionary_VR
from pydicom.tag import Tag
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    MPEG2MPML,
    ExplicitVRLittleEndian,
    RLELossless,
)

from glance.errors import GlanceError
from glance.io import read_volume
from glance.io.dicom_write import write_dicom_series
from glance.volume import Volume

from .conftest import ERROR_LINE, RECORD, check_complete_result, leftovers, run_in_process, segment_args
from .make_inputs import tiny_volume

FIELDS = {
    "numbers": ["Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                "SamplesPerPixel", "PixelPaddingValue"],
    "decimals": ["RescaleSlope", "RescaleIntercept", "PixelSpacing", "ImagePositionPatient",
                 "ImageOrientationPatient", "SliceThickness"],
    "text": ["Modality", "PhotometricInterpretation", "NumberOfFrames", "InstanceNumber", "SeriesInstanceUID",
             "SOPInstanceUID", "SeriesDescription", "PatientName", "SeriesNumber"],
}
SYNTAXES = [ExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless, JPEG2000Lossless, JPEGLSLossless, MPEG2MPML,
            "1.2.3.4", ""]
NASTY_NUMBERS = ["nan", "inf", "-inf", "0", "-0", "1e308", "-1e308", "1e-308", "abc", "", "1.5", "-5", " 2 ",
                 "\x00", "1e999", "0.000001", "-1", "65536", "99999999999999999999"]
COUNT = {"examples": 0, "volumes": 0, "refused": 0}

# A raw value per VR family; numbers (US/SS) are 0-3 packed 16-bit values, anything goes.
us_values = st.lists(st.sampled_from([0, 1, 2, 8, 12, 15, 16, 17, 32, 64, 255, 32768, 65535])
                     | st.integers(0, 65535), max_size=3).map(lambda v: b"".join(x.to_bytes(2, "little") for x in v))
decimal_values = st.lists(st.sampled_from(NASTY_NUMBERS)
                          | st.floats(allow_nan=True, allow_infinity=True).map(lambda f: repr(f)[:16]),
                          max_size=7).map(lambda v: "\\".join(v).encode("latin-1"))
text_values = st.sampled_from(["CT", "MR", "", "MONOCHROME1", "RGB", "ct", "1.2.3", "0", "-1", "../..", "\\\\"]
                              ).map(str.encode) | st.binary(max_size=24)
edit = st.one_of(
    st.tuples(st.just("field"), st.sampled_from(FIELDS["numbers"]), us_values),
    st.tuples(st.just("field"), st.sampled_from(FIELDS["decimals"]), decimal_values),
    st.tuples(st.just("field"), st.sampled_from(FIELDS["text"]), text_values),
    st.tuples(st.just("delete"), st.sampled_from(sum(FIELDS.values(), [])), st.just(b"")),
    st.tuples(st.just("pixels"), st.just("PixelData"), st.integers(0, 600)),
    st.tuples(st.just("syntax"), st.sampled_from(SYNTAXES), st.just(b"")),
)
fuzz_case = st.tuples(st.sampled_from(["all", 0, 1, 2]), st.lists(edit, min_size=1, max_size=4))


@pytest.fixture(scope="module")
def template() -> list[bytes]:
    """The three files of the valid tiny series, as bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        written = write_dicom_series(tiny_volume(), Path(tmp) / "s", uid_seed="fuzz")
        return [f.read_bytes() for f in written.files]


def _apply(ds: pydicom.Dataset, kind: str, what, value) -> None:
    if kind == "field":
        tag = Tag(what)
        raw = value + (b" " if len(value) % 2 else b"")  # DICOM values have even length
        ds._dict[tag] = RawDataElement(tag, dictionary_VR(tag).split(" or ")[0], len(raw), raw, 0, False, True)
    elif kind == "delete":
        ds.pop(Tag(what), None)
    elif kind == "pixels":
        ds.PixelData = ds.PixelData[:value] if value < len(ds.PixelData) else ds.PixelData + b"\x01" * value
    elif kind == "syntax":
        ds.file_meta.TransferSyntaxUID = what


def write_fuzzed(template: list[bytes], folder: Path, target, edits) -> None:
    """The tiny series with ``edits`` applied to slice ``target`` (or all); rejects what pydicom cannot write."""
    folder.mkdir()
    for k, data in enumerate(template):
        ds = pydicom.dcmread(io.BytesIO(data))
        if target in ("all", k):
            for kind, what, value in edits:
                _apply(ds, kind, what, value)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds.save_as(folder / f"IM{k}.dcm", enforce_file_format=False)
        except Exception:  # not encodable at all (e.g. implicit VR of an encapsulated element)
            reject()


@settings(max_examples=200, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(case=fuzz_case)
def test_reader_returns_volume_or_glance_error(template, case):
    target, edits = case
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "series"
        write_fuzzed(template, folder, target, edits)
        COUNT["examples"] += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                volume = read_volume(folder)
        except GlanceError as err:
            COUNT["refused"] += 1
            assert "\n" not in str(err) and str(folder) in str(err), str(err)
            return
        COUNT["volumes"] += 1
        assert isinstance(volume, Volume) and volume.array.ndim == 3


def test_fuzz_count_recorded():
    """Runs after the property test (file order): puts the number of examples in the table."""
    ran = COUNT["examples"]
    ok = ran >= 200
    RECORD.measurements["DICOM header fuzz examples run"] = (
        f"{ran} ({COUNT['volumes']} read as a Volume, {COUNT['refused']} refused with GlanceError, 0 other)")
    RECORD.add("fuzz", "DICOM header fuzzing (read_volume)", ">= 200 examples; each a Volume or GlanceError",
               f"{ran} examples: {COUNT['volumes']} Volumes, {COUNT['refused']} GlanceErrors, no other exception",
               ok)
    assert ok, COUNT


CLI_RUNS = {"runs": 0, "codes": []}


@settings(max_examples=6, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
@given(case=fuzz_case)
def test_full_cli_on_fuzzed_series(template, model_dir, case):
    """Whole `glance segment` runs: exit 0 with a complete result, or exit 2 with one error line."""
    target, edits = case
    with tempfile.TemporaryDirectory() as tmp:
        folder, out = Path(tmp) / "series", Path(tmp) / "result"
        write_fuzzed(template, folder, target, edits)
        result = run_in_process(segment_args(folder, out, model_dir))
        CLI_RUNS["runs"] += 1
        CLI_RUNS["codes"].append(result.rc)
        assert result.rc in (0, 2), result.stderr_lines
        if result.rc == 2:
            assert len(result.stderr_lines) == 1 and ERROR_LINE.match(result.stderr_lines[0]), result.stderr_lines
            assert not leftovers(out)
        else:
            check_complete_result(out)


def test_fuzz_cli_count_recorded():
    codes = CLI_RUNS["codes"]
    RECORD.add("fuzz", "DICOM header fuzzing (full glance segment)", "exit 0 (complete result) or exit 2 (one line)",
               f"{len(codes)} runs: {codes.count(0)} exit 0, {codes.count(2)} exit 2, "
               f"{len(codes) - codes.count(0) - codes.count(2)} other", len(codes) >= 1 and set(codes) <= {0, 2})
