"""The base of every typed settings model (params.yaml sections and the configs they embed)."""

from typing import Literal

from pydantic import BaseModel, ConfigDict

# The registered samplers (imager.samplers.SAMPLERS; a test keeps the two equal), named here so that
# the settings models can check them without importing torch.
SamplerName = Literal["ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "euler", "euler_ancestral", "heun"]


class Section(BaseModel):
    """Unknown keys are errors; values are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)
