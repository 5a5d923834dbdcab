"""Build the tiny offline Qwen2.5-VL checkpoint (Hugging Face layout) into a folder.

    python scripts/make_tiny_qwen.py --out out/tiny-hf [--seed 0]

Same seed, same bytes. `cultvlm convert --model tiny-4bit` builds it on its own when needed;
this script is for looking at it or pointing --hf-path at it.
"""

import argparse
import time

from mlx_cultvlm.tiny import TinySpec, build_tiny_qwen


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to create (must be empty or absent)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    out = build_tiny_qwen(args.out, TinySpec(seed=args.seed))
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"tiny Qwen2.5-VL written to {out}: {size / 1e6:.2f} MB in {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
