"""Fuzzing every file the library reads: calibration stores and estimator files.

Starting from a valid small store (the testbed's ``mixture_vp_noise`` pair, 3 Euler steps, 2 runs
of batch 2) and the estimator fitted on it, each *kind* of damage below makes many malformed
variants with a seeded RNG. Every read of a variant must either succeed or refuse with
:class:`~qdrift_stats.errors.QDriftError` (the command line: exit 2 and one stderr line, no
traceback), and must leave every file but its requested output untouched (a refused command
writes no output at all).

Readers of a store: ``open_store`` + ``EmpiricalEstimator().fit``, ``qdrift fit``, ``qdrift diagnose``.
Readers of an estimator file: ``EstimatorFile.load`` + ``.corrector(scheduler)``,
``qdrift sample --estimator``.

The same machinery, with more variants per kind, is ``studies/fuzz_files.py`` (its counts table
is in ``docs/robustness.md``); this test runs a few per kind to stay under a minute.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

PAIR = "qdrift_stats.testbed:mixture_vp_noise"
SCHEDULER, STEPS, RUNS, BATCH = "euler", 3, 2, 2

# Values of the wrong type or out of range, for attributes and metadata fields.
WRONG_VALUES: list = [
    None,
    -1,
    0,
    10**12,
    -(10**12),
    1.5,
    float("nan"),
    True,
    "",
    "x",
    "3",
    "NaN",
    [],
    [1, 2],
    {},
    {"a": 1},
    '{"bad json',
]


# ---- the valid starting files ---------------------------------------------------------------


def make_base(folder: Path) -> tuple[Path, Path]:
    """Record the valid store and fit the valid estimator file in ``folder``."""
    from qdrift_stats import testbed
    from qdrift_stats.estimators import EmpiricalEstimator
    from qdrift_stats.record.lockstep import record

    folder.mkdir(parents=True, exist_ok=True)
    store, est = folder / "base.zarr", folder / "base.safetensors"
    record(
        testbed.mixture_vp_noise(),
        store,
        pair_name=PAIR,
        scheduler_name=SCHEDULER,
        steps=STEPS,
        runs=RUNS,
        batch_size=BATCH,
        seed=0,
    )
    EmpiricalEstimator().fit(store).export(est)
    return store, est


# ---- store mutators: each damages the copy at ``path`` in place and says how -------------------


def _files(path: Path, pattern: str) -> list[Path]:
    return sorted(p for p in path.rglob(pattern) if p.is_file())


def _chunks(path: Path) -> list[Path]:
    return [p for p in _files(path, "*") if "c" in p.relative_to(path).parts[1:2]]


def _pick(rng: np.random.Generator, items: list):
    return items[int(rng.integers(len(items)))]


def _root_json(path: Path) -> dict:
    return json.loads((path / "zarr.json").read_text())


def _write_json(file: Path, value: dict) -> None:
    file.write_text(json.dumps(value, allow_nan=True))


def chunk_truncated(path: Path, rng) -> str:
    f = _pick(rng, _chunks(path))
    data = f.read_bytes()
    cut = int(rng.integers(0, max(len(data), 1)))
    f.write_bytes(data[:cut])
    return f"{f.relative_to(path)} cut to {cut} of {len(data)} bytes"


def chunk_zeroed(path: Path, rng) -> str:
    f = _pick(rng, _chunks(path))
    f.write_bytes(bytes(f.stat().st_size))
    return f"{f.relative_to(path)} zeroed"


def chunk_random_bytes(path: Path, rng) -> str:
    f = _pick(rng, _chunks(path))
    data = bytearray(f.read_bytes())
    if rng.random() < 0.5 or not data:
        data = bytearray(rng.integers(0, 256, size=int(rng.integers(1, 2 * len(data) + 2)), dtype=np.uint8).tobytes())
        how = "replaced by random bytes"
    else:
        for i in rng.integers(0, len(data), size=int(rng.integers(1, 8))):
            data[i] = int(rng.integers(0, 256))
        how = "random bytes overwritten"
    f.write_bytes(bytes(data))
    return f"{f.relative_to(path)} {how}"


def chunk_deleted(path: Path, rng) -> str:
    f = _pick(rng, _chunks(path))
    f.unlink()
    return f"{f.relative_to(path)} deleted"


def metadata_deleted(path: Path, rng) -> str:
    f = _pick(rng, _files(path, "zarr.json"))
    f.unlink()
    return f"{f.relative_to(path)} deleted"


def metadata_garbage(path: Path, rng) -> str:
    f = _pick(rng, _files(path, "zarr.json"))
    data = f.read_bytes()
    choice = int(rng.integers(4))
    if choice == 0:
        f.write_bytes(data[: int(rng.integers(0, len(data)))])
        how = "truncated"
    elif choice == 1:
        f.write_bytes(rng.integers(0, 256, size=int(rng.integers(1, 200)), dtype=np.uint8).tobytes())
        how = "random bytes"
    elif choice == 2:
        f.write_text(json.dumps(_pick(rng, [[], 1, "zarr", None, [1, {"a": 2}]])))
        how = "valid JSON, not an object"
    else:
        f.write_bytes(b"")
        how = "empty"
    return f"{f.relative_to(path)} {how}"


_ARRAY_FIELDS = {
    "shape": lambda rng, old: _pick(
        rng, [[], [0] * len(old), [n + 1 for n in old], old[:-1], old + [1], [-1] * len(old), "3", None]
    ),
    "data_type": lambda rng, old: _pick(
        rng, ["int8", "float16", "bool", "complex128", "uint64", "string", "nonsense", 5, None]
    ),
    "chunk_grid": lambda rng, old: _pick(
        rng,
        [
            {"name": "regular", "configuration": {"chunk_shape": [0]}},
            {"name": "irregular"},
            {"name": "regular", "configuration": {"chunk_shape": "x"}},
            None,
        ],
    ),
    "codecs": lambda rng, old: _pick(
        rng, [[], [{"name": "gzip", "configuration": {"level": 1}}], [{"name": "nope"}], "bytes", None]
    ),
    "fill_value": lambda rng, old: _pick(rng, ["x", [1, 2], {}, None, "Infinity"]),
    "dimension_names": lambda rng, old: _pick(
        rng, [None, [], ["run"] * (len(old) if isinstance(old, list) else 1), [1, 2], "step"]
    ),
    "node_type": lambda rng, old: _pick(rng, ["group", "table", None]),
    "zarr_format": lambda rng, old: _pick(rng, [2, 4, "3", None]),
}


def array_metadata_mutated(path: Path, rng) -> str:
    """One field of one array's metadata changed, in its own zarr.json and the consolidated copy."""
    root = _root_json(path)
    entries = root["consolidated_metadata"]["metadata"]
    name = _pick(rng, sorted(entries))
    key = _pick(rng, sorted(_ARRAY_FIELDS))
    old = entries[name].get(key)
    new = _ARRAY_FIELDS[key](rng, old if key != "dimension_names" else entries[name].get("shape"))
    where = _pick(rng, ["both", "consolidated", "array"])
    if where in ("both", "consolidated"):
        entries[name][key] = new
        _write_json(path / "zarr.json", root)
    if where in ("both", "array"):
        meta = json.loads((path / name / "zarr.json").read_text())
        meta[key] = new
        _write_json(path / name / "zarr.json", meta)
    return f"{name}.{key} = {new!r} ({where})"


def _set_attr(path: Path, key: str, value, delete: bool = False) -> None:
    root = _root_json(path)
    if delete:
        root["attributes"].pop(key, None)
    else:
        root["attributes"][key] = value
    _write_json(path / "zarr.json", root)


def attribute_wrong(path: Path, rng) -> str:
    key = _pick(rng, sorted(_root_json(path)["attributes"]))
    value = _pick(rng, WRONG_VALUES)
    _set_attr(path, key, value)
    return f"attribute {key} = {value!r}"


def attribute_deleted(path: Path, rng) -> str:
    key = _pick(rng, sorted(_root_json(path)["attributes"]))
    _set_attr(path, key, None, delete=True)
    return f"attribute {key} deleted"


def schema_version_wrong(path: Path, rng) -> str:
    key = _pick(rng, ["qdrift_schema_version", "qdrift_schema"])
    value = (
        _pick(rng, [0, 2, 99, -1, "1", 1.0001, None, "qdrift-cv", "qdrift-calibration-v2", ""])
        if key.endswith("version")
        else _pick(rng, ["qdrift-cv", "qdrift-estimator", "", None, 1])
    )
    _set_attr(path, key, value)
    return f"attribute {key} = {value!r}"


def variable_missing(path: Path, rng) -> str:
    root = _root_json(path)
    entries = root["consolidated_metadata"]["metadata"]
    name = _pick(rng, sorted(entries))
    where = _pick(rng, ["both", "folder", "consolidated"])
    if where in ("both", "consolidated"):
        del entries[name]
        _write_json(path / "zarr.json", root)
    if where in ("both", "folder"):
        shutil.rmtree(path / name)
    return f"variable {name} removed ({where})"


def values_non_finite(path: Path, rng) -> str:
    """An array (or a part of one) overwritten with NaN, inf, negative or huge values."""
    import zarr

    group = zarr.open_group(path, mode="r+", use_consolidated=False)
    name = _pick(rng, sorted(k for k, _ in group.arrays()))
    array = group[name]
    if array.dtype.kind == "f":
        value = float(_pick(rng, [np.nan, np.inf, -np.inf, -1.0, 1e300, -1e300, 0.0]))
    else:
        value = int(_pick(rng, [-1, np.iinfo(array.dtype).max, np.iinfo(array.dtype).min, 0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # zarr's cast of the extreme values
        if rng.random() < 0.5 or array.ndim == 0:
            array[...] = value
            how = "all"
        else:
            index = tuple(int(rng.integers(n)) if n else 0 for n in array.shape)
            array[index] = value
            how = f"at {index}"
    return f"{name} {how} = {value!r}"


STORE_MUTATORS: dict[str, Callable] = {
    "chunk truncated": chunk_truncated,
    "chunk zeroed": chunk_zeroed,
    "chunk random bytes": chunk_random_bytes,
    "chunk deleted": chunk_deleted,
    "zarr.json deleted": metadata_deleted,
    "zarr.json garbage": metadata_garbage,
    "array metadata field wrong": array_metadata_mutated,
    "attribute wrong type/value": attribute_wrong,
    "attribute deleted": attribute_deleted,
    "schema name/version wrong": schema_version_wrong,
    "variable missing": variable_missing,
    "values NaN/inf/negative/huge": values_non_finite,
}


# ---- estimator-file mutators ------------------------------------------------------------------


def _split(data: bytes) -> tuple[int, dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8 : 8 + n]), data[8 + n :]


def _load_parts(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(str(path), framework="np") as f:
        metadata = json.loads(f.metadata()["qdrift"])
    return load_file(str(path)), metadata


def _save_parts(path: Path, tensors: dict[str, np.ndarray], metadata, raw_metadata: str | None = None) -> None:
    from safetensors.numpy import save_file

    text = raw_metadata if raw_metadata is not None else json.dumps(metadata, allow_nan=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata={"qdrift": text})


def est_truncated(path: Path, rng) -> str:
    data = path.read_bytes()
    cut = int(rng.integers(0, len(data)))
    path.write_bytes(data[:cut])
    return f"cut to {cut} of {len(data)} bytes"


def est_header_bytes_flipped(path: Path, rng) -> str:
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    spots = rng.integers(0, 8 + n, size=int(rng.integers(1, 6)))
    for i in spots:
        data[i] ^= 1 << int(rng.integers(8))
    path.write_bytes(bytes(data))
    return f"bits flipped at {sorted(int(i) for i in spots)}"


def est_header_length_wrong(path: Path, rng) -> str:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    new = int(_pick(rng, [0, 1, n - 1, n + 1, len(data), 2**32, 2**63 - 1, 2**64 - 1, 100 * 2**20]))
    path.write_bytes(struct.pack("<Q", new) + data[8:])
    return f"header length {n} -> {new}"


def est_header_json_garbage(path: Path, rng) -> str:
    data = path.read_bytes()
    n, header, body = _split(data)
    choice = int(rng.integers(4))
    if choice == 0:
        text = rng.integers(32, 127, size=n, dtype=np.uint8).tobytes()
        how = "random printable bytes"
    elif choice == 1:
        text = json.dumps(_pick(rng, [[], 1, "x", None])).encode().ljust(n)
        how = "JSON not an object"
    elif choice == 2:
        key = _pick(rng, sorted(k for k in header if k != "__metadata__"))
        header[key]["data_offsets"] = _pick(rng, [[0, 10**9], [24, 0], [-1, 24], [0, 8], "x"])
        text = json.dumps(header).encode()
        how = f"{key} data_offsets = {header[key]['data_offsets']!r}"
        path.write_bytes(struct.pack("<Q", len(text)) + text + body)
        return how
    else:
        text = data[8 : 8 + n].replace(b"{", b"[", int(rng.integers(1, 4)))
        how = "braces replaced"
    path.write_bytes(data[:8] + text[:n].ljust(n) + body)
    return how


def est_data_random_bytes(path: Path, rng) -> str:
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    start = 8 + n
    for i in rng.integers(start, len(data), size=int(rng.integers(1, 16))):
        data[i] = int(rng.integers(0, 256))
    path.write_bytes(bytes(data))
    return "tensor bytes overwritten"


def est_tensor_wrong_shape(path: Path, rng) -> str:
    tensors, metadata = _load_parts(path)
    name = _pick(rng, sorted(tensors))
    old = tensors[name]
    shape = _pick(
        rng,
        [
            (),
            (0,),
            (len(old) + 1,),
            (max(len(old) - 1, 0),),
            (len(old), 2),
            (len(old), 0),
            (1, len(old)),
            (len(old), 2, 2),
        ],
    )
    tensors[name] = np.resize(old, shape) if int(np.prod(shape)) else np.zeros(shape)
    _save_parts(path, tensors, metadata)
    return f"{name} shape {old.shape} -> {shape}"


def est_tensor_wrong_dtype(path: Path, rng) -> str:
    tensors, metadata = _load_parts(path)
    name = _pick(rng, sorted(tensors))
    dtype = _pick(rng, [np.float16, np.float32, np.int64, np.int8, np.uint8, np.bool_, np.int32])
    with np.errstate(all="ignore"):
        tensors[name] = tensors[name].astype(dtype)
    _save_parts(path, tensors, metadata)
    return f"{name} as {np.dtype(dtype).name}"


def est_values_bad(path: Path, rng) -> str:
    tensors, metadata = _load_parts(path)
    name = _pick(rng, ["variance"] * 3 + sorted(tensors))
    value = float(_pick(rng, [np.nan, np.inf, -np.inf, -1.0, -1e-300, 1e308, 0.0]))
    arr = tensors[name].copy()
    if rng.random() < 0.5:
        arr[...] = value
        how = "all"
    else:
        arr[int(rng.integers(len(arr)))] = value
        how = "one step"
    tensors[name] = arr
    _save_parts(path, tensors, metadata)
    return f"{name} {how} = {value!r}"


def _metadata_paths(metadata: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for key, value in metadata.items():
        out.append(prefix + (key,))
        if isinstance(value, dict) and key != "config":
            out.extend(_metadata_paths(value, prefix + (key,)))
    return out


def est_metadata_key_missing(path: Path, rng) -> str:
    tensors, metadata = _load_parts(path)
    keys = _pick(rng, _metadata_paths(metadata))
    holder = metadata
    for k in keys[:-1]:
        holder = holder[k]
    del holder[keys[-1]]
    _save_parts(path, tensors, metadata)
    return f"metadata {'.'.join(keys)} removed"


def est_metadata_wrong_type(path: Path, rng) -> str:
    tensors, metadata = _load_parts(path)
    keys = _pick(
        rng,
        _metadata_paths(metadata)
        + [
            ("scheduler", "config"),
            ("scheduler", "config", "num_train_timesteps"),
            ("scheduler", "config", "prediction_type"),
        ],
    )
    holder = metadata
    for k in keys[:-1]:
        holder = holder[k]
    value = _pick(rng, WRONG_VALUES)
    holder[keys[-1]] = value
    _save_parts(path, tensors, metadata)
    return f"metadata {'.'.join(keys)} = {value!r}"


def est_metadata_not_json(path: Path, rng) -> str:
    tensors, metadata = _load_parts(path)
    raw = _pick(
        rng, ["", "{", "not json", "[]", "null", "1", '{"format": "qdrift-estimator"}', json.dumps(metadata)[:-3]]
    )
    _save_parts(path, tensors, metadata, raw_metadata=raw)
    return f"metadata entry {raw[:30]!r}"


def est_tensor_missing(path: Path, rng) -> str:
    tensors, metadata = _load_parts(path)
    name = _pick(rng, sorted(tensors))
    del tensors[name]
    if not tensors:
        tensors["other"] = np.zeros(1)
    _save_parts(path, tensors, metadata)
    return f"tensor {name} removed"


EST_MUTATORS: dict[str, Callable] = {
    "file truncated": est_truncated,
    "header bytes flipped": est_header_bytes_flipped,
    "header length wrong/huge": est_header_length_wrong,
    "header JSON garbage": est_header_json_garbage,
    "tensor bytes random": est_data_random_bytes,
    "tensor wrong shape": est_tensor_wrong_shape,
    "tensor wrong dtype": est_tensor_wrong_dtype,
    "values NaN/inf/negative": est_values_bad,
    "metadata key missing": est_metadata_key_missing,
    "metadata wrong type/value": est_metadata_wrong_type,
    "metadata entry not JSON/object": est_metadata_not_json,
    "tensor missing": est_tensor_missing,
}


# ---- readers and the checks on them -----------------------------------------------------------


@dataclass
class Outcome:
    kind: str
    reader: str
    result: str  # "ok", "refused", "crash", "touched"
    detail: str = ""


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder``: size and modification time."""
    out = {}
    for p in folder.rglob("*"):
        st = p.lstat()
        out[str(p.relative_to(folder))] = (st.st_size if p.is_file() else -1, st.st_mtime_ns)
    return out


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in set(before) | set(after) if before.get(k) != after.get(k)}


def run_cli(argv: list[str]) -> tuple[int, str, str, list[str]]:
    """``qdrift ARGV`` in-process: (exit code, stdout, stderr, warnings a console would print)."""
    from qdrift_stats.cli import main

    out, err = io.StringIO(), io.StringIO()
    with (
        warnings.catch_warnings(record=True) as caught,
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        warnings.simplefilter("default")
        code = main(argv)
    shown = [
        str(w.message) for w in caught if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))
    ]
    return code, out.getvalue(), err.getvalue(), shown


def _api(fn: Callable[[], object]) -> tuple[str, str]:
    from qdrift_stats.errors import QDriftError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
    except QDriftError as exc:
        msg = str(exc)
        return ("refused", msg) if "\n" not in msg and msg else ("crash", f"QDriftError with a bad message {msg!r}")
    except Exception as exc:  # noqa: BLE001 - any other exception is what we are looking for
        return "crash", f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    return "ok", ""


def _cli(argv: list[str], output: Path | None) -> tuple[str, str]:
    code, _, err, shown = run_cli(argv)
    lines = err.strip().splitlines() if err.strip() else []
    if code == 0:
        if output is not None and not output.exists():
            return "crash", "exit 0 but no output written"
        return "ok", ""
    if code == 2 and len(lines) == 1 and lines[0].startswith("qdrift: error:") and "Traceback" not in err:
        if output is not None and output.exists():
            return "crash", f"refused but wrote {output.name}"
        if shown:
            return "crash", f"one error line plus {len(shown)} warning(s): {shown[0][:200]}"
        return "refused", lines[0]
    return "crash", f"exit {code}: {' | '.join(lines)[:300]}"


def _checked(kind: str, reader: str, folder: Path, allowed: set[str], run: Callable[[], tuple[str, str]]) -> Outcome:
    """Run one read; only a successful one may change the paths in ``allowed`` (its output)."""
    before = snapshot(folder)
    result, detail = run()
    extra = changed(before, snapshot(folder)) - (allowed if result == "ok" else set())
    if extra:
        return Outcome(kind, reader, "touched", f"changed {sorted(extra)[:5]} ({detail})")
    return Outcome(kind, reader, result, detail)


def read_store(kind: str, store: Path, folder: Path) -> list[Outcome]:
    from qdrift_stats.estimators import EmpiricalEstimator
    from qdrift_stats.record.store import open_store

    outcomes = [
        _checked(
            kind, "open_store + fit", folder, set(), lambda: _api(lambda: EmpiricalEstimator().fit(open_store(store)))
        )
    ]
    est = folder / "fitted.safetensors"
    outcomes.append(
        _checked(
            kind, "qdrift fit", folder, {est.name}, lambda: _cli(["fit", str(store), "--out", str(est), "-q"], est)
        )
    )
    if est.exists():
        est.unlink()
    outcomes.append(_checked(kind, "qdrift diagnose", folder, set(), lambda: _cli(["diagnose", str(store)], None)))
    return outcomes


def read_estimator(kind: str, est: Path, folder: Path) -> list[Outcome]:
    from qdrift_stats import testbed
    from qdrift_stats.correct.estimator_file import EstimatorFile
    from qdrift_stats.schedulers.base import make_scheduler

    def api():
        scheduler = make_scheduler(SCHEDULER, testbed.mixture_vp_noise().scheduler_config)
        scheduler.set_timesteps(STEPS)
        EstimatorFile.load(est).corrector(scheduler)

    outcomes = [_checked(kind, "EstimatorFile.load + corrector", folder, set(), lambda: _api(api))]
    out = folder / "samples.npy"
    argv = [
        "sample",
        "--pair",
        PAIR,
        "--scheduler",
        SCHEDULER,
        "--steps",
        str(STEPS),
        "--num-samples",
        "2",
        "--batch",
        "2",
        "--seed",
        "5",
        "--model",
        "q",
        "--estimator",
        str(est),
        "--out",
        str(out),
    ]
    outcomes.append(_checked(kind, "qdrift sample --estimator", folder, {out.name}, lambda: _cli(argv, out)))
    if out.exists():
        out.unlink()
    return outcomes


@dataclass
class FuzzReport:
    outcomes: list[Outcome] = field(default_factory=list)
    tried: Counter = field(default_factory=Counter)
    examples: dict[tuple[str, str], list[str]] = field(default_factory=lambda: defaultdict(list))

    def crashes(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.result in ("crash", "touched")]

    def table(self) -> dict[tuple[str, str], Counter]:
        out: dict[tuple[str, str], Counter] = defaultdict(Counter)
        for o in self.outcomes:
            out[(o.kind, o.reader)][o.result] += 1
        return out


def fuzz(
    base_store: Path,
    base_est: Path,
    work: Path,
    per_kind: int,
    seed: int = 0,
    store_kinds: list[str] | None = None,
    est_kinds: list[str] | None = None,
) -> FuzzReport:
    """``per_kind`` malformed variants of each kind, each read by every reader of its file type."""
    rng = np.random.default_rng(seed)
    report = FuzzReport()
    for group, mutators, base, reader in (
        ("store", STORE_MUTATORS, base_store, read_store),
        ("estimator", EST_MUTATORS, base_est, read_estimator),
    ):
        kinds = store_kinds if group == "store" else est_kinds
        for kind, mutate in mutators.items():
            if kinds is not None and kind not in kinds:
                continue
            for k in range(per_kind):
                folder = work / f"{group}-{len(report.tried)}-{k}"
                folder.mkdir(parents=True)
                target = folder / base.name
                (shutil.copytree if base.is_dir() else shutil.copy2)(base, target)
                how = mutate(target, rng)
                report.tried[(group, kind)] += 1
                for o in reader(kind, target, folder):
                    o.detail = f"{how}: {o.detail}"
                    report.outcomes.append(o)
                    if o.result in ("crash", "touched"):
                        report.examples[(kind, o.reader)].append(o.detail)
                shutil.rmtree(folder)
    return report


# ---- the test -----------------------------------------------------------------------------

PER_KIND = int(os.environ.get("QDRIFT_FUZZ_PER_KIND", "3"))

# Crashes found by this fuzzing in library modules this test does not own, reported to the lead:
# (readers, text of the escaping exception, what is wrong). Remove an entry when it is fixed (the
# strict test below then passes).
# Crashes found by fuzzing and not fixed yet, as (readers, error text, why). Empty: the two found
# (a damaged chunk escaping the lazy fit as RuntimeError; a data_type mismatch escaping as
# ValueError) are turned into one-line errors by qdrift_stats.record.store.storage_errors_as_qdrift.
KNOWN_LIBRARY_BUGS: list[tuple[tuple[str, ...], str, str]] = []


def is_known_bug(outcome: Outcome) -> bool:
    return outcome.result == "crash" and any(
        outcome.reader in readers and text in outcome.detail for readers, text, _ in KNOWN_LIBRARY_BUGS
    )


@pytest.fixture(scope="module")
def base_files(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("fuzz-base"))


def test_the_valid_files_are_read(base_files, tmp_path):
    store, est = base_files
    shutil.copytree(store, tmp_path / store.name)
    shutil.copy2(est, tmp_path / est.name)
    assert all(o.result == "ok" for o in read_store("valid", tmp_path / store.name, tmp_path))
    assert all(o.result == "ok" for o in read_estimator("valid", tmp_path / est.name, tmp_path))


def test_malformed_files_are_read_or_refused_in_one_line_touching_nothing(base_files, tmp_path):
    store, est = base_files
    report = fuzz(store, est, tmp_path / "work", PER_KIND, seed=20261124)
    assert set(report.tried) == {("store", k) for k in STORE_MUTATORS} | {("estimator", k) for k in EST_MUTATORS}
    assert all(n == PER_KIND for n in report.tried.values())
    results = Counter(o.result for o in report.outcomes)
    assert results["refused"] > 0  # the fuzzing reaches the checks
    problems = [f"{o.kind} / {o.reader}: {o.result}: {o.detail}" for o in report.crashes() if not is_known_bug(o)]
    assert not problems, "\n".join(problems)


def test_no_malformed_file_crashes_any_reader(base_files, tmp_path):
    store, est = base_files
    report = fuzz(
        store,
        est,
        tmp_path / "work",
        2,
        seed=7,
        store_kinds=["chunk truncated", "chunk zeroed", "array metadata field wrong"],
        est_kinds=[],
    )
    problems = [f"{o.kind} / {o.reader}: {o.result}: {o.detail}" for o in report.crashes()]
    assert not problems, "\n".join(problems)


def test_an_unreadable_store_keeps_an_existing_estimator_untouched(base_files, tmp_path):
    """A refused 'qdrift fit' does not replace or remove an existing output."""
    store, est = base_files
    bad = tmp_path / "bad.zarr"
    shutil.copytree(store, bad)
    (bad / "zarr.json").write_text("{")
    out = tmp_path / "keep.safetensors"
    shutil.copy2(est, out)
    before = snapshot(tmp_path)
    code, _, err, _ = run_cli(["fit", str(bad), "--out", str(out), "--overwrite", "-q"])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert not changed(before, snapshot(tmp_path))


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: _set_attr(p, "runs_complete", None),
        lambda p: _set_attr(p, "runs_complete", -1),
        lambda p: _set_attr(p, "runs_complete", RUNS + 1),
        lambda p: _set_attr(p, "scheduler_config", "x"),
        lambda p: _set_attr(p, "scheduler_config", "[1, 2]"),
        lambda p: variable_missing_named(p, "b"),
        lambda p: variable_missing_named(p, "seed"),
    ],
    ids=[
        "runs_complete-None",
        "runs_complete-negative",
        "runs_complete-too-many",
        "scheduler_config-not-json",
        "scheduler_config-not-object",
        "no-b",
        "no-seed",
    ],
)
def test_store_damage_found_by_fuzzing_is_refused_by_open_store(base_files, tmp_path, damage):
    from qdrift_stats.errors import QDriftError
    from qdrift_stats.record.store import open_store

    store = tmp_path / "s.zarr"
    shutil.copytree(base_files[0], store)
    damage(store)
    with pytest.raises(QDriftError):
        open_store(store)


def variable_missing_named(path: Path, name: str) -> None:
    root = _root_json(path)
    del root["consolidated_metadata"]["metadata"][name]
    _write_json(path / "zarr.json", root)
    shutil.rmtree(path / name)


@pytest.mark.parametrize(
    "name,shape", [("timesteps", (STEPS, 2)), ("b_next", (STEPS, 2, 2)), ("variance", (STEPS, 2, 2))]
)
def test_estimator_tensors_of_too_many_dims_are_refused(base_files, tmp_path, name, shape):
    from qdrift_stats.correct.estimator_file import EstimatorFile
    from qdrift_stats.errors import QDriftError

    est = tmp_path / "e.safetensors"
    tensors, metadata = _load_parts(base_files[1])
    tensors[name] = np.resize(tensors[name], shape)
    _save_parts(est, tensors, metadata)
    with pytest.raises(QDriftError, match="shape"):
        EstimatorFile.load(est)
