"""A shared optuna study: one search spread over processes or machines, none of its finished trials lost.

The storage is SQLite in the run directory by default, or any RDB URL (PostgreSQL, MySQL) from the recipe.
Two studies live in it: `NAME/references` (the base, the vertices, uniform and the token prior, which fix the
normalization every worker needs) and `NAME` (the search's trials, which the sampler sees). Fixed points are
enqueued once, by the process that creates the study (creation is atomic in the database), and each is
popped by exactly one worker (optuna pops a waiting trial atomically), so no α is evaluated twice. Every
trial keeps its α, raw scores and worker in its user attributes; trials.jsonl stays each run's record.

A worker killed mid-trial leaves that trial RUNNING: the next worker on the same host sees its process is
gone, marks the trial failed and enqueues its point again (only one worker wins that update).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mergemix.errors import MergemixError

log = logging.getLogger(__name__)

Record = dict[str, Any]  # alpha, raw, kind, tid


def storage_url(storage: str | None, run_dir: Path) -> str:
    return storage or f"sqlite:///{(run_dir / 'study.db').resolve()}"


def _storage(url: str) -> Any:
    import optuna

    # Several processes write one SQLite file: wait for the lock instead of failing after sqlite's 5 s.
    kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    attempt = 0
    while True:
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
            if url.startswith("sqlite"):
                _serialize_sqlite(storage.engine)
            return storage
        except Exception as e:
            # Two workers creating the tables at once: one loses a unique constraint or finds a table made
            # between its look and its create; the tables now exist, the next attempt opens them.
            attempt += 1
            racing = "IntegrityError" in type(e).__name__ or "already exists" in str(e)
            if racing and attempt < 5:
                time.sleep(0.5 * attempt)
                continue
            raise MergemixError(f"search.storage: cannot open {url!r} ({type(e).__name__}: "
                                f"{str(e).splitlines()[0]}); give an RDB URL such as sqlite:///study.db or "
                                "postgresql://user@host/db") from None


def _serialize_sqlite(engine: Any) -> None:
    """Make every SQLite transaction take the write lock when it begins (BEGIN IMMEDIATE). optuna pops a
    waiting trial by read-check-write inside one transaction; SQLite's default deferred transactions let two
    processes both read it as waiting and both take it (PostgreSQL and MySQL lock the row instead)."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # let the begin event below issue BEGIN itself

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners are dropped


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _dead(worker: str | None) -> bool:
    """Whether a trial's worker is a process of this host that no longer runs."""
    if not worker:
        return False
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Shared:
    """One optuna study with enqueued fixed points: `open` creates or joins it, `pop` hands a worker the next
    trial (fixed or, with `sample`, from the sampler), `finish` stores the result."""

    def __init__(self, url: str, name: str, sampler: Callable[[int], Any] | None, seed: int,
                 fixed: list[tuple[dict[str, float], Record]]) -> None:
        """`sampler(seed)` builds the sampler: the process that creates the study uses `seed` (a lone run is
        reproducible); a worker that joins it seeds from its own id, or it would propose the same points."""
        import optuna

        from mergemix.artifacts import stable_hash

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = _storage(url)
        self.worker = worker_id()
        make = sampler or (lambda _seed: None)
        try:
            self.study = optuna.create_study(storage=storage, study_name=name, sampler=make(seed),
                                             direction="maximize")
            for params, attrs in fixed:  # the params kept in user_attrs too: optuna's own copy is private
                self.study.enqueue_trial(params, user_attrs={**attrs, "params": params})
            log.info("study %s created in %s with %d fixed points", name, url, len(fixed))
        except optuna.exceptions.DuplicatedStudyError:
            joined_seed = int(stable_hash([seed, self.worker]), 16) % 2**31
            self.study = optuna.load_study(storage=storage, study_name=name, sampler=make(joined_seed))
            log.info("joined study %s in %s", name, url)
        self.recover()

    def recover(self) -> None:
        """Fail the RUNNING trials of dead workers on this host; enqueue their fixed points again."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if not _dead(t.user_attrs.get("worker")):
                continue
            try:
                self.study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            except UpdateFinishedTrialError:
                continue  # another worker got there first
            fixed = "params" in t.user_attrs
            if fixed:
                attrs = {k: v for k, v in t.user_attrs.items() if k != "worker"}
                self.study.enqueue_trial(t.user_attrs["params"], user_attrs=attrs)
            log.warning("trial %d of a stopped worker (%s) marked failed%s", t.number, t.user_attrs["worker"],
                        "; its point is queued again" if fixed else "")

    def waiting(self) -> int:
        from optuna.trial import TrialState

        return len(self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))

    def count(self) -> int:
        """Trials finished or in flight (the budget counts both)."""
        from optuna.trial import TrialState

        return len(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)))

    def pop(self, sample: Callable[[Any], Record] | None) -> tuple[Any, Record] | None:
        """The next trial to evaluate: a fixed point if one waits, else (with `sample`) one the sampler
        proposes; None when nothing is left for this worker."""
        from optuna.trial import TrialState

        if sample is None and not self.waiting():
            return None
        trial = self.study.ask()
        trial.set_user_attr("worker", self.worker)
        attrs = trial.user_attrs
        if "params" in attrs:  # an enqueued point: suggesting returns its fixed values, recorded for the sampler
            for name in attrs["params"]:
                trial.suggest_float(name, 0.0, 1.0)
            return trial, dict(attrs)
        if sample is None:  # another worker took the last fixed point between our look and our ask
            self.study.tell(trial, state=TrialState.FAIL)
            return None
        record = sample(trial)
        for key in ("alpha", "kind", "tid"):
            trial.set_user_attr(key, record[key])
        return trial, record

    def finish(self, trial: Any, raw: dict[str, dict[str, float]], value: float) -> None:
        trial.set_user_attr("raw", raw)
        self.study.tell(trial, value)

    def complete(self) -> list[Record]:
        """Every finished trial's record (user attributes), in trial order."""
        from optuna.trial import TrialState

        return [dict(t.user_attrs) for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
