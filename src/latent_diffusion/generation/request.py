"""A generation request checked before any work: its numbers, its seeds and its memory.

Every check takes the argument's `name` as its caller spells it (`guidance scale` in Python, `--guidance` on the
command line), so that one function gives both callers an error that names what they typed.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from latent_diffusion.config import AutoencoderConfig, DiTConfig, MMDiTConfig, UNetConfig

MAX_GUIDANCE = 100.0  # CFG scales in use are 1-30; far beyond, every image saturates
MAX_SIDE = 16384  # pixels per side: the largest any Stable Diffusion front end offers (ComfyUI's MAX_RESOLUTION)
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64-bit seeds
MAX_NUM_IMAGES = 1000  # per command: image k uses seed + k, so more are another command with --seed S+1000
MAX_BATCH = 8  # images sampled at once by the command line (AUTOMATIC1111's largest batch size)


def check_steps(steps: int, maximum: int, name: str = "steps") -> None:
    """1 ≤ steps ≤ `maximum` (the model's diffusion timesteps)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= maximum:
        raise ValueError(f"{name} = {steps}: expected an integer from 1 to {maximum} (the model's timesteps)")


def check_number(value: float, low: float, high: float, name: str, what: str = "") -> None:
    """A finite number in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} = {value}: expected a finite number from {low:g} to {high:g}{what}")


def check_guidance(scale: float, name: str = "guidance scale") -> None:
    """0 ≤ w ≤ MAX_GUIDANCE (w = 0: unconditional, 1: conditional, above: guided)."""
    check_number(scale, 0.0, MAX_GUIDANCE, name, " (0: unconditional, 1: no guidance, usually 3-15)")


def check_num_images(num_images: int, maximum: int | None = None, name: str = "num_images") -> None:
    """1 ≤ num_images (≤ `maximum` when given)."""
    upper = math.inf if maximum is None else maximum
    if isinstance(num_images, bool) or not isinstance(num_images, int) or not 1 <= num_images <= upper:
        expected = "at least 1" if maximum is None else f"1 to {maximum}"
        raise ValueError(f"{name} = {num_images}: expected {expected}")


def image_seeds(seed: int, num_images: int, name: str = "seed") -> list[int]:
    """The seed of each image: seed + k for image k (as AUTOMATIC1111), each in 0 … 2**64 − 1."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED - (num_images - 1):
        top = "2**64 - 1" if num_images == 1 else f"2**64 - {num_images} (image k uses seed + k)"
        raise ValueError(f"{name} = {seed}: expected an integer from 0 to {top}")
    return [seed + k for k in range(num_images)]


def generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded with its seed: its noise never depends on the batch it is drawn in."""
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def check_side(value: int, multiple: int, name: str, why: str) -> None:
    """An image side in pixels: a positive multiple of `multiple` (`why` says whence), at most MAX_SIDE."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % multiple or value > MAX_SIDE:
        raise ValueError(f"{name} = {value}: expected a positive multiple of {multiple} ({why}), at most "
                         f"{MAX_SIDE}")


def activation_bytes(unet: UNetConfig | DiTConfig | MMDiTConfig, autoencoder: AutoencoderConfig,
                     latent: tuple[int, int], guided: bool, element_bytes: int = 4,
                     vae_tile: int | None = None) -> int:
    """A rough upper estimate of one image's activations at their peak: the UNet's (its skip connections and a few
    working tensors of its largest level, twice under guidance) or the decoder's (a few tensors of its largest
    level, within one tile when decoding in tiles), whichever is larger."""
    h, w = latent
    if isinstance(unet, (DiTConfig, MMDiTConfig)):  # a block's tokens, MLP and attention matrix (materialised on
        n = -(-h // unet.patch_size) * -(-w // unet.patch_size)  # some hosts); an MMDiT's text tokens are few
        unet_elements = int(n * unet.hidden_size * (6 + unet.mlp_ratio) + unet.num_heads * n * n) * (2 if guided else 1)
    else:
        levels = [unet.model_channels * m * -(-h // 2**i) * -(-w // 2**i) for i, m in enumerate(unet.channel_mult)]
        # 8 working tensors: a ResBlock's, or the transformer's feed-forward (GEGLU: 8x the channels, one level)
        unet_elements = (sum(levels) * (unet.num_res_blocks + 1) + 8 * max(levels)) * (2 if guided else 1)
    if autoencoder.pixel_space:
        return max(unet_elements, 4 * autoencoder.in_channels * h * w) * element_bytes
    th, tw = (min(h, vae_tile), min(w, vae_tile)) if vae_tile else (h, w)
    f, mult = autoencoder.downsample_factor, autoencoder.ch_mult
    # level l of the decoder runs at (f/2^l)× the latent size; its input comes upsampled from level l + 1
    decoder = max(autoencoder.ch * mult[min(l + 1, len(mult) - 1)] * (th * f // 2**l) * (tw * f // 2**l)
                  for l in range(len(mult)))
    return max(unet_elements, 4 * decoder) * element_bytes


def available_memory(device: torch.device) -> int | None:
    """Bytes free for activations on `device`: CUDA's free memory, a CPU's MemAvailable (Linux); None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def read_prompts(path: str | Path) -> list[str]:
    """The prompts in a text file, one a line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a text file of prompts")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path} holds no prompts (one a line; blank lines and lines starting with # are skipped)")
    return prompts
