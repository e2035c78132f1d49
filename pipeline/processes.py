"""Child processes that never outlive the process that started them."""
from __future__ import annotations

import os
import threading
import time


def exit_with_parent(parent_pid, every=0.5):
    """End this process as soon as `parent_pid` (the process that started it) is gone, however that ended (SIGKILL
    included): orphaned, it would be adopted by another process and live on. Watches from a daemon thread."""

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()
