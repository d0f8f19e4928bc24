"""One writer per snapshot directory, across real processes: a second live run is refused with the
directory and the other writer named; a writer killed with SIGKILL does not block its resumption."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest

import keras_snapshot
from keras_snapshot import SnapshotCallback

# A real training run in its own process: 8 steps per epoch, 3 epochs, M = 3, a backup every epoch.
# At the batch given by PAUSE_AT it writes READY and waits (bounded) for GO to appear.
WRITER = textwrap.dedent(
    """
    import os, sys, time
    import keras, numpy as np
    import keras_snapshot

    directory, backup, pause_at, ready, go = sys.argv[1:6]
    pause_at = int(pause_at)

    class Pause(keras.callbacks.Callback):
        seen = 0

        def on_train_batch_end(self, batch, logs=None):
            Pause.seen += 1
            if Pause.seen == pause_at:
                open(ready, "w").close()
                deadline = time.monotonic() + 120
                while not os.path.exists(go) and time.monotonic() < deadline:
                    time.sleep(0.05)

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
    model.compile(keras.optimizers.SGD(0.1), loss="mse")
    x, y = np.eye(8, dtype="float32"), np.ones((8, 1), "float32")
    model.fit(
        x, y, batch_size=1, epochs=3, shuffle=False, verbose=0,
        callbacks=[
            keras_snapshot.SnapshotCallback(directory, cycles=3),
            keras.callbacks.BackupAndRestore(backup),
            Pause(),
        ],
    )
    print("finished", flush=True)
    """
)


def start_writer(tmp_path, pause_at):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    ready, go = tmp_path / "ready", tmp_path / "go"
    process = subprocess.Popen(
        [
            sys.executable,
            str(script),
            str(tmp_path / "s"),
            str(tmp_path / "b"),
            str(pause_at),
            str(ready),
            str(go),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            _, err = process.communicate()
            pytest.fail(f"the writer did not reach batch {pause_at}: {err[-3000:]}")
        time.sleep(0.05)
    return process, go


def same_run_here(tmp_path, backup=True):
    """The writer's run, in this process."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")]
    )
    model.compile(keras.optimizers.SGD(0.1), loss="mse")
    x, y = np.eye(8, dtype="float32"), np.ones((8, 1), "float32")
    callbacks = [SnapshotCallback(tmp_path / "s", cycles=3)]
    if backup:
        callbacks.append(keras.callbacks.BackupAndRestore(str(tmp_path / "b")))
    model.fit(x, y, batch_size=1, epochs=3, shuffle=False, verbose=0, callbacks=callbacks)
    return model


def test_a_second_live_writer_is_refused_and_the_first_finishes_intact(tmp_path):
    process, go = start_writer(tmp_path, pause_at=10)  # paused after snapshot 1 (step 8)
    try:
        before = (tmp_path / "s" / "manifest.json").read_text()
        with pytest.raises(RuntimeError, match="being written by another run") as error:
            same_run_here(tmp_path, backup=False)
        message = str(error.value)
        assert repr(str(tmp_path / "s")) in message
        assert f"process {process.pid}" in message and "writer.py" in message
        # Refused before anything was trained or written.
        assert (tmp_path / "s" / "manifest.json").read_text() == before
    finally:
        go.touch()
        out, err = process.communicate(timeout=240)
    assert process.returncode == 0 and "finished" in out, err[-3000:]
    entries = keras_snapshot.read_manifest(tmp_path / "s")["snapshots"]
    assert [e["step"] for e in entries] == [8, 16, 24]


def test_a_sigkilled_writer_does_not_block_the_resumed_run(tmp_path):
    process, _ = start_writer(tmp_path, pause_at=12)  # mid-epoch 2, after the epoch-1 backup
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert [e["step"] for e in keras_snapshot.read_manifest(tmp_path / "s")["snapshots"]] == [8]
    model = same_run_here(tmp_path)  # resumes from the backup, in this process
    entries = keras_snapshot.read_manifest(tmp_path / "s")["snapshots"]
    assert [e["step"] for e in entries] == [8, 16, 24]
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 24
    # The lock is released at train end: a later run in another process may take the directory.
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys; fcntl.flock(os.open(sys.argv[1], os.O_RDONLY), fcntl.LOCK_EX | fcntl.LOCK_NB)",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
