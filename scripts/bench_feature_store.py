"""Peak memory and speed of the trunk pass into the feature store, by dataset size.

python scripts/bench_feature_store.py [--sizes 400 4000] [--dtype float32] [--keep DIR]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ARCH, WIDTH, SIZE, BATCH = "vgg19", 1 / 8, 64, 32
# block1_pool is large (32 KiB per image in float32), so a pass that held the
# features in memory would show it; block5_pool is the usual cut.
CUTS = ("block1_pool", "block5_pool")


def write_images(folder: Path, count: int) -> list[Path]:
    """`count` noisy 64×64 PNGs, made once and shared by every measurement."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"{i:05d}.png"
        if not path.exists():
            image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            cv2.imwrite(str(path), image)
        paths.append(path)
    return paths


def peak_rss_mib() -> float:
    """The largest resident set this process has had, in MiB (Linux counts KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_params(trunk):
    """Trunk parameters drawn with NumPy: compiling Flax's initialisers is slow."""
    import jax
    import jax.numpy as jnp

    image = jnp.zeros((1, SIZE, SIZE, 3))
    shapes = jax.eval_shape(trunk.init, jax.random.key(0), image)["params"]
    rng = np.random.default_rng(0)

    def draw(shape):
        fan_in = np.prod(shape.shape[:-1]) if len(shape.shape) > 1 else 1
        return (rng.standard_normal(shape.shape) * np.sqrt(2 / fan_in)).astype(
            np.float32
        )

    return jax.tree.map(draw, shapes)


def measure(images: Path, count: int, store: Path, dtype: str) -> dict:
    """One pass over the first `count` images, in this (fresh) process."""
    import jax

    from vtl import features, model

    paths = sorted(images.glob("*.png"))[:count]
    trunk = model.VGG(ARCH, WIDTH, 10, stop=CUTS[-1], capture=CUTS)
    params = random_params(trunk)

    def trunk_fn(params, images):
        return trunk.apply({"params": params}, images)

    names = [path.name for path in paths]
    key = {"arch": ARCH, "width": WIDTH, "image_size": SIZE, "bench": True}
    key["files"] = features.dataset_digest(paths, names)
    before = peak_rss_mib()

    started = time.perf_counter()
    _, _, record = features.features(
        store, key, trunk_fn, params, paths, list(CUTS), SIZE, BATCH, dtype
    )
    seconds = time.perf_counter() - started
    folder = store / record["fingerprint"]
    return {
        "images": count,
        "devices": jax.device_count(),
        "status": record["status"],
        "seconds": seconds,
        "store_mib": sum(f.stat().st_size for f in folder.iterdir()) / 2**20,
        "rss_before_mib": before,
        "peak_rss_mib": peak_rss_mib(),
    }


def run_child(images: Path, count: int, store: Path, dtype: str) -> dict:
    """Measure one size in a fresh interpreter, so peaks do not carry over."""
    command = [sys.executable, __file__, "--child", str(count), str(images)]
    command += [str(store), dtype]
    env = {"JAX_PLATFORMS": "cpu", **os.environ}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"measurement of {count} images failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict]) -> None:
    print(
        f"{'images':>7} {'devices':>7} {'seconds':>8} {'img/s':>7} {'store MiB':>10} "
        f"{'RSS before pass MiB':>20} {'peak RSS MiB':>13}"
    )
    for row in rows:
        print(
            f"{row['images']:>7} {row['devices']:>7} {row['seconds']:>8.1f} "
            f"{row['images'] / row['seconds']:>7.0f} {row['store_mib']:>10.1f} "
            f"{row['rss_before_mib']:>20.0f} {row['peak_rss_mib']:>13.0f}"
        )
    peaks = [row["peak_rss_mib"] for row in rows]
    print(f"largest / smallest peak RSS: {max(peaks) / min(peaks):.3f}")


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        count, images, store, dtype = sys.argv[2:6]
        print(json.dumps(measure(Path(images), int(count), Path(store), dtype)))
        return

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[400, 4000])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--keep", type=Path, help="folder for images and stores")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        work = args.keep or Path(scratch)
        write_images(work / "images", max(args.sizes))
        print(
            f"{ARCH} width {WIDTH} at {SIZE}px, cuts {list(CUTS)}, batch {BATCH}, "
            f"{args.dtype} store"
        )
        rows = []
        for count in args.sizes:
            store = work / f"store-{count}-{args.dtype}-{time.time_ns()}"
            rows.append(run_child(work / "images", count, store, args.dtype))
        print_table(rows)


if __name__ == "__main__":
    main()
