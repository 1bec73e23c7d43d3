"""vtl against the Keras recipe's peers: the same photos, weights, split and machine.

    python scripts/bench.py --photos ../shared/data/vehicles4 \
        --weights ../shared/weights/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 \
        --out docs/bench

The job is the recipe's: VGG16 frozen up to block5_pool; flatten, fc1, fc2 and a
softmax layer trained with RMSprop 1e-4, batch 32, for 100 epochs. Peers:

- keras-recipe: `model.fit` on images, the frozen trunk re-run every epoch; a few
  epochs are run and the 100-epoch job is extrapolated from them.
- keras-features: `predict` once, then `fit` the head on the stored features.
- vtl-cold / vtl-warm: `python -m vtl.train` with an empty feature store, then again
  with the store in place; the whole 100-epoch job is run, nothing extrapolated.
- vtl-end-to-end: images through the frozen trunk at every step, augmented; a few
  epochs, extrapolated.

Keras runs in float32 and in `mixed_bfloat16`. Every peer runs in its own process so
that its peak RSS is its own. Prints a table; with --out, writes results.json and
table.md there. `--scaling` adds the cold job on a subset of the photos and the head
epoch's time at earlier cuts.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
RESULT = "RESULT "
JOB_EPOCHS = 100
VTL_JOBS = ("vtl-cold", "vtl-warm")
TRUNK_SECONDS = 20.0


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, required=True)
    parser.add_argument("--weights", default="none")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=JOB_EPOCHS, help="vtl's job")
    parser.add_argument(
        "--peer-epochs", type=int, default=3, help="epochs run before extrapolating"
    )
    parser.add_argument("--precisions", default="float32,bfloat16")
    parser.add_argument(
        "--peers",
        default="trunk-rate,keras-recipe,keras-features,vtl-cold,vtl-warm,"
        "vtl-end-to-end",
    )
    parser.add_argument("--limit", type=int, default=0, help="photos per class")
    parser.add_argument("--scaling", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--reuse",
        type=Path,
        help="a results.json whose rows stand in for the peers not run this time",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------
# Children: one measurement each, printed as a JSON line.


def vtl_split(photos: Path, size: int):
    """vtl's own split and decoding, so that Keras trains on the very same pixels."""
    from vtl import data

    dataset = data.load_folder_dataset(photos)
    paths = dataset.paths()

    def load(indices):
        images = np.stack([data.load_image(paths[i], size) for i in indices])
        return images, dataset.labels[indices].astype(np.int32)

    train_x, train_y = load(dataset.train)
    test_x, test_y = load(dataset.test)
    return train_x, train_y, test_x, test_y, len(dataset.classes)


def keras_child(args) -> dict:
    sys.path.insert(0, str(SCRIPTS))
    import keras_peers

    started = time.perf_counter()
    *arrays, classes = vtl_split(args.photos, args.size)
    decode_seconds = time.perf_counter() - started

    weights = None if args.weights == "none" else args.weights
    peer = {
        "keras-recipe": keras_peers.recipe_way,
        "keras-features": keras_peers.features_first,
    }[args.child]
    result = peer(*arrays, classes, weights, args.precision, args.peer_epochs)
    # vtl's job decodes its photos inside the timed run; so does this one.
    result["job_seconds_100"] += decode_seconds
    return {**result, "decode_seconds": decode_seconds}


def vtl_command(args, workdir: Path, store: Path, overrides=()) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vtl.train",
        str(ROOT / "experiments" / "vgg16_head.py"),
        f"data.root={args.photos}",
        f"model.weights={args.weights}",
        f"data.image_size={args.size}",
        f"workdir={workdir}",
        f"features.dir={store}",
        *overrides,
    ]


def read_run(workdir: Path) -> dict:
    """What a vtl run folder says about its speed and result."""
    summary = json.loads((workdir / "summary.json").read_text())
    rows = [
        json.loads(line)
        for line in (workdir / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    seconds = [row["seconds"] for row in rows]
    stages = summary["stages"]
    return {
        "epochs_run": len(rows),
        "first_epoch_seconds": seconds[0],
        "epoch_seconds": statistics.median(seconds[1:] or seconds),
        "trunk_seconds": stages.get("trunk", 0.0),
        "stages": stages,
        "test_accuracy": summary["test_accuracy"],
        "feature_store": summary.get("feature_store"),
    }


def run_vtl(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


# ----------------------------------------------------------------------------------
# The parent: each peer in its own process, then the table.


def measure(args, child: str, precision: str = "float32") -> dict:
    """Run one child process; its JSON result plus its own peak RSS."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        child,
        "--precision",
        precision,
        "--photos",
        str(args.photos),
        "--weights",
        str(args.weights),
        "--size",
        str(args.size),
        "--peer-epochs",
        str(args.peer_epochs),
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise RuntimeError(f"{child} ({precision}) failed with status {status}")
    line = next(x for x in output.splitlines() if x.startswith(RESULT))
    result = json.loads(line[len(RESULT) :])
    # ru_maxrss is in KiB on Linux.
    return {
        **result,
        "peer": child,
        "precision": precision,
        "peak_rss_gib": usage.ru_maxrss / 2**20,
    }


def vtl_job(args, name: str, scratch: Path, store: str, overrides) -> dict:
    """One whole `vtl.train` run, timed from outside as a user would time it."""
    workdir = scratch / name
    command = vtl_command(args, workdir, scratch / store, overrides)
    wall, usage = timed_process(command)
    row = read_run(workdir)
    extrapolated = row["epochs_run"] != JOB_EPOCHS
    row.update(
        peer=name,
        precision="float32",
        extrapolated=extrapolated,
        job_seconds_100=extrapolate(row, wall) if extrapolated else wall,
        peak_rss_gib=usage.ru_maxrss / 2**20,
    )
    return row


def vtl_jobs(args, scratch: Path) -> list[dict]:
    """vtl cold then warm: the second run finds the store the first one wrote."""
    epochs = [f"train.epochs={args.epochs}"]
    return [vtl_job(args, name, scratch, "store", epochs) for name in VTL_JOBS]


def vtl_end_to_end(args, scratch: Path) -> dict:
    overrides = [
        "train.mode=end_to_end",
        f"train.epochs={args.peer_epochs}",
        "train.checkpoint_every=1000",
    ]
    return vtl_job(args, "vtl-end-to-end", scratch, "store", overrides)


def extrapolate(row: dict, wall: float) -> float:
    """A job of JOB_EPOCHS epochs from a shorter one: the rest at the median epoch."""
    return wall + (JOB_EPOCHS - row["epochs_run"]) * row["epoch_seconds"]


def timed_process(command: list[str]):
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise RuntimeError(f"{' '.join(command)} failed with status {status}")
    return time.perf_counter() - started, usage


def trunk_rate(row: dict, images: int) -> float | None:
    seconds = row.get("trunk_seconds")
    return images / seconds if seconds else None


def ratio(ours: float | None, theirs: float | None, higher_is_better: bool) -> str:
    """How many times better vtl is: > 1 means vtl wins."""
    if not ours or not theirs:
        return ""
    return f"{(ours / theirs if higher_is_better else theirs / ours):.2f}×"


def fmt(value, digits=1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def table(rows: list[dict], images: int) -> str:
    lines = [
        "| peer | precision | trunk images/s | head epoch s | 100-epoch job s "
        "| peak RSS GiB | test accuracy |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        rate = trunk_rate(row, images) if row["peer"] != "keras-recipe" else None
        job = fmt(row["job_seconds_100"]) + (" (extr.)" if row["extrapolated"] else "")
        lines.append(
            f"| {row['peer']} | {row['precision']} | {fmt(rate)} "
            f"| {fmt(row['epoch_seconds'], 2)} | {job} | {fmt(row['peak_rss_gib'], 2)} "
            f"| {fmt(row['test_accuracy'], 3)} |"
        )
    return "\n".join(lines)


def rate_table(rates: list[dict]) -> str:
    """Trunk throughput on random images; vtl's rate over TensorFlow's per precision."""
    lines = [
        "| trunk, batch 32 | precision | images/s | vtl / TensorFlow |",
        "| --- | --- | ---: | ---: |",
    ]
    for row in rates:
        keras = next(
            r
            for r in rates
            if r["library"] == "keras" and r["precision"] == row["precision"]
        )
        share = (
            ""
            if row["library"] == "keras"
            else ratio(row["images_per_s"], keras["images_per_s"], True)
        )
        lines.append(
            f"| {row['library']} | {row['precision']} | {row['images_per_s']:.1f} "
            f"| {share} |"
        )
    return "\n".join(lines)


def ratios(rows: list[dict], images: int) -> str:
    """Each vtl figure over each Keras peer's; > 1 means vtl is better."""
    ours = [r for r in rows if r["peer"].startswith("vtl")]
    theirs = [r for r in rows if r["peer"].startswith("keras")]
    lines = [
        "| vtl | against | trunk rate | head epoch | 100-epoch job |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for mine in ours:
        for other in theirs:
            their_rate = trunk_rate(other, images)
            if other["peer"] == "keras-recipe":
                their_rate = None
            lines.append(
                f"| {mine['peer']} | {other['peer']} {other['precision']} "
                f"| {ratio(trunk_rate(mine, images), their_rate, True)} "
                f"| {ratio(mine['epoch_seconds'], other['epoch_seconds'], False)} "
                f"| {ratio(mine['job_seconds_100'], other['job_seconds_100'], False)} |"
            )
    return "\n".join(lines)


def subset_folder(photos: Path, per_class: int, into: Path) -> Path:
    """A copy of `photos` (as links) with the first `per_class` files of each class."""
    for folder in sorted(p for p in photos.iterdir() if p.is_dir()):
        target = into / folder.name
        target.mkdir(parents=True)
        for path in sorted(folder.iterdir())[:per_class]:
            (target / path.name).symlink_to(path.resolve())
    return into


def scaling(args, scratch: Path) -> dict:
    """Cold job on a quarter of the photos, and head epochs at earlier cuts."""
    small = subset_folder(args.photos, 25, scratch / "photos100")
    quarter = argparse.Namespace(**{**vars(args), "photos": small})
    epochs = [f"train.epochs={args.peer_epochs}"]
    row = vtl_job(quarter, "vtl-cold-100", scratch, "store100", epochs)
    small_job = {
        "photos": 100,
        "trunk_seconds": row["trunk_seconds"],
        "epoch_seconds": row["epoch_seconds"],
        "job_seconds_100": row["job_seconds_100"],
    }

    cuts = {}
    for cut in ("block5_pool", "block5_conv2", "block4_pool"):
        cuts[cut] = measure(args, f"head-epoch:{cut}")["epoch_seconds"]
    return {"cold_100_photos": small_job, "head_epoch_by_cut": cuts}


def head_epoch_child(cut: str, epochs: int, size: int) -> dict:
    """A head on random features of the cut's shape: 352 rows, 4 classes."""
    import jax

    from vtl import model, tail
    from vtl.config import defaults

    config = defaults()
    config.train.epochs = epochs
    config.model.name = "vgg16"
    tail_module = model.VGG(
        "vgg16", 1.0, 4, start=model.layer_after("vgg16", cut), dropout=0.5
    )
    trunk = model.VGG("vgg16", 1.0, 4, stop=cut)
    shape = jax.eval_shape(
        lambda x: trunk.init_with_output(jax.random.key(0), x)[0],
        jax.ShapeDtypeStruct((1, size, size, 3), np.float32),
    ).shape[1:]
    rng = np.random.default_rng(0)
    train_x = rng.random((352, *shape), np.float32)
    train_y = np.arange(352) % 4
    params = tail_module.init(jax.random.key(0), train_x[:1])["params"]
    _, history, _ = tail.train(
        tail_module.apply,
        params,
        (train_x, train_y),
        (train_x[:40], train_y[:40]),
        config,
    )
    seconds = [row["seconds"] for row in history]
    return {"cut": cut, "epoch_seconds": statistics.median(seconds[1:] or seconds)}


def trunk_rate_child(library: str, precision: str, size: int) -> dict:
    """Trunk images per second on random images, batch 32, after a warm-up."""
    if library == "keras":
        sys.path.insert(0, str(SCRIPTS))
        import keras_peers

        return keras_peers.trunk_rate(size, 32, precision, TRUNK_SECONDS)

    import jax
    import jax.numpy as jnp

    from vtl import model, xla

    trunk = model.VGG("vgg16", 1.0, 4, stop="block5_pool", dtype=jnp.dtype(precision))
    images = np.random.default_rng(0).normal(0, 60, (32, size, size, 3))
    images = jnp.asarray(images, jnp.float32)
    params = trunk.init(jax.random.key(0), images[:1])
    step = jax.jit(trunk.apply, compiler_options=xla.cpu_options("trunk"))
    step(params, images).block_until_ready()
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < TRUNK_SECONDS:
        step(params, images).block_until_ready()
        calls += 1
    return {"images_per_s": 32 * calls / (time.perf_counter() - started)}


def trunk_rates(args) -> list[dict]:
    rows = []
    for precision in args.precisions.split(","):
        for library in ("keras", "vtl"):
            result = measure(args, f"trunk-rate:{library}", precision)
            rows.append({"library": library, "precision": precision, **result})
    return rows


def child_main(args) -> int:
    if args.child.startswith("trunk-rate:"):
        library = args.child.split(":", 1)[1]
        result = trunk_rate_child(library, args.precision, args.size)
    elif args.child.startswith("head-epoch:"):
        cut = args.child.split(":", 1)[1]
        result = head_epoch_child(cut, args.peer_epochs, args.size)
    else:
        result = keras_child(args)
    print(RESULT + json.dumps(result), flush=True)
    return 0


def count_photos(photos: Path) -> int:
    from vtl import data

    return len(data.load_folder_dataset(photos).labels)


def main(argv) -> int:
    args = parse_arguments(argv)
    if args.child:
        return child_main(args)
    args.photos = args.photos.resolve()
    if args.weights != "none":
        args.weights = str(Path(args.weights).resolve())
    peers = args.peers.split(",")
    print(machine(), flush=True)

    rows, rates = [], []
    if "trunk-rate" in peers:
        rates = trunk_rates(args)
        for row in rates:
            print(json.dumps(row), flush=True)
    with tempfile.TemporaryDirectory(prefix="vtl-bench-") as scratch:
        scratch = Path(scratch)
        if args.limit:
            args.photos = subset_folder(args.photos, args.limit, scratch / "photos")
        for precision in args.precisions.split(","):
            for peer in ("keras-recipe", "keras-features"):
                if peer in peers:
                    rows.append(measure(args, peer, precision))
                    print(json.dumps(rows[-1]), flush=True)
        if "vtl-cold" in peers:
            for row in vtl_jobs(args, scratch):
                rows.append(row)
                print(json.dumps(row), flush=True)
        if "vtl-end-to-end" in peers:
            rows.append(vtl_end_to_end(args, scratch))
            print(json.dumps(rows[-1]), flush=True)
        grown = scaling(args, scratch) if args.scaling else None
        images = count_photos(args.photos)
        shutil.rmtree(scratch / "store", ignore_errors=True)

    if args.reuse:
        rows, rates = reuse(args.reuse, rows, rates)
    report = "\n\n".join([rate_table(rates), table(rows, images), ratios(rows, images)])
    print(report)
    if grown:
        print(json.dumps(grown, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {
            "machine": machine(),
            "argv": argv,
            "trunk_rates": rates,
            "rows": rows,
            "scaling": grown,
        }
        (args.out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
        (args.out / "table.md").write_text(report + "\n")
    return 0


def reuse(path: Path, rows: list[dict], rates: list[dict]):
    """Rows of an earlier run for the peers this run left out, marked as reused."""
    earlier = json.loads(path.read_text())
    ran = {(row["peer"], row["precision"]) for row in rows}
    kept = [
        {**row, "reused_from": str(path)}
        for row in earlier["rows"]
        if (row["peer"], row["precision"]) not in ran
    ]
    return kept + rows, rates or earlier["trunk_rates"]


def machine() -> str:
    """CPU model, core count and memory, for the record."""
    model_name = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model_name = line.split(":", 1)[1].strip()
            break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model_name}, {os.cpu_count()} cores, {memory:.0f} GiB"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
