"""What an evaluation shows while it runs and when it ends: progress over images (count, rate,
ETA: a bar on a terminal, a log line every half minute elsewhere, as in a Slurm log) and the
tables users of the reference frameworks read (detectron2's per-category AP in column pairs,
mmseg's per-class IoU / Acc, per-class accuracy).

    with Progress(len(dataset), "COCO inference") as bar:
        for batch in loader:
            ...
            bar.update(len(batch))
    print(table(["class", "IoU"], [["road", 91.2], ["sky", None]]))
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterable, Sequence

from . import distributed as du

log = logging.getLogger("crossmae")


def duration(seconds: float) -> str:
    """``3h05m``, ``4m32s``, ``12s``."""
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def rate(count: float, seconds: float, unit: str) -> str:
    """``12.5 img/s``, or ``4.2 s/img`` below one per second (a CPU detector)."""
    if seconds <= 0 or count <= 0:
        return f"- {unit}/s"
    per_s = count / seconds
    return f"{per_s:.3g} {unit}/s" if per_s >= 1 else f"{1 / per_s:.3g} s/{unit}"


class Progress:
    """Counts the items of a loop on the main process (others stay silent).

    On a terminal a tqdm bar; otherwise a log line ``desc: 120/500 img, 3.1 img/s, ETA 2m03s``
    every ``every_s`` seconds. Either way one line when it starts (the count) and one when it
    ends (the count, the time and the rate).

    Args:
        total: items this process will see (its shard under torch.distributed).
        desc: what is counted ("COCO inference", "features").
        unit: the item's short name.
        every_s: seconds between log lines (no terminal).
    """

    def __init__(self, total: int, desc: str, unit: str = "img", every_s: float = 30.0):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.n, self.t0 = 0, time.perf_counter()
        self._last, self._bar = self.t0, None
        self.active = du.rank() == 0
        if not self.active:
            return
        share = f" (this process's share of {du.world_size()})" if du.world_size() > 1 else ""
        log.info("%s: %d %s%s", desc, total, unit, share)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.active and time.perf_counter() - self._last >= self.every_s:
            self._last = time.perf_counter()
            log.info("%s", self.line())

    def line(self) -> str:
        """Where it stands: count, rate and the time left."""
        dt = time.perf_counter() - self.t0
        left = (self.total - self.n) * dt / self.n if self.n else math.nan
        eta = duration(left) if math.isfinite(left) else "-"
        return (f"{self.desc}: {self.n}/{self.total} {self.unit}, {rate(self.n, dt, self.unit)}, "
                f"ETA {eta}")  # fmt: skip

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.active:
            dt = time.perf_counter() - self.t0
            log.info("%s: %d %s in %s (%s)", self.desc, self.n, self.unit, duration(dt),
                     rate(self.n, dt, self.unit))  # fmt: skip
            self.active = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def cell(value, fmt: str = ".2f") -> str:
    """A table cell: floats formatted, None / NaN as ``-``, the rest as they print."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt) if isinstance(value, float) else str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence], fmt: str = ".2f") -> str:
    """A Markdown table with aligned columns (also readable as plain text)."""
    cells = [list(headers)] + [[cell(v, fmt) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
             for r in cells]  # fmt: skip
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def column_pairs(values: dict[str, float | None], headers: tuple[str, str], ncols: int = 3,
                 fmt: str = ".3f") -> str:  # fmt: skip
    """``name | value`` pairs laid out ``ncols`` to a row (detectron2's per-category AP table)."""
    items = list(values.items())
    rows = []
    for start in range(0, len(items), ncols):
        chunk = items[start : start + ncols]
        row = [x for name, v in chunk for x in (name, v)]
        rows.append(row + [""] * (2 * ncols - len(row)))
    return table(list(headers) * min(ncols, max(len(items), 1)),
                 [r[: 2 * min(ncols, len(items))] for r in rows], fmt)  # fmt: skip
