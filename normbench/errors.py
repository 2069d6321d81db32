"""User-facing errors.

Everything a user can get wrong (a name, a suite file, a missing dataset, an option value) raises a
``NormbenchError``. The CLI prints its message as one paragraph and exits with status 2; it never
shows a traceback for these.
"""

from __future__ import annotations


class NormbenchError(Exception):
    """An error caused by the user's input or environment, with a message that says what to do."""

    exit_code = 2


class UnknownNameError(NormbenchError, KeyError):
    """A registry lookup for a name that is not registered."""

    def __init__(self, kind: str, name: str, closest: list[str], known: list[str]) -> None:
        self.kind, self.name, self.closest_matches = kind, name, closest
        if closest:
            hint = "Did you mean " + " or ".join(repr(c) for c in closest) + "?"
        else:
            hint = "Known {}s: {}.".format(kind, ", ".join(known) or "(none)")
        super().__init__(
            f"Unknown {kind} {name!r}. {hint} Run `normbench list {kind}s` to see all of them."
        )

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class SuiteError(NormbenchError):
    """A suite file that cannot be read or does not follow the suite schema."""


class DataError(NormbenchError):
    """A dataset that is missing, unreadable or fails its checksum."""
