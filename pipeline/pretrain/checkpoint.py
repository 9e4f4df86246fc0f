"""Atomic training checkpoints that load with ``torch.load(..., weights_only=True)``.

A checkpoint holds only tensors and plain Python types: model (with the EMA
target encoder and the router biases, which are buffers), optimizer,
scheduler, step, the resolved config as a dict, and per-rank loader state
and RNG states (numpy's state is stored as a tensor).
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.atomic import atomic_path
from pipeline.core.layout import RunLayout
from pipeline.core.errors import InputError

__all__ = ["checkpoint_path", "get_rng_state", "latest_checkpoint", "load_checkpoint", "prune_checkpoints", "save_checkpoint", "set_rng_state"]

_NAME = re.compile(r"^step-(\d+)\.pt$")


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """``RUN_DIR/checkpoints/step-<step>.pt``."""
    return RunLayout(run_dir).checkpoint(step)


def _steps(run_dir: str | Path) -> list[tuple[int, Path]]:
    folder = RunLayout(run_dir).checkpoints_dir
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Newest checkpoint of a run, or None."""
    steps = _steps(run_dir)
    return steps[-1][1] if steps else None


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints (``keep <= 0`` keeps all)."""
    if keep <= 0:
        return
    for _, path in _steps(run_dir)[:-keep]:
        path.unlink(missing_ok=True)


def get_rng_state() -> dict[str, Any]:
    """RNG states of torch (CPU and CUDA), numpy and ``random`` as tensors / plain types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (temp file, then rename)."""
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` onto the CPU.

    Raises
    ------
    InputError
        The file is missing or not a loadable checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated, corrupt or foreign files
        # torch's weights-only messages are a multi-line tutorial; say in one line what went wrong.
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
        foreign = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if foreign:
            raise InputError(path, f"holds {foreign.group(1)} objects, which a weights-only load refuses: "
                                   "not a neurocurate checkpoint") from None
        first = "" if not text or "Weights only load failed" in text else text.splitlines()[0][:200]
        detail = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        raise InputError(path, f"not a loadable checkpoint, truncated or corrupt ({detail})") from None
    if not isinstance(payload, dict) or "model" not in payload or "step" not in payload:
        raise InputError(path, "not a neurocurate pretraining checkpoint (missing model/step)")
    return payload
