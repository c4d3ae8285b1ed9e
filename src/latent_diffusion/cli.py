"""The `ldm` command: thin wrappers that parse arguments, call the library and report."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from latent_diffusion.config import ConfigError
from latent_diffusion.io.checkpoint import CheckpointError

BUNDLED_MODEL = Path(__file__).resolve().parents[2] / "models" / "ldm-shapes"
USER_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, ValueError)


def cmd_make_shapes(args: argparse.Namespace) -> None:
    from latent_diffusion.data.shapes import write_shapes_folder

    out = write_shapes_folder(args.out, args.count, args.seed)
    print(f"wrote {args.count} captioned shape images to {out}")


def cmd_train_autoencoder(args: argparse.Namespace) -> None:
    from latent_diffusion.config import AutoencoderRunConfig, load_config
    from latent_diffusion.training.autoencoder import train_autoencoder

    cfg = load_config(args.config, AutoencoderRunConfig, args.set)
    last = train_autoencoder(cfg, args.data, args.out, device=args.device)
    print(json.dumps({"run": str(args.out), **last}))


def cmd_eval_autoencoder(args: argparse.Namespace) -> None:
    from latent_diffusion.evaluation.autoencoder import evaluate_autoencoder_run

    figures = evaluate_autoencoder_run(args.run, args.data, args.split, args.num_images, args.batch_size,
                                       args.device, write_scale=not args.no_write_scale, features=args.features)
    print(f"PSNR {figures['psnr']:.2f} dB   SSIM {figures['ssim']:.4f}   "
          f"latent {figures['latent_shape']} mean {figures['latent_mean']:.4f} std {figures['latent_std']:.4f}   "
          f"latent_scale {figures['latent_scale']:.5f}   ({figures['num_images']} images)"
          + (f"   rFID {figures['rfid']:.2f}" if "rfid" in figures else ""))
    print(json.dumps(figures))


def cmd_train(args: argparse.Namespace) -> None:
    from latent_diffusion.config import LDMRunConfig, load_config
    from latent_diffusion.training.ldm import train_ldm

    cfg = load_config(args.config, LDMRunConfig, args.set)
    last = train_ldm(cfg, args.data, args.out, device=args.device)
    print(json.dumps({"run": str(args.out), **last}))


def cmd_generate(args: argparse.Namespace) -> None:
    from latent_diffusion.pipeline import Pipeline

    from PIL import Image

    if args.vae_tile < 0 or args.vae_tile == 1:
        raise ValueError(f"--vae-tile = {args.vae_tile}: expected 0 (decode whole) or a tile of >= 2 latent pixels")
    options = {"prediction_type": args.prediction_type} if args.prediction_type else {}
    pipe = Pipeline.from_pretrained(args.model or bundled_model(), device=args.device, precision=args.precision,
                                    backend=args.backend, **options)
    pipe.vae_tile = args.vae_tile or None
    spatial = {name: Image.open(path) for name, path in (("image", args.image), ("mask", args.mask)) if path}
    images = pipe(args.prompt, negative_prompt=args.negative, steps=args.steps, guidance_scale=args.guidance,
                  sampler=args.sampler, seed=args.seed, num_images=args.num_images, height=args.height,
                  width=args.width, guidance_rescale=args.guidance_rescale, **spatial)
    pipe.save(images, args.output)
    print(f"wrote {args.output}")


def bundled_model() -> str:
    """The text-to-image model that ships with the source tree (`models/ldm-shapes`)."""
    path = BUNDLED_MODEL
    if not path.is_dir():
        raise FileNotFoundError(f"no --model given, and the bundled model is not at {path} (it ships with the "
                                "source checkout): pass --model PATH")
    return str(path)


def cmd_convert(args: argparse.Namespace) -> None:
    import torch

    from latent_diffusion.io.model import load_model, save_model

    options = {"prediction_type": args.prediction_type} if args.prediction_type else {}
    parts = load_model(args.source, **options)
    if args.dtype:
        parts = parts.to({"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype])
    save_model(parts, args.dest, args.to)
    print(f"wrote {args.dest} ({args.to})")


def cmd_eval_adherence(args: argparse.Namespace) -> None:
    import torch

    from latent_diffusion.data.imagefolder import ImageFolder
    from latent_diffusion.evaluation.shapes import evaluate_model_adherence
    from latent_diffusion.evaluation.sweep import plot_sweep, settings
    from latent_diffusion.images import make_grid, pil_to_tensor, save_image
    from latent_diffusion.io.atomic import atomic_write_bytes
    from latent_diffusion.pipeline import Pipeline

    sweep = settings(args.sampler, args.steps, args.guidance)
    held_out = ImageFolder(args.data, resolution=64)
    captions = [held_out.caption(i) for i in range(min(args.num, len(held_out)))]
    pipe = Pipeline.from_pretrained(args.model, device=args.device, precision=args.precision)
    figures = evaluate_model_adherence(pipe, captions, sweep, args.seed)
    images = figures.pop("images")
    out = args.out or f"{args.model}/adherence"
    guidance_only = len(sweep) == len(args.guidance)  # one sampler and one step count
    for setting, ims in zip(sweep, images):
        name = f"w{setting.guidance}" if guidance_only else \
            f"{setting.sampler}_{setting.steps}_w{setting.guidance}"
        save_image(make_grid([torch.stack([pil_to_tensor(im) for im in ims[r * 10:(r + 1) * 10]])
                              for r in range(min(4, -(-len(ims) // 10)))], scale=2), f"{out}/samples_{name}.png")
    atomic_write_bytes(f"{out}/adherence.json", (json.dumps(figures, indent=2) + "\n").encode())
    results = figures["results"]
    title = f"caption adherence ({len(captions)} held-out captions)"
    if guidance_only:  # every attribute against w
        plot_sweep(results, {a: a for a in ("all", "colour", "shape", "size", "position")}, f"{out}/adherence.png",
                   title, "share of objects")
    else:
        plot_sweep(results, {"all": "all four right"}, f"{out}/adherence.png", title, "share of objects fully right")
    for f in results:
        print(f"{f['sampler']} {f['steps']} steps w={f['guidance']}: all attributes {f['all']:.1%}   colour "
              f"{f['colour']:.1%}  shape {f['shape']:.1%}  size {f['size']:.1%}  position {f['position']:.1%}   "
              f"({f['objects']} objects)")


def cmd_train_features(args: argparse.Namespace) -> None:
    import torch

    from latent_diffusion.data import open_dataset
    from latent_diffusion.evaluation.features import FeatureNetConfig, extract, save_feature_net, train_feature_net

    cfg = FeatureNetConfig(in_channels=args.channels, num_classes=args.num_classes, resolution=args.resolution)
    train = open_dataset(args.data, args.resolution, args.channels, "train")
    model = train_feature_net(train, cfg, epochs=args.epochs, seed=args.seed)
    test = open_dataset(args.data, args.resolution, args.channels, "test")
    images = torch.stack([test[i]["image"] for i in range(len(test))])
    labels = torch.tensor([test[i]["label"] for i in range(len(test))])
    accuracy = float((extract(model, images)[1] == labels).float().mean())
    save_feature_net(model, args.out, {"data": args.data, "epochs": args.epochs, "test_accuracy": accuracy})
    print(f"test accuracy {accuracy:.2%} ({len(test)} images); wrote {args.out}")


def cmd_eval_fid(args: argparse.Namespace) -> None:
    from latent_diffusion.data import open_dataset
    from latent_diffusion.evaluation.features import extract, load_feature_net
    from latent_diffusion.evaluation.generative import evaluate_samples, reference_images
    from latent_diffusion.evaluation.inception import inception_features, load_fid_inception
    from latent_diffusion.evaluation.sweep import plot_sweep, settings
    from latent_diffusion.io.atomic import atomic_write_bytes
    from latent_diffusion.pipeline import Pipeline

    sweep = settings(args.sampler, args.steps, args.guidance)
    pipe = Pipeline.from_pretrained(args.model, device=args.device, precision=args.precision)
    features = load_feature_net(args.features)
    channels = pipe.ae_config.model.in_channels
    real = reference_images(open_dataset(args.data, pipe.config.data.resolution, channels, "test"))
    reference = extract(features, real)[0]
    inception = None
    if args.inception:
        model = load_fid_inception(args.inception, pipe.device)
        print(f"Inception features of the {len(real)} reference images (the standard FID's network) ...")
        inception = (model, inception_features(model, real))
    figures = evaluate_samples(pipe, features, reference, args.num, sweep, features.config.num_classes, args.seed,
                               inception=inception)
    out = Path(args.out or f"{args.model}/fid")
    atomic_write_bytes(out / "fid.json", (json.dumps(figures, indent=2) + "\n").encode())
    results = figures["results"]
    plot_sweep(results, {"fid": "FID"}, out / "fid.png", "domain-feature FID", "FID")
    if inception is not None:
        plot_sweep(results, {"inception_fid": "Inception FID"}, out / "inception_fid.png", "Inception FID", "FID")
    plot_sweep(results, {"class_accuracy": "class accuracy"}, out / "accuracy.png",
               "class accuracy of conditional samples", "accuracy")
    for f in results:
        print(f"{f['sampler']} {f['steps']} steps w={f['guidance']}: FID {f['fid']:.2f}  KID {f['kid']:.4f} ± "
              f"{f['kid_std']:.4f}  class accuracy {f['class_accuracy']:.1%}  diversity {f['diversity']:.3f}  "
              f"{f['seconds_per_image'] * 1000:.1f} ms/image"
              + (f"  Inception FID {f['inception_fid']:.2f}" if "inception_fid" in f else ""))


def _add_training_arguments(p: argparse.ArgumentParser, configs: str) -> None:
    p.add_argument("--config", required=True, help=f"YAML config (see {configs})")
    p.add_argument("--data", required=True, help="image folder (captions in .txt or metadata.jsonl), "
                                                 "Fashion-MNIST IDX folder, or 'fashion-mnist'")
    p.add_argument("--out", required=True, help="run folder; rerun on the same folder to resume")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set training.max_steps=200 (repeatable)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm", description="Latent diffusion: autoencoder, diffusion, generation.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-shapes", help="write a folder of synthetic captioned shape images")
    p.add_argument("out", help="output folder")
    p.add_argument("--count", type=int, default=1000, help="number of images (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed; the same seed always gives the same images")
    p.set_defaults(func=cmd_make_shapes)

    p = sub.add_parser("train-autoencoder", help="train (or resume) the KL autoencoder")
    _add_training_arguments(p, "configs/autoencoder/")
    p.set_defaults(func=cmd_train_autoencoder)

    p = sub.add_parser("eval-autoencoder", help="PSNR/SSIM and latent statistics; writes latent_scale")
    p.add_argument("run", help="autoencoder run folder")
    p.add_argument("--data", required=True, help="held-out image folder, or Fashion-MNIST (test split)")
    p.add_argument("--split", default="test", choices=["train", "test"], help="Fashion-MNIST split")
    p.add_argument("--num-images", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-write-scale", action="store_true", help="don't write latent_scale into the run config")
    p.add_argument("--features", default=None, help="feature network folder (`ldm train-features`): adds rFID")
    p.set_defaults(func=cmd_eval_autoencoder)

    p = sub.add_parser("train", help="train (or resume) the latent diffusion UNet")
    _add_training_arguments(p, "configs/ldm/")
    p.set_defaults(func=cmd_train)

    _add_model_commands(sub)
    _add_evaluation_commands(sub)
    return parser


def _add_model_commands(sub) -> None:
    """`generate` and `convert`."""
    p = sub.add_parser("generate", help="text to image with a trained model")
    p.add_argument("prompt", help="what to draw")
    p.add_argument("-o", "--output", default="out.png", help="PNG to write (a grid for several images)")
    p.add_argument("--model", default=None, help="a model folder (`ldm train`), a Stable Diffusion checkpoint "
                                                 "(.safetensors / .ckpt) or a diffusers folder (default: the shapes "
                                                 "model that ships in models/ldm-shapes)")
    p.add_argument("--prediction-type", default=None, choices=["epsilon", "v_prediction"],
                   help="for a Stable Diffusion checkpoint without its YAML: what the UNet predicts")
    p.add_argument("--negative", default=None, help="negative prompt (replaces the empty prompt in guidance)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale w (default: the model's)")
    p.add_argument("--guidance-rescale", type=float, default=0.0, help="guidance rescale φ in [0, 1]")
    p.add_argument("--backend", default="torch", choices=["torch", "openvino"],
                   help="run the UNet in PyTorch (default) or OpenVINO (CPU; pip install openvino)")
    p.add_argument("--vae-tile", type=int, default=0, metavar="N",
                   help="decode in overlapping N×N latent tiles (e.g. 64) so that large images fit in memory; "
                        "0 (default): decode whole")
    p.add_argument("--sampler", default=None, help="sampler name (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: training size)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: training size)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="bf16/fp16: weights in that dtype (half the memory); bf16 math where the device multiplies "
                        "bf16 faster than fp32, else fp32 math (measured once on a CPU; LDM_CPU_BF16_MATH=1/0 "
                        "decides instead); fp16 is for GPUs")
    p.add_argument("--image", default=None, help="input image of a model with a spatial condition (the "
                                                 "low-resolution image, or the image to inpaint)")
    p.add_argument("--mask", default=None, help="inpainting mask image: white = region to generate")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("convert", help="convert a model between formats: native, original (a single "
                                       "Stable Diffusion checkpoint file), diffusers (a folder)")
    p.add_argument("source", help="model folder, .safetensors / .ckpt checkpoint, or diffusers folder")
    p.add_argument("dest", help="where to write (a .safetensors file for --to original, else a folder)")
    p.add_argument("--to", required=True, choices=["native", "original", "diffusers"], help="output format")
    p.add_argument("--prediction-type", default=None, choices=["epsilon", "v_prediction"],
                   help="for a checkpoint without its YAML: what the UNet predicts")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="store weights as (default: "
                                                                                  "as read)")
    p.set_defaults(func=cmd_convert)


def _add_evaluation_commands(sub) -> None:
    """`train-features`, `eval-fid` and `eval-adherence`."""
    p = sub.add_parser("train-features", help="train the domain feature network used by FID/KID and accuracy")
    p.add_argument("--data", required=True, help="labelled data with train/test splits ('fashion-mnist')")
    p.add_argument("--out", required=True, help="folder to write (features.json, features.safetensors)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_features)

    p = sub.add_parser("eval-fid", help="FID, KID, class accuracy and diversity of a model's samples per guidance")
    p.add_argument("model", help="model folder (class- or caption-conditional on the data's classes)")
    p.add_argument("--data", required=True, help="reference data (its test split), e.g. 'fashion-mnist'")
    p.add_argument("--features", required=True, help="feature network folder (`ldm train-features`)")
    p.add_argument("--inception", default=None, metavar="FILE",
                   help="the FID Inception weights (pytorch-fid's pt_inception-2015-12-05-6726825d.pth, torch-"
                        "fidelity's copy, or a .safetensors of it): also report the standard Inception FID")
    p.add_argument("--num", type=int, default=1000, help="samples per guidance scale")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    p.add_argument("--steps", type=int, nargs="+", default=[25], help="sampling steps to compare")
    p.add_argument("--sampler", nargs="+", default=["dpmpp_2m"], help="samplers to compare")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: MODEL/fid)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.set_defaults(func=cmd_eval_fid)

    p = sub.add_parser("eval-adherence", help="caption adherence of a shapes model on held-out captions")
    p.add_argument("model", help="model folder")
    p.add_argument("--data", required=True, help="held-out shapes folder (its captions are used)")
    p.add_argument("--num", type=int, default=200, help="number of captions (default 200)")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 5.0], help="guidance scales to compare")
    p.add_argument("--steps", type=int, nargs="+", default=[25], help="sampling steps to compare")
    p.add_argument("--sampler", nargs="+", default=["dpmpp_2m"], help="samplers to compare")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for adherence.json and sample grids (default MODEL/adherence)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.set_defaults(func=cmd_eval_adherence)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as exc:
        if os.environ.get("LDM_DEBUG"):
            raise
        print(f"ldm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ldm {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
