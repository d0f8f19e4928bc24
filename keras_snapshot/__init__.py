"""keras-snapshot: Snapshot Ensembles for Keras 3 (Huang et al., ICLR 2017, "Train 1, get M for free")."""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING

# The public names load on first use (PEP 562): `import keras_snapshot.cli` (the `keras-snapshot`
# command, `--help` included) must not import Keras and TensorFlow (~5 s and TensorFlow's log lines).
# `from keras_snapshot import build_ensemble` works as before; the imports below are for type
# checkers and mkdocstrings (griffe reads them statically).
if TYPE_CHECKING:
    from keras_snapshot.averaging import average_weights
    from keras_snapshot.calibration import fit_temperature
    from keras_snapshot.callback import SnapshotCallback
    from keras_snapshot.distillation import distill
    from keras_snapshot.ensemble import build_ensemble
    from keras_snapshot.evaluation import evaluate_ensemble
    from keras_snapshot.export import export_saved_model
    from keras_snapshot.manifest import read_manifest
    from keras_snapshot.schedule import SnapshotSchedule, snapshot_learning_rate, snapshot_steps
    from keras_snapshot.selection import greedy_selection
    from keras_snapshot.swa import StochasticWeightAveraging
    from keras_snapshot.weights import fit_ensemble_weights

__version__ = "0.2.0"

_EXPORTS = {
    "SnapshotCallback": "keras_snapshot.callback",
    "average_weights": "keras_snapshot.averaging",
    "distill": "keras_snapshot.distillation",
    "evaluate_ensemble": "keras_snapshot.evaluation",
    "fit_temperature": "keras_snapshot.calibration",
    "SnapshotSchedule": "keras_snapshot.schedule",
    "build_ensemble": "keras_snapshot.ensemble",
    "export_saved_model": "keras_snapshot.export",
    "fit_ensemble_weights": "keras_snapshot.weights",
    "read_manifest": "keras_snapshot.manifest",
    "snapshot_learning_rate": "keras_snapshot.schedule",
    "snapshot_steps": "keras_snapshot.schedule",
    "StochasticWeightAveraging": "keras_snapshot.swa",
    "greedy_selection": "keras_snapshot.selection",
}

__all__ = [
    "SnapshotCallback",
    "SnapshotSchedule",
    "StochasticWeightAveraging",
    "average_weights",
    "build_ensemble",
    "distill",
    "evaluate_ensemble",
    "export_saved_model",
    "fit_ensemble_weights",
    "fit_temperature",
    "greedy_selection",
    "read_manifest",
    "snapshot_learning_rate",
    "snapshot_steps",
]


# Classes that Keras must find by their registered names when it loads a file: SnapshotSchedule (a
# snapshot's optimizer on the in-graph path) and DistillationLoss (checkpoints written during
# `distill`). Keras cannot import them itself, so `import keras_snapshot` registers them, as before;
# only the `keras-snapshot` command (argv[0] is the script, or "-m" while `python -m
# keras_snapshot.cli` imports this package) leaves them, and Keras, to the sub-commands that need them.
_COMMAND_LINE = os.path.basename(sys.argv[0]) in ("keras-snapshot", "-m") if sys.argv else False
if "keras" in sys.modules or not _COMMAND_LINE:
    importlib.import_module("keras_snapshot.schedule")
    importlib.import_module("keras_snapshot.distillation")


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'keras_snapshot' has no attribute {name!r}")
    for registered in ("keras_snapshot.schedule", "keras_snapshot.distillation"):
        importlib.import_module(registered)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
