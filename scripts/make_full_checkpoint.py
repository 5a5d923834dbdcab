"""Write a Qwen2.5-VL-3B/7B-Instruct checkpoint as the hub repos lay it out, random weights.

    python scripts/make_full_checkpoint.py --size 7b --out /data/hf/Qwen2.5-VL-7B-Instruct

The real config.json (`mlx_cultvlm.models.real_config`), bf16 shards like the hub's (2 for 3B,
5 for 7B) with model.safetensors.index.json, the preprocessor and chat-template files, and a
tokenizer of the real size (151,665 tokens) with Qwen's special tokens at their real ids. It
needs no network, and holds one tensor at a time (a few float32 copies of the largest: peak RSS
4.7 GiB for 3B, 8.2 GiB for 7B, whose embedding is 152064 x 3584); 7B: 16.6 GB of disk, ~4 min.
`scripts/rehearse.py` runs every command on it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mlx_cultvlm.models import real_config
from mlx_cultvlm.tiny import build_checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("3b", "7b"), required=True)
    parser.add_argument("--out", type=Path, required=True, help="a new or empty folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        build_checkpoint(args.out, real_config(args.size), args.seed,
                         progress=lambda line: print(f"[{time.perf_counter() - start:6.0f} s] {line}", flush=True))
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.out}: Qwen2.5-VL-{args.size.upper()}-Instruct layout, random weights "
          f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
