"""The run folder: config, class list, split, metrics, plots, checkpoint and summary."""

import json
import logging
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from vtl import data  # noqa: E402

log = logging.getLogger(__name__)

THUMBNAIL_SIDE = 160
MISCLASSIFIED_SHOWN = 48
GRID_COLUMNS = 6


def configure_logging() -> None:
    """Time-stamped INFO lines for vtl's command-line tools."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    # Orbax and JAX report every checkpoint step at INFO; the run's own lines matter.
    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def start(workdir: str | Path, config) -> Path:
    """Create the run folder, save the resolved config and log to a file there too."""
    folder = Path(workdir).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(config.to_json(indent=1))
    (folder / "metrics.jsonl").write_text("")

    # One run folder logs at a time: a second run in the same process (tests, the
    # ablation) must not keep writing into the first one's log.
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "vtl_run_log", False)]:
        root.removeHandler(old)
        old.close()
    handler = logging.FileHandler(folder / "log.txt", mode="w")
    handler.vtl_run_log = True
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root.addHandler(handler)
    # The run's own INFO lines belong in its log even when no one configured logging.
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    return folder


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1) + "\n")


def append_metrics(folder: Path, row: dict) -> None:
    with open(folder / "metrics.jsonl", "a") as file:
        file.write(json.dumps(row) + "\n")


def plot_history(folder: Path, history: list[dict]) -> None:
    """loss.png and accuracy.png, train and test against the epoch."""
    epochs = [row["epoch"] for row in history]
    for metric in ("loss", "accuracy"):
        figure, axes = plt.subplots(figsize=(6, 4))
        axes.plot(epochs, [row[metric] for row in history], label="train")
        axes.plot(epochs, [row[f"test_{metric}"] for row in history], label="test")
        axes.set_xlabel("epoch")
        axes.set_ylabel(metric)
        axes.legend()
        axes.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(folder / f"{metric}.png", dpi=100)
        plt.close(figure)


def save_params(folder: Path, params) -> Path:
    """An orbax checkpoint of the tail parameters under `checkpoint/`."""
    path = folder / "checkpoint"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, params, force=True)
    checkpointer.wait_until_finished()
    return path


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int):
    """Rows are true classes, columns predicted ones."""
    matrix = np.zeros((num_classes, num_classes), int)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix.tolist()


def save_test_results(folder: Path, dataset, kept, probabilities) -> None:
    """test_predictions.json, confusion_matrix.png and misclassified.png.

    `kept` are the indices into `dataset.files` of the evaluated test images, in the
    order of the rows of `probabilities`.
    """
    files = [dataset.files[i] for i in kept]
    labels = np.asarray(dataset.labels)[kept]
    probabilities = np.asarray(probabilities)
    predicted = probabilities.argmax(-1)

    write_test_predictions(
        folder / "test_predictions.json", files, labels, probabilities, dataset.classes
    )
    matrix = confusion_matrix(labels, predicted, len(dataset.classes))
    plot_confusion_matrix(folder / "confusion_matrix.png", matrix, dataset.classes)
    plot_misclassified(
        folder / "misclassified.png",
        [dataset.root / f for f in files],
        labels,
        probabilities,
        dataset.classes,
    )


def write_test_predictions(path: Path, files, labels, probabilities, classes) -> None:
    """Each test image with its true and predicted class and every probability."""
    images = [
        {
            "file": name,
            "true": classes[int(label)],
            "predicted": classes[int(row.argmax())],
            "probabilities": [float(p) for p in row],
        }
        for name, label, row in zip(files, labels, probabilities)
    ]
    write_json(path, {"classes": list(classes), "images": images})


def plot_confusion_matrix(path: Path, matrix, classes: list[str]) -> None:
    """The confusion matrix as a heat map with the count in every cell."""
    matrix = np.asarray(matrix)
    n = len(classes)
    side = min(4 + 0.6 * n, 24)
    figure, axes = plt.subplots(figsize=(side, side * 0.85))
    axes.imshow(matrix, cmap="Blues", vmin=0, vmax=max(1, matrix.max()))

    axes.set_xticks(range(n), classes, rotation=45, ha="right", rotation_mode="anchor")
    axes.set_yticks(range(n), classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    dark = matrix.max() / 2
    for (row, column), count in np.ndenumerate(matrix):
        colour = "white" if count > dark else "black"
        axes.text(column, row, str(count), ha="center", va="center", color=colour)

    correct, total = int(matrix.trace()), int(matrix.sum())
    share = correct / total if total else 0.0
    axes.set_title(f"test set: {correct} of {total} correct ({share:.1%})")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def thumbnail(path: Path) -> np.ndarray | None:
    """A small RGB picture of an image file as it is on disk; None if unreadable."""
    try:
        rgb = data.decode(Path(path).read_bytes(), str(path))
    except (OSError, data.ImageError):
        return None
    scale = THUMBNAIL_SIDE / max(rgb.shape[:2])
    if scale < 1:
        width, height = round(rgb.shape[1] * scale), round(rgb.shape[0] * scale)
        rgb = cv2.resize(
            rgb, (max(1, width), max(1, height)), interpolation=cv2.INTER_AREA
        )
    return np.clip(rgb / 255.0, 0, 1)


def plot_misclassified(path: Path, paths, labels, probabilities, classes) -> list:
    """A grid of the misclassified images, most confident mistakes first.

    Returns the indices shown. With no mistakes the picture says so.
    """
    labels, probabilities = np.asarray(labels), np.asarray(probabilities)
    predicted = probabilities.argmax(-1)
    wrong = np.flatnonzero(predicted != labels)
    confidence = probabilities[wrong, predicted[wrong]]
    # The confident mistakes say most about the data or the model, so they lead.
    wrong = wrong[np.argsort(-confidence, kind="stable")]
    shown = wrong[:MISCLASSIFIED_SHOWN].tolist()

    if not shown:
        figure = plt.figure(figsize=(5, 1.5))
        figure.text(
            0.5,
            0.5,
            f"No misclassified test images: all {len(labels)} are correct",
            ha="center",
            va="center",
        )
        figure.savefig(path, dpi=100)
        plt.close(figure)
        return shown

    columns = min(GRID_COLUMNS, len(shown))
    rows = -(-len(shown) // columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(2.6 * columns, 3.0 * rows + 0.6), squeeze=False
    )
    for axis in axes.flat:
        axis.axis("off")
    for axis, index in zip(axes.flat, shown):
        draw_mistake(axis, paths[index], labels[index], probabilities[index], classes)

    title = f"{len(wrong)} of {len(labels)} test images misclassified"
    if len(wrong) > len(shown):
        title += f"; the {len(shown)} most confident shown"
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return shown


def draw_mistake(axis, path: Path, label: int, probabilities, classes) -> None:
    """One thumbnail titled with its name, true class and predicted class."""
    picture = thumbnail(path)
    if picture is None:
        axis.text(0.5, 0.5, "unreadable", ha="center", va="center")
    else:
        axis.imshow(picture)
    guess = int(probabilities.argmax())
    name = Path(path).name
    name = name if len(name) <= 24 else name[:21] + "..."
    axis.set_title(
        f"{name}\ntrue {classes[label]} ({probabilities[label]:.2f})\n"
        f"predicted {classes[guess]} ({probabilities[guess]:.2f})",
        fontsize=8,
    )
