"""Input bounds: JSON and declared array sizes are checked before anything is parsed or allocated.

A file qdrift did not write may declare anything: JSON nested ten thousand levels deep (Python's
parser recurses and raises ``RecursionError``), megabytes of metadata, or a zarr array of a
billion elements that xarray would index on open. These helpers turn such inputs into a one-line
:class:`~qdrift_stats.errors.QDriftError` before the expensive step. Standard library only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from qdrift_stats.errors import QDriftError

#: Deepest JSON nesting accepted in metadata (the formats need 4 levels).
MAX_JSON_DEPTH = 64
#: Largest JSON metadata text accepted, in characters.
MAX_JSON_BYTES = 16 * 2**20
#: Largest length accepted for a store's 1-D coordinate (run, step, ...): xarray builds an index from it.
MAX_COORD_LENGTH = 10_000_000


def json_depth(text: str) -> int:
    """The deepest ``[``/``{`` nesting of a JSON text (strings skipped), without recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
        elif ch in "]}":
            depth -= 1
    return deepest


def loads_bounded(
    text: str | bytes, what: str = "metadata", max_depth: int = MAX_JSON_DEPTH, max_bytes: int = MAX_JSON_BYTES
) -> Any:
    """``json.loads`` of at most ``max_bytes`` characters nested at most ``max_depth`` deep, else a one-line error."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise QDriftError(f"{what} is not UTF-8 text") from None
    if not isinstance(text, str):
        raise QDriftError(f"{what} is not JSON text")
    if len(text) > max_bytes:
        raise QDriftError(f"{what} is {len(text)} characters of JSON; more than the {max_bytes} accepted")
    if json_depth(text) > max_depth:
        raise QDriftError(f"{what} is JSON nested deeper than {max_depth} levels; not a file qdrift wrote")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise QDriftError(f"{what} is not valid JSON") from None


def check_number(value: Any, what: str, *, low: float | None = None, low_open: bool = False) -> float:
    """A finite real number (not a bool or a string), at least ``low`` (above it if ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise QDriftError(f"{what} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise QDriftError(f"{what} must be finite, got {value!r}")
    if low is not None and (number <= low if low_open else number < low):
        raise QDriftError(f"{what} must be {'>' if low_open else '>='} {low:g}, got {value!r}")
    return number


def check_declared_arrays(arrays: dict[str, tuple[tuple[int, ...], tuple[str, ...]]], where: str) -> None:
    """Check declared zarr array shapes before xarray opens them.

    ``arrays`` maps a name to ``(shape, dimension names)``. Every dimension must have one size
    across arrays, sizes must be non-negative, and a 1-D array (xarray indexes those that name
    their own dimension) must not exceed :data:`MAX_COORD_LENGTH`.
    """
    sizes: dict[str, int] = {}
    # Two passes in name order, so the same store always gets the same message: first every
    # dimension's size agrees across arrays, then no 1-D array is implausibly long.
    for name, (shape, dims) in sorted(arrays.items()):
        if len(dims) != len(shape):
            raise QDriftError(f"{where}: variable {name!r} declares {len(shape)} dims but names {len(dims)}")
        for dim, size in zip(dims, shape):
            if not isinstance(size, int) or size < 0:
                raise QDriftError(f"{where}: variable {name!r} declares an invalid size {size!r}")
            if sizes.setdefault(dim, size) != size:
                raise QDriftError(
                    f"{where}: dimension {dim!r} has size {sizes[dim]} in one variable and {size} "
                    f"in {name!r}; re-record the store"
                )
    for name, (shape, _) in sorted(arrays.items()):
        if len(shape) == 1 and shape[0] > MAX_COORD_LENGTH:
            raise QDriftError(
                f"{where}: variable {name!r} declares {shape[0]} entries (more than "
                f"{MAX_COORD_LENGTH}); not a store qdrift wrote"
            )


def declared_arrays(folder: str | Path) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """The arrays a zarr v3 group declares, ``{name: (shape, dimension names)}``, read from its JSON only.

    Uses the root's consolidated metadata when present, else each child's ``zarr.json``; nothing
    is allocated and every JSON text is bounded (:func:`loads_bounded`).
    """
    folder = Path(folder)
    where = str(folder)

    def read(path: Path) -> dict:
        try:
            if path.stat().st_size > MAX_JSON_BYTES:
                raise QDriftError(f"{path} is larger than {MAX_JSON_BYTES} bytes of metadata; not a store qdrift wrote")
            value = loads_bounded(path.read_bytes(), what=str(path))
        except OSError:
            raise QDriftError(f"{where} is not a readable zarr v3 store (no {path.name})") from None
        if not isinstance(value, dict):
            raise QDriftError(f"{path} is not a JSON object")
        return value

    root = read(folder / "zarr.json")
    consolidated = root.get("consolidated_metadata")
    entries = consolidated.get("metadata") if isinstance(consolidated, dict) else None
    if not isinstance(entries, dict):
        entries = {}
        for child in sorted(folder.iterdir()):
            if child.is_dir() and (child / "zarr.json").is_file():
                entries[child.name] = read(child / "zarr.json")
    arrays = {}
    for name, meta in entries.items():
        if not isinstance(meta, dict) or meta.get("node_type") != "array" or "/" in name:
            continue
        shape, dims = meta.get("shape"), meta.get("dimension_names")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
            raise QDriftError(f"{where}: variable {name!r} declares an invalid shape {shape!r}")
        if dims is None:
            dims = [f"{name}_dim_{k}" for k in range(len(shape))]
        if not isinstance(dims, list) or not all(isinstance(d, str) for d in dims):
            raise QDriftError(f"{where}: variable {name!r} declares invalid dimension names {dims!r}")
        arrays[name] = (tuple(shape), tuple(dims))
    return arrays


__all__ = [
    "declared_arrays",
    "MAX_COORD_LENGTH",
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "check_declared_arrays",
    "check_number",
    "json_depth",
    "loads_bounded",
]
