"""Typed errors, so callers (CLI, server) can react to the kind of failure without matching strings."""


class Qwen2VLError(Exception):
    """Base class of every error qwen2vl raises on purpose."""


class ConfigError(Qwen2VLError, ValueError):
    """config.json is not a Qwen2-VL config, or its values contradict each other."""


class CheckpointError(Qwen2VLError):
    """A checkpoint directory or file is missing, or a tensor is missing, unexpected or of the wrong shape."""


class InputError(Qwen2VLError, ValueError):
    """The model inputs (or a conversation item) are malformed; the message names the offending item."""


class ConstraintError(InputError):
    """An output constraint (JSON schema, regex, choices) that the grammar compiler cannot compile."""
