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


#: similarity (difflib's ratio) two method/basis names with different basis sets need to be suggested for each other:
#: a typo (6-31G(2df,p vs 6-31G(2df,p)), not another basis (HF/3-21G vs HF/STO-3G: 0.71, another level of theory)
OTHER_BASIS_CUTOFF = 0.85


def closest_name(name: str, known: Iterable[str]) -> str | None:
    """The known name nearest to `name` (case ignored: b3lyp → B3LYP), if any is near: the one known name that `name`
    begins (B3LYP → B3LYP/6-31G(2df,p)), else the nearest by difflib; a name of another basis set than `name`'s
    (HF/3-21G, HF/STO-3G) only when nearly the same text (OTHER_BASIS_CUTOFF)."""
    by_lower = {str(k).lower(): str(k) for k in known}
    low = str(name).lower().strip()
    starting = [k for k in by_lower if low and k.startswith(low) and k != low]
    if len(starting) == 1:
        return by_lower[starting[0]]
    for close in difflib.get_close_matches(low, list(by_lower), n=3, cutoff=0.5):
        other_basis = "/" in low and "/" in close and low.split("/", 1)[1] != close.split("/", 1)[1]
        if not other_basis or difflib.SequenceMatcher(None, low, close).ratio() >= OTHER_BASIS_CUTOFF:
            return by_lower[close]
    return None


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
