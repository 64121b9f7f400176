"""One exception hierarchy for users' errors.

Everything a user can cause (a bad file, a wrong flag, a conversation that does not fit) raises
a subclass of :class:`MlxtralError`. The CLI prints ``str(err)`` as one line and exits non-zero.
Programming errors are left to raise normally.
"""
from __future__ import annotations

from pathlib import Path


class MlxtralError(Exception):
    """Base class of every error a user can cause. ``str()`` is one line, naming the file."""

    exit_code = 1

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = str(path) if path is not None else None
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class FormatError(MlxtralError):
    """A checkpoint file is malformed, truncated, or of an unsupported kind."""


class ConfigError(MlxtralError):
    """A configuration is missing keys or disagrees with the tensors."""


class UnsafeCheckpointError(FormatError):
    """A pickle tried to do something other than rebuild tensors."""


class TokenizerError(MlxtralError):
    """A tokenizer or chat template cannot be built or applied."""


class ChatError(MlxtralError):
    """A conversation is not valid (roles do not alternate, unknown role...)."""


class ContextOverflowError(MlxtralError):
    """A prompt or a conversation does not fit the context the model was loaded with."""

    @classmethod
    def tokens(cls, n: int, context: int) -> ContextOverflowError:
        """``n`` positions asked of a KV cache of ``context``."""
        from mlxtral.wording import plural

        return cls(f"{plural(n, 'token')} do not fit the context of {context} (raise max_context; on the "
                   "command line: --max-context)")


class NumericalError(MlxtralError):
    """The model computed NaN or infinity (its weights hold NaN/Inf, or overflow float16)."""


class OutOfMemoryError(MlxtralError):
    """The machine cannot hold what was asked for."""


class UsageError(MlxtralError):
    """A wrong argument or combination of arguments."""

    exit_code = 2


class ContextLengthError(UsageError):
    """A KV cache longer than the model's context length was asked for."""

    def __init__(self, asked: int, limit: int) -> None:
        super().__init__(f"max_context {asked} exceeds the model's context length {limit}")
        self.asked, self.limit = asked, limit


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived during work that must clean up (a conversion): raised from the
    signal handler so that ``finally``/``except`` blocks run; the CLI exits ``128 + signum``."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"terminated by signal {signum}")
