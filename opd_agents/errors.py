"""Typed errors raised by the framework itself.

Broken *model output* never raises: it becomes a ToolResult with an ErrorType inside the trajectory.
These exceptions are for broken *user input* (configs, model paths, files) and broken infrastructure
(teacher servers), and each message names the offending thing and what is allowed.
"""


from gymnasium.error import ResetNeeded


class OpdError(Exception):
    """Base class of every error opd-agents raises on purpose."""


class ConfigError(OpdError, ValueError):
    """A config file or value is invalid (unknown key, bad value)."""


class ModelLoadError(OpdError, ValueError):
    """A model path does not exist or is not a causal LM."""


class ModelNotCachedError(ModelLoadError):
    """A hub id that is not in the Hugging Face cache, and downloading is off (or failed)."""


class ToolDefinitionError(OpdError, TypeError):
    """A function cannot be turned into a tool (missing annotations, bad name...)."""


class EnvOrderError(OpdError, ResetNeeded):
    """step() before reset() or after the episode ended (Gymnasium's order-enforcing convention)."""


class TrajectoryFileError(OpdError, ValueError):
    """A trajectory file cannot be read at all (e.g. written by an unsupported schema version)."""


class TokenizerMismatchError(OpdError, ValueError):
    """Teacher and student tokenizers differ and no cross-tokenizer path is configured."""


class TeacherError(OpdError, RuntimeError):
    """A teacher backend failed (its server is unreachable, does not serve the model, or kept failing)."""


class SandboxUnavailableError(OpdError, RuntimeError):
    """The host cannot provide the OS sandbox that model-written code needs (and unsafe mode is off)."""


class UnknownEnvError(ConfigError):
    """An environment id that is not registered with gymnasium."""


class TeacherUnreachableError(TeacherError):
    """A teacher server refuses the connection or does not answer in time."""


class TeacherModelNotServedError(TeacherError):
    """A teacher server answers but does not serve the configured model."""


class TeacherServersDownError(TeacherUnreachableError):
    """No server of a multi-server teacher could answer a request (each refused, timed out or answered 5xx
    until the retries or the time budget ran out); the message names every server with its last error."""
