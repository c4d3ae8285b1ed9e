"""Generation parameters as text in AUTOMATIC1111's "parameters" layout (its infotext), written and read back:

    a small green triangle in the center
    Negative prompt: blurry
    Steps: 25, Sampler: DPM++ 2M Karras, CFG scale: 5.0, Seed: 123, Size: 64x64, Model: ldm-shapes

The prompt, a "Negative prompt:" line when there is one, then "Key: value" pairs, a value holding a comma, colon or
newline JSON-quoted (A1111's `quote`). Size is WIDTHxHEIGHT. Besides A1111's keys we write "Eta" (A1111's key for
an ancestral sampler's η, here also DDIM's) and "Guidance rescale" when they are set; reading also takes A1111's
newer "Schedule type: Karras" and "Eta DDIM".
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from latent_diffusion.images import read_parameters

# A1111's re_param: a key, then a quoted value or one up to the next comma
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def format_infotext(prompt: str, negative_prompt: str | None, steps: int, sampler: str, guidance_scale: float,
                    seed: int, width: int, height: int, model: str | None = None, eta: float | None = None,
                    guidance_rescale: float = 0.0, strength: float | None = None) -> str:
    """One image's parameters; `sampler` by its A1111 name (`samplers.sampler_label`); `strength` of img2img and
    inpainting (A1111's denoising strength)."""
    fields = {"Steps": steps, "Sampler": sampler, "CFG scale": guidance_scale, "Seed": seed,
              "Size": f"{width}x{height}", "Model": model, "Eta": eta,
              "Guidance rescale": guidance_rescale or None, "Denoising strength": strength}
    pairs = ", ".join(f"{key}: {_quote(value)}" for key, value in fields.items() if value is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{pairs}"


def parse_infotext(text: str) -> dict[str, Any]:
    """The settings in an infotext, by `Pipeline.generate_tensors`' keywords (prompt, negative_prompt, steps,
    sampler, guidance_scale, seed, width, height, eta, guidance_rescale, strength), and model; only those it holds."""
    *lines, last = text.strip().split("\n")
    if len(_PAIR.findall(last)) < 3:  # no parameter line: all of it is prompt (as A1111 reads it)
        lines, last = [*lines, last], ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in (line.strip() for line in lines):
        if line.startswith("Negative prompt:") or negative:
            negative.append(line.removeprefix("Negative prompt:").strip())
        else:
            prompt.append(line)
    fields = {key.strip(): _unquote(value.strip()) for key, value in _PAIR.findall(last)}
    found: dict[str, Any] = {"prompt": "\n".join(prompt)}
    if negative:
        found["negative_prompt"] = "\n".join(negative)
    for key, name, kind in (("Steps", "steps", int), ("CFG scale", "guidance_scale", float), ("Seed", "seed", int),
                            ("Eta", "eta", float), ("Eta DDIM", "eta", float),
                            ("Guidance rescale", "guidance_rescale", float), ("Model", "model", str),
                            ("Denoising strength", "strength", float)):
        if key in fields:
            found[name] = _typed(key, fields[key], kind)
    if "Sampler" in fields:
        karras = fields.get("Schedule type", "").lower() == "karras"
        found["sampler"] = fields["Sampler"] + (" Karras" if karras else "")
    if "Size" in fields:
        size = _SIZE.match(fields["Size"])
        if size is None:
            raise ValueError(f"Size: {fields['Size']!r} is not WIDTHxHEIGHT")
        found["width"], found["height"] = int(size[1]), int(size[2])
    return found


def read_infotext(path: str | os.PathLike) -> dict[str, Any]:
    """The settings an image written by `ldm generate` or AUTOMATIC1111 carries (`parse_infotext`)."""
    text = read_parameters(path)
    if text is None:
        raise ValueError(f"{path} carries no generation parameters (no 'parameters' text, no EXIF UserComment)")
    return parse_infotext(text)


def _quote(value: object) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


def _typed(key: str, value: str, kind: type) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{key}: {value!r} is not {'an integer' if kind is int else 'a number'}") from None
