"""keras-snapshot: Snapshot Ensembles for Keras 3 (Huang et al., ICLR 2017, "Train 1, get M for free")."""

from keras_snapshot.callback import SnapshotCallback
from keras_snapshot.ensemble import build_ensemble
from keras_snapshot.export import export_saved_model
from keras_snapshot.manifest import read_manifest
from keras_snapshot.schedule import SnapshotSchedule, snapshot_learning_rate, snapshot_steps
from keras_snapshot.weights import fit_ensemble_weights

__version__ = "0.1.0"

__all__ = [
    "SnapshotCallback",
    "SnapshotSchedule",
    "build_ensemble",
    "export_saved_model",
    "fit_ensemble_weights",
    "read_manifest",
    "snapshot_learning_rate",
    "snapshot_steps",
]
