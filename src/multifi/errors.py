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


def closest_name(name: str, known: Iterable[str]) -> str | None:
    """The known name nearest to `name` (case ignored: b3lyp → B3LYP), if any is near."""
    by_lower = {str(k).lower(): str(k) for k in known}
    close = difflib.get_close_matches(str(name).lower(), list(by_lower), n=1, cutoff=0.5)
    return by_lower[close[0]] if close else None


def unknown_name(kind: str, name: str, known: Iterable[str], where: str = "") -> MultifiError:
    """An error for an unknown name that lists the known ones and suggests the nearest."""
    known = list(known)
    close = closest_name(name, known)
    hint = f"; did you mean {close!r}?" if close else ""
    prefix = f"{where}: " if where else ""
    return MultifiError(f"{prefix}unknown {kind} {name!r}{hint} (known: {', '.join(map(str, known))})")


#: how to drop non-finite labels, for the errors that find them (training config, `multifi data`, `multifi evaluate`)
SKIP_INVALID_HINT = (
    "drop them with data.skip_invalid: true (--set data.skip_invalid=true; --skip-invalid for multifi data and "
    "multifi evaluate)"
)
