"""`ldm eval-autoencoder`, `train-features`, `eval-fid` and `eval-adherence`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from latent_diffusion.cli.common import default_output, positive_int, seed_int


def cmd_eval_autoencoder(args: argparse.Namespace) -> None:
    from latent_diffusion.evaluation.autoencoder import evaluate_autoencoder_run

    out = args.out or default_output("eval-autoencoder", args.run)
    figures = evaluate_autoencoder_run(args.run, args.data, out, args.split, args.num_images, args.batch_size,
                                       args.device, write_scale=args.write_scale, features=args.features)
    print(f"PSNR {figures['psnr']:.2f} dB   SSIM {figures['ssim']:.4f}   "
          f"latent {figures['latent_shape']} mean {figures['latent_mean']:.4f} std {figures['latent_std']:.4f}   "
          f"latent_scale {figures['latent_scale']:.5f}   ({figures['num_images']} images)"
          + (f"   rFID {figures['rfid']:.2f}" if "rfid" in figures else ""))
    print(f"wrote {out}/eval.json and eval.png" + (f"; latent_scale written to {args.run}/config.yaml"
                                                  if args.write_scale else ""))
    print(json.dumps(figures))


def cmd_eval_adherence(args: argparse.Namespace) -> None:
    from latent_diffusion.data.imagefolder import ImageFolder
    from latent_diffusion.evaluation.shapes import adherence_grid, evaluate_model_adherence
    from latent_diffusion.evaluation.sweep import plot_sweep, settings
    from latent_diffusion.images import save_image
    from latent_diffusion.files.atomic import atomic_write_bytes, check_writable
    from latent_diffusion.pipeline import Pipeline

    sweep = settings(args.sampler, args.steps, args.guidance)
    out = args.out or default_output("eval-adherence", args.model)
    check_writable(out, "--out", folder=True)
    held_out = ImageFolder(args.data, resolution=64)
    captions = [held_out.caption(i) for i in range(min(args.num, len(held_out)))]
    pipe = Pipeline.from_pretrained(args.model, device=args.device, precision=args.precision)
    figures = evaluate_model_adherence(pipe, captions, sweep, args.seed)
    images = figures.pop("images")
    guidance_only = len(sweep) == len(args.guidance)  # one sampler and one step count
    for setting, ims in zip(sweep, images):
        name = f"w{setting.guidance}" if guidance_only else \
            f"{setting.sampler}_{setting.steps}_w{setting.guidance}"
        save_image(adherence_grid(ims, captions), f"{out}/samples_{name}.png")
    atomic_write_bytes(f"{out}/adherence.json", (json.dumps(figures, indent=2) + "\n").encode())
    results = figures["results"]
    title = f"caption adherence ({len(captions)} held-out captions)"
    if guidance_only:  # every attribute against w
        plot_sweep(results, {a: a for a in ("all", "colour", "shape", "size", "position")}, f"{out}/adherence.png",
                   title, "share of objects", share=True)
    else:
        plot_sweep(results, {"all": "all four right"}, f"{out}/adherence.png", title, "share of objects fully right",
                   share=True)
    for f in results:
        print(f"{f['sampler']} {f['steps']} steps w={f['guidance']}: all attributes {f['all']:.1%}   colour "
              f"{f['colour']:.1%}  shape {f['shape']:.1%}  size {f['size']:.1%}  position {f['position']:.1%}   "
              f"({f['objects']} objects)")


def cmd_train_features(args: argparse.Namespace) -> None:
    import torch

    from latent_diffusion.data import open_dataset
    from latent_diffusion.evaluation.features import FeatureNetConfig, extract, save_feature_net, train_feature_net
    from latent_diffusion.files.atomic import check_writable

    check_writable(args.out, "--out", folder=True)

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
    from latent_diffusion.files.atomic import atomic_write_bytes, check_writable
    from latent_diffusion.pipeline import Pipeline

    sweep = settings(args.sampler, args.steps, args.guidance)
    out = Path(args.out or default_output("eval-fid", args.model))
    check_writable(out, "--out", folder=True)
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
    atomic_write_bytes(out / "fid.json", (json.dumps(figures, indent=2) + "\n").encode())
    results = figures["results"]
    plot_sweep(results, {"fid": "FID"}, out / "fid.png", "domain-feature FID", "FID", log_y=True)
    if inception is not None:
        plot_sweep(results, {"inception_fid": "Inception FID"}, out / "inception_fid.png", "Inception FID", "FID",
                   log_y=True)
    plot_sweep(results, {"class_accuracy": "class accuracy"}, out / "accuracy.png",
               "class accuracy of conditional samples", "accuracy", share=True)
    for f in results:
        print(f"{f['sampler']} {f['steps']} steps w={f['guidance']}: FID {f['fid']:.2f}  KID {f['kid']:.4f} ± "
              f"{f['kid_std']:.4f}  class accuracy {f['class_accuracy']:.1%}  diversity {f['diversity']:.3f}  "
              f"{f['seconds_per_image'] * 1000:.1f} ms/image"
              + (f"  Inception FID {f['inception_fid']:.2f}" if "inception_fid" in f else ""))


def add_evaluation_commands(sub) -> None:
    """`eval-autoencoder`, `train-features`, `eval-fid` and `eval-adherence`."""
    p = sub.add_parser("eval-autoencoder", help="PSNR/SSIM and latent statistics (--write-scale: store the "
                                                "latent_scale that `ldm train` needs)")
    p.add_argument("run", help="autoencoder run folder")
    p.add_argument("--data", required=True, help="held-out image folder, or Fashion-MNIST (test split)")
    p.add_argument("--split", default="test", choices=["train", "test"], help="Fashion-MNIST split")
    p.add_argument("--num-images", type=positive_int, default=None, help="evaluate only the first N images")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--write-scale", action="store_true",
                   help="store the measured latent_scale in RUN/config.yaml (needed once before `ldm train` uses "
                        "this autoencoder); without it the run folder is only read")
    p.add_argument("--out", default=None, help="folder for eval.json and eval.png (default: "
                                               "runs/eval-autoencoder/RUN-NAME)")
    p.add_argument("--features", default=None, help="feature network folder (`ldm train-features`): adds rFID")
    p.set_defaults(func=cmd_eval_autoencoder)

    p = sub.add_parser("train-features", help="train the domain feature network used by FID/KID and accuracy")
    p.add_argument("--data", required=True, help="labelled data with train/test splits ('fashion-mnist')")
    p.add_argument("--out", required=True, help="folder to write (features.json, features.safetensors)")
    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--channels", type=positive_int, default=1)
    p.add_argument("--num-classes", type=positive_int, default=10)
    p.add_argument("--resolution", type=positive_int, default=32)
    p.add_argument("--seed", type=seed_int, default=0)
    p.set_defaults(func=cmd_train_features)

    p = sub.add_parser("eval-fid", help="FID, KID, class accuracy and diversity of a model's samples per guidance")
    p.add_argument("model", help="model folder (class- or caption-conditional on the data's classes)")
    p.add_argument("--data", required=True, help="reference data (its test split), e.g. 'fashion-mnist'")
    p.add_argument("--features", required=True, help="feature network folder (`ldm train-features`)")
    p.add_argument("--inception", default=None, metavar="FILE",
                   help="the FID Inception weights (pytorch-fid's pt_inception-2015-12-05-6726825d.pth, torch-"
                        "fidelity's copy, or a .safetensors of it): also report the standard Inception FID")
    p.add_argument("--num", type=positive_int, default=1000, help="samples per guidance scale")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    p.add_argument("--steps", type=positive_int, nargs="+", default=[25], help="sampling steps to compare")
    p.add_argument("--sampler", nargs="+", default=["dpmpp_2m"], help="samplers to compare")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: runs/eval-fid/MODEL-NAME)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "int8"])
    p.set_defaults(func=cmd_eval_fid)

    p = sub.add_parser("eval-adherence", help="caption adherence of a shapes model on held-out captions")
    p.add_argument("model", help="model folder")
    p.add_argument("--data", required=True, help="held-out shapes folder (its captions are used)")
    p.add_argument("--num", type=positive_int, default=200, help="number of captions (default 200)")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 5.0], help="guidance scales to compare")
    p.add_argument("--steps", type=positive_int, nargs="+", default=[25], help="sampling steps to compare")
    p.add_argument("--sampler", nargs="+", default=["dpmpp_2m"], help="samplers to compare")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--out", default=None, help="folder for adherence.json and sample grids (default: "
                                               "runs/eval-adherence/MODEL-NAME)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "int8"])
    p.set_defaults(func=cmd_eval_adherence)
