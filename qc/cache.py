"""Per-scan cache of QC metrics, so the group step measures only new or changed scans.

An entry holds the metrics of one scan and nothing that decides: thresholds, the reference z limit, the
classifier and the reviewer's ratings are applied to the metrics afresh on every group run
(:func:`qc.curation.build_table`), so a changed threshold changes decisions without re-measuring.

The key of an entry is a SHA-256 over

* the content (:func:`pipeline.core.provenance.file_digest`) of every file the metrics read: the derivative
  itself and its companions (anatomical brain mask and N4 field; BOLD mask and confounds; the ROI series'
  JSON sidecar), each with its role, so that a mask that appears or disappears changes the key too;
* the metric code version: :data:`METRIC_CODE_VERSION` and a digest of the source of the modules and
  functions that compute the metrics (a code edit invalidates without anyone remembering to bump);
* the versions of the numerical libraries that compute them;
* per modality, the settings that change metric values: the templates the scan is compared with (their
  content) and, for anatomical scans, ``[qc] mi_bins``.

Entries live in ``OUTPUT_DIR/.qc-cache/<key>.json`` (:class:`pipeline.core.layout.OutputLayout`), each
written whole under a temporary name and renamed (:mod:`pipeline.core.atomic`). Floats are stored with
``repr`` precision and in the order they were measured, so a metric read back is the same number that was
measured and a table built from the cache is identical to one built from fresh measurements.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.atomic import atomic_write_text
from pipeline.core.layout import OutputLayout
from pipeline.core.provenance import file_digest, software_versions

__all__ = ["METRIC_CODE_VERSION", "MetricCache", "code_digest", "normalise_metrics"]

LOG = logging.getLogger(__name__)

#: Bump when a metric's definition changes in a way the source digest cannot see (data files, units).
METRIC_CODE_VERSION = 1
#: Libraries whose versions can change metric values.
_NUMERIC_DISTRIBUTIONS = ("numpy", "scipy", "nibabel")


def code_digest(objects: Iterable[object]) -> str:
    """SHA-256 of the source text of ``objects`` (modules, functions or classes), in the given order."""
    digest = hashlib.sha256()
    for obj in objects:
        try:
            text = inspect.getsource(obj)  # type: ignore[arg-type]
        except (OSError, TypeError):  # no source (frozen build): fall back to the qualified name
            text = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}"
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def normalise_metrics(metrics: Mapping[str, object]) -> dict[str, float]:
    """The metrics as plain Python floats (the one form both fresh and cached records take)."""
    return {str(k): float(v) for k, v in metrics.items()}  # type: ignore[arg-type]


def _encode(value: float) -> float | str:
    return value if math.isfinite(value) else repr(value)  # JSON has no NaN/Inf: "nan", "inf", "-inf"


def _decode(value: float | str) -> float:
    return float(value)


@dataclass
class MetricCache:
    """The metric cache of one OUTPUT_DIR for one run of the group step.

    Parameters
    ----------
    output_dir : path-like
        OUTPUT_DIR.
    contexts : mapping of str to object
        Per modality (``"T1w"``, ``"bold"``, ...), a JSON-serialisable description of whatever besides the
        scan's own files changes its metric values (code digest, settings, template digests). A modality
        without an entry is never cached.

    Attributes
    ----------
    hits, misses : int
        Scans whose metrics came from the cache / were measured in this run.
    """

    output_dir: Path
    contexts: Mapping[str, object]
    hits: int = 0
    misses: int = 0
    _used: set[str] = field(default_factory=set)
    _started: float = field(default_factory=time.time)
    _context_keys: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        versions = software_versions(_NUMERIC_DISTRIBUTIONS)
        for modality, context in self.contexts.items():
            text = json.dumps({"version": METRIC_CODE_VERSION, "software": versions, "context": context},
                              sort_keys=True, default=str)
            self._context_keys[modality] = hashlib.sha256(text.encode("utf-8")).hexdigest()

    @property
    def layout(self) -> OutputLayout:
        return OutputLayout(self.output_dir)

    def key(self, modality: str, inputs: Mapping[str, Path | None]) -> str | None:
        """Content key of a scan whose metrics read ``inputs`` (role -> file; None: absent), or None.

        None when the modality is not cached or a named file cannot be read (the measurement then raises
        the error that names it).
        """
        context = self._context_keys.get(modality)
        if context is None:
            return None
        parts = [f"modality={modality}", f"context={context}"]
        for role in sorted(inputs):
            path = inputs[role]
            if path is None or not Path(path).is_file():
                parts.append(f"{role}=absent")
                continue
            try:
                parts.append(f"{role}={file_digest(path)}")
            except OSError:
                return None
        return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()

    def get(self, key: str | None) -> dict[str, float] | None:
        """The cached metrics under ``key`` (a hit), or None (a miss: missing, unreadable or no key)."""
        if key is None:
            self.misses += 1
            return None
        path = self.layout.qc_cache_entry(key)
        try:
            entry = json.loads(path.read_text())
            metrics = {str(k): _decode(v) for k, v in entry["metrics"].items()}
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            LOG.warning("%s: unreadable QC cache entry (%s); measuring again", path, exc)
            self.misses += 1
            return None
        self.hits += 1
        self._used.add(key)
        return metrics

    def put(self, key: str | None, metrics: Mapping[str, float], source: str = "") -> None:
        """Store ``metrics`` under ``key``, whole or not at all (a failure to write is logged, never raised)."""
        if key is None:
            return
        self._used.add(key)
        entry = {"metrics": {k: _encode(float(v)) for k, v in metrics.items()}, "source": source}
        try:
            atomic_write_text(self.layout.qc_cache_entry(key), json.dumps(entry) + "\n")  # metric order kept
        except OSError as exc:
            LOG.warning("could not write the QC cache entry of %s: %s", source, exc)

    def prune(self) -> int:
        """Remove entries that this run did not use and that are older than it; return how many."""
        folder = self.layout.qc_cache_dir
        if not folder.is_dir():
            return 0
        removed = 0
        for path in folder.glob("*.json"):
            if path.stem in self._used:
                continue
            try:
                if path.stat().st_mtime < self._started:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed
