"""Build every broken or hostile input of the robustness suite at test time.

Everything starts from one small valid phantom (``base_sources``): a
64 x 64 x 12 CT written once as a DICOM series and once as NRRD. Each
:class:`Case` copies what it needs into its own folder and corrupts the copy
(pydicom for DICOM headers, raw bytes for image files), so nothing large is
committed and every case is reproducible from the phantom seed.

A case states how it must end: ``recover`` (exit 0; ``detail`` is a phrase the
WARNING must contain, and ``expected_hu`` the exact HU the reader must return)
or ``refuse`` (exit 2; one stderr line naming ``names`` and containing
``detail``).
"""

from __future__ import annotations

import gzip
import os
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from glance.volume import Volume

SHAPE_IJK = (64, 64, 12)  # columns, rows, slices: a full segment run takes a few seconds
SPACING = (5.0, 5.0, 5.0)  # mm; a 320 mm field of view, so the phantom has air, lung and tissue
SEED = 7
DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
HOSTILE_NAME = "../../etc/passwd\x07\x1b[2J Ünïcødé 患者/..\\x"
HOSTILE_DESCRIPTION = "..\\..\\..\\tmp\\evil\r\n/ new line ñ"


@dataclass
class Sources:
    """The valid inputs every case starts from."""

    ct: Volume  # the phantom CT (int16 HU)
    dicom: Path  # its DICOM series (IM00001.dcm ... one file per slice, k order)
    nrrd: Path  # the same CT as gzip NRRD

    def copy_dicom(self, dest: Path) -> Path:
        shutil.copytree(self.dicom, dest)
        return dest

    def slices(self, folder: Path) -> list[Path]:
        return sorted(folder.glob("IM*.dcm"))


@dataclass
class Built:
    path: Path  # what `glance segment` is given
    names: Path | None = None  # the file a refusal must name (default: path)
    expected_hu: np.ndarray | None = None  # exact HU a recovery must read
    extra_args: list[str] = field(default_factory=list)

    @property
    def named(self) -> Path:
        return self.names or self.path


@dataclass(frozen=True)
class Case:
    name: str
    group: str  # dicom | image
    expect: str  # recover | refuse
    detail: str  # phrase the error (refuse) or a warning (recover) must contain; "" = none required
    build: Callable[[Path, Sources], Built]
    summary: str  # the expected outcome, for the README table


def base_sources(root: Path) -> Sources:
    """Write the phantom once as DICOM and NRRD under ``root``."""
    from glance.io import write_image
    from glance.io.dicom_write import write_dicom_series
    from glance.phantom import make_phantom

    ct = make_phantom(SHAPE_IJK, SPACING, seed=SEED, n_nodules=1).ct
    write_dicom_series(ct, root / "dicom", uid_seed="robustness")
    write_image(ct, root / "ct.nrrd")
    return Sources(ct, root / "dicom", root / "ct.nrrd")


def tiny_volume() -> Volume:
    """3 slices of 16 x 16: air on the left, soft tissue on the right (passes the HU check)."""
    k, j, i = np.meshgrid(np.arange(3), np.arange(16), np.arange(16), indexing="ij")
    array = np.where(i < 8, -1000, 40 + 10 * k + j).astype(np.int16)
    return Volume(array, (0.8, 0.8, 2.0), (-6.0, -6.0, -100.0), np.eye(3), {})


# ------------------------------------------------------------ DICOM editing


def edit(path: Path, change: Callable[[pydicom.Dataset], None]) -> None:
    """Rewrite one DICOM file with ``change`` applied to its dataset."""
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


def edit_all(folder: Path, change: Callable[[int, pydicom.Dataset], None]) -> None:
    for k, path in enumerate(sorted(folder.glob("IM*.dcm"))):
        edit(path, lambda ds, k=k: change(k, ds))


def _set_pixels(ds: pydicom.Dataset, stored: np.ndarray, signed: bool) -> None:
    ds.PixelRepresentation = int(signed)
    ds.PixelData = np.ascontiguousarray(stored, dtype="<i2" if signed else "<u2").tobytes()


def _hu(src: Sources) -> np.ndarray:
    return src.ct.array


# ---------------------------------------------------------------- DICOM cases


def zero_byte_file(d: Path, src: Sources) -> Built:
    d.mkdir()
    (d / "empty.dcm").write_bytes(b"")
    return Built(d / "empty.dcm")


def zero_byte_in_series(d: Path, src: Sources) -> Built:
    folder = src.copy_dicom(d / "series")
    (folder / "empty.dcm").write_bytes(b"")
    return Built(folder, expected_hu=_hu(src))


def truncated_header(d: Path, src: Sources) -> Built:
    d.mkdir()
    path = d / "cut.dcm"
    path.write_bytes(src.slices(src.dicom)[0].read_bytes()[:300])
    return Built(path)


def truncated_pixels(d: Path, src: Sources) -> Built:
    folder = src.copy_dicom(d / "series")
    path = src.slices(folder)[5]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    return Built(folder, names=path)


def non_dicom_named_dcm(d: Path, src: Sources) -> Built:
    d.mkdir()
    path = d / "notes.dcm"
    path.write_text("this is a text file, not DICOM\n" * 20)
    return Built(path)


def missing_pixel_data(d: Path, src: Sources) -> Built:
    folder = src.copy_dicom(d / "series")
    path = src.slices(folder)[3]
    edit(path, lambda ds: delattr(ds, "PixelData"))
    return Built(folder, names=path)


def short_pixel_data(d: Path, src: Sources) -> Built:
    folder = src.copy_dicom(d / "series")
    path = src.slices(folder)[4]

    def halve(ds):
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    edit(path, halve)
    return Built(folder, names=path)


def _compressed(syntax) -> Callable[[Path, Sources], Built]:
    def build(d: Path, src: Sources) -> Built:
        folder = src.copy_dicom(d / "series")
        edit_all(folder, lambda k, ds: ds.compress(syntax))
        return Built(folder, names=src.slices(folder)[0], expected_hu=_hu(src))
    return build


def compressed_undecodable(d: Path, src: Sources) -> Built:
    """JPEG 2000 transfer syntax whose fragments are not a codestream: decoding fails cleanly."""
    from pydicom.encaps import encapsulate

    folder = src.copy_dicom(d / "series")
    path = src.slices(folder)[2]

    def garble(ds):
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])
        ds["PixelData"].VR = "OB"
    edit(path, garble)
    return Built(folder, names=path)


def unknown_syntax(d: Path, src: Sources) -> Built:
    """A transfer syntax no plugin can decode (MPEG2): refused naming the syntax."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import MPEG2MPML

    folder = src.copy_dicom(d / "series")
    path = src.slices(folder)[0]

    def mpeg(ds):
        ds.file_meta.TransferSyntaxUID = MPEG2MPML
        ds.PixelData = encapsulate([b"\x00" * 64])
        ds["PixelData"].VR = "OB"
    edit(path, mpeg)
    return Built(folder, names=path)


def _modality(value: str) -> Callable[[Path, Sources], Built]:
    def build(d: Path, src: Sources) -> Built:
        folder = src.copy_dicom(d / "series")
        edit_all(folder, lambda k, ds: setattr(ds, "Modality", value))
        return Built(folder)
    return build


def single_slice(d: Path, src: Sources) -> Built:
    d.mkdir()
    shutil.copy(src.slices(src.dicom)[6], d / "only.dcm")
    return Built(d)


def duplicate_position(d: Path, src: Sources) -> Built:
    """Two different instances at one position: which one is right cannot be known."""
    folder = src.copy_dicom(d / "series")
    copy = folder / "IM00099.dcm"
    shutil.copy(src.slices(folder)[5], copy)
    edit(copy, lambda ds: setattr(ds, "SOPInstanceUID", generate_uid(entropy_srcs=["dup"])))
    return Built(folder)


def duplicate_instance(d: Path, src: Sources) -> Built:
    """A second copy of the same SOP instance (common after two exports): ignored."""
    folder = src.copy_dicom(d / "series")
    shutil.copy(src.slices(folder)[5], folder / "copy-of-IM00006.dcm")
    return Built(folder, expected_hu=_hu(src))


def missing_slice(d: Path, src: Sources) -> Built:
    folder = src.copy_dicom(d / "series")
    src.slices(folder)[6].unlink()
    hu = _hu(src).copy()
    hu[6] = np.rint((hu[5].astype(np.float32) + hu[7].astype(np.float32)) / 2)  # linear, midway
    return Built(folder, expected_hu=hu)


def large_gap(d: Path, src: Sources) -> Built:
    folder = src.copy_dicom(d / "series")
    for path in src.slices(folder)[3:9]:
        path.unlink()
    return Built(folder)


def mixed_orientation(d: Path, src: Sources) -> Built:
    folder = src.copy_dicom(d / "series")
    edit(src.slices(folder)[4], lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0, -1]))
    return Built(folder)


def two_series(d: Path, src: Sources) -> Built:
    """A second, shorter series in the same folder: the larger CT series is read, the other listed."""
    folder = src.copy_dicom(d / "series")
    uid = generate_uid(entropy_srcs=["second series"])
    for n, path in enumerate(src.slices(src.dicom)[:4]):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["second", str(n)])
        ds.SeriesDescription = "scout"
        ds.save_as(folder / f"scout{n}.dcm")
    return Built(folder, expected_hu=_hu(src))


def gantry_tilt(d: Path, src: Sources) -> Built:
    folder = src.copy_dicom(d / "series")

    def tilt(k, ds):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + k * 5.0 * np.tan(np.radians(15)), z]
    edit_all(folder, tilt)
    return Built(folder)


def non_uniform_spacing(d: Path, src: Sources) -> Built:
    folder = src.copy_dicom(d / "series")

    def squeeze(k, ds):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + (1.7 if k >= 6 else 0.0)]
    edit_all(folder, squeeze)
    return Built(folder)


def missing_rescale(d: Path, src: Sources) -> Built:
    """Signed HU without RescaleSlope/Intercept: read as HU (the default slope 1, intercept 0)."""
    folder = src.copy_dicom(d / "series")

    def drop(k, ds):
        del ds.RescaleSlope, ds.RescaleIntercept
    edit_all(folder, drop)
    return Built(folder, expected_hu=_hu(src))


def missing_rescale_offset(d: Path, src: Sources) -> Built:
    """Unsigned HU + 2048 without RescaleIntercept: the values are not HU, refused with a hint."""
    folder = src.copy_dicom(d / "series")
    hu = _hu(src)

    def drop(k, ds):
        del ds.RescaleSlope, ds.RescaleIntercept
        _set_pixels(ds, hu[k].astype(np.int32) + 2048, signed=False)
    edit_all(folder, drop)
    return Built(folder)


def _stored_as(d: Path, src: Sources, slope: str, intercept: str, signed: bool) -> Built:
    """The series stored as (HU - intercept) / slope, exact for the values used here."""
    folder = src.copy_dicom(d / "series")
    hu = _hu(src)
    stored = np.rint((hu.astype(np.float64) - float(intercept)) / float(slope)).astype(np.int32)

    def rescale(k, ds):
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        _set_pixels(ds, stored[k], signed=signed)
    edit_all(folder, rescale)
    return Built(folder, expected_hu=hu)


def odd_rescale(d: Path, src: Sources) -> Built:
    """Slope 0.5, intercept -2048.5: stored = 2 * (HU + 2048.5), exact."""
    return _stored_as(d, src, "0.5", "-2048.5", signed=False)


def unsigned_storage(d: Path, src: Sources) -> Built:
    return _stored_as(d, src, "1", "-2048", signed=False)


def signed_offset_storage(d: Path, src: Sources) -> Built:
    """Signed storage with a positive intercept (HU - 1000 stored, intercept +1000)."""
    return _stored_as(d, src, "1", "1000", signed=True)


def pixel_padding(d: Path, src: Sources) -> Built:
    """PixelPaddingValue -2048 (written as US 63488): padding reads as -1024 HU."""
    folder = src.copy_dicom(d / "series")
    hu = _hu(src)
    pad = hu.min()
    edit_all(folder, lambda k, ds: ds.add_new(0x00280120, "US", int(pad) & 0xFFFF))
    return Built(folder, expected_hu=np.where(hu == pad, -1024, hu).astype(np.int16))


def huge_rows_columns(d: Path, src: Sources) -> Built:
    folder = src.copy_dicom(d / "series")

    def claim(k, ds):
        ds.Rows = ds.Columns = 65535
    edit_all(folder, claim)
    return Built(folder)


def many_non_dicom_files(d: Path, src: Sources) -> Built:
    d.mkdir()
    blob = b"not a DICOM file " * 16
    for n in range(10_000):
        (d / f"f{n:05d}.dcm").write_bytes(blob)
    return Built(d)


def symlink_loop(d: Path, src: Sources) -> Built:
    """A folder symlinked into itself and a self-referencing file link: each skipped."""
    folder = src.copy_dicom(d / "series")
    (folder / "sub").mkdir()
    os.symlink("..", folder / "sub" / "loop")
    os.symlink("self.dcm", folder / "self.dcm")
    return Built(folder, expected_hu=_hu(src))


def unreadable_entries(d: Path, src: Sources) -> Built:
    """A broken symlink, a folder named x.dcm and a FIFO named .dcm: skipped, never blocking."""
    folder = src.copy_dicom(d / "series")
    os.symlink("does-not-exist.dcm", folder / "broken.dcm")
    (folder / "x.dcm").mkdir()
    os.mkfifo(folder / "fifo.dcm")
    return Built(folder, expected_hu=_hu(src))


def fifo_input(d: Path, src: Sources) -> Built:
    d.mkdir()
    os.mkfifo(d / "pipe.dcm")
    return Built(d / "pipe.dcm")


def broken_symlink_input(d: Path, src: Sources) -> Built:
    d.mkdir()
    os.symlink("missing.dcm", d / "link.dcm")
    return Built(d / "link.dcm")


def hostile_names(d: Path, src: Sources) -> Built:
    """Path separators, '..', control and non-ASCII characters in the names: never in a file name."""
    folder = src.copy_dicom(d / "series")

    def hostile(k, ds):
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = HOSTILE_NAME
        ds.PatientID = "../../../root"
        ds.SeriesDescription = HOSTILE_DESCRIPTION
        ds.StudyDescription = "/etc/passwd"
    edit_all(folder, hostile)
    return Built(folder, expected_hu=_hu(src))


def hostile_names_in_error(d: Path, src: Sources) -> Built:
    """Two series with control characters in SeriesDescription and a wrong --series: one error line."""
    built = two_series(d, src)
    for path in built.path.glob("scout*.dcm"):
        edit(path, lambda ds: setattr(ds, "SeriesDescription", "evil\nsecond line\x1b[31m"))
    return Built(built.path, extra_args=["--series", "1.2.3.4.5"])


def lidc_missing_slice(d: Path, src: Sources) -> Built:
    """12 neighbouring real LIDC-IDRI-0001 slices (../shared/data) less the 6th: interpolated."""
    def z(path: Path) -> float:
        return float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2])

    series = sorted((DATA / "LIDC-IDRI-0001").glob("*.dcm"), key=z)[40:52]  # 12 neighbouring slices
    d.mkdir()
    for path in series[:5] + series[6:]:
        os.symlink(path, d / path.name)
    return Built(d)


# ---------------------------------------------------------------- image cases


def _nrrd(path: Path, array: np.ndarray, spacing=(5.0, 5.0, 5.0), encoding: str = "raw",
          directions: str | None = None, body: bytes | None = None) -> Path:
    """A hand-written NRRD (the header is the thing under test)."""
    kinds = {np.dtype("int16"): "int16", np.dtype("float32"): "float", np.dtype("float64"): "double"}
    sizes = " ".join(str(s) for s in reversed(array.shape))
    dims = array.ndim
    if directions is None:
        directions = " ".join(
            "(" + ",".join(str(spacing[a] if b == a else 0.0) for b in range(dims)) + ")" for a in range(dims))
    header = (f"NRRD0004\ntype: {kinds[array.dtype]}\ndimension: {dims}\nspace dimension: {dims}\n"
              f"sizes: {sizes}\nspace directions: {directions}\nendian: little\nencoding: {encoding}\n"
              f"space origin: ({','.join('0' for _ in range(dims))})\n\n")
    data = body if body is not None else np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
    if body is None and encoding == "gzip":
        data = gzip.compress(data)
    path.write_bytes(header.encode() + data)
    return path


def nan_inf(d: Path, src: Sources) -> Built:
    d.mkdir()
    a = _hu(src).astype(np.float32)
    a[3, 10, 10], a[4, 20, 20], a[5, 30, 30] = np.nan, np.inf, -np.inf
    return Built(_nrrd(d / "naninf.nrrd", a))


def float_data(d: Path, src: Sources) -> Built:
    d.mkdir()
    return Built(_nrrd(d / "float.nrrd", _hu(src).astype(np.float32) + 0.3), expected_hu=_hu(src))


def two_d(d: Path, src: Sources) -> Built:
    d.mkdir()
    return Built(_nrrd(d / "slice.nrrd", _hu(src)[6], spacing=(5.0, 5.0)))


def four_d(d: Path, src: Sources) -> Built:
    d.mkdir()
    return Built(_nrrd(d / "time.nrrd", np.stack([_hu(src)] * 2), spacing=(5.0, 5.0, 5.0, 1.0)))


def zero_spacing(d: Path, src: Sources) -> Built:
    d.mkdir()
    return Built(_nrrd(d / "zero.nrrd", _hu(src), directions="(5,0,0) (0,5,0) (0,0,0)"))


def negative_spacing_mhd(d: Path, src: Sources) -> Built:
    d.mkdir()
    (d / "neg.raw").write_bytes(_hu(src).astype("<i2").tobytes())
    header = ("ObjectType = Image\nNDims = 3\nDimSize = 64 64 12\nElementSpacing = 5 5 -5\n"
              "ElementType = MET_SHORT\nElementByteOrderMSB = False\nElementDataFile = neg.raw\n")
    (d / "neg.mhd").write_text(header)
    return Built(d / "neg.mhd")


def non_orthonormal(d: Path, src: Sources) -> Built:
    d.mkdir()
    (d / "skew.raw").write_bytes(_hu(src).astype("<i2").tobytes())
    header = ("ObjectType = Image\nNDims = 3\nDimSize = 64 64 12\nElementSpacing = 5 5 5\n"
              "TransformMatrix = 1 0 0 0.5 1 0 0 0 1\n"
              "ElementType = MET_SHORT\nElementByteOrderMSB = False\nElementDataFile = skew.raw\n")
    (d / "skew.mhd").write_text(header)
    return Built(d / "skew.mhd")


def short_data_nrrd(d: Path, src: Sources) -> Built:
    d.mkdir()
    full = _hu(src).astype("<i2").tobytes()
    return Built(_nrrd(d / "short.nrrd", _hu(src), body=full[: len(full) // 3]))


def short_data_nifti(d: Path, src: Sources) -> Built:
    from glance.io import write_image

    d.mkdir()
    path = write_image(src.ct, d / "short.nii", compress=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return Built(path)


def gzip_bomb_nrrd(path: Path, inflated_bytes: int) -> Path:
    """An NRRD whose gzip body inflates to ``inflated_bytes`` zeros, and whose header says so."""
    chunk = 64 << 20
    member = _gzip_member(chunk)
    repeats = max(1, -(-inflated_bytes // chunk))
    slices = repeats * chunk // (4096 * 4096 * 2)
    header = (f"NRRD0004\ntype: int16\ndimension: 3\nspace: left-posterior-superior\n"
              f"sizes: 4096 4096 {slices}\nspace directions: (0.1,0,0) (0,0.1,0) (0,0,0.1)\n"
              "endian: little\nencoding: gzip\nspace origin: (0,0,0)\n\n")
    with open(path, "wb") as f:
        f.write(header.encode())
        for _ in range(repeats):
            f.write(member)  # concatenated gzip members inflate to the concatenation
    return path


def _gzip_member(n_zeros: int) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31 = gzip container
    block = b"\0" * (1 << 20)
    parts = [c.compress(block) for _ in range(n_zeros >> 20)]
    return b"".join(parts) + c.flush()


def ram_bytes() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def gzip_bomb(d: Path, src: Sources) -> Built:
    d.mkdir()
    return Built(gzip_bomb_nrrd(d / "bomb.nrrd", ram_bytes() + (1 << 30)))


def gzip_bomb_nifti(d: Path, src: Sources) -> Built:
    """A .nii.gz whose header (inside the gzip stream) claims 4096 x 4096 x 4096."""
    import nibabel as nib

    d.mkdir()
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape((4096, 4096, 4096))
    header.set_zooms((0.1, 0.1, 0.1))
    header.set_qform(np.diag([0.1, 0.1, 0.1, 1.0]), code=1)
    raw = header.binaryblock + b"\0" * 4  # 348-byte header + extension flag, data offset 352
    path = d / "bomb.nii.gz"
    path.write_bytes(gzip.compress(raw) + _gzip_member(64 << 20) * 4)
    return Built(path)


def too_many_voxels(d: Path, src: Sources) -> Built:
    """A valid CT with --max-voxels below its size: refused with the number it needed."""
    d.mkdir()
    shutil.copy(src.nrrd, d / "ct.nrrd")
    return Built(d / "ct.nrrd", extra_args=["--max-voxels", "10000"])


def lidc_nrrd_cropped_float(d: Path, src: Sources) -> Built:
    """Real LIDC-IDRI-0003 (../shared/data) slices 60..71 rewritten as float64 MHA: read, rounded exactly."""
    import SimpleITK as sitk

    d.mkdir()
    image = sitk.ReadImage(str(DATA / "scans" / "LIDC-IDRI-0003.nrrd"))[:, :, 60:72]
    hu = sitk.GetArrayFromImage(image)
    out = sitk.Cast(image, sitk.sitkFloat64)
    sitk.WriteImage(out, str(d / "lidc.mha"))
    return Built(d / "lidc.mha", expected_hu=hu)


# ------------------------------------------------------------------ the list


def _c(name, group, expect, detail, build, summary) -> Case:
    return Case(name, group, expect, detail, build, summary)


CASES: list[Case] = [
    _c("zero-byte file", "dicom", "refuse", "not a readable DICOM", zero_byte_file,
       "exit 2, names the file: not readable DICOM"),
    _c("zero-byte file in a series", "dicom", "recover", "", zero_byte_in_series,
       "exit 0, the file has no DICOM preamble and is ignored; series read exactly"),
    _c("truncated file (header)", "dicom", "refuse", "(no SeriesInstanceUID", truncated_header,
       "exit 2, names the file"),
    _c("truncated file (pixel data)", "dicom", "refuse", "pixel data", truncated_pixels,
       "exit 2, names the slice: pixel data too short"),
    _c("non-DICOM file named .dcm", "dicom", "refuse", "not a readable DICOM", non_dicom_named_dcm,
       "exit 2, names the file"),
    _c("missing PixelData", "dicom", "refuse", "no pixel data", missing_pixel_data,
       "exit 2, names the slice"),
    _c("pixel data shorter than Rows x Columns x Bits", "dicom", "refuse", "bytes,", short_pixel_data,
       "exit 2, names the slice and both byte counts"),
    _c("JPEG-LS lossless", "dicom", "recover", "", _compressed(JPEGLSLossless),
       "exit 0, decoded by the installed plugin; HU exact"),
    _c("JPEG 2000 lossless", "dicom", "recover", "", _compressed(JPEG2000Lossless),
       "exit 0, decoded by the installed plugin; HU exact"),
    _c("RLE lossless", "dicom", "recover", "", _compressed(RLELossless),
       "exit 0, decoded; HU exact"),
    _c("JPEG 2000 with a corrupt codestream", "dicom", "refuse", "JPEG 2000", compressed_undecodable,
       "exit 2, names the slice and the syntax"),
    _c("undecodable syntax (MPEG2)", "dicom", "refuse", "MPEG2", unknown_syntax,
       "exit 2, names the slice and the syntax"),
    _c("MR modality", "dicom", "refuse", "no CT series (found modalities: MR)", _modality("MR"),
       "exit 2, names the folder and the modality"),
    _c("CR modality", "dicom", "refuse", "no CT series (found modalities: CR)", _modality("CR"),
       "exit 2, names the folder and the modality"),
    _c("single slice", "dicom", "refuse", "a single slice", single_slice, "exit 2, names the folder"),
    _c("duplicate ImagePositionPatient", "dicom", "refuse", "share the position", duplicate_position,
       "exit 2, two different slices at one position"),
    _c("duplicate file of one instance", "dicom", "recover", "same instance", duplicate_instance,
       "exit 0, the copy is ignored with a warning naming it; HU exact"),
    _c("one missing slice (gap)", "dicom", "recover", "missing slice(s) at", missing_slice,
       "exit 0, warning names the slice position; interpolated linearly (exact), no DICOM-SEG"),
    _c("six missing slices", "dicom", "refuse", "too many to interpolate", large_gap,
       "exit 2, names the folder and the count"),
    _c("mixed orientations", "dicom", "refuse", "mixed orientations", mixed_orientation,
       "exit 2, names the folder"),
    _c("two series in one folder", "dicom", "recover", "", two_series,
       "exit 0, the CT series with most slices is read, the other listed (INFO); HU exact"),
    _c("control characters in an error message", "dicom", "refuse", "no series 1.2.3.4.5",
       hostile_names_in_error, "exit 2, one escaped line listing the series"),
    _c("gantry tilt", "dicom", "refuse", "gantry tilt", gantry_tilt, "exit 2, names the folder"),
    _c("non-uniform spacing", "dicom", "refuse", "irregular slice spacing", non_uniform_spacing,
       "exit 2, names the folder and the step range"),
    _c("missing RescaleSlope/Intercept (signed HU)", "dicom", "recover", "", missing_rescale,
       "exit 0, read as HU; exact"),
    _c("missing RescaleIntercept (unsigned offset)", "dicom", "refuse", "missing RescaleIntercept?",
       missing_rescale_offset, "exit 2, does not look like CT, with the hint"),
    _c("odd RescaleSlope/Intercept (0.5, -2048.5)", "dicom", "recover", "", odd_rescale,
       "exit 0, HU exact"),
    _c("unsigned storage (intercept -2048)", "dicom", "recover", "", unsigned_storage, "exit 0, HU exact"),
    _c("signed storage (intercept +1000)", "dicom", "recover", "", signed_offset_storage, "exit 0, HU exact"),
    _c("PixelPaddingValue", "dicom", "recover", "", pixel_padding,
       "exit 0, padding pixels read as -1024 HU, the rest exact"),
    _c("Rows/Columns 65535 x 65535", "dicom", "refuse", "exceeds the limit", huge_rows_columns,
       "exit 2 from the headers, before any allocation"),
    _c("10,000 non-DICOM files", "dicom", "refuse", "no DICOM series found", many_non_dicom_files,
       "exit 2 in seconds (132-byte preamble check per file)"),
    _c("symlink loop", "dicom", "recover", "", symlink_loop,
       "exit 0, each folder visited once, the self-link skipped; HU exact"),
    _c("unreadable entries (broken link, folder x.dcm, FIFO)", "dicom", "recover", "", unreadable_entries,
       "exit 0, all skipped, never blocks on the FIFO; HU exact"),
    _c("FIFO given as input", "dicom", "refuse", "not a regular file", fifo_input,
       "exit 2 at once (never opened), names it"),
    _c("broken symlink given as input", "dicom", "refuse", "no such file", broken_symlink_input,
       "exit 2, names it"),
    _c("hostile PatientName/SeriesDescription", "dicom", "recover", "", hostile_names,
       "exit 0, no header string reaches a file name; only the expected files inside --out"),
    _c("real LIDC-IDRI-0001 with a missing slice", "dicom", "recover", "missing slice(s) at",
       lidc_missing_slice, "exit 0, warning names the slice position"),
    _c("NaN/Inf voxels", "image", "refuse", "3 voxels are NaN or infinite", nan_inf,
       "exit 2, names the file and the count"),
    _c("float data", "image", "recover", "rounded", float_data,
       "exit 0, warning; rounded to whole HU (exact)"),
    _c("real LIDC-IDRI-0003 crop as float64 MHA", "image", "recover", "", lidc_nrrd_cropped_float,
       "exit 0, HU exact"),
    _c("2D image", "image", "refuse", "2D image", two_d, "exit 2, names the file"),
    _c("4D image", "image", "refuse", "4D image", four_d, "exit 2, names the file"),
    _c("zero spacing", "image", "refuse", "spacing", zero_spacing, "exit 2, names the file"),
    _c("negative spacing (MHD)", "image", "refuse", "spacing", negative_spacing_mhd, "exit 2, names the file"),
    _c("non-orthonormal direction", "image", "refuse", "not orthonormal", non_orthonormal,
       "exit 2, names the file and the matrix"),
    _c("NRRD claiming more data than it holds", "image", "refuse", "cannot read the image data",
       short_data_nrrd, "exit 2, names the file"),
    _c("NIfTI claiming more data than it holds", "image", "refuse", "cannot read the image data",
       short_data_nifti, "exit 2, names the file"),
    _c("gzip bomb NRRD (inflates past RAM)", "image", "refuse", "exceeds the limit", gzip_bomb,
       "exit 2 from the header sizes, nothing decompressed"),
    _c("gzip bomb NIfTI (.nii.gz)", "image", "refuse", "exceeds the limit", gzip_bomb_nifti,
       "exit 2 from the header sizes, nothing decompressed"),
    _c("--max-voxels below the volume", "image", "refuse", "49152 voxels exceeds the limit of 10000",
       too_many_voxels, "exit 2 with the number of voxels needed"),
]

NEEDS_SHARED_DATA = {"real LIDC-IDRI-0001 with a missing slice", "real LIDC-IDRI-0003 crop as float64 MHA"}


# ---------------------------------------------------------------- model cases


@dataclass(frozen=True)
class ModelCase:
    name: str
    detail: str  # phrase the one error line must contain
    names: str  # the file the error must name: "card" or "weights"
    build: Callable[[Path, Path, Path], None]  # (good model folder, new folder, marker path)


class _Payload:
    """Unpickling this creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _card(folder: Path) -> dict:
    import json

    return json.loads((folder / "card.json").read_text())


def _write_card(folder: Path, card: dict, resign: bool = True) -> None:
    """Write ``card``; with ``resign`` its SHA-256 is set to the weights now in the folder,
    so the check under test is the one after the hash (the hash alone cannot be trusted either)."""
    import hashlib
    import json

    if resign:
        card["weights_sha256"] = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    (folder / "card.json").write_text(json.dumps(card))


def _copy_model(good: Path, new: Path) -> dict:
    shutil.copytree(good, new)
    return _card(new)


def model_wrong_shape(good: Path, new: Path, marker: Path) -> None:
    from safetensors.torch import load_file, save_file

    card = _copy_model(good, new)
    state = load_file(str(new / "model.safetensors"))
    key = next(k for k, v in state.items() if v.ndim == 4)
    state[key] = state[key][:, :1].contiguous()  # fewer input channels
    save_file(state, str(new / "model.safetensors"))
    _write_card(new, card)


def model_card_other_config(good: Path, new: Path, marker: Path) -> None:
    from glance.model import config_for

    card = _copy_model(good, new)
    card["config"] = config_for("base").to_dict()
    _write_card(new, card)


def model_card_other_weights(good: Path, new: Path, marker: Path) -> None:
    """Same architecture, other weights: only the card's SHA-256 tells them apart."""
    from safetensors.torch import load_file, save_file

    _copy_model(good, new)
    state = load_file(str(new / "model.safetensors"))
    save_file({k: v * 2 if v.is_floating_point() else v for k, v in state.items()}, str(new / "model.safetensors"))


def model_pickle(good: Path, new: Path, marker: Path) -> None:
    import pickle

    card = _copy_model(good, new)
    (new / "model.safetensors").write_bytes(pickle.dumps({"weight": _Payload(marker)}))
    _write_card(new, card)


def model_torch_save(good: Path, new: Path, marker: Path) -> None:
    import torch

    card = _copy_model(good, new)
    torch.save({"weight": _Payload(marker)}, new / "model.safetensors")
    _write_card(new, card)


def model_pickle_card(good: Path, new: Path, marker: Path) -> None:
    import pickle

    _copy_model(good, new)
    (new / "card.json").write_bytes(pickle.dumps(_Payload(marker)))


def model_card_version(good: Path, new: Path, marker: Path) -> None:
    card = _copy_model(good, new)
    card["card_version"] = 99
    _write_card(new, card)


def model_card_unknown_field(good: Path, new: Path, marker: Path) -> None:
    card = _copy_model(good, new)
    card["exec"] = "__import__('os').system('touch marker')"
    _write_card(new, card)


def model_weights_outside(good: Path, new: Path, marker: Path) -> None:
    """weights_file '../evil.safetensors': only the base name is used, inside the folder."""
    card = _copy_model(good, new)
    shutil.copy(new / "model.safetensors", new.parent / "evil.safetensors")
    card["weights_file"] = "../evil.safetensors"
    _write_card(new, card, resign=False)


def model_huge_header(good: Path, new: Path, marker: Path) -> None:
    """A safetensors file whose 8-byte header length claims 2**62 bytes."""
    card = _copy_model(good, new)
    (new / "model.safetensors").write_bytes((1 << 62).to_bytes(8, "little") + b"{}" * 10)
    _write_card(new, card)


MODEL_CASES: list[ModelCase] = [
    ModelCase("wrong tensor shapes", "has shape", "weights", model_wrong_shape),
    ModelCase("card config does not match its weights", "do not match the card's config", "weights",
              model_card_other_config),
    ModelCase("weights do not match the card's SHA-256", "SHA-256 differs", "weights", model_card_other_weights),
    ModelCase("pickle renamed .safetensors", "not a valid safetensors file", "weights", model_pickle),
    ModelCase("torch.save zip renamed .safetensors", "not a valid safetensors file", "weights", model_torch_save),
    ModelCase("pickle as card.json", "unreadable model card", "card", model_pickle_card),
    ModelCase("unknown card version", "card version 99 is not supported", "card", model_card_version),
    ModelCase("unknown card field", "invalid model card", "card", model_card_unknown_field),
    ModelCase("weights_file pointing outside the folder", "weights file missing", "evil", model_weights_outside),
    ModelCase("safetensors header length 2**62", "not a valid safetensors file", "weights", model_huge_header),
]
