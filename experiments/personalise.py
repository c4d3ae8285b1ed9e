"""Personalisation on the shapes task (issue 20): teach the bundled model a concept it never saw — the heart, or the
colour cyan, drawn by `data/shapes.py` only when asked — and measure caption adherence to held-out captions with
the new word and to captions of the old vocabulary, before (the bundled model) and after a LoRA or a
textual-inversion embedding is loaded.

    python experiments/personalise.py --out runs/personalise                         # the "before" row
    python experiments/personalise.py --lora runs/lora-heart/heart.safetensors:1.0 --out runs/personalise
    python experiments/personalise.py --embedding runs/ti-heart/heart.safetensors --out runs/personalise

Training data for the concept: `ldm make-shapes data/hearts --count 20 --seed 0 --shapes heart` (every object a
heart; `--colours cyan` for the colour). The captions measured here are drawn with seeds 20,000 (concept) and
20,001 (old vocabulary) and skip any caption of `--train-data`, so they are phrasings the adapter was not trained
on. Each row draws `--captions` captions × `--seeds` seeds of each set with the bundled model's sampling settings
(config.yaml: DPM++ 2M, 25 steps, w = 5): 80 images, under a minute on 2 CPU cores. Every row starts from a fresh
pipeline; an embedding row writes its trigger word (`Pipeline.load_embedding`'s answer, or `--token`) in place of
the concept word in the concept prompts and scores the images against the plain captions. Rows accumulate in
`results.json` (a row measured again replaces its old figures), with a grid of concept samples per row.

The bundled model's first stage only draws the six colours it was trained on (cyan comes back blue, see
tests/evaluation/test_shapes_concepts.py), so a LoRA on the UNet alone can teach it the heart but not cyan.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Collection
from pathlib import Path

from latent_diffusion.cli.generate import lora_argument
from latent_diffusion.data.shapes import NEW_COLOURS, NEW_SHAPES, generate_scene
from latent_diffusion.evaluation.shapes import ATTRIBUTES, adherence_grid, sample_adherence
from latent_diffusion.files.atomic import atomic_write_bytes
from latent_diffusion.images import save_image
from latent_diffusion.pipeline import Pipeline

ROOT = Path(__file__).resolve().parent.parent
CONCEPT_SEED, OLD_SEED = 20_000, 20_001  # caption sets no training folder of this project is written with


def held_out_captions(count: int, seed: int, concept: str | None = None, exclude: Collection[str] = ()
                      ) -> list[str]:
    """`count` distinct captions of scenes `seed`, 0, 1, …, none in `exclude`; with `concept` (a new colour or
    shape) every object of every scene has it, else they use the bundled model's vocabulary."""
    colours = [concept] if concept in NEW_COLOURS else None
    shapes = [concept] if concept in NEW_SHAPES else None
    captions: list[str] = []
    for index in range(100 * count):
        caption = generate_scene(seed, index, colours, shapes).caption
        if caption not in exclude and caption not in captions:
            captions.append(caption)
            if len(captions) == count:
                return captions
    raise ValueError(f"fewer than {count} held-out captions for {concept or 'the old vocabulary'}")


def training_captions(folder: str | Path | None) -> set[str]:
    """The captions of a shapes folder's metadata.jsonl (none without a folder)."""
    if folder is None:
        return set()
    lines = (Path(folder) / "metadata.jsonl").read_text().splitlines()
    return {json.loads(line)["text"] for line in lines if line.strip()}


def with_trigger(caption: str, word: str, trigger: str) -> str:
    """`caption` with the whole word `word` written as `trigger` (a textual-inversion token)."""
    return re.sub(rf"\b{re.escape(word)}\b", trigger, caption)


def measure_row(make_pipeline, name: str, concept: str, concept_captions: list[str], old_captions: list[str],
                settings: dict, lora: tuple[str, float] | None = None, embedding: str | None = None,
                token: str | None = None) -> tuple[dict, list]:
    """(row, concept images): adherence to the concept and to the old captions of a fresh pipeline, with a LoRA
    (`Pipeline.load_lora(path, weight)`) or an embedding (`Pipeline.load_embedding(path)`) loaded when given."""
    pipe = make_pipeline()
    start = time.perf_counter()
    prompts = concept_captions
    if lora is not None:
        _require(pipe, "load_lora").load_lora(lora[0], lora[1])
    if embedding is not None:
        trigger = _require(pipe, "load_embedding").load_embedding(embedding, token) or token or concept
        prompts = [with_trigger(c, concept, trigger) for c in concept_captions]
    concept_figures, images = sample_adherence(pipe, concept_captions, prompts=prompts, **settings)
    old_figures, _ = sample_adherence(pipe, old_captions, **settings)
    row = {"name": name, "lora": list(lora) if lora else None, "embedding": embedding, "concept": concept_figures,
           "old": old_figures, "seconds": round(time.perf_counter() - start, 1)}
    if embedding is not None:
        row["example_prompt"] = prompts[0]
    return row, images


def _require(pipe, method: str):
    if not hasattr(pipe, method):
        raise SystemExit(f"Pipeline.{method} does not exist yet in this checkout: only the 'before' row can run")
    return pipe


def print_table(results: dict) -> None:
    """The rows as a table: share of objects right, all four attributes and each one, for both caption sets."""
    heads = "  ".join(f"{a:>8}" for a in ("all",) + ATTRIBUTES)
    print(f"{'':28}  new concept '{results['concept']}' ({results['rows'][0]['concept']['objects']} objects)"
          f"{'':16}old captions ({results['rows'][0]['old']['objects']} objects)")
    print(f"{'row':28}  {heads}  |  {heads}")
    for row in results["rows"]:
        cells = ["  ".join(f"{row[part][a]:8.1%}" for a in ("all",) + ATTRIBUTES) for part in ("concept", "old")]
        print(f"{row['name'][:28]:28}  {cells[0]}  |  {cells[1]}   {row['seconds']:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models/ldm-shapes"))
    parser.add_argument("--concept", default="heart", choices=list(NEW_SHAPES) + list(NEW_COLOURS))
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                        help="a row with this LoRA file loaded (repeatable: one row each)")
    parser.add_argument("--embedding", action="append", default=[], metavar="FILE",
                        help="a row with this textual-inversion embedding loaded (repeatable)")
    parser.add_argument("--token", default=None, help="trigger word for --embedding (default: the file's)")
    parser.add_argument("--no-before", action="store_true", help="skip the bundled model's row")
    parser.add_argument("--train-data", default=None, help="shapes folder the adapter was trained on: its "
                                                           "captions are left out of the measured ones")
    parser.add_argument("--captions", type=int, default=20, help="captions per set (concept, old)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 10_000], help="one image per caption each")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's config.yaml")
    parser.add_argument("--guidance", type=float, default=None, help="default: the model's config.yaml")
    parser.add_argument("--sampler", default=None, help="default: the model's config.yaml")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("runs/personalise"))
    args = parser.parse_args()

    def make_pipeline() -> Pipeline:
        return Pipeline.from_pretrained(args.model, device=args.device)

    sampling = make_pipeline().config.sampling
    settings = {"seeds": args.seeds, "steps": args.steps or sampling.steps,
                "guidance_scale": sampling.guidance_scale if args.guidance is None else args.guidance,
                "sampler": args.sampler or sampling.sampler}
    exclude = training_captions(args.train_data)
    concept_captions = held_out_captions(args.captions, CONCEPT_SEED, args.concept, exclude)
    old_captions = held_out_captions(args.captions, OLD_SEED, None, exclude)
    rows = [] if args.no_before else [("before", {})]
    rows += [(f"lora {Path(p).name}:{w:g}", {"lora": (p, w)}) for p, w in map(lora_argument, args.lora)]
    rows += [(f"embedding {Path(e).name}", {"embedding": e, "token": args.token}) for e in args.embedding]

    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = {"model": args.model, "concept": args.concept, "settings": settings,
               "concept_captions": concept_captions, "old_captions": old_captions, "rows": []}
    if results_path.is_file():
        kept = json.loads(results_path.read_text())
        if {k: kept.get(k) for k in ("model", "concept", "settings", "concept_captions", "old_captions")} == \
                {k: results[k] for k in ("model", "concept", "settings", "concept_captions", "old_captions")}:
            results["rows"] = kept["rows"]  # same measurement: keep the rows not measured again
    for name, adapter in rows:
        row, images = measure_row(make_pipeline, name, args.concept, concept_captions, old_captions, settings,
                                  **adapter)
        results["rows"] = [r for r in results["rows"] if r["name"] != name] + [row]
        captions = concept_captions * len(args.seeds)
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
        save_image(adherence_grid(images, captions, columns=10, rows=4), args.out / f"samples_{slug}.png")
        atomic_write_bytes(results_path, (json.dumps(results, indent=2) + "\n").encode())
    if results["rows"]:
        print_table(results)
        print(f"wrote {results_path}")


if __name__ == "__main__":
    main()
