"""Resumable results on disk: a zarr folder whose ``parts/`` groups are committed one by one.

A long computation (:func:`~qdrift_stats.validate.crossval.cross_validate`) writes each finished
piece (one calibration count, the strength search) as a group ``parts/NAME`` and marks it complete
(the commit point); an interrupted run is resumed by reading the complete parts back and computing
only the others. The root group's attributes hold the settings that identify the computation: a
folder written with other settings is refused, never silently mixed. :meth:`ResultParts.finish`
writes the combined Dataset at the root and marks the whole result complete.

Killed at any moment (``tests/test_cv_kill.py`` kills ``qdrift cv`` at every file write), the same
command resumes to the uninterrupted result, and a reader sees either the finished result or a
one-line refusal:

- **creation is atomic**: the root group is written with all its settings in one write, in a
  hidden sibling ``.NAME.creating`` that is then renamed into place (a leftover sibling is removed
  by the next run). Setting them afterwards (``attrs.update``) writes the root document once per
  key, and a kill in between left a folder that neither resumed nor counted as ours;
- **commit points**: a part's ``complete`` attribute, written after its arrays; the root's
  ``complete`` attribute, written after the combined result's arrays (the parts' own ``complete``
  is kept out of the attributes written with the result: xarray writes a Dataset's attributes
  before its arrays). Re-finishing a complete result first removes the mark, in one write; a
  finished result that nothing changed is not rewritten.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import xarray as xr
import zarr

from qdrift_stats.errors import QDriftError


class ResultParts:
    """A results folder (zarr v3) with committed parts; see the module docstring.

    Args:
        path: the folder.
        settings: JSON-able attributes that identify the computation (written at the root).
        identity: the keys of ``settings`` that must match an existing folder's to resume it.
        kind: what the folder holds, for messages (e.g. ``"cross-validation result"``).
        overwrite: replace an existing folder instead of resuming it.
    """

    def __init__(
        self,
        path: str | Path,
        settings: dict[str, Any],
        identity: Sequence[str],
        kind: str = "result",
        overwrite: bool = False,
    ):
        self.path = Path(path)
        self.wrote = False  # whether this object committed a part (the combined result then changes)
        if self.path.exists():
            if overwrite:  # only a folder of this kind (its schema attribute), never a foreign one
                from qdrift_stats.outputs import remove_marked_folder

                remove_marked_folder(self.path, settings.get("qdrift_schema"), kind)
            else:
                self._check_resumable(settings, identity, kind)
        if not self.path.exists():
            self._create(settings)

    def _create(self, settings: dict[str, Any]) -> None:
        """The root group with all of ``settings``, renamed into place whole (see the module docstring)."""
        temporary = self.path.with_name(f".{self.path.name}.creating")
        if temporary.exists():  # left by a run killed while it created the folder
            shutil.rmtree(temporary)
        try:
            zarr.create_group(temporary, zarr_format=3, attributes=settings)  # one write of the root document
            os.replace(temporary, self.path)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise

    def _check_resumable(self, settings: dict[str, Any], identity: Sequence[str], kind: str) -> None:
        try:
            have = dict(zarr.open_group(self.path, mode="r").attrs)
        except Exception:
            raise QDriftError(
                f"{self.path} exists and is not a qdrift {kind}; choose another --out or pass --overwrite"
            ) from None
        for key in identity:
            if str(have.get(key)) != str(settings.get(key)):
                raise QDriftError(
                    f"{self.path} was computed with {key}={have.get(key)!r}, not {settings.get(key)!r}; "
                    "choose another --out or pass --overwrite"
                )

    def done(self, name: str) -> bool:
        """Whether the part ``name`` was committed."""
        try:
            group = zarr.open_group(self.path, path=f"parts/{name}", mode="r")
        except Exception:
            return False
        return bool(group.attrs.get("complete", False))

    def read(self, name: str) -> xr.Dataset:
        """A committed part, loaded into memory."""
        return xr.open_zarr(self.path, group=f"parts/{name}", consolidated=False).load()

    def write(self, name: str, piece: xr.Dataset) -> None:
        """Write the part ``name`` and commit it (the ``complete`` mark is written last)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            piece.to_zarr(self.path, group=f"parts/{name}", mode="w", zarr_format=3, consolidated=False)
        zarr.open_group(self.path, path=f"parts/{name}", mode="r+").attrs["complete"] = True  # the commit point
        self.wrote = True

    def finish(self, result: xr.Dataset) -> None:
        """Write the combined ``result`` at the root (replacing an earlier one; the parts stay) and mark it complete.

        A complete result that this run did not change (no part written; the same variables and
        attributes) is left as it is: re-running a finished command writes nothing.
        """
        root = zarr.open_group(self.path, mode="r+")
        have = dict(root.attrs)
        if have.get("complete"):
            if not self.wrote and self._unchanged(root, result, have):
                return
            root.attrs.put({k: v for k, v in have.items() if k != "complete"})  # readers refuse from here on
        for name in list(root.array_keys()):
            del root[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result.drop_attrs(deep=False).assign_attrs(
                {k: v for k, v in result.attrs.items() if k != "complete"}
            ).to_zarr(self.path, mode="a", zarr_format=3, consolidated=False)
        zarr.open_group(self.path, mode="r+").attrs["complete"] = True  # the commit point

    @staticmethod
    def _unchanged(root: zarr.Group, result: xr.Dataset, have: dict[str, Any]) -> bool:
        if set(root.array_keys()) != {str(k) for k in result.variables}:
            return False
        return all(k in have and str(have[k]) == str(v) for k, v in result.attrs.items())


__all__ = ["ResultParts"]
