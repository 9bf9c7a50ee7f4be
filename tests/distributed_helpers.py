"""A worker plugin that kills its worker once, on an event, for the fault-tolerance tests.

Importable by the workers of a ``LocalCluster`` (spawned processes inherit the test's ``sys.path``).
"""

from __future__ import annotations

import os
from pathlib import Path

from distributed import WorkerPlugin

CHUNK_PREFIX = "cs-chunk-"


class KillAfterFirstChunk(WorkerPlugin):
    """Kill the worker (``os._exit``) that starts a chunk task after some chunk has finished, once.

    Events, not timers: a chunk task reaching ``memory`` on any worker writes ``first-done`` in
    ``folder``; the next chunk task to start executing while that file exists creates ``killed``
    (atomically, so only one worker ever dies) with its task key and ends its own process before the
    task runs. Every chunk task that starts is appended to ``started.log``.
    """

    name = "cs-kill-after-first-chunk"

    def __init__(self, folder: str):
        self.folder = str(folder)

    def transition(self, key, start, finish, **kwargs):
        key = str(key)
        if not key.startswith(CHUNK_PREFIX):
            return
        folder = Path(self.folder)
        if finish == "memory":
            (folder / "first-done").touch()
        elif finish == "executing":
            with open(folder / "started.log", "a") as fh:
                fh.write(key + "\n")
            if not (folder / "first-done").exists():
                return
            try:
                fd = os.open(folder / "killed", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.write(fd, key.encode())
            os.close(fd)
            os._exit(1)  # the worker dies in the middle of the run; its nanny starts a new one
