"""Files on disk: atomic writes, run-folder locks, safetensors weights and safely unpickled checkpoints."""
