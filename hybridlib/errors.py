"""Errors a user can act on, each message naming the problem and the fix; Jupyter shows them as one paragraph
(``_render_traceback_``, IPython's hook), the CLI prints them the same way and exits non-zero."""


class HybridlibError(Exception):
    """Base class: a problem with the user's input, data or files, not a bug."""

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


class ConfigError(HybridlibError, ValueError):
    """A params file or parameter value is wrong."""


class DataError(HybridlibError, ValueError):
    """The dataset, its columns or labels, or the tokenizer cannot be used as configured."""


class CheckpointError(HybridlibError, ValueError):
    """A checkpoint is missing, unsafe, or does not match the tokenizer/params in use."""


class RunError(HybridlibError, RuntimeError):
    """A run directory cannot be used (exists, missing, incomplete) or training diverged."""


def error_classes() -> dict[str, type[HybridlibError]]:
    """hybridlib's error classes by name: to re-raise an error that crossed a process boundary as itself."""
    return {c.__name__: c for c in (HybridlibError, *HybridlibError.__subclasses__())}
