"""`ldm make-shapes`, `train-autoencoder`, `train`, `train-lora`, `train-controlnet` and `train-embedding`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from latent_diffusion.cli.common import add_training_arguments, positive_int, seed_int


def cmd_make_shapes(args: argparse.Namespace) -> None:
    from latent_diffusion.data.shapes import write_shapes_folder

    out = write_shapes_folder(args.out, args.count, args.seed, colours=args.colours, shapes=args.shapes,
                              control=args.control)
    print(f"wrote {args.count} captioned shape images to {out}")


def cmd_train_autoencoder(args: argparse.Namespace) -> None:
    from latent_diffusion.config import AutoencoderRunConfig, load_config, resolve_paths
    from latent_diffusion.training.autoencoder import train_autoencoder

    cfg = resolve_paths(load_config(args.config, AutoencoderRunConfig, args.set), args.config)
    last = train_autoencoder(cfg, args.data, args.out, device=args.device)
    print(json.dumps({"run": str(args.out), **last}))


def cmd_train(args: argparse.Namespace) -> None:
    from latent_diffusion.config import LDMRunConfig, load_config, resolve_paths
    from latent_diffusion.training.ldm import train_ldm

    cfg = resolve_paths(load_config(args.config, LDMRunConfig, args.set), args.config)
    last = train_ldm(cfg, args.data, args.out, device=args.device)
    print(json.dumps({"run": str(args.out), **last}))


def _adapter_config(args: argparse.Namespace, kind: str, **adapter):
    """The `AdapterRunConfig` of `ldm train-lora` / `train-controlnet` / `train-embedding` from its flags, checked as
    a config is."""
    from latent_diffusion.config import apply_overrides, from_dict, to_dict
    from latent_diffusion.training.adapter_config import AdapterRunConfig

    flags = {"max_steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.lr,
             "ema_decay": args.ema, "precision": args.precision, "max_minutes": args.max_minutes, "seed": args.seed,
             "checkpoint_every": args.save_every, "image_every": args.save_every}
    defaults = to_dict(AdapterRunConfig(model=args.model, kind=kind))["training"]
    data = {"model": args.model, "kind": kind, kind: adapter, "resolution": args.resolution,
            "p_uncond": args.p_uncond, "prompts": args.prompt,
            "training": {**defaults, **{k: v for k, v in flags.items() if v is not None}}}
    return from_dict(AdapterRunConfig, apply_overrides(data, args.set))


def cmd_train_lora(args: argparse.Namespace) -> None:
    from latent_diffusion.training.adapters import train_adapter

    cfg = _adapter_config(args, "lora", rank=args.rank, alpha=args.alpha, conv=args.conv,
                          text_encoder=args.text_encoder, format=args.format)
    last = train_adapter(cfg, args.data, args.out, device=args.device)
    print(json.dumps({"run": str(args.out), **last}))


def cmd_train_controlnet(args: argparse.Namespace) -> None:
    from latent_diffusion.training.adapters import train_adapter

    cfg = _adapter_config(args, "controlnet", control_type=args.control_type, format=args.format)
    last = train_adapter(cfg, args.data, args.out, device=args.device)
    print(json.dumps({"run": str(args.out), **last}))


def cmd_train_embedding(args: argparse.Namespace) -> None:
    from latent_diffusion.files.atomic import check_writable
    from latent_diffusion.training.adapters import train_adapter

    out = Path(args.out)
    if out.suffix.lower() not in (".safetensors", ".pt"):
        raise ValueError(f"--out {out}: expected the embedding file to write, NAME.safetensors or NAME.pt")
    check_writable(out, "--out")
    cfg = _adapter_config(args, "embedding", token=args.token, vectors=args.vectors, init_word=args.init_word,
                          file=str(out))
    run = out.with_name(out.stem + ".run")
    last = train_adapter(cfg, args.data, run, device=args.device)
    print(json.dumps({"embedding": str(out), "run": str(run), **last}))


def add_training_commands(sub) -> None:
    """The training commands' parsers."""
    p = sub.add_parser("make-shapes", help="write a folder of synthetic captioned shape images")
    p.add_argument("out", help="output folder")
    p.add_argument("--count", type=positive_int, default=1000, help="number of images (default 1000)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed; the same seed always gives the same images")
    p.add_argument("--colours", nargs="+", default=None, metavar="COLOUR",
                   help="every object takes one of these colours, e.g. 'cyan', which the bundled model never saw "
                        "(default: the six it learnt)")
    p.add_argument("--shapes", nargs="+", default=None, metavar="SHAPE",
                   help="every object takes one of these shapes, e.g. 'heart', which the bundled model never saw "
                        "(default: circle, square, triangle)")
    p.add_argument("--control", default=None, choices=["mask", "edges"],
                   help="also write each image's control map for ControlNet training (conditioning/, named in "
                        "metadata.jsonl's conditioning_image column): the objects' silhouettes or outlines")
    p.set_defaults(func=cmd_make_shapes)

    p = sub.add_parser("train-autoencoder", help="train (or resume) the KL autoencoder")
    add_training_arguments(p, "configs/autoencoder/")
    p.set_defaults(func=cmd_train_autoencoder)

    p = sub.add_parser("train", help="train (or resume) the latent diffusion UNet")
    add_training_arguments(p, "configs/ldm/")
    p.set_defaults(func=cmd_train)

    _add_adapter_commands(sub)


def _add_adapter_arguments(p: argparse.ArgumentParser, steps: int) -> None:
    """The flags `train-lora` and `train-embedding` share."""
    p.add_argument("--model", required=True, help="the model to personalise (frozen): a model folder, a Stable "
                                                  "Diffusion checkpoint file or a diffusers folder")
    p.add_argument("--data", required=True, help="image folder with captions (NAME.txt beside each image, or "
                                                 "metadata.jsonl)")
    p.add_argument("--steps", type=positive_int, default=None, help=f"training steps (default {steps})")
    p.add_argument("--batch-size", type=positive_int, default=None, help="images per step (default 4)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-4; LoRA on small models and "
                                                         "embeddings learn faster at 1e-3 to 5e-3)")
    p.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="keep an exponential moving average of the trained weights and write it (e.g. 0.999)")
    p.add_argument("--resolution", type=positive_int, default=None, help="training image size (default: the "
                                                                         "model's)")
    p.add_argument("--p-uncond", type=float, default=None,
                   help="share of captions dropped for classifier-free guidance (default: the model's)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt of the sample grids (repeatable; "
                                                                "default: the first captions)")
    p.add_argument("--save-every", type=positive_int, default=None,
                   help="steps between checkpoints (the file is rewritten) and sample grids (default 100)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this many minutes, resumable")
    p.add_argument("--seed", type=seed_int, default=None, help="seed (default 0)")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"], help="training math")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="any other setting of adapter.yaml, e.g. --set training.lr_warmup_steps=50 (repeatable)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")


def _add_adapter_commands(sub) -> None:
    """`train-lora` and `train-embedding`."""
    p = sub.add_parser("train-lora", help="train a LoRA for a model on your captioned images (the model frozen); "
                                          "writes a file AUTOMATIC1111, ComfyUI and diffusers load",
                       description="Rerun the same command on the same --out to resume. Writes OUT/lora.safetensors "
                                   "(kohya) or OUT/pytorch_lora_weights.safetensors (--format peft) at every "
                                   "checkpoint; use it with `ldm generate --lora FILE[:WEIGHT]`.")
    _add_adapter_arguments(p, 500)
    p.add_argument("--out", required=True, help="run folder; rerun on the same folder to resume")
    p.add_argument("--rank", type=positive_int, default=8, help="rank r of each adapter (default 8)")
    p.add_argument("--alpha", type=float, default=None, help="alpha: the adapters are scaled by alpha/rank "
                                                             "(default: alpha = rank)")
    p.add_argument("--conv", action="store_true", help="also the UNet's 3×3 convolutions (LoCon)")
    p.add_argument("--text-encoder", action="store_true", help="also the CLIP text encoder's layers")
    p.add_argument("--format", default="kohya", choices=["kohya", "peft"],
                   help="kohya (AUTOMATIC1111, ComfyUI; default) or peft (diffusers' load_lora_weights)")
    p.set_defaults(func=cmd_train_lora)

    p = sub.add_parser("train-controlnet", help="train a ControlNet for a model on your images and their control "
                                                "maps (the model frozen); writes a file AUTOMATIC1111, ComfyUI and "
                                                "diffusers load",
                       description="--data holds images, captions and a control map per image (metadata.jsonl's "
                                   "conditioning_image column, as diffusers' train_controlnet.py reads it; "
                                   "`ldm make-shapes --control mask` writes such a folder). The ControlNet starts "
                                   "as a copy of the model's encoder. Rerun the same command on the same --out to "
                                   "resume. Writes OUT/controlnet.safetensors at every checkpoint; use it with "
                                   "`ldm generate --control IMAGE --control-model FILE`.")
    _add_adapter_arguments(p, 500)
    p.add_argument("--out", required=True, help="run folder; rerun on the same folder to resume")
    p.add_argument("--control-type", default="none",
                   help="what the maps are (canny, seg, mask, depth, ...; default none): recorded with the run, "
                        "for --control-type at generation")
    p.add_argument("--format", default="original", choices=["original", "diffusers"],
                   help="original (control_model.*, AUTOMATIC1111 and ComfyUI; default) or diffusers (also a "
                        "ControlNetModel folder, OUT/controlnet/)")
    p.set_defaults(func=cmd_train_controlnet)

    p = sub.add_parser("train-embedding", help="learn a new word for a model's text encoder from your images "
                                               "(textual inversion); writes the file AUTOMATIC1111 and diffusers load",
                       description="The captions must contain --token. Writes --out (AUTOMATIC1111's layout) and, "
                                   "in the run folder OUT.run/ beside it, diffusers' learned_embeds.safetensors; "
                                   "rerun the same command to resume. Use it with `ldm generate --embedding FILE`.")
    _add_adapter_arguments(p, 500)
    p.add_argument("--token", required=True, help="the new word, e.g. '<my-thing>', as written in the captions")
    p.add_argument("--vectors", type=positive_int, default=1, help="token vectors the word stands for (default 1)")
    p.add_argument("--init-word", default=None, help="start from this word's embedding (default: '*')")
    p.add_argument("--out", required=True, help="the embedding file to write: NAME.safetensors or NAME.pt (A1111 "
                                                "calls it by NAME)")
    p.set_defaults(func=cmd_train_embedding)
