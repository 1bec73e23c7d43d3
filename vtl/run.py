"""The run folder: config, class list, split, metrics, plots, checkpoint and summary."""

import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

log = logging.getLogger(__name__)


def start(workdir: str | Path, config) -> Path:
    """Create the run folder, save the resolved config and log to a file there too."""
    folder = Path(workdir).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(config.to_json_best_effort(indent=1))
    (folder / "metrics.jsonl").write_text("")

    handler = logging.FileHandler(folder / "log.txt", mode="w")
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.getLogger().addHandler(handler)
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
