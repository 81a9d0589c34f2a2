"""The one exception family tokopt raises for bad input.

Every message names what is wrong and what would be accepted; the CLI prints it on one line
without a traceback (set ``TOKOPT_DEBUG=1`` to see one).
"""


class TokoptError(Exception):
    """A user-facing error: bad input, a missing file, an unsupported model."""


class UnknownModelError(TokoptError):
    """A model name that is neither a known alias nor a local directory."""


class UnsupportedModelError(TokoptError):
    """A model whose architecture tokopt cannot rewrite."""


class FetchError(TokoptError):
    """The default model could not be fetched or converted."""


class EngineError(TokoptError):
    """An engine directory that is missing, damaged or from an incompatible version."""


class PromptError(TokoptError):
    """A prompt that is empty or does not fit in the model's context window."""
