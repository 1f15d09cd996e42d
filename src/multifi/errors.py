"""The one exception type users see: a single line naming the file/record and the problem."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MultifiError(ValueError):
    """Bad input or a bad request; the message is one line and says where and what."""


class Terminated(KeyboardInterrupt):
    """A run stopped by SIGTERM (a scheduler's time limit, `kill`): handled as Ctrl-C, exit code 143 instead of 130."""


class NoFidelityError(MultifiError):
    """A structure names no fidelity and its source gives none (a caller with a default may supply one)."""


def unknown_name(kind: str, name: str, known: Iterable[str], where: str = "") -> MultifiError:
    """An error for an unknown name that lists the known ones and suggests the nearest."""
    known = list(known)
    by_lower = {str(k).lower(): str(k) for k in known}  # suggestions ignore case (b3lyp → B3LYP)
    close = difflib.get_close_matches(str(name).lower(), list(by_lower), n=1, cutoff=0.5)
    hint = f"; did you mean {by_lower[close[0]]!r}?" if close else ""
    prefix = f"{where}: " if where else ""
    return MultifiError(f"{prefix}unknown {kind} {name!r}{hint} (known: {', '.join(map(str, known))})")


#: how to drop non-finite labels, for the errors that find them (training config, `multifi data`, `multifi evaluate`)
SKIP_INVALID_HINT = (
    "drop them with data.skip_invalid: true (--set data.skip_invalid=true; --skip-invalid for multifi data and "
    "multifi evaluate)"
)
