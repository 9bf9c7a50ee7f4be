"""Scale-out of the embedding functions on a ``dask.distributed`` cluster: the generic part.

``cs.pp.embed_morphology(..., client=client)`` and ``cs.pp.embed_expression(..., client=client)`` give
their chunks to the chunk engine (:mod:`cellsymphony.pp._chunks`), whose dask executor submits one task
per chunk through :func:`run_tasks` here: a bounded number of chunks in flight (so the scheduler never
holds the whole matrix), each collected as soon as it completes. A task carries only what its chunk
needs (for morphology the sample's picklable
:class:`~cellsymphony.pp._patch_source.PatchSource` and the chunk's nucleus coordinates; for expression
the chunk's sparse rows, cell ids and the column -> token index), never the MuData.

On the workers, the :class:`WorkerCache` plugin (registered by :func:`ensure_worker_cache` before the
first task) holds what lives across tasks:

- torch set to one thread per process (``$CELLSYMPHONY_TORCH_THREADS`` on the worker overrides it);
- the loaded models, keyed by model name / weights file / device (loaded by the first task that needs
  one, reused by every later task of that worker);
- one open slide per path and thread (with its tile cache).

Memory: dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also freezes glibc's
mmap threshold at 128 KiB, so every large temporary array of patch decoding becomes a fresh ``mmap``
(about 5x slower decoding than in a plain process). Set the thresholds where the cluster is made, e.g.
``dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_": 64 << 20,
"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": 128 << 20})`` (the scaling page of the
docs; ``benchmarks/bench_distributed.py`` does so).
"""

from __future__ import annotations

import os
import threading
import uuid
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from ._settings import settings
from ._utils import file_stamp

try:
    from distributed import WorkerPlugin
except ImportError:  # pragma: no cover - distributed is a dependency
    WorkerPlugin = object

if TYPE_CHECKING:
    from collections.abc import Callable

THREADS_ENV = "CELLSYMPHONY_TORCH_THREADS"
WORKER_CACHE = "cellsymphony-worker-cache"


# ------------------------------------------------------------------------------------------------
# worker side: one cache per worker process, as a dask worker plugin
class WorkerCache(WorkerPlugin):
    """What a worker keeps across chunk tasks: its torch thread setting, loaded models, open slides.

    Registered on a cluster's workers as a dask worker plugin (:func:`ensure_worker_cache`; workers that
    join later, e.g. after a crash, get it from the scheduler); outside a worker one process-wide
    instance plays its part (:func:`worker_cache`). ``info()`` says how many models it loaded and holds.
    """

    name = WORKER_CACHE
    max_sources = 16

    def __init__(self):
        self.lock = threading.RLock()
        self._models: dict[tuple, Any] = {}
        self._sources: OrderedDict[tuple, Any] = OrderedDict()
        self._loads = 0

    def __getstate__(self):  # shipped to the workers empty
        return {"empty": True}

    def __setstate__(self, state):
        self.__init__()

    def setup(self, worker=None) -> None:
        """Called by dask on each worker: one torch intra-op thread (``$CELLSYMPHONY_TORCH_THREADS``)."""
        import torch

        torch.set_num_threads(max(1, int(os.environ.get(THREADS_ENV, "1") or 1)))

    def teardown(self, worker=None) -> None:
        with self.lock:
            for src in self._sources.values():
                src.close()
            self._sources.clear()
            self._models.clear()

    def model(self, key: tuple, load: Callable[[], Any]):
        """The model cached under ``key``, loaded by ``load()`` on first use (without repeating the
        client's 'untrained weights' warnings)."""
        import warnings

        with self.lock:
            if key not in self._models:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*untrained.*")
                    warnings.filterwarnings("ignore", message=".*random weights.*")
                    self._models[key] = load()
                self._loads += 1
            return self._models[key]

    def source(self, src):
        """One open :class:`PatchSource` per slide and thread (its tile cache lives across chunks)."""
        key = (
            threading.get_ident(), src.he_path, file_stamp(src.he_path), src.geometry_bytes(),
            float(src.pixel_size), src.he_mpp, src.sample,
        )  # the file's size and mtime: a slide re-exported to the same path is opened again, not read from old tiles
        with self.lock:
            if key in self._sources:
                self._sources.move_to_end(key)
                return self._sources[key]
            from .pp._bands import WORKER_KEEP_TILES

            src.keep_tiles = WORKER_KEEP_TILES  # its chunks come one by one: keep what neighbours share
            self._sources[key] = src
            while len(self._sources) > self.max_sources:
                _, old = self._sources.popitem(last=False)
                old.close()
            return src

    def info(self) -> dict:
        """``{"loads": models loaded by this process, "models": models held now}``."""
        with self.lock:
            return {"loads": self._loads, "models": len(self._models)}


_LOCAL: WorkerCache | None = None


def worker_cache() -> WorkerCache:
    """This worker's :class:`WorkerCache` plugin; outside a dask worker (or before the plugin reached it),
    one instance for the whole process."""
    global _LOCAL
    try:
        from distributed import get_worker

        plugin = get_worker().plugins.get(WORKER_CACHE)
        if plugin is not None:
            return plugin
    except (ImportError, ValueError):  # not in a worker
        pass
    if _LOCAL is None:
        _LOCAL = WorkerCache()
        _LOCAL.setup()
    return _LOCAL


def worker_cache_info(dask_worker=None) -> dict:
    """The worker's cache figures (``client.run(worker_cache_info)`` gives them per worker)."""
    plugin = dask_worker.plugins.get(WORKER_CACHE) if dask_worker is not None else None
    return (plugin or worker_cache()).info()


def _has_cache(dask_worker) -> bool:
    return WORKER_CACHE in dask_worker.plugins


def ensure_worker_cache(client) -> None:
    """Register the :class:`WorkerCache` plugin on the cluster unless every worker has it (registering it
    again would drop the models the workers hold)."""
    have = client.run(_has_cache)
    if not have or not all(have.values()):
        client.register_plugin(WorkerCache(), name=WORKER_CACHE)


# ------------------------------------------------------------------------------------------------
# client side: checks, chunking, the submit / gather loop
def check_client(client) -> None:
    """A clear error unless ``client`` is a ``dask.distributed.Client``."""
    try:
        from distributed import Client
    except ImportError as err:  # pragma: no cover - distributed is a dependency
        raise ImportError("client= needs dask.distributed: pip install 'distributed'.") from err
    if not isinstance(client, Client):
        raise ValueError(
            f"client must be a dask.distributed.Client (or None for a single process), got {type(client).__name__}."
        )
    if client.status not in ("running", "newly-created"):
        raise ValueError(f"The dask client is not running (status {client.status!r}); start it or pass client=None.")


def n_threads(client) -> int:
    """Worker threads of the cluster (1 when unknown): a sizing hint for the number of tasks."""
    try:
        return max(1, int(sum(client.nthreads().values())))
    except Exception:  # noqa: BLE001 - only a sizing hint
        return 1


def run_tasks(
    client,
    tasks: list[tuple[str, Callable, tuple, dict]],
    on_result: Callable[[int, Any], None],
    *,
    progress_total: int = 0,
    progress_sizes: list[int] | None = None,
    desc: str = "",
    max_in_flight: int | None = None,
) -> None:
    """Submit ``tasks`` (``(name, fn, args, kwargs)``) with a bounded window, call ``on_result(i, value)``
    for each as it finishes (any order), release it at once. A task's error cancels the rest and is raised
    here; a worker lost mid-task is dask's business: the scheduler runs the task again elsewhere."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    if not tasks:
        return
    window = max_in_flight or max(4, 2 * n_threads(client))
    run_id = uuid.uuid4().hex[:10]
    it = iter(enumerate(tasks))
    index_of: dict[str, int] = {}

    def submit_next(ac=None):
        try:
            i, (name, fn, args, kwargs) = next(it)
        except StopIteration:
            return None
        fut = client.submit(fn, *args, key=f"{name}-{run_id}", pure=False, retries=0, **kwargs)
        index_of[fut.key] = i
        if ac is not None:
            ac.add(fut)
        return fut

    first = [f for f in (submit_next() for _ in range(window)) if f is not None]
    ac = as_completed(first, with_results=False)
    with tqdm(total=progress_total, desc=desc, unit="cell", disable=not settings.progress or progress_total == 0) as bar:
        try:
            for fut in ac:
                i = index_of.pop(fut.key)
                value = fut.result()  # raises the task's own exception
                fut.release()
                on_result(i, value)
                if progress_sizes is not None:
                    bar.update(progress_sizes[i])
                submit_next(ac)
        except BaseException:
            for f in list(ac.futures):
                f.cancel()
            raise
