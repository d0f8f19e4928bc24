"""One snapshot training run for the resume, fault and distribution tests.

Runs in-process (`run(config)`) or as a subprocess (`python tests/workers/train_worker.py CONFIG.json`),
so that a test can SIGKILL it, hand it an OS-level file size limit, or start it with several devices
or as one worker of a multi-worker job. The backend is `KERAS_BACKEND`, inherited from the test.

The model makes the applied learning rate readable from the weights: y = x . w (a Dense(N, 1) kernel
without bias, zeros to start), inputs one-hot, plain SGD and the loss mean(y_pred). Whatever the batch
size, replica count or data order, every step lowers the kernel's sum by exactly the step's learning
rate. So the recorder gets each step's rate as the drop of the kernel's sum, and a snapshot taken at
global step g has kernel sum -(rate(1) + ... + rate(g)).

Config keys (JSON):
    directory, cycles, steps (per epoch), epochs, alpha0, batch (global, default 1),
    path ("callback": float LR set by the callback; "in_graph": SnapshotSchedule),
    backup (BackupAndRestore directory or null), save_freq ("epoch" or an int),
    order (the callback list by names: "backup", "snapshot", "record", "kill", "vanish", "fsize"),
    kill ({"step": g, "hook": "batch_begin" | "batch_end" | "epoch_end" | "write" | "record",
           "how": "sigkill" | "raise"}),
    record (JSON-lines file: one {"it", "rate"} per step, and a {"start": it} per run),
    result (JSON file written at the end), distribution (null | "mirrored" | "mwms" | "data_parallel"),
    vanish_at / fsize_at ({"step": g, ...}: the directory is moved away / RLIMIT_FSIZE is lowered there).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time


class Interrupted(RuntimeError):
    """Raised by the kill callback in "raise" mode: an in-process interruption of fit."""


def _die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _set_up_devices(config):
    """What must happen before Keras (and the backend) is imported."""
    distribution = config.get("distribution")
    if distribution == "data_parallel":
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
        ).strip()
    if distribution == "mirrored":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)


_INITIALIZED = []


def _strategy(config):
    distribution = config.get("distribution")
    if distribution == "mirrored":
        import tensorflow as tf

        return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    if distribution == "mwms":
        import tensorflow as tf

        return tf.distribute.MultiWorkerMirroredStrategy()
    if distribution in ("data_parallel", "jax_multiprocess"):
        import keras

        if distribution == "jax_multiprocess" and not _INITIALIZED:  # one process per worker
            _INITIALIZED.append(True)
            keras.distribution.initialize(
                config["coordinator"], num_processes=config["processes"], process_id=config["process_id"]
            )
        devices = keras.distribution.list_devices("cpu")  # every process's devices
        # Each process passes its own share of the data (see run): no auto-sharding of numpy arrays.
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(
                devices=devices, auto_shard_dataset=distribution == "data_parallel"
            )
        )
    return None


def per_sample_prediction(y_true, y_pred):
    """Per-sample loss y_pred: Keras averages it over the (global) batch."""
    return y_pred[:, 0]


def build_model(config):
    import keras

    import keras_snapshot

    features = config["steps"] * config.get("batch", 1)
    if config.get("path", "callback") == "in_graph":
        total = config["steps"] * config["epochs"]
        rate = keras_snapshot.SnapshotSchedule(config["alpha0"], total_steps=total, cycles=config["cycles"])
    else:
        rate = 0.5  # must be overridden by the callback
    model = keras.Sequential(
        [keras.Input((features,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")]
    )
    model.compile(optimizer=keras.optimizers.SGD(rate), loss=per_sample_prediction)
    return model


def make_callbacks(config):
    import keras
    import numpy as np

    import keras_snapshot

    kill = config.get("kill") or {}

    def log_write(kind, name):
        """Every file write of the snapshot callback, with the writing process (config["writes"])."""
        if config.get("writes"):
            with open(config["writes"], "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"kind": kind, "name": os.path.basename(name), "pid": os.getpid()}))
                handle.write("\n")

    def stop(where):
        if kill.get("how", "sigkill") == "raise":
            raise Interrupted(f"interrupted at {where}")
        _die()

    class Snapshots(keras_snapshot.SnapshotCallback):
        """The package's callback; the "write" and "record" kills strike inside its file writes."""

        def _save_model(self, path):
            log_write("snapshot", path)
            super()._save_model(path)
            if kill.get("hook") == "write" and self._step == kill["step"]:
                # Killed mid-write: a partial temporary file is left behind.
                size = os.path.getsize(path)
                with open(path, "r+b") as handle:
                    handle.truncate(size // 2)
                stop("write")

        def _record(self, cycle, step, epoch, logs, file, write=True):
            if write and kill.get("hook") == "record" and step == kill["step"]:
                stop("record")  # the snapshot file is in place, the manifest not yet updated
            if write:
                log_write("manifest", file)
            super()._record(cycle, step, epoch, logs, file, write)

    def iterations(model):
        return int(keras.ops.convert_to_numpy(model.optimizer.iterations))

    class Recorder(keras.callbacks.Callback):
        """Each step's learning rate, from the kernel (read through `self.model`: JAX syncs there)."""

        def __init__(self, path):
            super().__init__()
            self.handle = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115
            self.previous = None

        def kernel_sum(self):
            return float(np.sum(np.asarray(self.model.get_weights()[0], dtype="float64")))

        def write(self, record):
            if self.handle:
                self.handle.write(json.dumps(record) + "\n")
                self.handle.flush()

        def on_train_batch_begin(self, batch, logs=None):
            if self.previous is None:  # after every on_train_begin, so after any restore
                self.previous = self.kernel_sum()
                self.write({"start": iterations(self.model), "sum": self.previous, "pid": os.getpid()})

        def on_train_batch_end(self, batch, logs=None):
            current = self.kernel_sum()
            self.write({"it": iterations(self.model), "rate": self.previous - current})
            self.previous = current

        def on_train_end(self, logs=None):
            if self.previous is None:  # no batch ran: the restore put the run at its end
                self.write({"start": iterations(self.model), "sum": self.kernel_sum(), "pid": os.getpid()})
            self.write({"end": iterations(self.model)})
            if self.handle:
                self.handle.close()

    class Kill(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if kill.get("hook") == "batch_begin" and iterations(self.model) + 1 == kill["step"]:
                stop("batch_begin")

        def on_train_batch_end(self, batch, logs=None):
            if kill.get("hook") == "batch_end" and iterations(self.model) == kill["step"]:
                stop("batch_end")

        def on_epoch_end(self, epoch, logs=None):
            if kill.get("hook") == "epoch_end" and iterations(self.model) == kill["step"]:
                stop("epoch_end")

    class Vanish(keras.callbacks.Callback):
        """Moves the snapshot directory away at a step: the directory vanishes under the callback."""

        def on_train_batch_end(self, batch, logs=None):
            spec = config.get("vanish_at")
            if spec and iterations(self.model) == spec["step"]:
                os.rename(config["directory"], spec["to"])

    class FileSizeLimit(keras.callbacks.Callback):
        """Lowers RLIMIT_FSIZE at a step: from then on no file may grow past the limit (a full disk)."""

        def on_train_batch_end(self, batch, logs=None):
            spec = config.get("fsize_at")
            if spec and iterations(self.model) == spec["step"]:
                import resource

                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes then fail with EFBIG
                resource.setrlimit(resource.RLIMIT_FSIZE, (spec["bytes"], resource.RLIM_INFINITY))

    by_name = {
        "snapshot": lambda: Snapshots(
            config["directory"],
            cycles=config["cycles"],
            initial_learning_rate=None if config.get("path") == "in_graph" else config["alpha0"],
        ),
        "backup": lambda: keras.callbacks.BackupAndRestore(
            config["backup"], save_freq=config.get("save_freq", "epoch")
        ),
        "record": lambda: Recorder(config.get("record")),
        "kill": Kill,
        "vanish": Vanish,
        "fsize": FileSizeLimit,
    }
    order = config.get("order") or ["backup", "snapshot", "record", "kill"]
    if not config.get("backup"):
        order = [name for name in order if name != "backup"]
    return [by_name[name]() for name in order]


def start_async_killer(config):
    """A thread that SIGKILLs this process as soon as a snapshot's temporary file appears."""
    spec = config.get("kill") or {}
    if spec.get("hook") != "write_async":
        return

    def watch():
        directory = config["directory"]
        while True:
            try:
                names = os.listdir(directory)
            except OSError:
                names = []
            if any(name.startswith(".tmp-") and name.endswith(".keras") for name in names):
                time.sleep(spec.get("delay", 0.0))
                _die()
            time.sleep(0.0005)

    threading.Thread(target=watch, daemon=True).start()


def run(config):
    """Trains as configured; returns a summary dict (also written to config["result"])."""
    import keras
    import numpy as np

    strategy = _strategy(config)
    if strategy is not None:
        with strategy.scope():
            model = build_model(config)
    else:
        model = build_model(config)
    batch = config.get("batch", 1)
    features = config["steps"] * batch
    x, y = np.eye(features, dtype="float32"), np.zeros((features, 1), "float32")
    if config.get("distribution") == "jax_multiprocess":
        # Keras's JAX trainer takes each process's share of the global batch from that process.
        count, index = config["processes"], config["process_id"]
        x, y, batch = x[index::count], y[index::count], batch // count
    callbacks = make_callbacks(config)
    start_async_killer(config)
    model.fit(
        x,
        y,
        batch_size=batch,
        epochs=config["epochs"],
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )
    snapshot = next(c for c in callbacks if isinstance(c, keras.callbacks.Callback) and hasattr(c, "cycles"))
    ensemble = None
    if config.get("ensemble") and snapshot._chief:
        from keras_snapshot.ensemble import build_ensemble

        # Built and run in this process, under its distribution: the mean of the members' outputs.
        ensemble = build_ensemble(config["directory"]).predict(x, batch_size=batch, verbose=0).tolist()
    result = {
        "iterations": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "chief": bool(getattr(snapshot, "_chief", True)),
        "replicas": int(getattr(strategy, "num_replicas_in_sync", 1)) if strategy is not None else 1,
        "devices": len(keras.distribution.list_devices()) if keras.backend.backend() == "jax" else None,
        "pid": os.getpid(),
        "ensemble": ensemble,
    }
    if config.get("result"):
        with open(config["result"], "w", encoding="utf-8") as handle:
            json.dump(result, handle)
    return result


def main(argv):
    if os.environ.get("WORKER_FULL_TRACEBACK"):
        import keras

        keras.config.disable_traceback_filtering()
    with open(argv[1], encoding="utf-8") as handle:
        configs = json.load(handle)
    configs = configs if isinstance(configs, list) else [configs]  # several runs share one start-up
    _set_up_devices(configs[0])
    for config in configs:
        run(config)


if __name__ == "__main__":
    main(sys.argv)
