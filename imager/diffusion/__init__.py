"""The diffusion process: noise schedules, the forward process, parameterisations and the loss.

Nothing here knows about networks or samplers (see imager/samplers and imager/models).
"""

from imager.diffusion.config import LossConfig, ScheduleConfig
from imager.diffusion.process import diffusion_loss, predict_x0, q_sample, target
from imager.diffusion.schedule import NoiseSchedule

__all__ = ["LossConfig", "NoiseSchedule", "ScheduleConfig", "diffusion_loss", "predict_x0", "q_sample", "target"]
