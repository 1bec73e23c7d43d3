"""The feature store: fingerprint, reuse by cut, damage, dtypes, resume, devices."""

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.images import write_class_folders
from vtl import config as configs
from vtl import data, features, model, train

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = str(Path(__file__).with_name("tiny_experiment.py"))
SIZE, BATCH = 32, 8
CUTS = ["block3_pool", "block5_pool"]


def tiny_trunk(cuts=CUTS):
    """A narrow VGG16 trunk with random weights, and its apply function."""
    trunk = model.VGG("vgg16", 1 / 16, 3, stop="block5_pool", capture=tuple(cuts))
    # NumPy draws: compiling Flax's initialisers takes tens of seconds on 2 cores.
    image = jnp.zeros((1, SIZE, SIZE, 3))
    shapes = jax.eval_shape(trunk.init, jax.random.key(0), image)["params"]
    rng = np.random.default_rng(0)

    def draw(shape):
        scale = np.sqrt(2 / np.prod(shape.shape[:-1])) if len(shape.shape) > 1 else 0.1
        return (rng.standard_normal(shape.shape) * scale).astype(np.float32)

    params = jax.tree.map(draw, shapes)

    def trunk_fn(params, images):
        return trunk.apply({"params": params}, images)

    return trunk_fn, params


def photo_paths(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/*.png"))


def key_parts(paths, **changes) -> dict:
    names = [f"{p.parent.name}/{p.name}" for p in paths]
    parts = {
        "weights": {"source": "none", "seed": 0},
        "arch": "vgg16",
        "width": 1 / 16,
        "image_size": SIZE,
        "files": features.dataset_digest(paths, names),
    }
    return {**parts, **changes}


def run_store(store, paths, cuts=CUTS, dtype="float32", **changes):
    trunk_fn, params = tiny_trunk(cuts)
    parts = key_parts(paths, **changes)
    return features.features(
        store, parts, trunk_fn, params, paths, cuts, SIZE, BATCH, dtype
    )


def expected_features(paths, cuts=CUTS):
    trunk_fn, params = tiny_trunk(cuts)
    images = np.stack([data.load_image(path, SIZE) for path in paths])
    return {cut: np.asarray(out) for cut, out in trunk_fn(params, images).items()}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """20 photos: with batches of 8, three batches and the last one padded."""
    folder = tmp_path_factory.mktemp("photos")
    write_class_folders(folder, per_class=7, size=40)
    paths = photo_paths(folder)
    paths[-1].unlink()
    return folder


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory):
    """66 photos: nine batches of 8, so a pass can be stopped halfway."""
    return write_class_folders(tmp_path_factory.mktemp("many"), per_class=22, size=40)


def assert_close(actual, expected, relative=1e-6):
    """Equal up to float32 rounding, which grows with the features' scale.

    XLA sums convolutions in an order that depends on the per-device batch, so
    values near 100 may differ in their last bits (about 1e-5).
    """
    expected = np.asarray(expected)
    scale = np.abs(expected).max()
    assert scale > 1.0
    assert np.abs(np.asarray(actual) - expected).max() <= relative * scale


def finished_stores(store: Path) -> list[Path]:
    return [path for path in store.iterdir() if "." not in path.name]


def test_fingerprint_covers_every_part():
    parts = {"weights": {"sha256": "ab"}, "arch": "vgg16", "image_size": 32}
    same = dict(reversed(list(parts.items())))
    assert features.fingerprint(parts) == features.fingerprint(same)

    changed = [
        {**parts, "weights": {"sha256": "ac"}},
        {**parts, "arch": "vgg19"},
        {**parts, "image_size": 64},
        {**parts, "storage_dtype": "float16"},
    ]
    keys = {features.fingerprint(p) for p in changed} | {features.fingerprint(parts)}
    assert len(keys) == 5


def test_one_pass_writes_every_cut_compiling_once(photos, tmp_path, caplog):
    paths = photo_paths(photos)
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        arrays, valid, record = run_store(tmp_path, paths)
    compiles = [r for r in caplog.records if "Compiling jit(trunk_pass)" in r.message]
    # 20 images in batches of 8: three batches, the last padded, one compilation.
    assert len(compiles) == 1
    assert record["status"] == "computed" and record["count"] == 20
    assert "no store with this fingerprint" in record["reason"]

    expected = expected_features(paths)
    assert arrays["block3_pool"].shape == (20, 4, 4, 16)
    assert arrays["block5_pool"].shape == (20, 1, 1, 32)
    for cut in CUTS:
        assert_close(arrays[cut], expected[cut])
    assert valid.all() and record["skipped"] == 0


def test_a_subset_of_cuts_reuses_and_a_new_cut_is_added(photos, tmp_path):
    paths = photo_paths(photos)
    _, _, first = run_store(tmp_path, paths)

    _, _, again = run_store(tmp_path, paths, cuts=["block3_pool"])
    assert again["status"] == "reused"
    assert again["fingerprint"] == first["fingerprint"]

    arrays, _, added = run_store(tmp_path, paths, cuts=["block4_pool", "block5_pool"])
    assert added["status"] == "computed"
    assert "not ['block4_pool']" in added["reason"]
    assert sorted(added["cuts"]) == ["block3_pool", "block4_pool", "block5_pool"]
    assert added["checksums"]["block3_pool"] == first["checksums"]["block3_pool"]
    expected = expected_features(paths, ["block4_pool"])["block4_pool"]
    assert_close(arrays["block4_pool"], expected)
    assert len(finished_stores(tmp_path)) == 1

    _, _, everything = run_store(tmp_path, paths, cuts=["block5_pool", "block3_pool"])
    assert everything["status"] == "reused"


def test_a_changed_field_is_named_in_the_reason(photos, tmp_path):
    paths = photo_paths(photos)
    run_store(tmp_path, paths, cuts=["block5_pool"])
    _, _, record = run_store(tmp_path, paths, cuts=["block5_pool"], arch="vgg16b")
    assert record["status"] == "computed"
    assert 'differs in arch ("vgg16" -> "vgg16b")' in record["reason"]
    assert len(finished_stores(tmp_path)) == 2


@pytest.mark.parametrize("damage", ["truncate", "flip", "reshape"])
def test_a_damaged_store_is_computed_again(photos, tmp_path, damage, caplog):
    paths = photo_paths(photos)
    good, _, record = run_store(tmp_path, paths)
    good = np.array(good["block5_pool"])
    path = tmp_path / record["fingerprint"] / "block5_pool.npy"
    if damage == "truncate":
        os.truncate(path, path.stat().st_size - 64)
    elif damage == "flip":
        content = bytearray(path.read_bytes())
        content[-5] ^= 0x40
        path.write_bytes(bytes(content))
    else:
        np.save(path, np.zeros((20, 2, 2, 8), np.float32))

    with caplog.at_level(logging.WARNING):
        arrays, _, again = run_store(tmp_path, paths)
    assert again["status"] == "computed"
    assert (
        "does not match its record" in caplog.text and "block5_pool.npy" in caplog.text
    )
    np.testing.assert_array_equal(arrays["block5_pool"], good)
    _, _, third = run_store(tmp_path, paths)
    assert third["status"] == "reused"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_stores(photos, tmp_path, dtype):
    paths = photo_paths(photos)
    full, _, full_record = run_store(tmp_path, paths)
    half, _, record = run_store(tmp_path, paths, dtype=dtype)
    assert record["fingerprint"] != full_record["fingerprint"]
    assert record["key"]["storage_dtype"] == dtype

    stored = np.load(tmp_path / record["fingerprint"] / "block3_pool.npy")
    assert stored.dtype == (np.uint16 if dtype == "bfloat16" else np.float16)
    assert half["block3_pool"].dtype == jnp.dtype(dtype)

    rows = features.as_float32(half["block3_pool"])[np.array([0, 5, 19])]
    assert rows.dtype == np.float32
    reference = np.asarray(full["block3_pool"])[[0, 5, 19]]
    tolerance = {"float16": 1e-3, "bfloat16": 8e-3}[dtype]
    np.testing.assert_allclose(rows, reference, rtol=tolerance, atol=tolerance)
    assert not np.array_equal(rows, reference)


def test_unknown_dtype_is_refused(photos, tmp_path):
    with pytest.raises(ValueError, match="features.dtype: expected one of.*'fp8'"):
        run_store(tmp_path, photo_paths(photos), dtype="fp8")


def left_partial(root: Path, layout: dict, pid: int, done: int) -> Path:
    """A partial store as a pass by process `pid` leaves it after `done` images."""
    folder = root / f"{layout['fingerprint']}.partial-{pid}"
    folder.mkdir(parents=True)
    for path, dtype, shape in features.array_files(folder, layout).values():
        features.create_array(path, dtype, shape)
    progress = {**layout, "done": done, "host": socket.gethostname(), "pid": pid}
    (folder / features.PROGRESS).write_text(json.dumps(progress))
    return folder


def test_only_abandoned_partial_stores_of_the_same_layout_are_adopted(tmp_path):
    layout = features.layout_of("f" * 24, 6, 2, {"block5_pool": (1, 1, 4)}, "float16")
    finished = subprocess.Popen(["true"])
    finished.wait()
    dead = finished.pid
    running = left_partial(tmp_path, layout, os.getppid(), 4)
    other = left_partial(tmp_path, {**layout, "batch_size": 3}, dead, 3)

    folder, done, owner = features.claim_partial(tmp_path, layout)
    assert (done, owner) == (0, None)
    assert folder.name == f"{'f' * 24}.partial-{os.getpid()}"
    assert running.exists() and not other.exists()

    shutil.rmtree(folder)
    abandoned = left_partial(tmp_path, layout, dead, 4)
    folder, done, owner = features.claim_partial(tmp_path, layout)
    assert (done, owner) == (4, dead) and not abandoned.exists()
    assert np.load(folder / "block5_pool.npy").shape == (6, 1, 1, 4)


def child_pass(store: str, photos: str, mode: str) -> None:
    """The store pass in a child process.

    `mode` is "fast", "slow" (so it can be stopped midway) or "process:I:N:PORT",
    process I of N under jax.distributed with its coordinator on this machine.
    """
    if mode.startswith("process:"):
        _, index, count, port = mode.split(":")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{port}", int(count), int(index))
    load_image, loaded = data.load_image, []

    def counted_load(path, size):
        if mode == "slow":
            time.sleep(0.05)
        loaded.append(path)
        return load_image(path, size)

    data.load_image = counted_load
    _, _, record = run_store(Path(store), photo_paths(Path(photos)))
    report = {"devices": jax.device_count(), "loaded": len(loaded), "record": record}
    print(json.dumps(report))


def start_child(store, photos, mode="fast", devices=8):
    code = "import sys; from tests.test_features import child_pass; "
    code += "child_pass(*sys.argv[1:])"
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }
    return subprocess.Popen(
        [sys.executable, "-c", code, str(store), str(photos), mode],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_child(child) -> dict:
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def images_done(store: Path) -> int:
    for progress in store.glob("*.partial-*/progress.json"):
        try:
            return json.loads(progress.read_text())["done"]
        except (OSError, ValueError):
            pass
    return 0


def test_killed_pass_is_resumed_not_reused(many_photos, tmp_path):
    store = tmp_path / "store"
    child = start_child(store, many_photos, "slow")
    deadline = time.monotonic() + 240
    while images_done(store) < 2 * BATCH and child.poll() is None:
        assert time.monotonic() < deadline, "the pass never got going"
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.communicate()
    assert child.returncode == -signal.SIGKILL

    done = images_done(store)
    assert 2 * BATCH <= done < 66 and done % BATCH == 0
    assert finished_stores(store) == []
    paths = photo_paths(many_photos)

    arrays, valid, record = run_store(store, paths)
    assert record["status"] == "computed" and record["resumed_from"] == done
    assert (
        f"resumed at image {done} of 66, left by process {child.pid}"
        in (record["reason"])
    )
    assert list(store.glob("*.partial-*")) == []

    fresh, fresh_valid, _ = run_store(tmp_path / "fresh", paths)
    for cut in CUTS:
        np.testing.assert_array_equal(arrays[cut], fresh[cut])
    np.testing.assert_array_equal(valid, fresh_valid)


def test_one_and_eight_devices_agree(photos, tmp_path):
    one = start_child(tmp_path / "one", photos, devices=1)
    one = finish_child(one)
    eight = finish_child(start_child(tmp_path / "eight", photos, devices=8))
    assert (one["devices"], eight["devices"]) == (1, 8)

    for cut in CUTS:
        a = np.load(tmp_path / "one" / one["record"]["fingerprint"] / f"{cut}.npy")
        b = np.load(tmp_path / "eight" / eight["record"]["fingerprint"] / f"{cut}.npy")
        assert a.shape[0] == 20
        assert_close(b, a)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_each_load_their_share(photos, tmp_path):
    port = free_port()
    children = [
        start_child(tmp_path / f"host{i}", photos, f"process:{i}:2:{port}", devices=2)
        for i in range(2)
    ]
    reports = [finish_child(child) for child in children]
    one = finish_child(start_child(tmp_path / "one", photos, devices=4))

    # Batches of 8 rows over 4 devices, 2 per process: process 0 holds rows 0-3
    # of each batch, process 1 rows 4-7, and the last batch ends at image 20.
    assert [r["loaded"] for r in reports] == [12, 8] and one["loaded"] == 20
    assert {r["devices"] for r in reports} == {4}
    for cut in CUTS:
        whole = np.load(tmp_path / "one" / one["record"]["fingerprint"] / f"{cut}.npy")
        for i, report in enumerate(reports):
            folder = tmp_path / f"host{i}" / report["record"]["fingerprint"]
            assert_close(np.load(folder / f"{cut}.npy"), whole)


def test_train_run_with_float16_store_and_extra_cuts(photos, tmp_path):
    overrides = [
        f"data.root={photos}",
        f"features.dir={tmp_path / 'store'}",
        "features.dtype=float16",
        "features.extra_cuts=block4_pool",
        "train.epochs=3",
    ]
    first = train.main(EXPERIMENT, overrides + [f"workdir={tmp_path / 'run1'}"])
    assert first["feature_store"]["status"] == "computed"

    # A run cut at block4_pool finds it in the same store; only what
    # cached_features reads of the network is needed to ask.
    config = configs.resolve(EXPERIMENT, overrides + ["model.cut=block4_pool"])
    dataset = data.load_folder_dataset(photos, 0.25, 0)
    trunk = model.VGG("vgg19", 1 / 16, 3, stop="block4_pool")
    split = types.SimpleNamespace(
        weights_key={"source": "none", "seed": 0}, trunk=trunk, trunk_params=None
    )
    rows, valid, record = train.cached_features(config, dataset, split)
    assert record["status"] == "reused"
    assert record["fingerprint"] == first["feature_store"]["fingerprint"]
    assert rows.shape == (20, 2, 2, 32) and valid.all()
    head = rows[np.arange(4)]
    assert head.dtype == np.float32
    stored = tmp_path / "store" / record["fingerprint"] / "block4_pool.npy"
    np.testing.assert_array_equal(head, np.load(stored)[:4].astype(np.float32))


def test_extra_cuts_beyond_the_cut_are_refused():
    config = configs.defaults()
    config.model.cut = "block4_pool"
    config.features.extra_cuts = ("block3_pool", "fc1")
    # The check comes before the dataset or the network is touched.
    with pytest.raises(ValueError, match="features.extra_cuts: \\['fc1'\\] are not"):
        train.cached_features(config, None, None)
