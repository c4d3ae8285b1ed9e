"""`ldm generate` and `ldm convert`."""

from __future__ import annotations

import argparse
import functools
import random
from pathlib import Path

from latent_diffusion.cli.common import BUNDLED_MODEL, bundled_model, naming


# The flags of `ldm generate` that errors from `Pipeline` name (by its keywords)
GENERATE_FLAGS = {"steps": "--steps", "guidance_scale": "--guidance", "guidance_rescale": "--guidance-rescale",
                  "sampler": "--sampler", "eta": "--eta", "karras": "--karras", "seed": "--seed",
                  "num_images": "--num-images", "height": "--height", "width": "--width", "image": "--image",
                  "mask": "--mask", "vae_tile": "--vae-tile", "strength": "--strength",
                  "image_prompt": "--image-prompt", "image_prompt_scale": "--image-prompt-scale",
                  "refiner_start": "--refiner-start", "original_size": "--original-size", "crop": "--crop",
                  "target_size": "--target-size", "aesthetic_score": "--aesthetic-score",
                  "negative_aesthetic_score": "--negative-aesthetic-score"}
# What --from-png reads (`infotext.parse_infotext`'s keys) into which flag, unless that flag is given
FROM_PNG = {"prompt": "prompt", "negative_prompt": "negative", "steps": "steps", "guidance_scale": "guidance",
            "sampler": "sampler", "seed": "seed", "width": "width", "height": "height", "eta": "eta",
            "guidance_rescale": "guidance_rescale", "strength": "strength"}


def cmd_generate(args: argparse.Namespace) -> None:
    from latent_diffusion.images import open_image
    from latent_diffusion.pipeline.infotext import format_infotext
    from latent_diffusion.pipeline.outputs import check_grid, write_images
    from latent_diffusion.pipeline import Pipeline
    from latent_diffusion.generation.editing import start_step
    from latent_diffusion.generation.request import MAX_BATCH
    from latent_diffusion.samplers import sampler_label

    prompts, jobs, seed = _generation_request(args)
    spatial = {name: naming(f"--{name}", open_image, path) for name, path in (("image", args.image),
                                                                              ("mask", args.mask)) if path}
    options = reader_options(args)
    pipe = Pipeline.from_pretrained(args.model or bundled_model(), device=args.device, precision=args.precision,
                                    backend=args.backend, **options)
    pipe.vae_tile = args.vae_tile or None
    for path, token in args.embedding:
        print(f"embedding {naming('--embedding', pipe.load_embedding, path, token)!r} from {path}")
    for path, weight in args.lora:
        naming("--lora", pipe.load_lora, path, weight)
    if args.lora:
        pipe.fuse_lora()  # the same outputs to rounding, with no extra work per step
    image_prompt = _image_prompt(pipe, args)
    sdxl = _sdxl_options(pipe, args)
    settings = pipe.settings(args.steps, args.guidance, args.sampler, args.eta, args.karras,
                             args.guidance_rescale or 0.0, names=GENERATE_FLAGS)
    pipe.check_image_inputs("image" in spatial, "mask" in spatial, args.strength is not None, GENERATE_FLAGS)
    strength = pipe.strength("image" in spatial, "mask" in spatial, args.strength)
    if strength is not None:
        start_step(settings.steps, strength, "--strength")
    height, width = (pipe.config.data.resolution if side is None else side
                     for side in pipe.output_size(spatial.get("image"), args.height, args.width))
    controls = _controls(pipe, args, height, width)
    guided = settings.guidance_scale not in (0.0, 1.0)
    batch = min(MAX_BATCH, args.num_images, pipe.max_batch_size(height, width, guided, GENERATE_FLAGS))
    if args.grid:
        naming("--grid", check_grid, args.num_images, height, width)
    print(f"seed {seed}" + (" (random: --seed fixes it)" if args.seed in (None, -1) else ""))
    karras = settings.grid.karras
    for prompt, (paths, grid) in zip(prompts, jobs):
        infotext = functools.partial(format_infotext, prompt, args.negative, settings.steps,
                                     sampler_label(settings.sampler, karras), settings.guidance_scale,
                                     width=width, height=height, model=_model_name(args.model), eta=args.eta,
                                     guidance_rescale=settings.guidance_rescale, strength=strength)
        write_images(pipe, prompt, paths, grid, seed, batch, infotext, negative_prompt=args.negative,
                     steps=settings.steps, guidance_scale=settings.guidance_scale, sampler=settings.sampler,
                     eta=args.eta, karras=karras, height=height, width=width,
                     guidance_rescale=settings.guidance_rescale, strength=args.strength, overlay=args.overlay,
                     controls=controls, guess_mode=args.guess_mode, **image_prompt, **spatial, **sdxl)
        print(f"wrote {paths[0]}" + (f" … {paths[-1].name}" if len(paths) > 1 else "")
              + (f" and {grid.name}" if grid else ""))


MICRO_FLAGS = {"original_size": "--original-size", "crop": "--crop", "target_size": "--target-size",
               "aesthetic_score": "--aesthetic-score", "negative_aesthetic_score": "--negative-aesthetic-score"}


def _sdxl_options(pipe, args: argparse.Namespace) -> dict:
    """The SDXL micro-conditioning and refiner of a request (the refiner loaded like the model), checked."""
    from latent_diffusion.pipeline import Pipeline

    micro = {name: getattr(args, name) for name in MICRO_FLAGS if getattr(args, name) is not None}
    micro = {name: tuple(value) if isinstance(value, list) else value for name, value in micro.items()}
    sdxl = pipe.config.conditioning.encoder == "sdxl"
    if (micro or args.refiner) and not sdxl:
        flag = MICRO_FLAGS[next(iter(micro))] if micro else "--refiner"
        raise ValueError(f"{flag}: only SDXL models take it (this model's condition encoder is "
                         f"'{pipe.config.conditioning.encoder}')")
    if args.refiner_start is not None and not args.refiner:
        raise ValueError("--refiner-start without --refiner: it is where the refiner takes over")
    if args.refiner_start is not None and not 0 < args.refiner_start < 1:
        raise ValueError(f"--refiner-start = {args.refiner_start}: expected a share of the denoising in (0, 1)")
    if not sdxl:
        return {}
    options = {"micro": micro}
    if args.refiner:
        refiner = naming("--refiner", Pipeline.from_pretrained, args.refiner, args.device, args.precision)
        if refiner.config.conditioning.encoder != "sdxl":
            raise ValueError(f"--refiner: {args.refiner} is not an SDXL model")
        options.update(refiner=refiner, refiner_start=0.8 if args.refiner_start is None else args.refiner_start)
    return options


CONTROL_LISTS = ("control_model", "control_type", "control_scale", "control_start", "control_end")


def _control_settings(args: argparse.Namespace) -> list[dict]:
    """The settings of each --control, checked before the model loads: --control-model once per --control, each
    other --control-* flag once for all or once per --control."""
    count = len(args.control)
    if not count:
        given = [f"--{name.replace('_', '-')}" for name in CONTROL_LISTS if getattr(args, name)]
        if given or args.guess_mode:
            raise ValueError(f"{', '.join(given + ['--guess-mode'] * args.guess_mode)}: give --control IMAGE too")
        return []
    from latent_diffusion.conditioning.control_images import control_type
    from latent_diffusion.generation.control import Control

    columns = {}
    for name in CONTROL_LISTS:
        values = getattr(args, name)
        if name == "control_model" and len(values) != count or len(values) not in (0, 1, count):
            expected = f"{count} (one per --control)" if name == "control_model" else f"1 or {count}"
            raise ValueError(f"--{name.replace('_', '-')}: given {len(values)} times for {count} --control; "
                             f"expected {expected}")
        columns[name] = values * count if len(values) == 1 else values
    settings = [{"image": image, "model": model, "type": naming("--control-type", control_type, kind or "none"),
                 "scale": scale, "start": start, "end": end}
                for image, model, kind, scale, start, end in zip(
                    args.control, columns["control_model"], columns["control_type"] or [None] * count,
                    columns["control_scale"] or [1.0] * count, columns["control_start"] or [0.0] * count,
                    columns["control_end"] or [1.0] * count, strict=True)]
    for setting in settings:
        Control(None, None, setting["scale"], setting["start"], setting["end"]).check("--control-{}".format)
        for flag, path in (("--control", setting["image"]), ("--control-model", setting["model"])):
            if not Path(path).exists():
                raise ValueError(f"{flag}: {path} does not exist")
    return settings


def _controls(pipe, args: argparse.Namespace, height: int, width: int) -> list:
    """The ControlNets of --control-model loaded into `pipe`, each with its control image made at the output size."""
    from latent_diffusion.generation.control import Control
    from latent_diffusion.images import open_image

    controls = []
    for setting in args.controls:
        net = naming("--control-model", pipe.load_controlnet, setting["model"])
        image = setting["type"].prepare(naming("--control", open_image, setting["image"]), width, height)
        controls.append(Control(net, image, setting["scale"], setting["start"], setting["end"]))
    return controls


def _image_prompt(pipe, args: argparse.Namespace) -> dict:
    """The IP-Adapter of --ip-adapter loaded into `pipe`; the image-prompt keywords of each request."""
    from latent_diffusion.generation.request import check_number
    from latent_diffusion.images import open_image

    given = [flag for flag, value in (("--ip-adapter", args.ip_adapter), ("--image-encoder", args.image_encoder),
                                      ("--image-prompt", args.image_prompt)) if value]
    if given and len(given) < 3:
        raise ValueError(f"{', '.join(given)}: an image prompt needs --image-prompt IMAGE, --ip-adapter FILE and "
                         "--image-encoder PATH (the CLIP image encoder the adapter was trained with)")
    if args.image_prompt_scale is not None and not given:
        raise ValueError("--image-prompt-scale: give --image-prompt, --ip-adapter and --image-encoder too")
    if not given:
        return {}
    if args.image_prompt_scale is not None:
        check_number(args.image_prompt_scale, -10.0, 10.0, "--image-prompt-scale", " (1: as trained, 0: off)")
    naming("--ip-adapter", pipe.load_ip_adapter, args.ip_adapter, args.image_encoder)
    return {"image_prompt": naming("--image-prompt", open_image, args.image_prompt),
            "image_prompt_scale": args.image_prompt_scale}


def lora_argument(text: str) -> tuple[str, float]:
    """An argparse type: FILE or FILE:WEIGHT (a number; a path with a colon of its own stays whole)."""
    path, _, weight = text.rpartition(":")
    try:
        return (path, float(weight)) if path else (text, 1.0)
    except ValueError:
        return text, 1.0


def embedding_argument(text: str) -> tuple[str, str | None]:
    """An argparse type: FILE or FILE:TOKEN (the trigger word; default: the file's)."""
    path, _, token = text.rpartition(":")
    return (path, token) if path and Path(path).suffix.lower() in (".safetensors", ".pt", ".bin") else (text, None)


def _generation_request(args: argparse.Namespace) -> tuple[list[str], list, int]:
    """(prompts, (image paths, grid path) per prompt, seed) of `ldm generate`, checked before the model loads;
    --from-png fills in what was not given."""
    from latent_diffusion.pipeline.infotext import read_infotext
    from latent_diffusion.pipeline.outputs import plan_outputs
    from latent_diffusion.generation.request import MAX_NUM_IMAGES, check_num_images, image_seeds, read_prompts
    from latent_diffusion.samplers import resolve_sampler

    if args.from_png:
        _apply_parameters(args, naming("--from-png", read_infotext, args.from_png))
    if args.prompt is not None and args.prompts is not None:
        raise ValueError("give PROMPT or --prompts FILE, not both")
    if args.prompt is None and args.prompts is None:
        raise ValueError("nothing to draw: give PROMPT, --prompts FILE or --from-png IMAGE")
    prompts = [args.prompt] if args.prompts is None else naming("--prompts", read_prompts, args.prompts)
    if args.vae_tile < 0 or args.vae_tile == 1:
        raise ValueError(f"--vae-tile = {args.vae_tile}: expected 0 (decode whole) or a tile of >= 2 latent pixels")
    check_num_images(args.num_images, MAX_NUM_IMAGES, "--num-images")
    seed = random.randrange(2**32) if args.seed in (None, -1) else args.seed
    image_seeds(seed, args.num_images, "--seed")
    if args.sampler is not None:
        naming("--sampler", resolve_sampler, args.sampler)
    args.controls = _control_settings(args)
    return prompts, naming("-o", plan_outputs, args.output, len(prompts), args.num_images, args.grid), seed


def _apply_parameters(args: argparse.Namespace, found: dict) -> None:
    """Fill each flag not given on the command line from `found` (a prompts file replaces the image's prompt)."""
    for key, dest in FROM_PNG.items():
        if dest == "strength" and args.image is None:
            continue  # an edit's strength: the image it edited is not in the parameters
        if key in found and getattr(args, dest) is None and not (dest == "prompt" and args.prompts is not None):
            setattr(args, dest, found[key])


def _model_name(model: str | None) -> str:
    """How the images' parameters name the model: its folder's name, or its file's without the extension."""
    path = Path(model) if model else BUNDLED_MODEL
    return path.name if path.is_dir() else path.stem


def cmd_convert(args: argparse.Namespace) -> None:
    import torch

    from latent_diffusion.files.atomic import check_writable
    from latent_diffusion.formats.controlnet import is_controlnet, load_controlnet, save_controlnet
    from latent_diffusion.formats.model import load_model, save_model

    check_writable(args.dest, "DEST", folder=args.to != "original")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(args.dtype)
    if is_controlnet(args.source):
        if args.to == "native":
            raise ValueError("--to native: a ControlNet is written as --to original (a .safetensors file with "
                             "control_model.* keys, what AUTOMATIC1111 and ComfyUI load) or --to diffusers")
        save_controlnet(load_controlnet(args.source, dtype=dtype), args.dest, args.to)
        print(f"wrote {args.dest} (ControlNet, {args.to})")
        return
    options = reader_options(args)
    parts = load_model(args.source, **options)
    if dtype is not None:
        parts = parts.to(dtype)
    save_model(parts, args.dest, args.to)
    print(f"wrote {args.dest} ({args.to})")


def reader_options(args: argparse.Namespace) -> dict:
    """The model reader's options the command line gave (`load_model`)."""
    options = {"prediction_type": args.prediction_type} if args.prediction_type else {}
    if args.t5_tokenizer:
        options["t5_tokenizer"] = args.t5_tokenizer
    return options


def add_reader_flags(p) -> None:
    """--prediction-type and --t5-tokenizer: what a single checkpoint file may not say."""
    p.add_argument("--prediction-type", default=None, choices=["epsilon", "v_prediction"],
                   help="for a checkpoint without its YAML: what the UNet predicts")
    p.add_argument("--t5-tokenizer", default=None, metavar="FOLDER",
                   help="for an SD3 single file with T5: the folder of T5's tokenizer.json (default: tokenizer_3/ "
                        "beside the file, e.g. a diffusers SD3 folder's)")


def add_model_commands(sub) -> None:
    """`generate` and `convert`."""
    _add_generate_command(sub)

    p = sub.add_parser("convert", help="convert a model between formats: native, original (a single "
                                       "Stable Diffusion checkpoint file), diffusers (a folder)")
    p.add_argument("source", help="model folder, .safetensors / .ckpt checkpoint, or diffusers folder")
    p.add_argument("dest", help="where to write (a .safetensors file for --to original, else a folder)")
    p.add_argument("--to", required=True, choices=["native", "original", "diffusers"], help="output format")
    add_reader_flags(p)
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="store weights as (default: "
                                                                                  "as read)")
    p.set_defaults(func=cmd_convert)


GENERATE_DESCRIPTION = """\
Text to image. Image k of --num-images N is drawn with seed + k alone (its initial and its sampler's noise), so
`--seed S --num-images 4` draws the same images as --seed S, S+1, S+2, S+3 one at a time (as AUTOMATIC1111).

Files: -o out.png writes out.png, out-1.png, ..., out-{{N-1}}.png (and out-grid.png with --grid); with
--prompts FILE, prompt p (from 0, in file order) writes out-0000.png, out-0000-1.png, ... (out-0000-grid.png).
-o DIR/ (or an existing folder) writes DIR/out.png and so on. The extension picks the format: .png, .jpg/.jpeg
or .webp. Each image (not the grid) carries its settings as AUTOMATIC1111 writes them (PNG: a 'parameters' text
chunk; JPEG, WebP: EXIF UserComment), which --from-png reads back.

samplers: {samplers}
AUTOMATIC1111's names work too, in any case: {a1111}, and '<name> Karras' (= --karras) for {karras}."""


def _add_generate_command(sub) -> None:
    """`generate`: its flags and what each does."""
    from latent_diffusion.generation.request import MAX_GUIDANCE, MAX_NUM_IMAGES
    from latent_diffusion.samplers import A1111_NAMES, SAMPLERS, sampler_label, sampler_options

    takes = {option: ", ".join(n for n in SAMPLERS if option in sampler_options(n)) for option in ("eta", "karras")}
    p = sub.add_parser("generate", help="text to image with a trained model",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=GENERATE_DESCRIPTION.format(
                           samplers=", ".join(SAMPLERS), a1111=", ".join(A1111_NAMES.values()),
                           karras=", ".join(sampler_label(n) for n in takes["karras"].split(", "))))
    p.add_argument("prompt", nargs="?", default=None, help="what to draw (or --prompts FILE, or --from-png IMAGE)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="draw every prompt of a text file, one a line (blank lines and lines starting with # are "
                        "skipped), the model loaded once; each prompt gets the same seeds")
    p.add_argument("--from-png", default=None, metavar="IMAGE",
                   help="take prompt, negative prompt, steps, sampler, guidance, seed and size from the "
                        "parameters of an image written by `ldm generate` or AUTOMATIC1111 (PNG, JPEG or WebP); "
                        "flags given as well win")
    p.add_argument("-o", "--output", default="out.png", metavar="PATH",
                   help="file for the first image, the others numbered after it; or a folder (see above)")
    p.add_argument("--num-images", type=int, default=1, metavar="N",
                   help=f"images per prompt, 1 to {MAX_NUM_IMAGES} (drawn in batches that fit in memory)")
    p.add_argument("--grid", action="store_true", help="also write the images of each prompt as one grid")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the first image, 0 to 2**64-1 (default, or -1: a random one, printed)")
    p.add_argument("--model", default=None, help="a model folder (`ldm train`), a Stable Diffusion checkpoint "
                                                 "(.safetensors / .ckpt) or a diffusers folder (default: the shapes "
                                                 "model that ships in models/ldm-shapes)")
    add_reader_flags(p)
    p.add_argument("--negative", default=None, help="negative prompt (replaces the empty prompt in guidance)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None,
                   help=f"guidance scale w, 0 to {MAX_GUIDANCE:g} (0: unconditional, 1: no guidance; default: the "
                        "model's)")
    p.add_argument("--guidance-rescale", type=float, default=None, help="guidance rescale φ in [0, 1] (default 0)")
    p.add_argument("--sampler", default=None, help="sampler (default: the model's); names above")
    p.add_argument("--karras", action=argparse.BooleanOptionalAction, default=None,
                   help=f"Karras et al.'s σ spacing of the steps (samplers: {takes['karras']})")
    p.add_argument("--eta", type=float, default=None,
                   help=f"η in [0, 1], the noise added back at each step: 0 deterministic, 1 ancestral (samplers: "
                        f"{takes['eta']}; default: the sampler's, ddim 0, euler_a 1)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: training size)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: training size)")
    p.add_argument("--lora", type=lora_argument, action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="apply a LoRA file (kohya/AUTOMATIC1111, LoCon or diffusers/PEFT) with WEIGHT (default 1; "
                        "AUTOMATIC1111's <lora:name:WEIGHT>); repeatable, each with its own weight")
    p.add_argument("--embedding", type=embedding_argument, action="append", default=[], metavar="FILE[:TOKEN]",
                   help="load a textual-inversion embedding (AUTOMATIC1111 .pt/.safetensors, diffusers "
                        "learned_embeds); its word (TOKEN, else the file's name or stored token) then works in "
                        "prompts; repeatable")
    p.add_argument("--image", default=None,
                   help="an image to start from (img2img; the output has its size unless --width/--height say "
                        "otherwise), the image to inpaint with --mask, or the low-resolution input of an upscaling "
                        "model; 16-bit, palette and CMYK images are converted")
    p.add_argument("--mask", default=None, help="inpainting mask image for --image: white = region to draw anew "
                                                "(any model: latent blending; SD-inpainting models: their own "
                                                "condition)")
    p.add_argument("--strength", type=float, default=None,
                   help="with --image: the share of the steps run from the noised image, in (0, 1] (AUTOMATIC1111's "
                        "denoising strength; default 0.75 for img2img, 1 for inpainting)")
    p.add_argument("--overlay", action=argparse.BooleanOptionalAction, default=True,
                   help="inpainting: paste the unmasked pixels of --image back over the result (default; "
                        "--no-overlay keeps the decoded ones)")
    p.add_argument("--control", action="append", default=[], metavar="IMAGE",
                   help="a control image for a ControlNet (with --control-model); repeatable: several ControlNets "
                        "at once, the other --control-* flags then given once for all or once each, in order")
    p.add_argument("--control-model", action="append", default=[], metavar="FILE",
                   help="the ControlNet: an original file (control_v11p_sd15_canny.pth / .safetensors) or a "
                        "diffusers folder")
    p.add_argument("--control-type", action="append", default=[], metavar="TYPE",
                   help="how the control image is made from --control: canny (edges detected here), seg / mask "
                        "(a map of regions, kept exact), none / depth / openpose / ... (a map already made); "
                        "default none")
    p.add_argument("--control-scale", action="append", default=[], type=float, metavar="S",
                   help="the ControlNet's weight (default 1)")
    p.add_argument("--control-start", action="append", default=[], type=float, metavar="F",
                   help="the share of the steps before the ControlNet acts (default 0)")
    p.add_argument("--control-end", action="append", default=[], type=float, metavar="F",
                   help="the share of the steps after which it stops (default 1)")
    p.add_argument("--guess-mode", action="store_true",
                   help="ControlNets on the conditional branch of guidance only, shallow layers weakened: they "
                        "find the content in the control image even with an empty prompt")
    p.add_argument("--image-prompt", default=None, metavar="IMAGE",
                   help="an image whose content steers the result (IP-Adapter; with --ip-adapter and "
                        "--image-encoder)")
    p.add_argument("--ip-adapter", default=None, metavar="FILE",
                   help="IP-Adapter weights (ip-adapter_sd15.bin / .safetensors; base or Plus)")
    p.add_argument("--image-encoder", default=None, metavar="PATH",
                   help="the IP-Adapter's CLIP image encoder: a folder with config.json and model.safetensors")
    p.add_argument("--image-prompt-scale", type=float, default=None, metavar="S",
                   help="the image prompt's weight λ (default 1; 0 ignores it, 0.5 balances it with the text)")
    p.add_argument("--original-size", type=int, nargs=2, default=None, metavar=("HEIGHT", "WIDTH"),
                   help="SDXL: the size the model is told the image had before cropping (default: the output's)")
    p.add_argument("--crop", type=int, nargs=2, default=None, metavar=("TOP", "LEFT"),
                   help="SDXL: the crop's top-left corner the model is told of (default 0 0: uncropped)")
    p.add_argument("--target-size", type=int, nargs=2, default=None, metavar=("HEIGHT", "WIDTH"),
                   help="SDXL: the target size the model is told of (default: the output's)")
    p.add_argument("--aesthetic-score", type=float, default=None, metavar="S",
                   help="SDXL refiner: the aesthetic score asked for (default 6)")
    p.add_argument("--negative-aesthetic-score", type=float, default=None, metavar="S",
                   help="SDXL refiner: the aesthetic score of the negative prompt and ∅ (default 2.5)")
    p.add_argument("--refiner", default=None, metavar="MODEL",
                   help="SDXL: a refiner (any format) that takes over the last steps in latent space")
    p.add_argument("--refiner-start", type=float, default=None, metavar="F",
                   help="SDXL: the share of the denoising the model does before --refiner takes over (default 0.8)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "int8"],
                   help="bf16/fp16: weights in that dtype (half the memory); bf16 math on GPUs and on CPUs with AMX "
                        "bf16 tiles, else fp32 math (LDM_CPU_BF16_MATH=1/0 decides instead); fp16 is for GPUs; "
                        "int8: as bf16, with the UNet's and text encoder's linear layers in int8 (torchao; int8 "
                        "products where the CPU has VNNI but no AMX, else weight-only: LDM_INT8_MODE=dynamic/weight)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "openvino", "inductor"],
                   help="run the UNet in PyTorch (torch), OpenVINO (openvino: CPU, pip install openvino) or compiled "
                        "ahead of time by Inductor (inductor: CPU or GPU, needs g++; at the precision the weights "
                        "are kept in); both compile the UNet once (minutes) and keep it in a cache; auto (default): "
                        "PyTorch, or a compiled backend where its graph is in that cache and measured faster on this "
                        "machine")
    p.add_argument("--vae-tile", type=int, default=0, metavar="N",
                   help="decode in overlapping N×N latent tiles (e.g. 64) so that large images fit in memory; "
                        "0 (default): decode whole")
    p.set_defaults(func=cmd_generate)
