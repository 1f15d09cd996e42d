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


#: similarity (difflib's ratio) a method/basis name needs to be suggested for another one: a typo (6-31G(2df,p vs
#: 6-31G(2df,p): 0.97), not another basis (HF/3-21G vs HF/STO-3G: 0.71; def2-TZVP vs def2-SVP: 0.88) or another
#: method of one basis (HF/3-21G vs B3LYP/3-21G: 0.74), another level of theory each
OTHER_BASIS_CUTOFF = 0.9


def closest_name(name: str, known: Iterable[str]) -> str | None:
    """The known name nearest to `name` (case ignored: b3lyp → B3LYP), if any is near: for a name without a basis
    (no '/'), the one known name it begins (B3LYP → B3LYP/6-31G(2df,p)), else the nearest by difflib; between two
    method/basis names only a near-typo (OTHER_BASIS_CUTOFF), never another basis or method (HF/3-21G: not
    HF/STO-3G, not B3LYP/3-21G)."""
    by_lower = {str(k).lower(): str(k) for k in known}
    low = str(name).lower().strip()
    starting = [k for k in by_lower if low and "/" not in low and k.startswith(low) and k != low]
    if len(starting) == 1:
        return by_lower[starting[0]]
    close = difflib.get_close_matches(low, list(by_lower), n=1, cutoff=0.5)
    if not close:
        return None
    if "/" in low and "/" in close[0] and difflib.SequenceMatcher(None, low, close[0]).ratio() < OTHER_BASIS_CUTOFF:
        return None
    return by_lower[close[0]]


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
