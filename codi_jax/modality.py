"""The four CoDi modalities and the latent-alignment modes, as enums (no magic strings)."""

import enum


class _ParsedEnum(str, enum.Enum):
  """A string enum whose `parse` accepts a member or its name (any case) and names the options."""

  @classmethod
  def parse(cls, value):
    if isinstance(value, cls):
      return value
    try:
      return cls(str(value).lower())
    except ValueError:
      valid = ", ".join(m.value for m in cls)
      raise ValueError(f"unknown {cls.__name__.lower()} {value!r}; expected one of: {valid}") \
          from None


class Modality(_ParsedEnum):
  """A generated or conditioning modality. Image and video share one diffuser."""

  TEXT = "text"
  IMAGE = "image"
  VIDEO = "video"
  AUDIO = "audio"

  @property
  def branch(self) -> str:
    """Name of the diffuser that generates this modality (the original's `unet_*` attribute)."""
    return "unet_image" if self in (Modality.IMAGE, Modality.VIDEO) else f"unet_{self.value}"


class Alignment(_ParsedEnum):
  """What each output's connector cross-attention attends to in joint generation.

  SELF: its own environment code, as the released CoDi code does (bit-exact with its weights).
  OTHERS: the other outputs' codes, as the paper describes; the default for training from scratch.
  """

  SELF = "self"
  OTHERS = "others"
