"""The main job on a tiny model: run folder, learning, feature reuse, errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.images import write_class_folders
from vtl import train

EXPERIMENT = str(Path(__file__).with_name("tiny_experiment.py"))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One tiny run, shared by the tests that only read its folder."""
    root = write_class_folders(tmp_path_factory.mktemp("photos"), per_class=8)
    work = tmp_path_factory.mktemp("work")
    overrides = [
        f"data.root={root}",
        f"workdir={work / 'run1'}",
        f"features.dir={work / 'store'}",
    ]
    summary = train.main(EXPERIMENT, overrides)
    return summary, work, overrides


def test_run_folder_holds_everything(first_run):
    summary, work, _ = first_run
    folder = work / "run1"
    for name in (
        "config.json",
        "metrics.jsonl",
        "loss.png",
        "accuracy.png",
        "classes.json",
        "split.json",
        "summary.json",
        "log.txt",
        "checkpoint",
    ):
        assert (folder / name).exists(), name

    assert json.loads((folder / "classes.json").read_text()) == [
        "dark",
        "grey",
        "light",
    ]
    rows = [
        json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()
    ]
    assert [row["epoch"] for row in rows] == list(range(1, 21))
    config = json.loads((folder / "config.json").read_text())
    assert config["model"]["width"] == pytest.approx(1 / 16)

    split = json.loads((folder / "split.json").read_text())
    assert len(split["test"]) == 6 and len(split["train"]) == 18
    assert not set(split["test"]) & set(split["train"])


def test_tail_learns_shades(first_run):
    summary, _, _ = first_run
    # Three shades, separable even through a random trunk; chance is 1/3.
    assert summary["test_accuracy"] == 1.0
    matrix = np.array(summary["confusion_matrix"])
    assert matrix.trace() == 6 and matrix.sum() == 6
    assert summary["feature_store"]["status"] == "computed"
    assert set(summary["stages"]) >= {"data", "weights", "trunk", "train", "total"}


def test_checkpoint_restores_trained_tail(first_run):
    _, work, _ = first_run
    restored = ocp.StandardCheckpointer().restore(work / "run1" / "checkpoint")
    assert set(restored) == {"fc1", "fc2", "predictions"}
    assert restored["predictions"]["kernel"].shape == (256, 3)


def test_second_run_reuses_features(first_run):
    summary, work, overrides = first_run
    again = train.main(
        EXPERIMENT, overrides[:1] + [f"workdir={work / 'run2'}"] + overrides[2:]
    )
    assert again["feature_store"]["status"] == "reused"
    assert (
        again["feature_store"]["fingerprint"] == summary["feature_store"]["fingerprint"]
    )
    # Same seed, same features: training is deterministic on the CPU.
    assert again["test_loss"] == summary["test_loss"]


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "vtl.train", EXPERIMENT, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_unknown_override_is_one_clear_line(tmp_path):
    result = run_cli("train.epoch=3", f"workdir={tmp_path}")
    assert result.returncode == 1
    assert "no field 'epoch'" in result.stderr and "epochs" in result.stderr
    assert "Traceback" not in result.stderr


def test_wrong_type_override_is_refused(tmp_path):
    result = run_cli("train.epochs=many", f"workdir={tmp_path}")
    assert result.returncode == 1
    assert "train.epochs: expected a number, got 'many'" in result.stderr


def test_imagenet_offline_names_the_file(tmp_path, monkeypatch):
    root = write_class_folders(tmp_path / "photos", per_class=2)
    monkeypatch.setenv("VTL_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setenv("VTL_OFFLINE", "1")
    result = run_cli(
        f"data.root={root}",
        "model.weights=imagenet",
        "model.width=1.0",
        f"workdir={tmp_path / 'run'}",
    )
    assert result.returncode == 1
    assert "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5" in result.stderr
    assert str(tmp_path / "weights") in result.stderr
    assert "Traceback" not in result.stderr


def test_two_stages_write_each_stage(first_run, tmp_path):
    _, work, overrides = first_run
    folder = tmp_path / "two"
    summary = train.main(
        EXPERIMENT,
        [
            overrides[0],
            f"workdir={folder}",
            overrides[2],
            "finetune.cut=block4_pool",
            "finetune.epochs=2",
            "finetune.batch_size=8",
            "finetune.learning_rate=1e-3",
        ],
    )
    assert set(summary["stage_results"]) == {"cached", "finetune"}
    assert summary["stage_results"]["finetune"]["cut"] == "block4_pool"
    assert summary["feature_store"]["status"] == "reused"
    for name in ("metrics.jsonl", "loss.png", "checkpoint", "stage.json"):
        assert (folder / "finetune" / name).exists(), name
    stage = json.loads((folder / "finetune" / "stage.json").read_text())
    assert stage["layers"][:3] == ["block5_conv1", "block5_conv2", "block5_conv3"]
    rows = (folder / "finetune" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2
    assert summary["stages"]["finetune"] > 0


def test_end_to_end_mode_learns(tmp_path):
    root = write_class_folders(tmp_path / "photos", per_class=8)
    summary = train.main(
        EXPERIMENT,
        [
            f"data.root={root}",
            f"workdir={tmp_path / 'run'}",
            "train.mode=end_to_end",
            "train.epochs=20",
            "augment.crop_min_scale=0.8",
        ],
    )
    assert summary["feature_store"] is None
    assert summary["stage_results"]["end_to_end"]["test_accuracy"] == 1.0


def test_missing_data_root_says_so(tmp_path):
    result = run_cli(f"workdir={tmp_path}")
    assert result.returncode == 1
    assert "data.root: not set" in result.stderr
    assert "Traceback" not in result.stderr
