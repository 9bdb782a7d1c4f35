"""qwen2vl: a fast, standalone inference engine for the Qwen2-VL vision-language models."""

from .api import Qwen2VL
from .config import Qwen2VLConfig, TextConfig, VisionConfig
from .datatypes import ModelInputs
from .errors import CheckpointError, ConfigError, InputError, Qwen2VLError
from . import grounding
from .inputs.fetch import MediaPolicy
from .generate import ChatResult, Usage
from .processor import Processor
from .sampling import SamplingParams

__all__ = ["Qwen2VL", "Processor", "MediaPolicy", "SamplingParams", "ChatResult", "Usage", "Qwen2VLConfig",
           "TextConfig", "VisionConfig", "ModelInputs", "CheckpointError", "ConfigError", "InputError", "Qwen2VLError",
           "grounding"]
__version__ = "0.1.0"
