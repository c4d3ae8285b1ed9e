"""ControlNet layout control on the shapes task (issue 21): does a ControlNet trained on the objects' silhouettes
make the bundled model draw its objects where a control image says, while the caption still gives their colours?

    ldm make-shapes runs/controlnet/data --count 3000 --seed 100 --control mask
    ldm train-controlnet --model models/ldm-shapes --data runs/controlnet/data --out runs/controlnet/run \\
        --control-type mask --batch-size 32 --lr 3e-4 --steps 3000 --max-minutes 13 --save-every 150
    python experiments/controlnet.py --controlnet runs/controlnet/run/controlnet.safetensors --out runs/controlnet

Held-out scenes (seed 30,000, which no training folder of this project uses) give each image its caption and its
control map; each is drawn with the bundled model's sampling settings, without and with the ControlNet, from the
same seed. Layout adherence is the IoU of the drawn objects (pixels nearer an object colour than a background's)
with the control mask; caption adherence is `evaluation.shapes.caption_adherence` (every attribute right).
What text cannot say: the "unplaced" case keeps one object of each held-out scene and drops its position from the
prompt ("a large red circle"), so only the control mask says where it goes; its position is then scored against
the scene's full caption. `results.json`, `grid.png` and `grid-unplaced.png` (control | without | with) are
written to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from latent_diffusion.data.shapes import ShapeScene, control_map, generate_scene
from latent_diffusion.evaluation.shapes import caption_adherence, layout_iou
from latent_diffusion.files.atomic import atomic_write_bytes
from latent_diffusion.generation.control import Control
from latent_diffusion.images import make_grid, pil_to_tensor, save_image
from latent_diffusion.pipeline import Pipeline

ROOT = Path(__file__).resolve().parent.parent
HELD_OUT_SEED = 30_000


def held_out(count: int, seed: int = HELD_OUT_SEED) -> tuple[list[str], torch.Tensor]:
    """(captions, control maps (N, 3, 64, 64) in [0, 1]) of scenes `seed`, 0 … count − 1."""
    return _captions_and_maps([generate_scene(seed, i) for i in range(count)])


def unplaced(count: int, seed: int = HELD_OUT_SEED) -> tuple[list[str], list[str], torch.Tensor]:
    """(prompts without a position, full captions, control maps) of the first object of scenes `seed`, 0 … count − 1:
    only the map says where the object goes."""
    scenes = [generate_scene(seed, i) for i in range(count)]
    scenes = [ShapeScene(scene.background, scene.objects[:1]) for scene in scenes]
    prompts = [f"a {o.size} {o.colour} {o.shape}" for o in (scene.objects[0] for scene in scenes)]
    return prompts, *_captions_and_maps(scenes)


def _captions_and_maps(scenes: list[ShapeScene]) -> tuple[list[str], torch.Tensor]:
    maps = torch.stack([(pil_to_tensor(control_map(scene)) + 1) / 2 for scene in scenes])
    return [scene.caption for scene in scenes], maps


def measure(images, captions: list[str], maps: torch.Tensor) -> dict:
    """Mean layout IoU with the control masks, and caption adherence."""
    masks = (maps[:, 0] > 0.5).numpy()
    ious = [layout_iou(image, mask) for image, mask in zip(images, masks, strict=True)]
    return {"layout_iou": float(np.mean(ious)), "caption": caption_adherence(images, captions)}


def draw(pipe: Pipeline, captions: list[str], maps: torch.Tensor, net, scale: float, batch: int, seed: int):
    """One image per caption, in batches (image k with seed + k), with the ControlNet at `scale` (None: without)."""
    images = []
    for start in range(0, len(captions), batch):
        part = slice(start, start + batch)
        controls = [] if net is None else [Control(net, maps[part], scale)]
        images += pipe(captions[part], seed=seed + start, controls=controls, progress=False)
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--controlnet", required=True, help="the trained ControlNet file")
    parser.add_argument("--model", default=str(ROOT / "models" / "ldm-shapes"))
    parser.add_argument("--count", type=int, default=200, help="held-out scenes (default 200)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0], help="ControlNet weights to measure")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--out", default="runs/controlnet")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline.from_pretrained(args.model, device="cpu")
    net = pipe.load_controlnet(args.controlnet)
    begin = time.time()
    captions, maps = held_out(args.count)
    rows = compare(pipe, net, captions, captions, maps, args, out / "grid.png")
    prompts, full, single = unplaced(args.count)
    rows_unplaced = compare(pipe, net, prompts, full, single, args, out / "grid-unplaced.png")
    sampling = pipe.config.sampling
    result = {"scenes": args.count, "held_out_seed": HELD_OUT_SEED, "seed": args.seed, "controlnet": args.controlnet,
              "sampling": {"sampler": sampling.sampler, "steps": sampling.steps, "guidance": sampling.guidance_scale},
              "minutes": round((time.time() - begin) / 60, 1), "rows": rows, "unplaced": rows_unplaced}
    atomic_write_bytes(out / "results.json", (json.dumps(result, indent=2) + "\n").encode())
    print(f"wrote {out / 'results.json'}, {out / 'grid.png'} and {out / 'grid-unplaced.png'}")


def compare(pipe: Pipeline, net, prompts: list[str], captions: list[str], maps: torch.Tensor,
            args: argparse.Namespace, grid_path: Path) -> list[dict]:
    """The figures of `prompts` drawn without and with the ControlNet (at each of args.scales), scored against
    `captions` and `maps`; the first 8 of each in a grid (control | without | with)."""
    rows, shown = [], {}
    for label, scale in [("without", None)] + [(f"with, scale {s:g}", s) for s in args.scales]:
        images = draw(pipe, prompts, maps, None if scale is None else net, scale, args.batch, args.seed)
        rows.append({"row": label, **measure(images, captions, maps)})
        shown[label] = torch.stack([pil_to_tensor(image) for image in images[:8]])
        print(json.dumps(rows[-1]))
    save_image(make_grid([maps[:8] * 2 - 1, *shown.values()], scale=2, captions=["control", *shown]), grid_path)
    return rows


if __name__ == "__main__":
    main()
