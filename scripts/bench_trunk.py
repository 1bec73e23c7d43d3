"""Trunk throughput: images per second of the jitted VGG trunk, by batch size and dtype.

    python scripts/bench_trunk.py --arch vgg19 --batch-sizes 32,64,128 \
        --dtypes float32,bfloat16 --size 224 --peak-tflops 790

Synthetic images; the first call of each shape compiles and is not timed. Prints one
row per setting and, with --peak-tflops, the share of that peak the trunk reaches.
"""

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from vtl import model, xla

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vgg19")
    parser.add_argument("--cut", default="block5_pool")
    parser.add_argument("--batch-sizes", default="32")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=10.0, help="time per setting")
    parser.add_argument("--peak-tflops", type=float, default=0.0)
    parser.add_argument(
        "--xla-defaults",
        action="store_true",
        help="compile with XLA's own defaults instead of vtl's CPU options",
    )
    return parser.parse_args(argv)


def trunk_flops(trunk, params, batch) -> float:
    """FLOPs of one forward pass over `batch`, as XLA counts them."""
    lowered = jax.jit(trunk.apply).lower(params, batch)
    return float((lowered.cost_analysis() or {}).get("flops", 0.0))


def measure(args, batch_size: int, dtype_name: str) -> dict:
    trunk = model.VGG(
        args.arch, args.width, 1000, stop=args.cut, dtype=DTYPES[dtype_name]
    )
    images = jnp.asarray(
        np.random.default_rng(0).normal(0, 60, (batch_size, args.size, args.size, 3)),
        jnp.float32,
    )
    params = trunk.init(jax.random.key(0), images[:1])
    options = None if args.xla_defaults else xla.cpu_options("trunk")
    step = jax.jit(trunk.apply, compiler_options=options)
    step(params, images).block_until_ready()

    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < args.seconds or calls < 2:
        step(params, images).block_until_ready()
        calls += 1
    seconds = (time.perf_counter() - started) / calls

    flops = trunk_flops(trunk, params, images)
    return {
        "batch": batch_size,
        "dtype": dtype_name,
        "images_per_s": batch_size / seconds,
        "tflops": flops / seconds / 1e12,
        "gflop_per_image": flops / batch_size / 1e9,
    }


def main(argv) -> int:
    args = parse_arguments(argv)
    print(
        f"{jax.devices()[0].device_kind} x{jax.device_count()}, {args.arch} up to "
        f"{args.cut}, {args.size}x{args.size}, width {args.width}"
    )
    print(f"{'dtype':>9} {'batch':>6} {'images/s':>10} {'TFLOP/s':>9} {'of peak':>8}")
    for dtype_name in args.dtypes.split(","):
        for batch_size in map(int, args.batch_sizes.split(",")):
            row = measure(args, batch_size, dtype_name)
            share = (
                row["tflops"] / args.peak_tflops if args.peak_tflops else float("nan")
            )
            print(
                f"{dtype_name:>9} {batch_size:>6} {row['images_per_s']:>10.1f} "
                f"{row['tflops']:>9.2f} {share:>8.1%}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
