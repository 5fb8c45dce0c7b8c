"""The errors a user can meet: each message names what is wrong and what to change.

The command line prints them without a traceback (exit 2); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class QtrainError(Exception):
    """Base of the user-facing errors."""


class ConfigError(QtrainError, ValueError):
    """All problems found in a recipe or on the command line; `problems` holds one message per problem."""

    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in {source}:\n{lines}")


class HyperparameterError(QtrainError, ValueError):
    """An optimizer method or one of its hyperparameters ([optim] method, [optim.args]) is unknown, out of its
    range, or does not fit a weight's shape."""


class DataError(QtrainError, ValueError):
    """A problem with the corpus, tokenizer or token files."""


class CheckpointError(QtrainError, RuntimeError):
    """A checkpoint could not be written, or one on disk is missing files or fails its checksum."""


class ExportError(QtrainError, RuntimeError):
    """The model or tokenizer cannot be exported faithfully."""


class TrainingError(QtrainError, RuntimeError):
    """A run cannot start or cannot go on."""
