"""Prediction from a tiny trained run, and the test-set pictures a run leaves."""

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.images import write_class_folders
from vtl import predict, run, train

EXPERIMENT = str(Path(__file__).with_name("tiny_experiment.py"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run folder and the photo folder it was trained on."""
    root = write_class_folders(tmp_path_factory.mktemp("photos"), per_class=8)
    work = tmp_path_factory.mktemp("work")
    train.main(
        EXPERIMENT,
        [
            f"data.root={root}",
            f"workdir={work / 'run'}",
            f"features.dir={work / 'store'}",
        ],
    )
    return work / "run", root


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "vtl.predict", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_run_folder_keeps_test_predictions(trained):
    folder, _ = trained
    saved = json.loads((folder / "test_predictions.json").read_text())
    split = json.loads((folder / "split.json").read_text())
    summary = json.loads((folder / "summary.json").read_text())

    assert [image["file"] for image in saved["images"]] == split["test"]
    for image in saved["images"]:
        assert image["true"] == image["file"].split("/")[0]
        best = int(np.argmax(image["probabilities"]))
        assert image["predicted"] == saved["classes"][best]
        assert sum(image["probabilities"]) == pytest.approx(1, abs=1e-5)
    correct = np.mean([i["true"] == i["predicted"] for i in saved["images"]])
    assert correct == summary["test_accuracy"]
    assert (folder / "confusion_matrix.png").stat().st_size > 1000
    assert (folder / "misclassified.png").stat().st_size > 1000


def test_cli_json_equals_training_probabilities(trained):
    folder, root = trained
    saved = json.loads((folder / "test_predictions.json").read_text())
    files = [image["file"] for image in saved["images"]]

    result = run_cli(folder, *[root / f for f in files], "--format", "json")
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)

    assert output["classes"] == saved["classes"] == ["dark", "grey", "light"]
    assert output["unreadable"] == []
    assert [p["file"] for p in output["predictions"]] == [str(root / f) for f in files]
    for predicted, expected in zip(output["predictions"], saved["images"]):
        by_class = {item["class"]: item["probability"] for item in predicted["top"]}
        again = [by_class[name] for name in saved["classes"]]
        np.testing.assert_allclose(again, expected["probabilities"], rtol=0, atol=1e-5)
        assert predicted["top"][0]["class"] == expected["predicted"]


def test_text_on_a_folder_reports_unreadable_files(trained, tmp_path, capsys, caplog):
    _, root = trained
    photos = shutil.copytree(root, tmp_path / "photos")
    (photos / "dark" / ".hidden.png").write_bytes((photos / "dark/00.png").read_bytes())
    (photos / "grey" / "notes.txt").write_text("not an image")
    (photos / "grey" / "broken.jpg").write_text("not an image either")
    missing = tmp_path / "missing.png"

    code = predict.main([str(trained[0]), str(photos), str(missing), "--top-k", "2"])
    lines = capsys.readouterr().out.splitlines()

    # 24 photos walked (hidden and .txt skipped), broken.jpg and missing.png fail.
    assert code == 0
    assert len(lines) == 24
    assert not any("hidden" in line or "broken" in line for line in lines)
    for line in lines:
        name, first, p_first, second, p_second = line.split()
        assert Path(name).parent.name == first
        assert 1 >= float(p_first) >= float(p_second) >= 0
    assert "broken.jpg" in caplog.text and "missing.png" in caplog.text
    assert "2 of 26 files could not be read" in caplog.text


def test_csv_gives_one_row_per_image(trained, capsys):
    folder, root = trained
    paths = sorted((root / "light").iterdir())[:3]

    code = predict.main([str(folder), *map(str, paths), "--format", "csv"])
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))

    assert code == 0
    assert rows[0] == [
        "file",
        "class_1",
        "probability_1",
        "class_2",
        "probability_2",
        "class_3",
        "probability_3",
    ]
    assert [row[0] for row in rows[1:]] == [str(p) for p in paths]
    for row in rows[1:]:
        assert row[1] == "light"
        assert sorted(row[1::2]) == ["dark", "grey", "light"]
        assert sum(float(p) for p in row[2::2]) == pytest.approx(1, abs=1e-5)


def test_nothing_readable_exits_1(trained, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    assert predict.main([str(trained[0]), str(bad)]) == 1
    assert capsys.readouterr().out == ""


def test_missing_weights_file_is_one_clear_line(trained, tmp_path):
    folder = shutil.copytree(trained[0], tmp_path / "run")
    config = json.loads((folder / "config.json").read_text())
    config["model"]["weights"] = str(tmp_path / "moved" / "vgg19.h5")
    (folder / "config.json").write_text(json.dumps(config))

    result = run_cli(folder, trained[1])
    assert result.returncode == 1
    assert str(tmp_path / "moved" / "vgg19.h5") in result.stderr
    assert "model.weights" in result.stderr and "--weights" in result.stderr
    assert "Traceback" not in result.stderr


def test_checkpoint_that_does_not_fit_is_refused(trained, tmp_path):
    folder = shutil.copytree(trained[0], tmp_path / "run")
    classes = ["dark", "grey", "light", "white"]
    (folder / "classes.json").write_text(json.dumps(classes))

    with pytest.raises(ValueError, match="does not fit the tail") as error:
        predict.load_run(folder)
    assert "(256, 4)" in str(error.value) and "(256, 3)" in str(error.value)


def test_misclassified_grid_shows_confident_mistakes_first(trained, tmp_path):
    _, root = trained
    paths = [root / "dark/00.png", root / "grey/00.png", root / "light/00.png"]
    labels = np.array([0, 1, 2])
    probabilities = np.array(
        [[0.3, 0.6, 0.1], [0.1, 0.8, 0.1], [0.05, 0.9, 0.05]], np.float32
    )

    shown = run.plot_misclassified(
        tmp_path / "m.png", paths, labels, probabilities, ["dark", "grey", "light"]
    )
    assert shown == [2, 0]
    assert (tmp_path / "m.png").stat().st_size > 1000

    none = run.plot_misclassified(
        tmp_path / "none.png",
        paths,
        np.array([1, 1, 1]),
        probabilities,
        ["a", "b", "c"],
    )
    assert none == [] and (tmp_path / "none.png").is_file()


def test_stages_of_a_fine_tuned_run(tmp_path):
    root = write_class_folders(tmp_path / "photos", per_class=4)
    folder = tmp_path / "run"
    train.main(
        EXPERIMENT,
        [
            f"data.root={root}",
            f"workdir={folder}",
            f"features.dir={tmp_path / 'store'}",
            "train.epochs=3",
            "finetune.cut=block4_pool",
            "finetune.epochs=2",
        ],
    )

    for stage, saved_in, cut, tolerance in (
        ("first", folder, "block5_pool", 1e-5),
        # The fine-tuning stage evaluated its images rounded to 8 bits.
        ("last", folder / "finetune", "block4_pool", 1e-2),
    ):
        saved = json.loads((saved_in / "test_predictions.json").read_text())
        restored = predict.load_run(folder, stage=stage)
        paths = [root / image["file"] for image in saved["images"]]
        probabilities, valid = predict.predict(restored, paths)

        assert restored.cut == cut and restored.stage == saved_in
        assert valid.all()
        expected = [image["probabilities"] for image in saved["images"]]
        np.testing.assert_allclose(probabilities, expected, rtol=0, atol=tolerance)
