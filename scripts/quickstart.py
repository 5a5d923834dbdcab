"""The offline main job, end to end on this machine: build the tiny Qwen2.5-VL checkpoint,
convert it to 4-bit MLX with `cultvlm convert`, draw a picture, and ask the model about it with
`cultvlm generate` (the answer streams; the weights are random, so it is gibberish -- the point
is that every real step runs). Outputs go to out/ (git-ignored).

    python scripts/quickstart.py
"""

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out"


def draw_sample(path: Path) -> Path:
    """A cartoonish face, so there is something in the picture."""
    img = Image.new("RGB", (400, 300), (150, 200, 240))
    d = ImageDraw.Draw(img)
    d.ellipse((60, 40, 160, 140), fill=(140, 90, 50))  # ears
    d.ellipse((240, 40, 340, 140), fill=(140, 90, 50))
    d.ellipse((120, 80, 280, 260), fill=(160, 110, 60))  # head
    d.ellipse((160, 140, 185, 165), fill="black")
    d.ellipse((215, 140, 240, 165), fill="black")
    img.save(path)
    return path


def cultvlm(*args: str) -> None:
    cli = Path(sys.executable).with_name("cultvlm")
    print("$ cultvlm " + " ".join(args), flush=True)
    subprocess.run([str(cli), *args], check=True)


def main():
    OUT.mkdir(exist_ok=True)
    os.environ.setdefault("CULTVLM_HOME", str(OUT / "cultvlm_home"))  # keep ~/.cache clean
    cultvlm("convert", "--model", "tiny-4bit", "--force")
    image = draw_sample(OUT / "sample.png")
    cultvlm("generate", str(image), "--model", "tiny-4bit", "--max-tokens", "24")
    print(f"\nDone. Converted model: {os.environ['CULTVLM_HOME']}/models/tiny-4bit")


if __name__ == "__main__":
    main()
