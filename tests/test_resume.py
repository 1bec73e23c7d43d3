"""A run killed during training continues from its last saved state to the same end."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

from tests.images import write_class_folders

EXPERIMENT = str(Path(__file__).with_name("tiny_experiment.py"))


def command(root, store, workdir):
    return [
        sys.executable,
        "-m",
        "vtl.train",
        EXPERIMENT,
        f"data.root={root}",
        f"features.dir={store}",
        f"workdir={workdir}",
        "train.epochs=150",
        "train.checkpoint_every=5",
        "train.checkpoint_minutes=0",
    ]


def saved_steps(workdir: Path) -> list[int]:
    state = workdir / "train_state"
    if not state.is_dir():
        return []
    return sorted(int(p.name) for p in state.iterdir() if p.name.isdigit())


def kill_after_first_save(args, workdir: Path) -> None:
    process = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while not saved_steps(workdir) and process.poll() is None:
        assert time.monotonic() < deadline, "no training state was saved"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()


def leaves(path: Path) -> dict:
    restored = ocp.StandardCheckpointer().restore(path / "checkpoint")
    return {
        f"{layer}/{name}": np.asarray(value)
        for layer, params in restored.items()
        for name, value in params.items()
    }


def test_killed_training_resumes_to_identical_parameters(tmp_path):
    root = write_class_folders(tmp_path / "photos", per_class=4)
    store = tmp_path / "store"
    whole, killed = tmp_path / "whole", tmp_path / "killed"

    subprocess.run(command(root, store, whole), check=True, capture_output=True)
    kill_after_first_save(command(root, store, killed), killed)

    assert not (killed / "summary.json").exists(), "the run finished before the kill"
    steps = saved_steps(killed)
    assert steps and steps[-1] < 150

    result = subprocess.run(
        command(root, store, killed), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming after epoch {steps[-1]}" in result.stderr

    expected, found = leaves(whole), leaves(killed)
    assert expected.keys() == found.keys()
    for name in expected:
        np.testing.assert_array_equal(found[name], expected[name], err_msg=name)

    def rows(folder):
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        return [
            {k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in lines
        ]

    assert rows(killed) == rows(whole)
    assert len(rows(killed)) == 150
    assert not (killed / "train_state").exists()
