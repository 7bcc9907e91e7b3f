"""The kit's error types, in one module that imports nothing else.

The command line turns each of these into a one-line `error: ...` and exit status 2; keeping them
here lets it do so without importing torch, pandas or transformers on its error path. The modules
that raise them re-export them (`clue_mtl.data.folder.DataError` is this `DataError`).
"""

from __future__ import annotations


class DataWarning(UserWarning):
    """Rows of a competition file that were mended, predicted anyway or skipped; the message lists
    them as "FILE:LINE: what" lines (`task_files`)."""


class ConfigError(ValueError):
    """A config that cannot train: an unknown key, a wrong type, a value out of range."""


class DataError(Exception):
    """Bad input data; `problems` holds one "FILE:LINE: what is wrong" string per problem."""

    shown = 20

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(self.problems)

    def __str__(self) -> str:
        lines = self.problems[: self.shown]
        if len(self.problems) > self.shown:
            lines.append(f"... and {len(self.problems) - self.shown} more")
        return "\n".join(lines)


class SubmissionError(ValueError):
    """A submission that cannot be written, read or scored; the message is one line."""


class SoftLabelError(ValueError):
    """A soft-label file that cannot be written or read."""


class AveragingError(ValueError):
    """Runs whose weights cannot be averaged."""


class EncoderError(ValueError):
    """An encoder that cannot be loaded: a missing or incomplete folder, an unreachable hub id."""


class RunFolderError(ValueError):
    """A run folder that holds another run, a run under another config than the one given, or files
    that are not a run's (`untrusted.py`: a FIFO, a link to a device, labels or weights that do not parse)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: none complete, unreadable, or from another run."""


class BlendError(ValueError):
    """A blend that cannot be fitted, read or used: members of another split, a changed member."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss or weight: training stops, and the last checkpoint and `best/` are kept."""


KNOWN_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, DataError, SubmissionError, SoftLabelError, AveragingError, EncoderError, RunFolderError,
    CheckpointError, BlendError, TrainingDiverged,
)
