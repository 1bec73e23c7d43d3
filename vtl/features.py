"""The feature store: trunk outputs computed once, kept on disk, keyed by a fingerprint.

One folder per fingerprint of everything but the cut, one `.npy` per cut inside; a
request for cuts the folder lacks computes only those and adds them to it.
"""

import concurrent.futures
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from vtl import data, xla

log = logging.getLogger(__name__)

# Version 2: cuts left the fingerprint (one file per cut), storage dtypes, checksums.
FORMAT_VERSION = 2
RECORD = "record.json"
PROGRESS = "progress.json"
VALID = "valid"
STORAGE_DTYPES = ("float32", "float16", "bfloat16")
CHUNK_BYTES = 1 << 22


class StoreError(ValueError):
    """A store or partial store whose files do not match what it says it holds."""


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


def file_dtype(name: str) -> np.dtype:
    """How a storage dtype is written in `.npy`: bfloat16 as its raw uint16 bits."""
    if name not in STORAGE_DTYPES:
        raise ValueError(
            f"features.dtype: expected one of {list(STORAGE_DTYPES)}, got {name!r}"
        )
    # NumPy has no bfloat16; ml_dtypes' one is written as an opaque "V2" that
    # np.load cannot read back, so the bits go to disk as uint16.
    return np.dtype(np.uint16) if name == "bfloat16" else np.dtype(name)


def describe_miss(root: Path, key_parts: dict) -> str:
    """Why no store fits: the nearest other store and the fields where it differs."""
    wanted = {"format": FORMAT_VERSION, **key_parts}
    siblings = []
    for path in sorted(root.glob(f"*/{RECORD}")):
        if "." in path.parent.name:
            continue
        try:
            record = json.loads(path.read_text())
            other = {"format": record.get("format"), **record["key"]}
        except (OSError, ValueError, KeyError, TypeError):
            continue
        fields = sorted(set(wanted) | set(other))
        differing = [f for f in fields if wanted.get(f) != other.get(f)]
        siblings.append((len(differing), path.parent.name, other, differing))

    if not siblings:
        return f"no store with this fingerprint in {root}"
    _, name, other, differing = min(siblings)
    changes = ", ".join(
        f"{f} ({brief(other.get(f))} -> {brief(wanted.get(f))})" for f in differing
    )
    return (
        f"no store with this fingerprint; the nearest of the {len(siblings)} in "
        f"{root}, {name}, differs in {changes}"
    )


def brief(value) -> str:
    """A value of a fingerprint field, short enough for one log line."""
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 28 else text[:24] + "..."


def mesh() -> jax.sharding.Mesh:
    """A one-axis mesh, `data`, over every device of every host."""
    return jax.make_mesh((jax.device_count(),), ("data",))


def batch_loader(paths: list[Path], size: int, batch_size: int, rows=None, first=0):
    """Yield (images, valid) batches of exactly `batch_size`, decoding one batch ahead.

    Files that cannot be decoded are named in the log and come back as zeros with
    valid=False; the last batch is padded the same way, so every batch has one shape.
    `rows=(lo, hi)` loads only those rows of each batch (this host's share), and
    batches start at image `first`.
    """
    lo, hi = rows or (0, batch_size)

    def load(path):
        try:
            return data.load_image(path, size)
        except data.ImageError as error:
            log.warning("skipped: %s", error)
            return None

    def load_batch(start):
        images = np.zeros((hi - lo, size, size, 3), np.float32)
        valid = np.zeros(hi - lo, bool)
        chunk = paths[start + lo : min(start + hi, start + batch_size)]
        for i, image in enumerate(pool.map(load, chunk)):
            if image is not None:
                images[i], valid[i] = image, True
        return images, valid

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        starts = range(first, len(paths), batch_size)
        with concurrent.futures.ThreadPoolExecutor(1) as ahead:
            pending = [ahead.submit(load_batch, s) for s in starts[:1]]
            for next_start in list(starts[1:]) + [None]:
                if next_start is not None:
                    pending.append(ahead.submit(load_batch, next_start))
                yield pending.pop(0).result()


def compile_trunk(apply_fn, params, batch_size: int | None = None):
    """Jit the trunk with the batch sharded over the `data` axis, params replicated."""
    devices = mesh()
    replicated = NamedSharding(devices, PartitionSpec())
    sharded = NamedSharding(devices, PartitionSpec("data"))
    params = jax.device_put(params, replicated)
    step = jax.jit(
        apply_fn,
        in_shardings=(replicated, sharded),
        compiler_options=xla.cpu_options("trunk"),
    )
    return step, params, sharded


def compile_pass(apply_fn, params, cuts, dtype: str):
    """The trunk pass step: outputs at `cuts`, cast on the device to `dtype`."""

    def trunk_pass(params, images):
        outputs = apply_fn(params, images)
        return {cut: outputs[cut].astype(dtype) for cut in cuts}

    return compile_trunk(trunk_pass, params)


def local_rows(sharding, batch_size: int) -> tuple[int, int]:
    """The rows [lo, hi) of every global batch whose shards live on this process."""
    indices = sharding.addressable_devices_indices_map((batch_size,))
    los = [index[0].start or 0 for index in indices.values()]
    his = [
        batch_size if index[0].stop is None else index[0].stop
        for index in indices.values()
    ]
    return min(los), max(his)


def global_batch(sharding, local, batch_size: int):
    """This process's rows of a batch, made into one array over every host's devices."""
    shape = (batch_size,) + local.shape[1:]
    return jax.make_array_from_process_local_data(sharding, local, shape)


def to_host(array) -> np.ndarray:
    """A global array as one NumPy array on this host, whole."""
    if jax.process_count() == 1:
        return np.asarray(array)
    return multihost_utils.process_allgather(array, tiled=True)


def create_array(path: Path, dtype: np.dtype, shape: tuple) -> None:
    """A `.npy` file of `shape`, zero-filled to full size, to be written in place."""
    header = {
        "descr": np.lib.format.dtype_to_descr(dtype),
        "fortran_order": False,
        "shape": tuple(shape),
    }
    with open(path, "wb") as file:
        np.lib.format.write_array_header_1_0(file, header)
        file.truncate(file.tell() + int(np.prod(shape)) * dtype.itemsize)


def open_array(path: Path, dtype: np.dtype, shape: tuple):
    """Memory-map a `.npy` read-only after checking its dtype, shape and length."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise StoreError(f"{path}: cannot be read ({error})") from None
    if array.dtype != dtype or array.shape != tuple(shape):
        raise StoreError(
            f"{path}: expected {dtype} {list(shape)}, found "
            f"{array.dtype} {list(array.shape)}"
        )
    size, expected = path.stat().st_size, array.offset + array.nbytes
    if size != expected:
        raise StoreError(f"{path}: expected {expected} bytes, found {size}")
    return array


def data_offset(path: Path) -> int:
    """Where the array data of a `.npy` file starts, after its header."""
    return np.load(path, mmap_mode="r").offset


def checksum(path: Path) -> str:
    """CRC-32 of a `.npy` file's data, read in chunks so memory stays flat."""
    crc = 0
    with open(path, "rb") as file:
        file.seek(data_offset(path))
        for chunk in iter(lambda: file.read(CHUNK_BYTES), b""):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def layout_of(key: str, count: int, batch_size: int, shapes: dict, dtype: str) -> dict:
    """What a pass writes: a partial store can be resumed only by the same layout."""
    return {
        "fingerprint": key,
        "count": count,
        "batch_size": batch_size,
        "dtype": dtype,
        "cuts": {cut: list(shape) for cut, shape in shapes.items()},
    }


def array_files(folder: Path, layout: dict) -> dict:
    """Each file of a layout: name -> (path, dtype on disk, shape)."""
    count = layout["count"]
    files = {
        cut: (folder / f"{cut}.npy", file_dtype(layout["dtype"]), (count, *shape))
        for cut, shape in layout["cuts"].items()
    }
    files[VALID] = (folder / f"{VALID}.npy", np.dtype(bool), (count,))
    return files


def write_progress(folder: Path, layout: dict, done: int) -> None:
    """Record that the first `done` images are on disk, atomically."""
    progress = {**layout, "done": done, "host": socket.gethostname()}
    progress["pid"] = os.getpid()
    temporary = folder / f"{PROGRESS}.tmp"
    temporary.write_text(json.dumps(progress))
    os.replace(temporary, folder / PROGRESS)


def owner_alive(pid: int) -> bool:
    """Whether process `pid` on this host still runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def claim_partial(root: Path, layout: dict):
    """A partial folder for this process: an abandoned one of the same layout, or new.

    Returns (folder, images already done, pid of the process that left it or None).
    """
    key = layout["fingerprint"]
    mine = root / f"{key}.partial-{os.getpid()}"
    for candidate in sorted(root.glob(f"{key}.partial-*")):
        try:
            progress = json.loads((candidate / PROGRESS).read_text())
        except (OSError, ValueError):
            progress = {}
        owner = progress.get("pid")
        here = progress.get("host", socket.gethostname()) == socket.gethostname()
        if candidate != mine and (not here or owner is None or owner_alive(owner)):
            continue
        done = progress.pop("done", 0)
        same = {k: progress.get(k) for k in layout} == layout
        if not same or not partial_files_fit(candidate, layout):
            log.info("features: removing %s (another layout)", candidate)
            shutil.rmtree(candidate, ignore_errors=True)
            continue
        if candidate != mine:
            try:
                # Rename to claim it: of two processes adopting it, one wins.
                os.replace(candidate, mine)
            except OSError:
                continue
        return mine, done, owner

    shutil.rmtree(mine, ignore_errors=True)
    mine.mkdir(parents=True)
    return mine, 0, None


def partial_files_fit(folder: Path, layout: dict) -> bool:
    """Whether every preallocated file of a partial store is there, whole."""
    try:
        for path, dtype, shape in array_files(folder, layout).values():
            open_array(path, dtype, shape)
    except StoreError:
        return False
    return True


def compute(folder, layout, done, apply_fn, params, paths, size):
    """Run the trunk over `paths` from image `done` on, streaming into `folder`."""
    batch_size, cuts = layout["batch_size"], list(layout["cuts"])
    step, params, sharded = compile_pass(apply_fn, params, cuts, layout["dtype"])
    rows = local_rows(sharded, batch_size)
    files = array_files(folder, layout)
    if done == 0:
        for path, dtype, shape in files.values():
            create_array(path, dtype, shape)
        write_progress(folder, layout, 0)

    handles = {name: open(path, "r+b") for name, (path, _, _) in files.items()}
    offsets = {name: data_offset(path) for name, (path, _, _) in files.items()}
    try:
        progress = tqdm(total=len(paths), initial=done, desc="trunk pass", unit="img")
        batches = batch_loader(paths, size, batch_size, rows, first=done)
        for start, (images, ok) in zip(range(done, len(paths), batch_size), batches):
            result = step(params, global_batch(sharded, images, batch_size))
            count = min(batch_size, len(paths) - start)
            outputs = {cut: to_host(result[cut]) for cut in cuts}
            outputs[VALID] = to_host(global_batch(sharded, ok, batch_size))
            for name, rows_out in outputs.items():
                write_rows(handles[name], offsets[name], start, rows_out[:count])
            write_progress(folder, layout, start + count)
            progress.update(count)
        progress.close()
    finally:
        for handle in handles.values():
            handle.close()


def write_rows(handle, offset: int, start: int, rows: np.ndarray) -> None:
    """Write rows at their place in a preallocated `.npy` and push them to disk."""
    data_bytes = np.ascontiguousarray(rows).tobytes()
    row_bytes = len(data_bytes) // max(len(rows), 1)
    os.pwrite(handle.fileno(), data_bytes, offset + start * row_bytes)
    # Data first, then the progress file: a pass killed in between redoes one batch.
    os.fdatasync(handle.fileno())


def output_shapes(apply_fn, params, cuts, batch_size: int, size: int) -> dict:
    """The shape of one image's features at each cut, without running the trunk."""
    example = jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32)
    shapes = jax.eval_shape(apply_fn, params, example)
    return {cut: shapes[cut].shape[1:] for cut in cuts}


def finish(partial: Path, layout: dict, old: dict | None, folder: Path, extra: dict):
    """Write the record of a completed pass, taking over the cuts of an older store."""
    files = array_files(partial, layout)
    checksums = {name: checksum(path) for name, (path, _, _) in files.items()}
    cuts = dict(layout["cuts"])
    for cut in (old or {}).get("cuts", {}):
        if cut in cuts:
            continue
        try:
            os.link(folder / f"{cut}.npy", partial / f"{cut}.npy")
        except FileNotFoundError:
            continue
        except OSError:
            shutil.copyfile(folder / f"{cut}.npy", partial / f"{cut}.npy")
        cuts[cut], checksums[cut] = old["cuts"][cut], old["checksums"][cut]

    skipped = int((~np.load(files[VALID][0])).sum())
    record = {**layout, "format": FORMAT_VERSION, "cuts": cuts, "skipped": skipped}
    record.update(checksums=checksums, **extra)
    record.pop("batch_size")
    (partial / RECORD).write_text(json.dumps(record, indent=1))
    (partial / PROGRESS).unlink(missing_ok=True)
    return record


def publish(partial: Path, folder: Path) -> None:
    """Give a finished partial store its final name, replacing an older store there."""
    retired = folder.with_name(f"{folder.name}.retired-{os.getpid()}")
    for _ in range(3):
        try:
            os.replace(partial, folder)
            return
        except OSError:
            pass
        # A folder cannot replace a non-empty one in one rename: move the old aside
        # (another process may have just done the same; then try again).
        try:
            os.replace(folder, retired)
        except FileNotFoundError:
            continue
        shutil.rmtree(retired, ignore_errors=True)
    os.replace(partial, folder)


def open_store(folder: Path, record: dict, cuts, verify: bool = True):
    """Arrays at `cuts` and the valid mask of a finished store, checked against it."""
    layout = {
        "count": record["count"],
        "dtype": record["dtype"],
        "cuts": {cut: record["cuts"][cut] for cut in cuts},
    }
    arrays = {}
    for name, (path, dtype, shape) in array_files(folder, layout).items():
        arrays[name] = open_array(path, dtype, shape)
        expected = record["checksums"][name]
        if verify and (found := checksum(path)) != expected:
            raise StoreError(f"{path}: checksum {found}, its record says {expected}")

    valid = np.asarray(arrays.pop(VALID))
    if record["dtype"] == "bfloat16":
        arrays = {cut: array.view(jnp.bfloat16) for cut, array in arrays.items()}
    return arrays, valid


def find_store(root: Path, folder: Path, key_parts: dict, cuts):
    """The finished store's record and arrays at the cuts it has, or why there is none.

    Returns (record or None, arrays, valid, reason).
    """
    if not folder.exists():
        return None, {}, None, describe_miss(root, key_parts)
    try:
        record = json.loads((folder / RECORD).read_text())
        present = [cut for cut in cuts if cut in record["cuts"]]
        arrays, valid = open_store(folder, record, present)
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("features: store %s does not match its record: %s", folder, error)
        return None, {}, None, f"store {folder} was damaged ({error})"
    return record, arrays, valid, f"same fingerprint, cuts {present} checked"


def features(
    store_root: Path,
    key_parts: dict,
    apply_fn,
    params,
    paths,
    cuts,
    size: int,
    batch_size: int,
    dtype: str = "float32",
):
    """Features at `cuts` for `paths`: reused from the store, or computed and stored.

    `key_parts` holds everything but the cut that changes the features; the storage
    `dtype` is added to it. A store lacking some of `cuts` gets them from a pass that
    computes only those. An interrupted pass of the same layout, whose process is
    gone, is resumed from its last complete batch. Returns (arrays by cut in `dtype`,
    valid mask, record); the record's "status" is "reused" or "computed" and its
    "reason" says why.
    """
    file_dtype(dtype)
    root = Path(store_root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    key_parts = {**key_parts, "storage_dtype": dtype}
    key = fingerprint(key_parts)
    folder = root / key

    old, arrays, valid, reason = find_store(root, folder, key_parts, cuts)
    missing = [cut for cut in cuts if old is None or cut not in old["cuts"]]
    if not missing:
        log.info("features: reused store %s (%s)", folder, reason)
        return arrays, valid, {**old, "status": "reused", "reason": reason}
    if old is not None:
        reason = f"the store has cuts {sorted(old['cuts'])}, not {missing}"

    n_devices = jax.device_count()
    batch_size = -(-batch_size // n_devices) * n_devices
    shapes = output_shapes(apply_fn, params, missing, batch_size, size)
    layout = layout_of(key, len(paths), batch_size, shapes, dtype)
    partial, done, owner = claim_partial(root, layout)
    if done:
        reason = f"resumed at image {done} of {len(paths)}, left by process {owner}"
    log.info("features: computing %s into %s (%s)", missing, folder, reason)

    started = time.perf_counter()
    compute(partial, layout, done, apply_fn, params, paths, size)
    extra = {
        "seconds": round(time.perf_counter() - started, 2),
        "resumed_from": done,
        "key": key_parts,
    }
    record = finish(partial, layout, old, folder, extra)
    # Opened before the rename, the arrays stay readable whatever happens to the
    # folder next (another process may replace it with its own copy).
    arrays, valid = open_store(partial, record, cuts, verify=False)
    publish(partial, folder)
    log.info(
        "features: computed store %s in %.1f s (%d images, %d skipped)",
        folder,
        extra["seconds"],
        len(paths),
        record["skipped"],
    )
    return arrays, valid, {**record, "status": "computed", "reason": reason}


class Float32Rows:
    """Rows of a stored array read back as float32, which the tail computes in."""

    def __init__(self, array):
        self.array = array
        self.shape = array.shape
        self.dtype = np.dtype(np.float32)

    def __len__(self):
        return len(self.array)

    def __getitem__(self, index):
        return np.asarray(self.array[index], np.float32)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[:], dtype or np.float32)


def as_float32(array):
    """A stored array as float32: itself when it is, else a view that converts rows."""
    return array if array.dtype == np.float32 else Float32Rows(array)
