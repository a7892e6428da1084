"""Argument types shared by the package's and the benchmarks' command lines."""
from __future__ import annotations

import argparse
from typing import Callable, Iterable, Optional

__all__ = ["comma_list", "positive_int"]


def comma_list(item: Callable = str, accepted: Optional[Iterable] = None, what: str = "") -> Callable[[str], list]:
    """An argparse ``type=``: a comma-separated list (empty parts ignored), each part converted by ``item``
    and, with ``accepted``, one of those; a bad part is an argparse error that names it and what is
    accepted (``what``: e.g. "positive ints")."""
    accepted = None if accepted is None else tuple(accepted)

    def parse(text: str) -> list:
        out, unknown = [], []
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            try:
                value = item(part)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{part!r} is not valid; accepted: comma-separated "
                                                 f"{what or getattr(item, '__name__', 'values')}") from None
            if accepted is not None and value not in accepted:
                unknown.append(value)
            out.append(value)
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; accepted: {', '.join(map(str, accepted))}")
        if not out:
            raise argparse.ArgumentTypeError(f"empty list; accepted: comma-separated {what or 'values'}")
        return out

    return parse


def positive_int(text: str) -> int:
    """An int >= 1 (``comma_list(positive_int)``: batch sizes)."""
    v = int(text)
    if v < 1:
        raise ValueError(text)
    return v
