"""Loading many-tensor files: `lora_ops.io.load_state_dict` against the safetensors library, side by side.

    python benchmarks/load.py [--tensors 20000 200000]

For each count, writes a file of that many small fp16 tensors (4×32, the size of a LoRA's smallest factors) to a
temp folder and times, in one process with one torch thread (CPU seconds, median of 3):

* ours: ``io.load_state_dict`` (header validated by us, data read once, a tensor per entry via ``frombuffer``);
* reference: ``safetensors.torch.load_file`` (the library's own loader, which does not check what we check);
* ``load_lora`` refusing the file as no LoRA: the format is decided from the header before any tensor is read,
  so this should cost about the header parse, not a full load.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import safetensors.torch
import torch

from lora_ops import io
from lora_ops.errors import LoraFormatError
from lora_ops.files import load_lora


def median_cpu_seconds(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return sorted(times)[len(times) // 2]


def refuse(path: Path) -> None:
    try:
        load_lora(path)
    except LoraFormatError:
        return
    raise AssertionError("a file of junk tensors loaded as a LoRA")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, nargs="+", default=[20_000, 200_000])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| tensors | ours load_state_dict (s) | safetensors load_file (s) | ours / ref | load_lora refusal (s) |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.tensors:
            path = Path(tmp) / f"junk{n}.safetensors"
            safetensors.torch.save_file({f"junk.{i}": torch.zeros(4, 32, dtype=torch.float16) for i in range(n)},
                                        str(path))
            ours = median_cpu_seconds(lambda p=path: io.load_state_dict(p))
            ref = median_cpu_seconds(lambda p=path: safetensors.torch.load_file(str(p)))
            refusal = median_cpu_seconds(lambda p=path: refuse(p))
            print(f"| {n:,} | {ours:.2f} | {ref:.2f} | {ours / ref:.2f}× | {refusal:.2f} |")


if __name__ == "__main__":
    main()
