"""FidelityTable: the one place where fidelity names become integer indices."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from multifi.errors import unknown_name


class FidelityTable:
    """An ordered, immutable list of fidelity names (levels of theory) ↔ indices 0..K-1."""

    def __init__(self, names: Iterable[str]):
        self.names: tuple[str, ...] = tuple(str(n) for n in names)
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"duplicate fidelity names in {self.names}")
        self._index = {n: i for i, n in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self):
        return iter(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FidelityTable) and self.names == other.names

    def __repr__(self) -> str:
        return f"FidelityTable({list(self.names)})"

    def index(self, name: str, where: str = "") -> int:
        """Index of `name`; an unknown name raises an error listing the known ones."""
        try:
            return self._index[name]
        except KeyError:
            raise unknown_name("fidelity", name, self.names, where) from None

    def indices(self, names: Sequence[str], where: str = "") -> list[int]:
        return [self.index(n, where) for n in names]

    def per_index(self, values: Mapping[str, float], fill: float, where: str = "") -> np.ndarray:
        """[K] float64: values[name] at the index of each name, `fill` at the others; an unknown name is an
        error naming `where` (e.g. the config key) and the known fidelities."""
        out = np.full(len(self), fill, dtype=np.float64)
        for name, value in values.items():
            out[self.index(name, where)] = value
        return out

    def union(self, other: FidelityTable) -> FidelityTable:
        """This table's names followed by the other's new names (existing indices are kept)."""
        return FidelityTable(list(self.names) + [n for n in other.names if n not in self._index])


def alike_names(names: Iterable[str]) -> list[tuple[str, str]]:
    """Pairs of distinct names equal up to case and spaces ('HI' and 'hi', 'B3LYP' and 'B3 LYP'): two fidelities
    a reader would take for one."""
    seen: dict[str, str] = {}
    pairs = []
    for name in names:
        norm = "".join(str(name).split()).casefold()
        if norm in seen and seen[norm] != name:
            pairs.append((seen[norm], name))
        seen.setdefault(norm, name)
    return pairs


def one_letter_apart(names: Iterable[str]) -> list[tuple[str, str]]:
    """Pairs of names (≥ 4 characters) one letter apart inside the name — a letter dropped or added, or two
    neighbouring letters swapped ('R2SCAN' and 'R2SCN', 'B3LYP' and 'B3LPY'): a typo more often than two methods.
    Replaced letters, digits and first or last characters are left out, as method and basis names differ so:
    'cc-pVDZ' / 'cc-pVTZ', 'wB97X-V' / 'wB97M-V', 'GFN1-xTB' / 'GFN2-xTB', 'TPSS' / 'TPSSh', 'SCAN' / 'rSCAN'."""
    names = [str(n) for n in names]
    return [(a, b) for n, a in enumerate(names) for b in names[n + 1 :] if _typo_pair(a, b)]


def _typo_pair(a: str, b: str) -> bool:
    """Whether a and b differ in one part only (parts: the pieces between / - _ + ( ) , . : and spaces), there by one
    letter inside it added, dropped or swapped with its neighbour ('TPSS-D3' / 'TPSSh-D3': the letter ends a part)."""
    if min(len(a), len(b)) < 4 or a.casefold() == b.casefold():  # equal up to case: alike_names's
        return False
    pa, pb = _PARTS.split(a), _PARTS.split(b)
    if len(pa) != len(pb) or _PARTS.findall(a) != _PARTS.findall(b):
        return False
    differ = [(x, y) for x, y in zip(pa, pb) if x != y]
    return len(differ) == 1 and (_one_inner_letter(*differ[0]) or _inner_swap(*differ[0]))


_PARTS = re.compile(r"[/\-_+(),.:\s]")


def _one_inner_letter(a: str, b: str) -> bool:
    """Whether one of a, b is the other with one letter, not its first or last character, added."""
    if len(a) > len(b):
        a, b = b, a
    if len(b) - len(a) != 1:
        return False
    start = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    # b's character at `start`, where the names first differ, is the added one
    return a[start:] == b[start + 1 :] and 0 < start < len(b) - 1 and b[start].isalpha()


def _inner_swap(a: str, b: str) -> bool:
    """Whether b is a with two neighbouring letters, not its first or last character, swapped."""
    if len(a) != len(b) or a == b:
        return False
    diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    return (
        len(diff) == 2
        and diff[1] == diff[0] + 1
        and 0 < diff[0]
        and diff[1] < len(a) - 1
        and a[diff[0]] == b[diff[1]]
        and a[diff[1]] == b[diff[0]]
        and a[diff[0]].isalpha()
        and a[diff[1]].isalpha()
    )
