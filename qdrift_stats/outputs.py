"""Output guards: where a command may write, what ``--overwrite`` may replace, and how a file is written.

Every verb that writes goes through :func:`check_output` before it computes anything, then writes
through :func:`atomic_output` (a finished file or folder) or, for outputs that grow and resume (a
calibration store, a cross-validation result), removes an old output only with
:func:`remove_output`. The rules:

- the output's folder must exist and be writable (checked before any sampling);
- an output that is a symbolic link is refused (nothing is written through a link);
- an output equal to an input, inside an input, or holding an input is refused
  (``qdrift diagnose s.zarr --out s.zarr``);
- an existing output is replaced only with ``overwrite`` and only when it is our own output of
  the same kind (:func:`is_own_output`): a store by its schema attribute, a cross-validation or
  diagnostics result by its marker, an estimator file by its metadata, an ``.npy`` or a figure by
  its magic bytes. A foreign folder or file is never removed;
- a finished output is written to a hidden temporary sibling and renamed into place, so a failed
  or killed write leaves the old output (or nothing) and no stray temporary; files get the
  ordinary ``0666 & ~umask`` mode (0644 under the usual umask), not the 0600 of temporary files.

This module imports only the standard library, so every layer can use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from qdrift_stats.errors import QDriftError

#: Output kinds and how they are described in messages.
KINDS: dict[str, str] = {
    "store": "qdrift calibration store",
    "cv": "qdrift cross-validation result",
    "diagnostics": "qdrift diagnostics result",
    "estimator": "qdrift estimator file (.safetensors)",
    "npy": "NumPy .npy file",
    "figure": "figure file (.png, .pdf or .svg)",
}
DIR_KINDS = ("store", "cv", "diagnostics")
#: The marker attribute of folders qdrift writes (zarr group attributes).
SCHEMA_ATTR = "qdrift_schema"
SCHEMAS = {"store": "qdrift-calibration", "cv": "qdrift-cv", "diagnostics": "qdrift-diagnostics"}
FIGURE_SUFFIXES = (".png", ".pdf", ".svg")
_TMP_TAG = ".qdrift-tmp-"
_MAX_HEADER = 16 * 2**20


def _describe(kind: str) -> str:
    return KINDS.get(kind, kind)


def _read_json_head(path: Path, limit: int = _MAX_HEADER) -> dict | None:
    from qdrift_stats.inputs import loads_bounded

    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > limit:
            return None
        value = loads_bounded(path.read_text(), what=str(path), max_bytes=limit)
    except (OSError, UnicodeDecodeError, QDriftError):
        return None
    return value if isinstance(value, dict) else None


def _zarr_attrs(folder: Path) -> dict:
    meta = _read_json_head(folder / "zarr.json")
    attrs = (meta or {}).get("attributes")
    return attrs if isinstance(attrs, dict) else {}


def _magic(path: Path, n: int = 16) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(n)
    except OSError:
        return b""


def _is_estimator_file(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) != 8:
                return False
            size = int.from_bytes(head, "little")
            if not 0 < size <= _MAX_HEADER:
                return False
            header = json.loads(handle.read(size))
    except (OSError, ValueError, RecursionError):
        return False
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("qdrift"), str):
        return False
    return '"qdrift-estimator"' in meta["qdrift"]


def is_own_output(path: str | Path, kind: str) -> bool:
    """Whether ``path`` is an output qdrift writes, of this ``kind`` (never follows a link)."""
    path = Path(path)
    if path.is_symlink():
        return False
    if kind in DIR_KINDS:
        if not path.is_dir():
            return False
        attrs = _zarr_attrs(path)
        if attrs.get(SCHEMA_ATTR) == SCHEMAS[kind]:
            return True
        # diagnostics saved before the marker existed: the verdict attributes diagnose writes
        return kind == "diagnostics" and {"regime", "lb_lags", "estimator"} <= set(attrs)
    if not path.is_file():
        return False
    if kind == "estimator":
        return _is_estimator_file(path)
    if kind == "npy":
        return _magic(path, 6) == b"\x93NUMPY"
    if kind == "figure":
        head = _magic(path, 256)
        return (
            head.startswith(b"\x89PNG\r\n\x1a\n")
            or head.startswith(b"%PDF-")
            or (b"<svg" in head and head.lstrip().startswith((b"<?xml", b"<svg", b"<!--")))
        )
    raise ValueError(f"unknown output kind {kind!r}")


def _contains(outer: Path, inner: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output(
    out: str | Path,
    kind: str,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | Path | None] = (),
    resumable: bool = False,
) -> Path:
    """Check that ``out`` may be written as an output of ``kind``; return it as a :class:`Path`.

    Raises :class:`QDriftError` (one line) for a link, a missing or read-only folder, an output
    that is, holds or lies inside an input, an existing output without ``overwrite``, or an
    existing path that is not our own output of this kind (never replaced, even with ``overwrite``).
    ``resumable`` outputs (a store, a cross-validation result) may exist without ``overwrite``
    when they are our own: the command then extends them.
    """
    out = Path(out)
    if str(out) in ("", ".", "..") or out.name in ("", ".", ".."):
        raise QDriftError(f"--out {str(out) or repr('')} names a folder, not a new {_describe(kind)}; give a name")
    if out.is_symlink():
        raise QDriftError(f"{out} is a symbolic link; qdrift does not write through links, choose another --out")
    parent = out.parent
    if not parent.is_dir():
        raise QDriftError(f"the folder {parent} of --out {out} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QDriftError(f"cannot write in the folder {parent} (permission denied or read-only)")
    resolved = out.resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if _contains(source, resolved):
            raise QDriftError(f"--out {out} is, or lies inside, the input {given}; choose another --out")
        if _contains(resolved, source):
            raise QDriftError(f"--out {out} holds the input {given}; choose another --out")
    for folder in list(resolved.parents)[:8]:
        if (folder / "zarr.json").is_file():
            raise QDriftError(f"--out {out} lies inside the zarr store {folder}; choose another --out")
    if out.exists():
        if not overwrite and not resumable:
            raise QDriftError(f"{out} exists; pass --overwrite to replace it")
        if not is_own_output(out, kind):
            raise QDriftError(
                f"{out} exists and is not a {_describe(kind)}; --overwrite replaces only such "
                "outputs, choose another --out"
            )
    if kind == "figure" and out.suffix.lower() not in FIGURE_SUFFIXES:
        raise QDriftError(f"--out {out}: a figure is written as .png, .pdf or .svg, not {out.suffix or 'no suffix'!r}")
    return out


def remove_output(path: str | Path, kind: str) -> None:
    """Remove an existing output before it is written anew; refuse anything that is not ours of ``kind``."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not is_own_output(path, kind):
        raise QDriftError(
            f"{path} exists and is not a {_describe(kind)}; --overwrite replaces only such "
            "outputs, choose another --out"
        )
    _remove(path)


def remove_marked_folder(path: str | Path, schema: Any, what: str = "result") -> None:
    """Remove a results folder before it is written anew, only if its marker attribute is ``schema``."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir() or schema is None or _zarr_attrs(path).get(SCHEMA_ATTR) != schema:
        raise QDriftError(
            f"{path} exists and is not a qdrift {what}; --overwrite replaces only such outputs, choose another --out"
        )
    _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def temporary_sibling(out: Path) -> Path:
    """A hidden, unused name beside ``out`` with the same suffix (writers pick the format from it)."""
    return out.with_name(f".{out.stem}{_TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}{out.suffix}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_mode(path: Path) -> None:
    """Give a written file (or every file of a written folder) the mode a plain ``open`` would."""
    mask = _umask()
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    for f in files:
        with contextlib.suppress(OSError):
            os.chmod(f, 0o666 & ~mask)


@contextlib.contextmanager
def atomic_output(out: str | Path, kind: str) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it replaces ``out`` in one rename.

    Call :func:`check_output` first. On any error (or a kill between the write and the rename)
    the temporary is removed (a kill leaves a hidden ``.NAME.qdrift-tmp-*`` sibling at worst) and
    ``out`` is unchanged. An existing folder output is moved aside, the new one renamed in, then
    the old one removed, so no moment leaves both missing for long and none loses data.
    """
    out = Path(out)
    tmp = temporary_sibling(out)
    try:
        yield tmp
        if not tmp.exists():
            raise QDriftError(f"nothing was written to {out}")
        publish_mode(tmp)
        if out.is_symlink():
            raise QDriftError(f"{out} became a symbolic link while it was written; not replaced")
        if kind in DIR_KINDS and out.exists():
            if not is_own_output(out, kind):
                raise QDriftError(f"{out} exists and is not a {_describe(kind)}; not replaced")
            old = temporary_sibling(out)
            os.replace(out, old)
            os.replace(tmp, out)
            _remove(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        _remove(tmp)
        raise


def write_zarr_dataset(ds, out: str | Path, kind: str) -> Path:
    """Write an xarray Dataset as a zarr v3 folder atomically, with the kind's marker attribute."""
    import warnings

    out = Path(out)
    ds = ds.assign_attrs({SCHEMA_ATTR: SCHEMAS[kind]})
    with atomic_output(out, kind) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.to_zarr(tmp, mode="w-", zarr_format=3, consolidated=False)
    return out


__all__ = [
    "KINDS",
    "atomic_output",
    "check_output",
    "is_own_output",
    "publish_mode",
    "remove_marked_folder",
    "remove_output",
    "temporary_sibling",
    "write_zarr_dataset",
]
