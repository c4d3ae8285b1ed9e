"""Model formats: our run folders, Stable Diffusion (CompVis) checkpoints and diffusers folders, with explicit key
maps between them (`ModelParts` is what every reader returns and every writer takes)."""
