"""Text encoding, CLIP ViT-L/14 text transformer shape (123 M parameters, Stable Diffusion 1.x): a batch of 2
prompts padded to 77 tokens; ours against transformers' CLIPTextModel with the same (random) weights.

    python benchmarks/text.py [--dtype fp32 bf16] [--repeats 5]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import (DTYPES, alternate, arguments, at_dtype, machine, measure_peak, peaks, table,  # noqa: E402
                     write_json)

from latent_diffusion.conditioning.clip import ClipTextConfig, ClipTextTransformer  # noqa: E402
from latent_diffusion.formats.diffusers_config import clip_config_to_transformers  # noqa: E402
from latent_diffusion.formats.keymaps import clip_state_to_transformers  # noqa: E402

IMPLS = ("ours", "transformers")


def build(impl: str, dtype: torch.dtype, device: str):
    cfg = ClipTextConfig()
    torch.manual_seed(0)
    ours = ClipTextTransformer(cfg)
    if impl == "ours":
        model = ours
    else:
        from transformers import CLIPTextConfig, CLIPTextModel
        model = CLIPTextModel(CLIPTextConfig(**clip_config_to_transformers(cfg, bos_token_id=49406)))
        state = clip_state_to_transformers(cfg, ours.state_dict())
        if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers 5 names them bare
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
        model.load_state_dict(state)
        del ours
    # the pipeline's text encoder: weights at `dtype`, fp32 math
    model = at_dtype(model.to(device).eval(), impl == "ours", dtype, device, math="fp32")[0]
    tokens = torch.randint(1, 49000, (2, 77), generator=torch.Generator().manual_seed(1)).to(device)
    tokens[:, 0], tokens[:, -1] = 49406, 49407

    @torch.inference_mode()
    def call():
        return (model(tokens) if impl == "ours" else model(tokens).last_hidden_state).float()

    return call


def main() -> None:
    args = arguments(__doc__)
    if args.peak:
        measure_peak(build(args.impl, DTYPES[args.dtype[0]], args.device))
        return
    print(f"CLIP ViT-L/14 text encoder, 2 × 77 tokens — {machine()}")
    figures = {}
    for name in args.dtype:
        calls = {impl: build(impl, DTYPES[name], args.device) for impl in IMPLS}
        outputs = {impl: fn() for impl, fn in calls.items()}
        times = alternate(calls, args.repeats, warmup=0)
        rows = table(f"text encoder {name}", times, peaks(args, __file__, IMPLS, "--dtype", name))
        diff = (outputs["ours"] - outputs["transformers"]).abs().max().item()
        print(f"\nmax |ours − transformers| = {diff:.2e}")
        figures[name] = {"rows": rows, "max_abs_diff": diff}
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
