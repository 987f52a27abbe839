"""Units of work run in this process or as Ray tasks, with the same results in the same order.

A data stage splits its input into units (a shard's worth of entries), maps a pure function over
them and assembles the results in unit order, so the outputs do not depend on where or in which
order the units ran. With ``distributor: ray`` each unit is a Ray task on the cluster named by
``RAY_ADDRESS``, or on a local Ray started for the stage (and stopped after it); a task whose
worker dies (a killed process, a lost node) is run again, up to ``ray.retries`` times. Ray is an
optional dependency (``pip install -e '.[ray]'``), imported only when a stage uses it.

The functions given to :func:`map_units` must be importable module-level functions: Ray ships them
to its workers by reference, and every node needs Imager installed, and the stage's input and output
paths on storage it shares with the driver.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, TypeVar

from pydantic import Field
from tqdm.auto import tqdm

from imager.errors import ConfigError, ImagerError
from imager.schema import Section

log = logging.getLogger(__name__)

Distributor = Literal["local", "ray"]
U = TypeVar("U")
R = TypeVar("R")


class RaySettings(Section):
    """How a data stage runs on Ray (``distributor: ray``). None of these changes the outputs."""

    workers: int | None = Field(None, ge=1)  # tasks running at once; None: one per CPU of the cluster
    unit: int = Field(1000, ge=1)  # entries per unit of work (embed: rounded up to whole batches)
    retries: int = Field(3, ge=0, le=100)  # runs again of a unit whose worker died


def units_of(items: Sequence[U], size: int) -> list[Sequence[U]]:
    """``items`` cut into consecutive runs of ``size`` (the last one shorter)."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def map_units(
    fn: Callable[..., R],
    units: Sequence[Any],
    distributor: Distributor,
    settings: RaySettings,
    *,
    shared: Any = None,
    desc: str = "units",
    weight: Callable[[Any], int] = len,
    unit_name: str = "entry",
) -> Iterator[R]:
    """``fn(unit, shared)`` for every unit, yielded in unit order.

    ``local`` runs them here, one after the other; ``ray`` runs them as Ray tasks (at most
    ``settings.workers`` at once; ``shared`` is put in Ray's object store once). The progress bar
    counts ``weight(unit)`` entries per finished unit. An Imager error raised by ``fn`` is raised
    here as it is, whichever process ran it; a unit that still fails after its retries is one
    ConfigError line naming it.
    """
    total = sum(weight(u) for u in units)
    with tqdm(total=total, desc=desc, unit=unit_name) as bar:
        if distributor == "local":
            for unit in units:
                result = fn(unit, shared)
                bar.update(weight(unit))
                yield result
            return
        yield from _map_ray(fn, units, settings, shared, bar, weight)


def _map_ray(fn, units, settings: RaySettings, shared, bar, weight) -> Iterator[Any]:
    ray = import_ray()
    started = connect(ray)
    try:
        task = ray.remote(num_cpus=1, max_retries=settings.retries, retry_exceptions=False)(fn)
        shared_ref = ray.put(shared)
        limit = settings.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        pending: dict[Any, int] = {}  # object ref -> unit index
        done: dict[int, Any] = {}
        submitted, emitted = 0, 0
        while emitted < len(units):
            # keep `limit` tasks running, and no more than 2 * limit results waiting to be yielded
            while submitted < len(units) and len(pending) < limit and len(done) < 2 * limit:
                pending[task.remote(units[submitted], shared_ref)] = submitted
                submitted += 1
            if pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                index = pending.pop(ready[0])
                try:
                    done[index] = _get(ray, ready[0], index, settings)
                except ImagerError as exc:
                    raise _first_failure(ray, pending, index, exc, settings) from None
                bar.update(weight(units[index]))
            while emitted in done:
                yield done.pop(emitted)
                emitted += 1
    finally:
        if started:
            ray.shutdown()


def _first_failure(ray, pending: dict[Any, int], index: int, error: ImagerError, settings: RaySettings) -> ImagerError:
    """The error of the first unit, in unit order, that fails: the one a local run stops at. Units
    before ``index`` still running are waited for; a later unit's error is the answer only when
    they all succeed."""
    for ref, i in sorted(pending.items(), key=lambda item: item[1]):
        if i < index:
            try:
                _get(ray, ref, i, settings)
            except ImagerError as earlier:
                return earlier
    return error


def _get(ray, ref, index: int, settings: RaySettings) -> Any:
    from ray import exceptions

    try:
        return ray.get(ref)
    except exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, ImagerError):
            raise cause from None
        raise ConfigError(f"ray: unit {index} failed ({type(cause or exc).__name__}: {_first_line(cause or exc)})") from None
    except (exceptions.WorkerCrashedError, exceptions.NodeDiedError, exceptions.ObjectLostError) as exc:
        raise ConfigError(f"ray: unit {index} failed after {settings.retries} retries ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@contextlib.contextmanager
def session(distributor: Distributor) -> Iterator[None]:
    """Keep one Ray connection across several :func:`map_units` calls (each would otherwise start
    and stop a local Ray of its own); nothing for ``local``."""
    if distributor != "ray":
        yield
        return
    ray = import_ray()
    started = connect(ray)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("distributor: ray needs the package ray; install it with pip install -e '.[ray]'") from None
    return ray


def connect(ray) -> bool:
    """Join the cluster of ``RAY_ADDRESS`` (or the Ray already running in this process), else start a
    local one of this process's own (``address="local"``: never a cluster that ``ray start`` left on
    the machine, alive or not); True when this call started it (and its caller stops it)."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS") or None
    try:
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    except ConnectionError as exc:
        raise ConfigError(f"RAY_ADDRESS={address}: cannot join the Ray cluster ({_first_line(exc)})") from None
    where = f"the cluster at {address}" if address else "a local Ray"
    log.info("ray: %s with %s CPUs", where, int(ray.cluster_resources().get("CPU", 0)))
    return True
