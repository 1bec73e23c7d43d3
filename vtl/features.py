"""The feature store: trunk outputs computed once, kept on disk, keyed by a fingerprint.

A store is a folder named by the fingerprint of everything that changes the features.
It is written batch by batch into preallocated `.npy` files under a temporary name and
renamed into place only when complete, so a folder under its final name is finished.
"""

import concurrent.futures
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from vtl import data

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
RECORD = "record.json"


def file_digest(path: Path) -> str:
    """SHA-256 of a file's contents."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(parts: dict) -> str:
    """A short, stable key for a dict of everything that changes the features."""
    canonical = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]


def dataset_digest(paths: list[Path], names: list[str]) -> str:
    """One digest over the exact file list and every file's contents."""
    digest = hashlib.sha256()
    for path, name in zip(paths, names):
        try:
            content = file_digest(path)
        except OSError as error:
            content = f"unreadable: {error.strerror}"
        digest.update(f"{name}\0{content}\n".encode())
    return digest.hexdigest()


def mesh() -> jax.sharding.Mesh:
    """A one-axis mesh, `data`, over every device of every host."""
    return jax.make_mesh((jax.device_count(),), ("data",))


def batch_loader(paths: list[Path], size: int, batch_size: int):
    """Yield (images, valid) batches of exactly `batch_size`, decoding one batch ahead.

    Files that cannot be decoded are named in the log and come back as zeros with
    valid=False; the last batch is padded the same way, so every batch has one shape.
    """

    def load(path):
        try:
            return data.load_image(path, size)
        except data.ImageError as error:
            log.warning("skipped: %s", error)
            return None

    def load_batch(start):
        images = np.zeros((batch_size, size, size, 3), np.float32)
        valid = np.zeros(batch_size, bool)
        for i, image in enumerate(pool.map(load, paths[start : start + batch_size])):
            if image is not None:
                images[i], valid[i] = image, True
        return images, valid

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        starts = range(0, len(paths), batch_size)
        with concurrent.futures.ThreadPoolExecutor(1) as ahead:
            pending = [ahead.submit(load_batch, s) for s in starts[:1]]
            for next_start in list(starts[1:]) + [None]:
                if next_start is not None:
                    pending.append(ahead.submit(load_batch, next_start))
                yield pending.pop(0).result()


def compile_trunk(apply_fn, params, batch_size: int):
    """Jit the trunk with the batch sharded over the `data` axis, params replicated."""
    devices = mesh()
    replicated = NamedSharding(devices, PartitionSpec())
    sharded = NamedSharding(devices, PartitionSpec("data"))
    params = jax.device_put(params, replicated)
    step = jax.jit(apply_fn, in_shardings=(replicated, sharded))
    return step, params, sharded


def compute(folder: Path, apply_fn, params, paths, cuts, size: int, batch_size: int):
    """Run the trunk over `paths` and stream its outputs at `cuts` into `folder`."""
    n_devices = jax.device_count()
    batch_size = -(-batch_size // n_devices) * n_devices
    step, params, sharded = compile_trunk(apply_fn, params, batch_size)

    example = jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32)
    shapes = jax.eval_shape(apply_fn, params, example)
    outputs = {
        cut: np.lib.format.open_memmap(
            folder / f"{cut}.npy",
            "w+",
            np.float32,
            (len(paths),) + shapes[cut].shape[1:],
        )
        for cut in cuts
    }
    valid = np.zeros(len(paths), bool)

    progress = tqdm(total=len(paths), desc="trunk pass", unit="img", smoothing=0.1)
    for start, (images, ok) in zip(
        range(0, len(paths), batch_size), batch_loader(paths, size, batch_size)
    ):
        result = step(params, jax.device_put(images, sharded))
        count = min(batch_size, len(paths) - start)
        for cut in cuts:
            outputs[cut][start : start + count] = np.asarray(result[cut])[:count]
        valid[start : start + count] = ok[:count]
        progress.update(count)
    progress.close()

    for array in outputs.values():
        array.flush()
    np.save(folder / "valid.npy", valid)
    return {cut: list(shapes[cut].shape[1:]) for cut in cuts}, int((~valid).sum())


def load(folder: Path, cuts):
    """Open a finished store read-only; None when it is absent or does not match."""
    try:
        record = json.loads((folder / RECORD).read_text())
        valid = np.load(folder / "valid.npy")
        arrays = {cut: np.load(folder / f"{cut}.npy", mmap_mode="r") for cut in cuts}
    except (OSError, ValueError, KeyError) as error:
        if folder.exists():
            log.warning(
                "feature store %s is unreadable (%s); computing it again", folder, error
            )
        return None

    shapes_match = all(
        list(arrays[cut].shape) == [record["count"]] + record["shapes"][cut]
        for cut in cuts
    )
    if not shapes_match or len(valid) != record["count"]:
        log.warning(
            "feature store %s does not match its record; computing it again", folder
        )
        return None
    return arrays, valid, record


def features(
    store_root: Path,
    key_parts: dict,
    apply_fn,
    params,
    paths,
    cuts,
    size: int,
    batch_size: int,
):
    """Features at `cuts` for `paths`: reused from the store, or computed and stored.

    Returns (arrays by cut, valid mask, record), where the record says whether the
    store was "reused" or "computed" and holds the fingerprint.
    """
    key = fingerprint(key_parts)
    folder = Path(store_root).expanduser() / key
    found = load(folder, cuts)
    if found is not None:
        log.info("features: reused store %s (same fingerprint)", folder)
        arrays, valid, record = found
        return arrays, valid, {**record, "status": "reused"}

    log.info(
        "features: computing store %s (no finished store has this fingerprint)", folder
    )
    partial = folder.with_name(f"{key}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)

    started = time.perf_counter()
    shapes, skipped = compute(partial, apply_fn, params, paths, cuts, size, batch_size)
    record = {
        "fingerprint": key,
        "count": len(paths),
        "shapes": shapes,
        "skipped": skipped,
        "seconds": round(time.perf_counter() - started, 2),
        "key": key_parts,
    }
    (partial / RECORD).write_text(json.dumps(record, indent=1))

    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    arrays, valid, record = load(folder, cuts)
    return arrays, valid, {**record, "status": "computed"}
