"""Progress of a long step: a tqdm bar (count, rate, time left) on a terminal, plain periodic lines otherwise."""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("pipeline.progress")

LOG_EVERY_SECONDS = 30


class Progress:
    """Counts work done towards `total`; call `advance(n)` as it happens and `close()` at the end."""

    def __init__(self, description, total, unit="items"):
        self.description, self.total, self.unit = description, total, unit
        self.done, self.start = 0, time.monotonic()
        self.last_line = self.start
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=description, unit=f" {unit}", leave=False, file=sys.stderr,
                            disable=False)  # TQDM_DISABLE (pipeline/__init__.py) is for the libraries' bars

    def advance(self, n=1):
        """Record `n` more units done."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last_line >= LOG_EVERY_SECONDS and self.done < self.total:
            self.last_line = now
            rate = self.done / max(now - self.start, 1e-9)
            log.info("%s: %d/%d %s, %.1f %s/s, about %.0f s left", self.description, self.done, self.total,
                     self.unit, rate, self.unit, (self.total - self.done) / max(rate, 1e-9))

    def close(self):
        """End the bar (the caller logs the step's summary line)."""
        if self.bar is not None:
            self.bar.close()
