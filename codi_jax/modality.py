"""The four CoDi modalities and the latent-alignment modes, as enums (no magic strings)."""

import enum


class Modality(str, enum.Enum):
  """A generated or conditioning modality. Image and video share one diffuser."""

  TEXT = "text"
  IMAGE = "image"
  VIDEO = "video"
  AUDIO = "audio"

  @classmethod
  def parse(cls, value: "str | Modality") -> "Modality":
    """Returns the modality named `value`, or raises a ValueError that lists the valid names."""
    if isinstance(value, Modality):
      return value
    try:
      return cls(str(value).lower())
    except ValueError:
      valid = ", ".join(m.value for m in cls)
      raise ValueError(f"unknown modality {value!r}; expected one of: {valid}") from None

  @property
  def branch(self) -> str:
    """Name of the diffuser that generates this modality (the original's `unet_*` attribute)."""
    return "unet_image" if self in (Modality.IMAGE, Modality.VIDEO) else f"unet_{self.value}"


class Alignment(str, enum.Enum):
  """What each output's connector cross-attention attends to in joint generation.

  SELF: its own environment code, as the released CoDi code does (bit-exact with its weights).
  OTHERS: the other outputs' codes, as the paper describes; the default for training from scratch.
  """

  SELF = "self"
  OTHERS = "others"

  @classmethod
  def parse(cls, value: "str | Alignment") -> "Alignment":
    if isinstance(value, Alignment):
      return value
    try:
      return cls(str(value).lower())
    except ValueError:
      raise ValueError(f"unknown alignment {value!r}; expected 'self' or 'others'") from None
