"""End-to-end: post-gate denoiser step time with the fused block fast path on vs off.

The real architecture (random weights, nothing downloaded) runs one generation with the gate at
step 1; every later step is post-gate and alternates between ``kernels="auto"`` and
``kernels="off"``, so both are measured side by side under the same machine load. Prints the
median step time of each and their ratio.

    OMP_NUM_THREADS=2 python bench/bench_fast_path.py --model sd15 --resolution 256 --repeats 6
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tgate_kernels
from tgate_kernels.tools.benchmarking.architectures import architecture
from tgate_kernels.tools.benchmarking.denoising_loop import DenoisingLoop


def measure(model: str, resolution: int, repeats: int, dtype: torch.dtype) -> dict[str, list[float]]:
    arch = architecture(model)
    loop = DenoisingLoop(arch, arch.build_denoiser(device="cpu", dtype=dtype), cfg=arch.cfg)
    settings = dict(gate_step=1, sp_interval=1, warm_up=0)
    tgate_kernels.enable(loop, kernels="auto", **settings)
    times: dict[str, list[float]] = {"auto": [], "off": []}
    modes = ["auto", "off"]
    started = [time.perf_counter()]

    def on_step(step: int) -> None:
        elapsed = time.perf_counter() - started[0]
        if step >= 1:  # step 0 is the gate step itself (full CFG batch)
            times[tgate_kernels.view(loop).kernels.value].append(elapsed)
        # switching attaches or detaches the block hooks; the running generation goes on
        tgate_kernels.enable(loop, kernels=modes[step % 2], **settings)
        started[0] = time.perf_counter()

    loop.run(1 + 2 * repeats, resolution=resolution, device="cpu", dtype=dtype, on_step=on_step)
    tgate_kernels.disable(loop)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--resolution", type=int, default=256, help="image side in pixels (latents are 1/8)")
    parser.add_argument("--repeats", type=int, default=6, help="post-gate steps measured per mode")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    times = measure(args.model, args.resolution, args.repeats, getattr(torch, args.dtype))
    on, off = statistics.median(times["auto"]), statistics.median(times["off"])
    print(f"{args.model} {args.resolution}px {args.dtype}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, kernel backend: {tgate_kernels.ops.kernel_status()['backends']['cpu']}")
    print(f"post-gate step, kernels=auto: median {on * 1e3:.1f} ms  ({', '.join(f'{t * 1e3:.0f}' for t in times['auto'])})")
    print(f"post-gate step, kernels=off:  median {off * 1e3:.1f} ms  ({', '.join(f'{t * 1e3:.0f}' for t in times['off'])})")
    print(f"ratio auto/off: {on / off:.3f}")


if __name__ == "__main__":
    main()
