"""Compare freeze depths: one trunk pass, one tail per cut and seed, one table.

    python scripts/ablate_freeze_depth.py EXPERIMENT.py [dotted.field=value ...] \
        --cuts block4_pool,block5_pool --seeds 3 --epochs block4_pool=10 --out DIR

Every run shares the experiment's split (`data.split_seed`) and the feature store,
which the first run fills for all cuts at once. Each run is a `vtl.train` process of
its own, so its peak memory is its own. DIR gets table.md, table.csv and plot.png.
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from vtl import config as configs
from vtl import data, model

POOLS = ("block3_pool", "block4_pool", "block5_pool")
# A CPU rate to turn FLOPs into an expected time before anything has run; the table
# reports the measured time.
ASSUMED_GFLOPS = 100.0


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment")
    parser.add_argument("overrides", nargs="*", help="dotted.field=value")
    parser.add_argument("--cuts", default="", help="comma-separated layer names")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--epochs",
        default="",
        help="epoch budget per cut: cut=N,cut=N (others: config)",
    )
    parser.add_argument("--out", default="runs/ablation")
    return parser.parse_args(argv)


def default_cuts(config) -> list[str]:
    """Pooling layers from block3_pool on, and fc1 and fc2 when the file has them."""
    cuts = list(POOLS)
    weights = str(config.model.weights)
    if (
        config.model.fc_weights != "fresh"
        and "notop" not in weights
        and weights != "none"
    ):
        cuts += ["fc1", "fc2"]
    return cuts


def epoch_budget(text: str, cuts, default: int) -> dict:
    budget = {cut: default for cut in cuts}
    for item in filter(None, text.split(",")):
        cut, _, epochs = item.partition("=")
        if cut not in budget or not epochs.isdigit():
            raise SystemExit(
                f"--epochs: expected cut=N with a cut among {cuts}, got {item!r}"
            )
        budget[cut] = int(epochs)
    return budget


def tail_cost(config, cut: str, num_classes: int):
    """Trainable parameters and GFLOP per image (forward and backward) of a tail."""
    arch, width, size = config.model.name, config.model.width, config.data.image_size
    trunk = model.VGG(arch, width, num_classes, stop=cut)
    tail = model.VGG(arch, width, num_classes, start=model.layer_after(arch, cut))
    image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    trunk_params = jax.eval_shape(trunk.init, jax.random.key(0), image)
    features = jax.eval_shape(trunk.apply, trunk_params, image)
    params = jax.eval_shape(tail.init, jax.random.key(0), features)
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))

    lowered = jax.jit(tail.apply).lower(params, features)
    flops = (lowered.cost_analysis() or {}).get("flops", 0.0)
    # Backward costs about twice the forward pass.
    return count, 3 * flops / 1e9


def run_one(config_args, cut, seed, epochs, workdir, extra_cuts) -> dict:
    """One vtl.train process; its summary plus its own peak memory."""
    command = [
        sys.executable,
        "-m",
        "vtl.train",
        *config_args,
        f"model.cut={cut}",
        f"seed={seed}",
        f"train.epochs={epochs}",
        f"workdir={workdir}",
        f"features.extra_cuts={','.join(extra_cuts)}",
    ]
    started = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"run failed ({' '.join(command)}); see {workdir}/log.txt")
    summary = json.loads((Path(workdir) / "summary.json").read_text())
    summary["peak_rss_mb"] = usage.ru_maxrss / 1024
    summary["wall"] = time.perf_counter() - started
    return summary


def table_rows(results: dict, costs: dict, budget: dict) -> list[dict]:
    rows = []
    for cut, runs in results.items():
        accuracies = [r["test_accuracy"] for r in runs]
        rows.append(
            {
                "cut": cut,
                "trainable_parameters": costs[cut][0],
                "epochs": budget[cut],
                "seeds": len(runs),
                "test_accuracy_mean": round(float(np.mean(accuracies)), 4),
                "test_accuracy_std": round(float(np.std(accuracies)), 4),
                "train_seconds": round(
                    float(np.mean([r["stages"]["train"] for r in runs])), 1
                ),
                "seconds_per_epoch": round(
                    float(np.mean([r["seconds_per_epoch"] for r in runs])), 2
                ),
                "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs)),
            }
        )
    return rows


def write_outputs(out: Path, rows: list[dict], command: str) -> None:
    with open(out / "table.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    lines = [
        "| cut | trainable parameters | epochs | test accuracy (mean ± std) "
        "| train time (s) | s / epoch | peak RSS (MB) |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['cut']} | {r['trainable_parameters']:,} | {r['epochs']} "
            f"| {r['test_accuracy_mean']:.3f} ± {r['test_accuracy_std']:.3f} "
            f"(n={r['seeds']}) | {r['train_seconds']} | {r['seconds_per_epoch']} "
            f"| {r['peak_rss_mb']} |"
        )
    (out / "table.md").write_text(f"Command: `{command}`\n\n" + "\n".join(lines) + "\n")
    plot(out / "plot.png", rows)


def plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cuts = [r["cut"] for r in rows]
    figure, accuracy_axes = plt.subplots(figsize=(6, 4))
    accuracy_axes.errorbar(
        cuts,
        [r["test_accuracy_mean"] for r in rows],
        yerr=[r["test_accuracy_std"] for r in rows],
        marker="o",
        capsize=4,
        color="tab:blue",
    )
    accuracy_axes.set_xlabel("cut (last frozen layer)")
    accuracy_axes.set_ylabel("test accuracy (mean ± std over seeds)", color="tab:blue")
    time_axes = accuracy_axes.twinx()
    time_axes.plot(cuts, [r["seconds_per_epoch"] for r in rows], "s--", color="tab:red")
    time_axes.set_ylabel("seconds per epoch", color="tab:red")
    time_axes.set_ylim(bottom=0)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv) -> int:
    args = parse_arguments(argv)
    config = configs.resolve(args.experiment, args.overrides)
    cuts = [c for c in args.cuts.split(",") if c] or default_cuts(config)
    for cut in cuts:
        model.layer_after(config.model.name, cut)
    budget = epoch_budget(args.epochs, cuts, config.train.epochs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    dataset = data.load_folder_dataset(
        config.data.root, config.data.test_fraction, config.data.split_seed
    )
    costs = {cut: tail_cost(config, cut, len(dataset.classes)) for cut in cuts}
    print(
        f"expected cost (at an assumed {ASSUMED_GFLOPS:.0f} GFLOP/s, "
        f"{len(dataset.train)} training images):"
    )
    for cut in cuts:
        count, gflop = costs[cut]
        epoch = gflop * len(dataset.train) / ASSUMED_GFLOPS
        total = epoch * budget[cut] * args.seeds
        print(
            f"  {cut:12s} {count:>12,} trainable parameters, {gflop:8.2f} GFLOP per "
            f"image per epoch, about {epoch:.0f} s per epoch; {budget[cut]} epochs x "
            f"{args.seeds} seeds: about {total / 60:.0f} min"
        )

    # The deepest cut's run computes the features of every cut in one trunk pass.
    order = sorted(cuts, key=lambda c: -model.layer_index(config.model.name, c))
    config_args = [args.experiment, *args.overrides]
    results = {cut: [] for cut in order}
    for position, cut in enumerate(order):
        extra = order[1:] if position == 0 else []
        for seed in range(args.seeds):
            summary = run_one(
                config_args, cut, seed, budget[cut], out / cut / f"seed{seed}", extra
            )
            results[cut].append(summary)
            print(
                f"{cut} seed {seed}: test accuracy {summary['test_accuracy']:.4f}, "
                f"train {summary['stages']['train']} s, "
                f"peak RSS {summary['peak_rss_mb']:.0f} MB"
            )

    ordered = {cut: results[cut] for cut in cuts}
    rows = table_rows(ordered, costs, budget)
    write_outputs(out, rows, " ".join(["python scripts/ablate_freeze_depth.py", *argv]))
    print((out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
