"""The feature store: one SQLite file per SAE (`features.sqlite` beside its `sae/` folder).

`write_store` builds a new store under .partial/ and renames it into place only when it is whole
(the `complete` flag in `meta` is set last), carrying the old store's labels over (not its explanations,
which the interp suite wrote from the old examples). `FeatureStore`
is the only reader; it refuses a store of another schema version or an unfinished one.
Schema: docs/formats.md ("Feature store").
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from saebench.analysis import QUANTILES, FeatureResults, histogram_edges
from saebench.atomic import atomic_write
from saebench.errors import DataError
from saebench.runs import Run

SCHEMA_VERSION = 1
N_SNIPPET_EXAMPLES = 5  # top examples whose +-5-token windows are indexed for search
SNIPPET_RADIUS = 5

SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE vocab(id INTEGER PRIMARY KEY, piece TEXT NOT NULL);
CREATE TABLE contexts(id INTEGER PRIMARY KEY, tokens BLOB NOT NULL);
CREATE TABLE features(
  id INTEGER PRIMARY KEY, n_fires INTEGER NOT NULL, density REAL NOT NULL, mean REAL, mean_signed REAL, std REAL,
  max REAL, min REAL, positive_fraction REAL, quantiles TEXT NOT NULL, interval_edges TEXT NOT NULL,
  histogram TEXT NOT NULL, top_tokens TEXT NOT NULL, logit_top TEXT, logit_bottom TEXT,
  decoder_neighbours TEXT NOT NULL, coact_neighbours TEXT NOT NULL);
CREATE TABLE examples(
  feature INTEGER NOT NULL, kind TEXT NOT NULL, interval INTEGER NOT NULL, rank INTEGER NOT NULL, value REAL NOT NULL,
  context INTEGER NOT NULL, position INTEGER NOT NULL, act_positions BLOB NOT NULL, act_values BLOB NOT NULL,
  PRIMARY KEY(feature, kind, interval, rank)) WITHOUT ROWID;
CREATE TABLE labels(
  feature INTEGER PRIMARY KEY, label TEXT NOT NULL DEFAULT '', note TEXT NOT NULL DEFAULT '', updated TEXT);
CREATE VIRTUAL TABLE search USING fts5(top_tokens, logit_tokens, snippets, label);
"""
# written by `saebench eval --suite interp`; a store written before it lacks the table until then
EXPLANATIONS = """CREATE TABLE IF NOT EXISTS explanations(
  feature INTEGER NOT NULL, explainer TEXT NOT NULL, explanation TEXT NOT NULL, detection REAL, fuzzing REAL,
  error TEXT, updated TEXT, PRIMARY KEY(feature, explainer)) WITHOUT ROWID"""


# -- what a reader gets ---------------------------------------------------------------------------
@dataclass
class Example:
    """One fire: `tokens` is its whole context (so a model rerun reproduces `value` at `position`),
    `acts` the feature's code at every position of it (0 where it did not fire)."""

    tokens: list[int]
    position: int
    value: float
    acts: list[float]
    context: int
    pieces: list[str] = field(default_factory=list)  # each token as text

    @property
    def token(self) -> int:
        return self.tokens[self.position]


@dataclass
class IntervalExamples:
    """A uniform sample of the fires whose |code| lies in [low, high) (the last interval includes
    high); low and high are the feature's q_low and q_high quantiles (read from its histogram)."""

    low: float
    high: float
    q_low: float
    q_high: float
    examples: list[Example]


@dataclass
class Explanation:
    """One explainer's explanation of a feature and its detection / fuzzing scores (balanced accuracy)."""

    explainer: str
    text: str
    detection: float | None
    fuzzing: float | None
    error: str | None = None  # why it went unscored


@dataclass
class FeatureCard:
    id: int
    density: float  # fires per analysed token
    n_fires: int
    mean_activation: float  # mean |code| over fires
    max_activation: float
    min_activation: float
    std_activation: float
    quantiles: dict[float, float]  # of |code| over fires, read from the histogram
    histogram: tuple[list[float], list[int]]  # (bin edges [b+1], counts [b]) over the bins that hold fires
    top_examples: list[Example]  # best first
    quantile_examples: list[IntervalExamples]  # lowest interval first
    logit_lens: tuple[list[tuple[str, float]], list[tuple[str, float]]] | None  # (top, bottom) (piece, logit)
    decoder_neighbours: list[tuple[int, float]]  # (feature, cosine)
    coactivation_neighbours: list[tuple[int, float]]  # (feature, Jaccard over the co-activation sample)
    top_tokens: list[tuple[str, int]]  # the top examples' tokens, most frequent first
    label: str = ""
    note: str = ""
    mean_signed: float | None = None  # abstopk: mean signed code over fires
    positive_fraction: float | None = None  # abstopk: share of fires with a positive code


# -- writing ----------------------------------------------------------------------------------------
def _json(x) -> str:
    return json.dumps(x, separators=(",", ":"))


def _rounded(values, digits: int = 6) -> list:
    return [None if v != v else round(float(v), digits) for v in values]


def write_store(
    path: str | Path, results: FeatureResults, contexts: torch.Tensor, vocab: list[str], meta: dict
) -> Path:
    """Build the store for one SAE at `path` atomically, keeping the labels of the store it
    replaces. contexts: [n_ctx ctx] the analysed split's token contexts (examples refer to them
    by index); vocab: each token id's text."""
    path = Path(path)

    def build(tmp: str) -> None:
        con = sqlite3.connect(tmp)
        con.execute("PRAGMA journal_mode=OFF")
        con.execute("PRAGMA synchronous=OFF")
        con.executescript(SCHEMA)
        con.execute(EXPLANATIONS)
        with con:
            _fill(con, results, contexts, vocab, meta)
            con.executemany(
                "INSERT INTO labels VALUES (?, ?, ?, ?)",
                _on_old(path, "SELECT feature, label, note, updated FROM labels"),
            )
            con.execute(
                "UPDATE search SET label = (SELECT label FROM labels WHERE feature = search.rowid) "
                "WHERE rowid IN (SELECT feature FROM labels)"
            )
            con.execute("INSERT INTO meta VALUES ('complete', 'true')")
        con.execute("PRAGMA journal_mode=WAL")
        con.close()
        _on_old(path, "PRAGMA wal_checkpoint(TRUNCATE)")  # fold the old WAL in: no -wal file may meet the new store

    atomic_write(path, build)
    return path


def _on_old(path: Path, sql: str) -> list[tuple]:
    """sql's rows on the store that `path` holds now; [] when there is none or it is unreadable."""
    if not path.exists():
        return []
    con = sqlite3.connect(path)
    try:
        return con.execute(sql).fetchall()
    except sqlite3.DatabaseError:
        return []
    finally:
        con.close()


def _fill(con: sqlite3.Connection, r: FeatureResults, contexts: torch.Tensor, vocab: list[str], meta: dict) -> None:
    n, ctx = len(r.n_fires), contexts.shape[1]
    edges = histogram_edges()
    meta = {
        **meta,
        "schema_version": SCHEMA_VERSION,
        "n_features": n,
        "n_tokens": r.n_tokens,
        "context_size": ctx,
        "histogram_edges": edges,
        "quantiles": list(QUANTILES),
        "coactivation_tokens": r.coact_tokens,
        "coactivation_statistic": f"Jaccard index of firing sets over the first {r.coact_tokens} analysed tokens",
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **r.notes,
    }
    con.executemany("INSERT INTO meta VALUES (?, ?)", [(k, _json(v)) for k, v in meta.items()])
    con.executemany("INSERT INTO vocab VALUES (?, ?)", list(enumerate(vocab)))

    examples, used_ctx = [], set()
    per_feature_tokens: list[list[int]] = [[] for _ in range(n)]
    snippets: list[list[str]] = [[] for _ in range(n)]
    all_tokens = contexts.numpy()
    for kind, slots, interval, irank in [
        ("top", r.top, None, None),
        ("interval", r.sample, r.sample_interval, r.sample_interval_rank),
    ]:
        show = slots.token >= 0
        if kind == "interval":
            show &= irank < meta["per_interval"]
        f_idx, s_idx = show.nonzero(as_tuple=True)
        tok = slots.token[f_idx, s_idx].numpy()
        ctx_id, pos = tok // ctx, tok % ctx
        acts = slots.acts[f_idx, s_idx].float().numpy()
        rows, cols = np.nonzero(acts)  # row-major: each example's non-zero positions are contiguous
        bounds = np.searchsorted(rows, np.arange(len(acts) + 1))
        cols16, vals32 = cols.astype("<i2"), acts[rows, cols].astype("<f4")
        ranks = s_idx.numpy() if kind == "top" else irank[f_idx, s_idx].numpy()
        ints = np.zeros(len(ranks), dtype=np.int64) if kind == "top" else interval[f_idx, s_idx].numpy()
        values = slots.value[f_idx, s_idx].numpy()
        for j, (f, c, p, v, rank, iv) in enumerate(
            zip(
                f_idx.tolist(),
                ctx_id.tolist(),
                pos.tolist(),
                values.tolist(),
                ranks.tolist(),
                ints.tolist(),
                strict=True,
            )
        ):
            lo, hi = bounds[j], bounds[j + 1]
            examples.append((f, kind, iv, rank, v, c, p, cols16[lo:hi].tobytes(), vals32[lo:hi].tobytes()))
        used_ctx.update(np.unique(ctx_id).tolist())
        if kind == "top":
            for f, t in zip(f_idx.tolist(), all_tokens[ctx_id, pos].tolist(), strict=True):
                per_feature_tokens[f].append(t)
            first = ranks < N_SNIPPET_EXAMPLES
            for f, c, p in zip(f_idx[first].tolist(), ctx_id[first].tolist(), pos[first].tolist(), strict=True):
                window = all_tokens[c, max(0, p - SNIPPET_RADIUS) : p + SNIPPET_RADIUS + 1]
                snippets[f].append("".join(vocab[t] for t in window.tolist()))
    con.executemany("INSERT INTO examples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", examples)
    con.executemany(
        "INSERT INTO contexts VALUES (?, ?)", [(c, all_tokens[c].astype("<i4").tobytes()) for c in sorted(used_ctx)]
    )

    density = (r.n_fires.double() / max(r.n_tokens, 1)).tolist()
    pos_frac = (r.n_positive.double() / r.n_fires.clamp_min(1)).tolist()
    signed = meta.get("signed", False)
    lens = r.logit_lens
    feature_rows, search_rows = [], []
    for i in range(n):
        fired = int(r.n_fires[i]) > 0
        counts = r.hist[i]
        nzb = counts.nonzero().squeeze(-1).tolist()
        hist = {"bins": nzb, "counts": counts[nzb].tolist()}
        top_tokens = sorted(Counter(per_feature_tokens[i]).items(), key=lambda kv: (-kv[1], kv[0]))
        if lens is not None:
            ltop = [[int(t), round(float(v), 4)] for t, v in zip(lens[0][i], lens[1][i], strict=True)]
            lbot = [[int(t), round(float(v), 4)] for t, v in zip(lens[2][i], lens[3][i], strict=True)]
        else:
            ltop = lbot = None
        dec = (
            []
            if r.decoder is None
            else [[int(j), round(float(v), 5)] for j, v in zip(r.decoder[0][i], r.decoder[1][i], strict=True)]
        )
        coact = [[int(j), round(float(v), 5)] for j, v in zip(r.coact[0][i], r.coact[1][i], strict=True) if j >= 0]
        feature_rows.append(
            (
                i,
                int(r.n_fires[i]),
                density[i],
                float(r.mean[i]) if fired else None,
                float(r.mean_signed[i]) if fired else None,
                float(r.std[i]) if fired else None,
                float(r.max[i]) if fired else None,
                float(r.min[i]) if fired else None,
                pos_frac[i] if (fired and signed) else None,
                _json(_rounded(r.quantiles[i].tolist())),
                _json(_rounded(r.interval_edges[i].tolist())) if fired else "[]",
                _json(hist),
                _json([[t, c] for t, c in top_tokens]),
                _json(ltop) if ltop else None,
                _json(lbot) if lbot else None,
                _json(dec),
                _json(coact),
            )
        )
        search_rows.append(
            (
                i,
                " ".join(vocab[t] for t, _ in top_tokens),
                " ".join(vocab[t] for t, _ in ltop) if ltop else "",
                " | ".join(snippets[i]),
                "",
            )
        )
    con.executemany(f"INSERT INTO features VALUES ({', '.join('?' * 17)})", feature_rows)
    con.executemany(
        "INSERT INTO search(rowid, top_tokens, logit_tokens, snippets, label) VALUES (?, ?, ?, ?, ?)", search_rows
    )


# -- reading ----------------------------------------------------------------------------------------
def find_store(path: str | Path, hook: str | None = None) -> Path:
    """A store file, or the run folder holding it (a multi-hook run needs `hook`)."""
    path = Path(path)
    if path.is_file() or path.suffix == ".sqlite":
        if not path.exists():
            raise DataError(f"no feature store at {path}: run `saebench analyze RUN` on its run first")
        return path
    if not path.is_dir():
        raise DataError(f"{path} is neither a run folder nor a feature store")
    homes = [h for h in Run(path).saes.values() if h.store_path.exists() and hook in (None, h.hook, h.path.name)]
    if len(homes) == 1:
        return homes[0].store_path
    if not homes:
        raise DataError(f"no feature store in {path}: run `saebench analyze {path}` first")
    raise DataError(f"{path} holds stores for several hooks ({', '.join(h.hook for h in homes)}): pass hook=...")


class FeatureStore:
    """Reads a feature store; writes only labels, and only when opened with `writable=True`.

    store = sb.FeatureStore("runs/tiny")
    card = store.feature(123); store.search("light"); store.table()
    """

    def __init__(self, path: str | Path, writable: bool = False, hook: str | None = None):
        self.path = find_store(path, hook)
        self.writable = writable
        mode = "rw" if writable else "ro"
        try:
            self._con = sqlite3.connect(f"file:{self.path.resolve()}?mode={mode}", uri=True, check_same_thread=False)
            rows = self._con.execute("SELECT key, value FROM meta").fetchall()
        except sqlite3.DatabaseError as e:
            raise DataError(
                f"{self.path} is not a saebench feature store ({e}): rerun `saebench analyze` on its run"
            ) from None
        self._lock = threading.Lock()
        self.meta = {k: json.loads(v) for k, v in rows}
        version = self.meta.get("schema_version")
        if version != SCHEMA_VERSION:
            raise DataError(
                f"{self.path} has feature-store schema {version}, this saebench reads {SCHEMA_VERSION}: "
                f"rerun `saebench analyze` on its run (labels are kept)"
            )
        if self.meta.get("complete") is not True:
            raise DataError(f"{self.path} is an unfinished analysis: finish it with `saebench analyze RUN --resume`")
        self.n_features: int = self.meta["n_features"]
        self.context_size: int = self.meta["context_size"]
        self.edges: list[float] = self.meta["histogram_edges"]
        self.vocab: list[str] = [p for (p,) in self._query("SELECT piece FROM vocab ORDER BY id")]
        self._columns = [d[0] for d in self._con.execute("SELECT * FROM features LIMIT 0").description]

    # -- plumbing ---------------------------------------------------------------------------------
    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._con.execute(sql, args).fetchall()

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.n_features

    def _check_id(self, i) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= int(i) < self.n_features:
            raise DataError(
                f"feature {i!r} is out of range: this SAE has {self.n_features} features (0-{self.n_features - 1})"
            )
        return int(i)

    def pieces(self, token_ids: list[int]) -> list[str]:
        """Each token id as text."""
        return [self.vocab[t] for t in token_ids]

    # -- one feature ------------------------------------------------------------------------------
    def feature(self, i: int) -> FeatureCard:
        i = self._check_id(i)
        (row,) = self._query("SELECT * FROM features WHERE id = ?", (i,))
        f = dict(zip(self._columns, row, strict=True))
        examples = self._query(
            "SELECT kind, interval, rank, value, context, position, act_positions, act_values, tokens "
            "FROM examples JOIN contexts ON contexts.id = examples.context WHERE feature = ? "
            "ORDER BY kind DESC, interval, rank",
            (i,),
        )
        top, by_interval = [], {}
        for kind, interval, _rank, value, context, position, apos, avals, tokens in examples:
            ex = self._example(tokens, position, value, context, apos, avals)
            (top if kind == "top" else by_interval.setdefault(interval, [])).append(ex)
        edges, m = json.loads(f["interval_edges"]), self.meta["n_intervals"]
        intervals = [
            IntervalExamples(edges[j], edges[j + 1], j / m, (j + 1) / m, by_interval.get(j, []))
            for j in range(len(edges) - 1)
        ]
        label, note = self._label_note(i)
        lens_top, lens_bottom = (
            [(self.vocab[t], v) for t, v in json.loads(f[key] or "[]")] for key in ("logit_top", "logit_bottom")
        )
        return FeatureCard(
            id=i,
            density=f["density"],
            n_fires=f["n_fires"],
            mean_activation=f["mean"] or 0.0,
            max_activation=f["max"] or 0.0,
            min_activation=f["min"] or 0.0,
            std_activation=f["std"] or 0.0,
            quantiles={q: v for q, v in zip(self.meta["quantiles"], json.loads(f["quantiles"]), strict=False)},
            histogram=self._histogram(json.loads(f["histogram"])),
            top_examples=top,
            quantile_examples=intervals,
            logit_lens=(lens_top, lens_bottom) if f["logit_top"] is not None else None,
            decoder_neighbours=[(j, v) for j, v in json.loads(f["decoder_neighbours"])],
            coactivation_neighbours=[(j, v) for j, v in json.loads(f["coact_neighbours"])],
            top_tokens=[(self.vocab[t], c) for t, c in json.loads(f["top_tokens"])],
            label=label,
            note=note,
            mean_signed=f["mean_signed"] if self.meta.get("signed") else None,
            positive_fraction=f["positive_fraction"],
        )

    def _example(self, tokens: bytes, position: int, value: float, context: int, apos: bytes, avals: bytes) -> Example:
        ids = np.frombuffer(tokens, dtype="<i4").tolist()
        acts = np.zeros(len(ids), dtype=np.float32)
        acts[np.frombuffer(apos, dtype=np.int16)] = np.frombuffer(avals, dtype="<f4")
        return Example(ids, position, value, acts.tolist(), context, self.pieces(ids))

    def _histogram(self, hist: dict) -> tuple[list[float], list[int]]:
        if not hist["bins"]:
            return [], []
        lo, hi = hist["bins"][0], hist["bins"][-1]
        counts = dict(zip(hist["bins"], hist["counts"], strict=False))
        return self.edges[lo : hi + 2], [counts.get(b, 0) for b in range(lo, hi + 1)]

    # -- all features -----------------------------------------------------------------------------
    def table(self):
        """One row per feature: id, density, n_fires, mean, max, median, top token, top logit token, label."""
        import pandas as pd

        rows = self._query(
            "SELECT f.id, f.density, f.n_fires, f.mean, f.max, f.quantiles, f.top_tokens, f.logit_top, "
            "COALESCE(l.label, '') FROM features f LEFT JOIN labels l ON l.feature = f.id ORDER BY f.id"
        )
        median_at = self.meta["quantiles"].index(0.5)
        out = []
        for i, density, n_fires, mean, mx, qs, top_tokens, logit_top, label in rows:
            tt, lt = json.loads(top_tokens), json.loads(logit_top) if logit_top else []
            out.append(
                {
                    "feature": i,
                    "density": density,
                    "n_fires": n_fires,
                    "mean": mean,
                    "max": mx,
                    "median": json.loads(qs)[median_at],
                    "top_token": self.vocab[tt[0][0]] if tt else "",
                    "logit_token": self.vocab[lt[0][0]] if lt else "",
                    "label": label,
                }
            )
        return pd.DataFrame(out)

    def search(self, text: str, limit: int = 20):
        """Full-text search over top tokens, logit-lens tokens, example snippets and labels.
        -> DataFrame (feature, label, density, max, score), best match first."""
        import pandas as pd

        terms = [t for t in text.split() if t.strip('"')]
        if not terms:
            return pd.DataFrame(columns=["feature", "label", "density", "max", "score"])
        query = " ".join('"' + t.replace('"', '""') + '"' for t in terms)
        rows = self._query(
            "SELECT s.rowid, COALESCE(l.label, ''), f.density, f.max, bm25(search) AS score FROM search s "
            "JOIN features f ON f.id = s.rowid LEFT JOIN labels l ON l.feature = s.rowid "
            "WHERE search MATCH ? ORDER BY score LIMIT ?",
            (query, int(limit)),
        )
        return pd.DataFrame(rows, columns=["feature", "label", "density", "max", "score"])

    def _label_note(self, i: int) -> tuple[str, str]:
        rows = self._query("SELECT label, note FROM labels WHERE feature = ?", (i,))
        return rows[0] if rows else ("", "")

    def label(self, i: int) -> str:
        """Feature i's user label ('' if none), without reading its card."""
        return self._label_note(self._check_id(i))[0]

    def explanations(self, i: int) -> list[Explanation]:
        """Feature i's explanations, one per explainer (none before `saebench eval RUN --suite interp`)."""
        i = self._check_id(i)
        try:
            rows = self._query(
                "SELECT explainer, explanation, detection, fuzzing, error FROM explanations WHERE feature = ? "
                "ORDER BY explainer",
                (i,),
            )
        except sqlite3.OperationalError:  # a store no interp suite has written to
            return []
        return [Explanation(*row) for row in rows]

    def set_explanations(self, explainer: str, records: dict[int, dict]) -> None:
        """Save feature -> {"explanation", "detection", "fuzzing"[, "error"]} from one explainer (replacing its
        earlier ones for those features); a re-analysis drops them, as their examples change."""
        self._check_writable()
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        rows = [
            (self._check_id(f), explainer, r["explanation"], r["detection"], r["fuzzing"], r.get("error"), now)
            for f, r in records.items()
        ]
        with self._lock, self._con:
            self._con.execute(EXPLANATIONS)
            self._con.executemany("INSERT OR REPLACE INTO explanations VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def _check_writable(self) -> None:
        if not self.writable:
            raise DataError(
                "this store is open read-only: open it with sb.FeatureStore(path, writable=True) to save labels"
            )

    def set_label(self, i: int, label: str, note: str | None = None) -> None:
        """Save a user label (and note) for feature i; a re-analysis keeps it."""
        i = self._check_id(i)
        self._check_writable()
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self._lock, self._con:
            self._con.execute(
                "INSERT INTO labels(feature, label, note, updated) VALUES (?, ?, COALESCE(?, ''), ?) "
                "ON CONFLICT(feature) DO UPDATE SET label = excluded.label, "
                "note = COALESCE(?, labels.note), updated = excluded.updated",
                (i, label, note, now, note),
            )
            self._con.execute("UPDATE search SET label = ? WHERE rowid = ?", (label, i))
