"""The freeze-depth ablation script on a tiny model: one trunk pass, a full table."""

import csv
import json
import subprocess
import sys
from pathlib import Path

from tests.images import write_class_folders

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "ablate_freeze_depth.py"
EXPERIMENT = ROOT / "tests" / "tiny_experiment.py"


def test_ablation_table_has_one_row_per_cut(tmp_path):
    photos = write_class_folders(tmp_path / "photos", per_class=6)
    out = tmp_path / "ablation"
    command = [
        sys.executable,
        str(SCRIPT),
        str(EXPERIMENT),
        f"data.root={photos}",
        f"features.dir={tmp_path / 'store'}",
        "train.epochs=6",
        "--cuts",
        "block4_pool,block5_pool",
        "--seeds",
        "2",
        "--epochs",
        "block4_pool=3",
        "--out",
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "expected cost (at an assumed" in result.stdout

    rows = list(csv.DictReader(open(out / "table.csv")))
    assert [row["cut"] for row in rows] == ["block4_pool", "block5_pool"]
    # Width 1/16 VGG19: fc1 32x256, fc2 256x256, predictions 256x3, plus biases;
    # block4_pool's tail adds four 3x3 convs of 32 channels.
    assert int(rows[1]["trainable_parameters"]) == 8448 + 65792 + 771
    assert int(rows[0]["trainable_parameters"]) == 75011 + 4 * (9 * 32 * 32 + 32)
    assert [row["epochs"] for row in rows] == ["3", "6"]
    assert all(row["seeds"] == "2" for row in rows)
    for row in rows:
        assert 0.0 <= float(row["test_accuracy_mean"]) <= 1.0
        assert float(row["peak_rss_mb"]) > 100

    first = json.loads((out / "block5_pool" / "seed0" / "summary.json").read_text())
    later = json.loads((out / "block4_pool" / "seed1" / "summary.json").read_text())
    assert first["feature_store"]["status"] == "computed"
    assert later["feature_store"]["status"] == "reused"
    splits = {
        (out / cut / seed / "split.json").read_text()
        for cut in ("block4_pool", "block5_pool")
        for seed in ("seed0", "seed1")
    }
    assert len(splits) == 1
    assert (out / "plot.png").stat().st_size > 1000
    assert "± " in (out / "table.md").read_text()
