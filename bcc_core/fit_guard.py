"""Keep measurement-only data sets (BCCD) out of every fit: one check that fitting entry points call.

A data set kept for measurement (``data.SOURCE_TERMS``: BCCD, "measurement only: never train, tune
or fit thresholds on it") stops telling anything about the next lab once a threshold, a calibration or
a weight has seen it. :func:`assert_fittable` refuses such paths before anything is fitted;
:func:`assert_bundle_fittable` is the weaker check for adaptation, which may adapt on part of BCCD in a
benchmark, but never into a bundled model (``models/``).

A path is measurement-only when, after resolving symlinks or before:

* one of its folders is named after a measurement-only source (``bccd``, also ``BCCD_cropped``,
  ``bccd-2``: the name, then nothing or a separator), or
* one of its folders holds a marker file named ``MEASUREMENT_ONLY`` (put one at the root of any
  data set that must stay out of fits, whatever its folder is called).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

MARKER_FILE = "MEASUREMENT_ONLY"


class MeasurementDataError(ValueError):
    """A fitting function was given images of a data set kept for measurement only."""


def measurement_only_names() -> frozenset[str]:
    """Folder names of the measurement-only sources, from ``data.SOURCE_TERMS`` (lower case)."""
    from .data import SOURCE_TERMS

    return frozenset(k.lower() for k, v in SOURCE_TERMS.items()
                     if str(v.get("use", "")).lower().startswith("measurement only"))


def _has_marker(folder: str, memo: dict[str, bool]) -> bool:
    # Memoised per check only: a marker added later must count.
    if folder not in memo:
        memo[folder] = os.path.isfile(os.path.join(folder, MARKER_FILE))
    return memo[folder]


def _folders(p: Path) -> list[Path]:
    # The path itself counts as a folder unless it is (or looks like) a file.
    own = [] if (p.is_file() or (not p.exists() and p.suffix)) else [p]
    return own + list(p.parents)


def measurement_only_reason(path: str | os.PathLike, names: frozenset[str] | None = None,
                            _memo: dict[str, bool] | None = None) -> str | None:
    """Why ``path`` lies in a measurement-only data set, or None if it does not.

    Args:
        path: An image file or a folder.
        names: Measurement-only folder names; default :func:`measurement_only_names`.

    Returns:
        A short reason (``"folder 'bccd'"``, ``"marker file /data/x/MEASUREMENT_ONLY"``) or None.
    """
    names = measurement_only_names() if names is None else names
    memo = {} if _memo is None else _memo
    pattern = re.compile(r"^(%s)([\W_].*)?$" % "|".join(map(re.escape, sorted(names)))) if names else None
    p = Path(path)
    candidates = [p.absolute()]
    try:
        resolved = p.resolve()
        if resolved != candidates[0]:
            candidates.append(resolved)
    except OSError:
        pass
    for q in candidates:
        for folder in _folders(q):
            if pattern is not None and folder.name and pattern.match(folder.name.lower()):
                return f"folder {folder.name!r}"
            if _has_marker(str(folder), memo):
                return f"marker file {folder / MARKER_FILE}"
    return None


def assert_fittable(paths: Iterable[str | os.PathLike] | str | os.PathLike, what: str = "a fit") -> None:
    """Raise if any path lies in a measurement-only data set (BCCD).

    Call it at the top of every function that fits weights, thresholds or calibration on images.

    Args:
        paths: Image files and/or data folders the fit would read (one path is accepted too).
        what: What is being fitted, for the message (e.g. ``"the quality-gate thresholds"``).

    Raises:
        MeasurementDataError: Naming how many paths were refused, the first few and why.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    names, memo = measurement_only_names(), {}
    bad = [(str(p), r) for p in paths if (r := measurement_only_reason(p, names, memo)) is not None]
    if bad:
        first = "; ".join(f"{p} ({r})" for p, r in bad[:3])
        raise MeasurementDataError(
            f"{len(bad)} path(s) given to {what} lie in a data set kept for measurement only "
            f"({', '.join(sorted(names)) or 'marker ' + MARKER_FILE}): {first}. Such data is never used to "
            f"train, tune or fit thresholds; measure on it afterwards instead.")


def assert_bundle_fittable(paths: Iterable[str | os.PathLike], out_dir: str | os.PathLike,
                           bundled_root: str | os.PathLike) -> None:
    """Adaptation's check: measurement-only cells may be adapted on, but never into a bundled model.

    Args:
        paths: The labelled cells (files or their folder) the adaptation reads.
        out_dir: The model folder it would write.
        bundled_root: The folder of the bundled models (``models/`` of the checkout).

    Raises:
        MeasurementDataError: ``out_dir`` lies inside ``bundled_root`` and a path is measurement-only.
    """
    out, root = Path(out_dir).resolve(), Path(bundled_root).resolve()
    if out == root or root in out.parents:
        assert_fittable(paths, what=f"an adaptation written into the bundled models ({out})")
