"""The diffusion process: noise schedules and the denoiser view of a network (guidance and objective live here too)."""

from latent_diffusion.diffusion.denoiser import Denoiser, PredictionType
from latent_diffusion.diffusion.schedule import NoiseSchedule, make_schedule

__all__ = ["Denoiser", "NoiseSchedule", "PredictionType", "make_schedule"]
