"""Files we write and files we read, made trustworthy: complete outputs or none, and inputs checked before use.

Writing. ``write_atomically`` writes into a hidden temporary file beside the target, flushes it to disk, lets the
caller verify it (read it back), and only then renames it over the target. Some writers do not report a short
write: SimpleITK prints "wrote only 0 of N bytes" on stderr and returns normally when the disk fills up, leaving a
truncated ``.nii.gz`` that SimpleITK itself still reads, with most voxels wrong. So for such writers the read-back
check is what turns a full disk into an error. Every OSError (disk full, file size limit, read-only folder, no
permission) becomes one InputError line naming the file and the fix, and the temporary file is removed.

Reading. ``check_file_integrity`` catches damaged inputs that image readers accept silently: a gzip stream that
is cut short or fails its CRC (``.gz``), an uncompressed NIfTI shorter than its header says, a MetaImage whose
zlib data does not inflate to the size it declares. A flipped byte inside uncompressed pixel data cannot be
detected by anyone: those formats carry no checksum.
"""

from __future__ import annotations

import errno
import gzip
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Callable

from .errors import InputError

try:
    import resource
except ImportError:  # Windows: no file size limits to explain
    resource = None

#: Errors that mean "this place cannot hold the file", as opposed to a bug.
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_CHUNK = 1 << 20


# --- writing ---------------------------------------------------------------------------------------------------


def os_error_reason(exc: OSError) -> str:
    """A short human reason for ``exc`` (the strerror without the path noise)."""
    if exc.errno in _NO_SPACE:
        return "the disk is full"
    if exc.errno == errno.EFBIG:
        return f"the file size limit (ulimit -f) of {_fsize_limit_text()} was reached"
    if exc.errno == errno.EROFS:
        return "the folder is on a read-only file system"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return exc.strerror or _first_line(exc)


def _fsize_limit() -> int | None:
    if resource is None:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _fsize_limit_text() -> str:
    limit = _fsize_limit()
    return "unknown size" if limit is None else f"{limit} bytes"


class WriteError(InputError):
    """An output could not be written; ``reason`` says why in a few words ("the disk is full")."""

    def __init__(self, path: Path, reason: str):
        super().__init__(
            f"could not write {path}: {reason}; nothing was written there. "
            "Free some space or choose another output folder"
        )
        self.path, self.reason = path, reason


def _write_error(path: Path, reason: str) -> WriteError:
    return WriteError(path, reason)


def check_writable_folder(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Refuse, before any work, a folder that does not exist or where a file cannot be created.

    The probe really creates (and removes) a file: permission bits say nothing for root, and a read-only mount
    or a full disk shows only when one tries.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{what} {folder} does not exist; create it first")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".medprivacy-probe-", suffix=".tmp")
    except OSError as exc:
        raise InputError(
            f"cannot write to {what} {folder} ({os_error_reason(exc)}); choose a folder you can write to"
        ) from None
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:
        pass
    return folder


def _temporary_beside(path: Path, suffix: str | None = None) -> Path:
    """A hidden temporary path beside ``path``, by default with the same (possibly double) suffix, so writers pick
    the format. mkstemp creates it 0600: nothing is readable by others before ``write_atomically`` sets the mode."""
    name = path.name
    if suffix is None:
        suffix = next((s for s in (".seg.nrrd", ".nii.gz") if name.endswith(s)), path.suffix)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.", suffix=suffix)
    except OSError as exc:
        raise _write_error(path, os_error_reason(exc)) from None
    os.close(fd)
    return Path(tmp)


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _flush_to_disk(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _space_problem(tmp: Path) -> str | None:
    """Why a written-but-wrong file is short, when the place it lives in explains it."""
    try:
        size = tmp.stat().st_size
    except OSError:
        size = 0
    limit = _fsize_limit()
    if limit is not None and size >= limit:
        return f"the file size limit (ulimit -f) of {limit} bytes was reached"
    try:
        stats = os.statvfs(tmp.parent)
    except (OSError, AttributeError):
        return None
    # A little slack: a nearly full disk can have a few blocks left that the writer could not use.
    if stats.f_bavail * stats.f_frsize < 64 * 1024:
        return "the disk is full"
    return None


def write_atomically(
    path: str | os.PathLike,
    write: Callable[[Path], None],
    verify: Callable[[Path], None] | None = None,
    mode: int | None = None,
    *,
    temporary_suffix: str | None = None,
    sync: bool = True,
) -> Path:
    """Create ``path`` completely or not at all: the one "write, then rename" of the package.

    ``write(tmp)`` writes the content to ``tmp`` (same suffix as ``path`` unless ``temporary_suffix`` is given,
    e.g. so that readers globbing ``*.npy`` never pick it up); ``verify(tmp)``, if given, reads it back and raises
    when it is not what was meant. ``mode`` (default: 0666 minus the umask) is set before the rename; until then
    the file is 0600. ``sync=False`` skips the fsyncs, for copies not worth slowing every request for. A short
    write, a full disk, a read-only folder: one ``WriteError`` (an InputError) line, and no file at ``path`` changed.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"output folder {path.parent} does not exist; create it first")
    tmp = _temporary_beside(path, temporary_suffix)
    try:
        try:
            write(tmp)
            if sync:
                _flush_to_disk(tmp)
        except OSError as exc:
            # A library's own error (SimpleITK's PNG writer) carries no errno: the disk may still be the reason.
            reason = os_error_reason(exc) if exc.errno is not None else (_space_problem(tmp) or os_error_reason(exc))
            raise _write_error(path, reason) from None
        if verify is not None:
            try:
                verify(tmp)
            except (InputError, OSError, RuntimeError, ValueError) as exc:
                problem = _space_problem(tmp)
                if problem is not None:
                    raise _write_error(path, problem) from None
                if isinstance(exc, InputError):
                    raise
                raise _write_error(path, f"the file does not read back as written ({_first_line(exc)})") from None
        try:
            os.chmod(tmp, _default_file_mode() if mode is None else mode)
            os.replace(tmp, path)
        except OSError as exc:
            raise _write_error(path, os_error_reason(exc)) from None
        if sync:
            _flush_folder(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomically(path: str | os.PathLike, data: bytes, mode: int | None = None) -> Path:
    """``data`` into ``path`` through ``write_atomically``, read back and compared byte for byte."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)

    def verify(tmp: Path) -> None:
        if tmp.read_bytes() != data:
            raise ValueError("content differs")

    return write_atomically(path, write, verify, mode)


def write_json(data, path: str | os.PathLike) -> Path:
    """``data`` as indented JSON text into ``path`` through ``write_atomically`` (reports, manifests of outputs)."""
    import json

    return write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n"))


def _flush_folder(folder: Path) -> None:
    # The rename itself must reach the disk, or a power cut can bring back the old file (POSIX only).
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[-1] if text else type(exc).__name__)[:160]


# --- reading ---------------------------------------------------------------------------------------------------


def check_file_integrity(path: str | os.PathLike) -> None:
    """Raise an InputError naming the damage when ``path`` is a truncated or corrupted file we can check."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".gz"):
        size = _check_gzip(path)
        if name.endswith(".nii.gz"):
            with gzip.open(path, "rb") as handle:
                _check_nifti_size(path, handle.read(352), size)
    elif name.endswith(".nii"):
        with open(path, "rb") as handle:
            _check_nifti_size(path, handle.read(352), path.stat().st_size)
    elif name.endswith(".mha") or name.endswith(".mhd"):
        _check_metaimage(path)


def _damaged(path: Path, what: str) -> InputError:
    return InputError(f"{path} is damaged ({what}); copy or export the file again")


def _check_gzip(path: Path) -> int:
    """Inflate the whole stream (gzip checks every member's CRC and length); returns the inflated size."""
    total = 0
    try:
        with gzip.open(path, "rb") as handle:
            while True:
                block = handle.read(_CHUNK)
                if not block:
                    break
                total += len(block)
    except EOFError:
        raise _damaged(path, "the compressed data ends early: the file is truncated") from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise _damaged(path, f"its compressed data fails the gzip check: {_first_line(exc)}") from None
    except OSError as exc:
        raise InputError(f"cannot read {path} ({os_error_reason(exc)})") from None
    return total


def _check_nifti_size(path: Path, header: bytes, available: int) -> None:
    """A NIfTI-1/2 file must hold vox_offset + every voxel; ITK fills the missing part with garbage."""
    if len(header) < 348:
        raise _damaged(path, f"only {len(header)} bytes, shorter than a NIfTI header")
    for order in ("<", ">"):
        sizeof_hdr = struct.unpack_from(order + "i", header, 0)[0]
        if sizeof_hdr == 348:
            dims = struct.unpack_from(order + "8h", header, 40)
            bitpix = struct.unpack_from(order + "h", header, 72)[0]
            offset = int(struct.unpack_from(order + "f", header, 108)[0])
            break
        if sizeof_hdr == 540 and len(header) >= 352:
            dims = struct.unpack_from(order + "8q", header, 16)
            bitpix = struct.unpack_from(order + "h", header, 14)[0]
            offset = struct.unpack_from(order + "q", header, 168)[0]
            break
    else:
        return  # not NIfTI after all: let the reader say so
    rank = dims[0]
    if not 1 <= rank <= 7 or bitpix <= 0 or any(d < 0 for d in dims[1 : rank + 1]):
        return  # a broken header: the reader reports it
    voxels = 1
    for d in dims[1 : rank + 1]:
        voxels *= max(int(d), 1)
    needed = max(int(offset), sizeof_hdr) + voxels * bitpix // 8
    if available < needed:
        raise _damaged(path, f"{available} bytes of image data where its header needs {needed}: the file is truncated")


def _check_metaimage(path: Path) -> None:
    """MetaImage with local compressed data: the zlib stream must inflate completely (its Adler-32 is checked)."""
    with open(path, "rb") as handle:
        head = handle.read(64 * 1024)
    fields, data_start = {}, None
    position = 0
    for line in head.split(b"\n"):
        position += len(line) + 1
        key, sep, value = line.decode("latin-1").partition("=")
        if not sep:
            break
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            data_start = position
            break
    if (
        fields.get("CompressedData", "").lower() != "true"
        or fields.get("ElementDataFile") != "LOCAL"
        or data_start is None
    ):
        return
    inflater = zlib.decompressobj()
    with open(path, "rb") as handle:
        handle.seek(data_start)
        try:
            while True:
                block = handle.read(_CHUNK)
                if not block:
                    break
                inflater.decompress(block, 0)
                if inflater.eof:
                    break
        except zlib.error as exc:
            raise _damaged(path, f"its compressed pixel data fails the zlib check: {_first_line(exc)}") from None
    if not inflater.eof:
        raise _damaged(path, "the compressed pixel data ends early: the file is truncated")
