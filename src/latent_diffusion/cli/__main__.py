"""`python -m latent_diffusion.cli ...`: the `ldm` command (as torchrun runs it)."""

import sys

from latent_diffusion.cli import main

sys.exit(main())
