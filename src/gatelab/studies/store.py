"""The results store: SQLite, one row per finished fit, written in transactions.

The primary key (study, setting, n, replicate) makes reruns idempotent: finished rows
are skipped, and a run killed mid-way (even with SIGKILL) loses only the fits in flight,
because each work unit's rows are committed together after the unit finishes. The WAL
journal keeps readers (reports) and the writer apart. Each row records the hash of the
inputs that made it (``spec_hash``, see ``runner.setting_hash``), so that a changed spec
is never answered with old rows.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FitRow", "Store", "results", "records"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS fits (
    study TEXT NOT NULL, setting TEXT NOT NULL, n INTEGER NOT NULL, replicate INTEGER NOT NULL,
    seed INTEGER NOT NULL, loss REAL, mass REAL, blocks TEXT NOT NULL, loglik REAL,
    n_iter INTEGER, converged INTEGER, degenerate INTEGER, seconds REAL,
    version TEXT, created REAL, spec_hash TEXT, status TEXT, params TEXT,
    reading TEXT, grad_norm REAL, gain REAL,
    PRIMARY KEY (study, setting, n, replicate)
);
CREATE TABLE IF NOT EXISTS studies (name TEXT PRIMARY KEY, spec TEXT NOT NULL, updated REAL);
"""

# In insertion order; named, because stores from before a column was added have it last.
_COLUMNS = ("study", "setting", "n", "replicate", "seed", "loss", "mass", "blocks", "loglik",
            "n_iter", "converged", "degenerate", "seconds", "version", "created", "spec_hash",
            "status", "params", "reading", "grad_norm", "gain")


@dataclass(frozen=True)
class FitRow:
    """One finished fit: its losses, per-block errors and diagnostics."""

    study: str
    setting: str
    n: int
    replicate: int
    seed: int
    loss: float
    mass: float
    blocks: dict[str, float]
    loglik: float
    n_iter: int
    converged: bool
    degenerate: bool
    seconds: float
    version: str
    spec_hash: str = ""   # the inputs that made the row (runner.setting_hash)
    status: str = ""      # how the fit ended (``gatelab.fit.status``); "" in old stores
    params: dict[str, Any] = field(default_factory=dict)  # the estimate, identifiable form
    reading: str = "protocol"   # "protocol" or "certified" (``Study.reading``)
    grad_norm: float | None = None  # gradient norm at the estimate (fit.polish); None for lsq
    gain: float | None = None  # certified: log-likelihood gain of the polish over EM's stop


class Store:
    """A SQLite file of fit rows. Open with ``Store(path)``; close with ``close()`` (or use
    it as a context manager)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(self.path, timeout=60)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.executescript(_SCHEMA)
            columns = {r[1] for r in self.conn.execute("PRAGMA table_info(fits)")}
            # Columns added since the first stores (their rows are stale: ROWS_VERSION).
            for name, kind in (("spec_hash", "TEXT"), ("status", "TEXT"), ("params", "TEXT"),
                               ("reading", "TEXT"), ("grad_norm", "REAL"), ("gain", "REAL")):
                if name not in columns:
                    with self.conn:
                        self.conn.execute(f"ALTER TABLE fits ADD COLUMN {name} {kind}")
        except sqlite3.DatabaseError as err:
            raise ValueError(f"{self.path} is not a gatelab results store ({err}). Pass another "
                             f"--db path.") from None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.conn.close()

    def save_study(self, name: str, spec: dict) -> None:
        with self.conn:
            self.conn.execute("INSERT OR REPLACE INTO studies VALUES (?, ?, ?)",
                              (name, json.dumps(spec), time.time()))

    def study_spec(self, name: str) -> dict | None:
        row = self.conn.execute("SELECT spec FROM studies WHERE name = ?", (name,)).fetchone()
        return None if row is None else json.loads(row[0])

    def studies(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT name FROM studies ORDER BY name")]

    def done(self, study: str, hashes: Mapping[str, str] | None = None) -> set[tuple[str, int, int]]:
        """(setting, n, replicate) of every finished fit of ``study``; with ``hashes``
        (setting -> spec hash), only the fits made from those inputs."""
        cur = self.conn.execute("SELECT setting, n, replicate, spec_hash FROM fits WHERE study = ?",
                                (study,))
        return {(s, n, r) for s, n, r, h in cur if hashes is None or hashes.get(s) == h}

    def stale(self, study: str, hashes: Mapping[str, str]) -> dict[str, int]:
        """Fits of ``study`` not made from ``hashes`` (a changed or removed setting, or a
        row from before hashes were recorded): count per setting."""
        cur = self.conn.execute("SELECT setting, spec_hash, COUNT(*) FROM fits WHERE study = ? "
                                "GROUP BY setting, spec_hash", (study,))
        out: dict[str, int] = {}
        for setting, digest, count in cur:
            if hashes.get(setting) != digest:
                out[setting] = out.get(setting, 0) + count
        return out

    def delete_stale(self, study: str, hashes: Mapping[str, str]) -> int:
        """Delete the fits ``stale`` counts, in one transaction; returns how many."""
        count = sum(self.stale(study, hashes).values())
        keep = list(hashes.items())
        with self.conn:
            self.conn.execute("CREATE TEMP TABLE IF NOT EXISTS keep (setting TEXT, spec_hash TEXT)")
            self.conn.execute("DELETE FROM keep")
            self.conn.executemany("INSERT INTO keep VALUES (?, ?)", keep)
            self.conn.execute("DELETE FROM fits WHERE study = ? AND NOT EXISTS (SELECT 1 FROM keep "
                              "WHERE keep.setting = fits.setting AND keep.spec_hash = fits.spec_hash)",
                              (study,))
        return count

    def add(self, rows: Iterable[FitRow]) -> int:
        """Insert rows in one transaction; rows already present are left as they are."""
        values = [(r.study, r.setting, r.n, r.replicate, r.seed, r.loss, r.mass,
                   json.dumps(r.blocks), r.loglik, r.n_iter, int(r.converged), int(r.degenerate),
                   r.seconds, r.version, time.time(), r.spec_hash, r.status,
                   json.dumps(r.params), r.reading, r.grad_norm, r.gain) for r in rows]
        with self.conn:
            cur = self.conn.executemany(
                f"INSERT OR IGNORE INTO fits ({', '.join(_COLUMNS)}) VALUES "
                f"({', '.join('?' * len(_COLUMNS))})", values)
        return cur.rowcount

    def rows(self, study: str) -> list[FitRow]:
        cur = self.conn.execute(
            "SELECT study, setting, n, replicate, seed, loss, mass, blocks, loglik, n_iter, "
            "converged, degenerate, seconds, version, spec_hash, status, params, reading, "
            "grad_norm, gain FROM fits WHERE study = ? "
            "ORDER BY setting, n, replicate", (study,))
        nan = float("nan")  # SQLite stores NaN as NULL
        return [FitRow(r[0], r[1], r[2], r[3], r[4], nan if r[5] is None else r[5],
                       nan if r[6] is None else r[6],
                       json.loads(r[7]), nan if r[8] is None else r[8], r[9], bool(r[10]),
                       bool(r[11]), r[12], r[13], r[14] or "", r[15] or "",
                       json.loads(r[16]) if r[16] else {}, r[17] or "protocol", r[18], r[19])
                for r in cur]


_ROW_FIELDS = ("study", "setting", "n", "replicate", "seed", "status", "loss", "mass", "loglik",
               "n_iter", "converged", "degenerate", "seconds", "version", "spec_hash",
               "reading", "grad_norm", "gain")


def records(rows: Iterable[FitRow]) -> list[dict[str, Any]]:
    """Flat records, one per fit: the row's fields, ``error.<block>`` for each block's
    error and ``param.<block>[i,j]`` for each entry of the estimate (``param.<block>`` for
    a scalar block)."""
    import numpy as np
    out = []
    for r in rows:
        rec: dict[str, Any] = {k: getattr(r, k) for k in _ROW_FIELDS}
        rec.update({f"error.{k}": v for k, v in r.blocks.items()})
        for name, value in r.params.items():
            arr = np.asarray(value, dtype=float)
            if arr.ndim == 0:
                rec[f"param.{name}"] = float(arr)
            for idx in np.ndindex(*arr.shape) if arr.ndim else ():
                rec[f"param.{name}[{','.join(map(str, idx))}]"] = float(arr[idx])
        out.append(rec)
    return out


def results(db: str | Path, study: str | None = None, frame: bool | None = None):
    """Every fit in the results store ``db`` (of one ``study``, or all), one record each
    (``records``): a pandas DataFrame where pandas is installed (``pip install
    'gatelab[pandas]'``), else a list of dicts; ``frame`` forces one or the other."""
    if not Path(db).exists():
        raise ValueError(f"{db} does not exist; run 'gatelab reproduce NAME --db {db}' first.")
    with Store(db) as store:
        names = [study] if study is not None else store.studies()
        if study is not None and study not in store.studies():
            raise ValueError(f"{db} holds no study {study!r}; it holds {store.studies()}.")
        recs = [rec for name in names for rec in records(store.rows(name))]
    if frame is False:
        return recs
    try:
        import pandas as pd
    except ModuleNotFoundError:
        if frame:
            raise ModuleNotFoundError("results(..., frame=True) needs pandas: pip install "
                                      "'gatelab[pandas]'.") from None
        return recs
    return pd.DataFrame.from_records(recs)
