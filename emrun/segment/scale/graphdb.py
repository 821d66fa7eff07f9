"""The region adjacency graph in a database, through SQLAlchemy: SQLite (embedded, one file
in the output's private folder; the default, for one machine) or PostgreSQL
(``postgresql://user@host/db``, for workers on many machines; driver psycopg 3, extra
``emrun[postgres]``).

Tables: ``nodes`` (fragment id, block, size, centre), ``edges`` (fragment pair, block, summed
affinity, count, histogram), ``blocks`` (the blocks whose graph is in: the graph step's
done-markers, committed in the same transaction as the block's rows, so a worker killed
mid-block leaves nothing that a resumed job would trust), ``levels`` (blockwise
agglomeration: the score at which each block joined the ends of the edges it owns, under a
key naming the agglomeration settings), ``agglomerated`` (that step's done-markers, per key)
and ``meta`` (the job digest: a database filled for other fragments refuses to be mixed with
these; and the run filling it, with its output: a graph another run left, even of the same
input path, is never taken for this run's). Tables under these names with other columns are
someone else's: refused before anything is created.
"""

from __future__ import annotations

import functools
import os
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np

from ...errors import UserError
from .rag import BINS, BlockGraph

__all__ = ["GraphData", "GraphStore", "Neighbourhood", "RegionGraph", "default_url",
           "job_url", "shown_url"]

SQLITE_FILE = "graph.sqlite"
REGION_CACHE_BYTES = 1 << 30
"""Blockwise agglomeration: the most bytes of blocks' rows a worker keeps for the next
blocks' neighbourhoods (about 170 per edge with histograms: some 6 M edges)."""


def default_url(folder: Path) -> str:
    """The SQLite database of a job whose private folder is ``folder``."""
    return f"sqlite:///{(folder / SQLITE_FILE).resolve()}"


def job_url(url: str) -> str:
    """``--db`` as the job records it: a SQLite file by its absolute path (a worker may start
    in another folder); an in-memory SQLite database, which no worker would see, refused."""
    from sqlalchemy.engine import make_url

    if url.split(":", 1)[0].split("+", 1)[0].lower() != "sqlite":
        return url
    try:
        parsed = make_url(url)
    except Exception:  # not a URL: GraphStore says so
        return url
    database = parsed.database or ""
    if database in ("", ":memory:") or parsed.query.get("mode") == "memory":
        raise UserError(f"--db {url}: an in-memory SQLite database lives in one "
                        "process, where the workers cannot see it; give sqlite:///FILE, or "
                        "leave --db out (a file in the output)")
    if database.startswith("file:") or Path(database).is_absolute():
        return url
    return parsed.set(database=str(Path(database).resolve())).render_as_string(
        hide_password=False)


def password_to_environment(url: str) -> str:
    """``url`` without its password, which goes to ``PGPASSWORD`` instead (libpq reads it, and
    the workers this process starts inherit it): the job file in the output, readable by
    whoever may read the output, held the password in plain text."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # not a URL: GraphStore says so
        return url
    if parsed.password is None or parsed.get_backend_name() not in ("postgresql", "postgres"):
        return url
    os.environ["PGPASSWORD"] = str(parsed.password)
    return parsed._replace(password=None).render_as_string(hide_password=False)


def shown_url(url: str) -> str:
    """The URL with any password hidden, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not even a URL: hide what stands where a password would
        return _hide_secret(url, url)


def _check_sqlite_file(url: str, shown: str) -> None:
    """Where SQLite could not open its file, a place that cannot hold one, said as such:
    SQLite only says 'unable to open database file' of a folder given as the file, or of
    a file in a folder that does not exist."""
    from sqlalchemy.engine import make_url

    try:
        database = make_url(url).database
    except Exception:  # the engine's own parse says what is wrong
        return
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    if path.is_dir():
        raise UserError(f"--db {shown}: {path} is a folder; give a file in it, e.g. "
                        f"sqlite:///{path / 'graph.db'}")
    if not path.parent.is_dir():
        raise UserError(f"--db {shown}: the folder {path.parent} does not exist; create it, "
                        "or give a file in a folder that does")


def _hide_secret(text: str, url: str) -> str:
    """``text`` with the password of ``url`` (``scheme://user:password@...``, parsed or
    not) shown as ***: a URL too malformed to parse still carries one, and so may the
    reason it failed."""
    _, sep, rest = url.partition("://")
    userinfo = rest.rpartition("@")[0] if sep else ""
    secret = userinfo.partition(":")[2]
    return text.replace(secret, "***") if secret else text


@dataclass(frozen=True)
class GraphData:
    """The whole graph: nodes sorted by id; edges aggregated over blocks (``u < v``)."""

    ids: np.ndarray
    sizes: np.ndarray
    u: np.ndarray
    v: np.ndarray
    total: np.ndarray
    count: np.ndarray
    hist: np.ndarray


@dataclass(frozen=True)
class Neighbourhood:
    """What one block agglomerates: its own nodes (ids ``first`` to ``last``, in ``block``),
    the nodes whose centre lies in the box ``begin`` to ``end`` (voxels, z y x), and every
    node touching one of its own; all of them lie in ``blocks`` (which hold every edge
    between them: a pair's edge lies in the block of one of its ends)."""

    block: int
    first: int
    last: int
    begin: tuple[int, int, int]
    end: tuple[int, int, int]
    blocks: tuple[int, ...]


@dataclass(frozen=True)
class RegionGraph:
    """The graph around one block: ``graph`` (nodes sorted by id, edges aggregated) with each
    node's block."""

    graph: GraphData
    blocks: np.ndarray


@functools.cache
def _tables() -> tuple[Any, ...]:
    import sqlalchemy as sa

    meta = sa.MetaData()
    info = sa.Table("meta", meta, sa.Column("key", sa.String(64), primary_key=True),
                    sa.Column("value", sa.Text, nullable=False))
    nodes = sa.Table("nodes", meta, sa.Column("id", sa.BigInteger, primary_key=True,
                                              autoincrement=False),
                     sa.Column("block", sa.BigInteger, nullable=False, index=True),
                     sa.Column("size", sa.BigInteger, nullable=False),
                     sa.Column("z", sa.Float), sa.Column("y", sa.Float), sa.Column("x", sa.Float))
    edges = sa.Table("edges", meta, sa.Column("u", sa.BigInteger, nullable=False),
                     sa.Column("v", sa.BigInteger, nullable=False),
                     sa.Column("block", sa.BigInteger, nullable=False, index=True),
                     sa.Column("total", sa.Float, nullable=False),
                     sa.Column("count", sa.BigInteger, nullable=False),
                     sa.Column("hist", sa.LargeBinary, nullable=False))
    blocks = sa.Table("blocks", meta, sa.Column("block", sa.BigInteger, primary_key=True,
                                                autoincrement=False))
    levels = sa.Table("levels", meta, sa.Column("key", sa.String(32), nullable=False),
                      sa.Column("block", sa.BigInteger, nullable=False),
                      sa.Column("u", sa.BigInteger, nullable=False),
                      sa.Column("v", sa.BigInteger, nullable=False),
                      sa.Column("level", sa.Float, nullable=False))
    agglomerated = sa.Table("agglomerated", meta,
                            sa.Column("key", sa.String(32), primary_key=True),
                            sa.Column("block", sa.BigInteger, primary_key=True,
                                      autoincrement=False))
    return meta, info, nodes, edges, blocks, levels, agglomerated


class GraphStore:
    """One job's graph database."""

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        self.url = url
        shown = shown_url(url)
        scheme = url.split(":", 1)[0].split("+", 1)[0].lower()
        if scheme not in ("sqlite", "postgresql", "postgres"):
            raise UserError(f"--db {shown}: give sqlite:///FILE or postgresql://USER@HOST/DB")
        if scheme == "postgres":  # the libpq spelling
            url = "postgresql" + url[len("postgres"):]
        connect: dict[str, Any] = ({"timeout": 300} if scheme == "sqlite"
                                   else {"connect_timeout": 10})
        try:
            self.engine = sa.create_engine(url, connect_args=connect, pool_pre_ping=True)
        except ImportError as exc:
            if exc.name in (None, "psycopg"):
                raise UserError(f"--db {shown}: the driver is missing ({exc}); pip install "
                                "'emrun[postgres]'") from None
            raise UserError(f"--db {shown}: the driver {exc.name} is not installed; "
                            "emrun[postgres] brings psycopg (3): write postgresql://... (or "
                            f"postgresql+psycopg://...), or install {exc.name}") from None
        except Exception as exc:
            reason = _hide_secret(_first_line(exc), url)
            raise UserError(f"--db {shown}: not a database URL ({reason})") from None
        if scheme == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_settings)
        self.seconds = 0.0  # time spent writing, for the benchmark's database share
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cache_key: tuple[Any, bool] | None = None  # (graph digest, histograms)
        self._held = 0  # bytes of the rows in ``_cache``

    def create(self, digest: str, run: str = "", output: str = "",
               resumed: bool = False) -> None:
        """Create the tables if missing and record ``digest`` and the ``run`` that fills
        them (`ScaleJob.run`, with its ``output`` for messages). Refused, before anything
        is changed: tables of ours that hold other columns (not emrun's), a database that
        records another digest (another job's graph), and one holding the graph of another
        run of these fragments (another output, or this one started over: the affinities
        may have been rewritten since) unless this run resumes one that recorded none.
        On PostgreSQL under a lock: processes creating the tables of one new database at
        once collided ('duplicate key ... pg_type', exit 1 'a bug in emrun')."""
        import sqlalchemy as sa

        meta, info, *_ = _tables()
        with self._connection("create the graph tables in") as conn:
            if conn.dialect.name == "postgresql":  # held to the transaction's end
                conn.execute(sa.text(f"SELECT pg_advisory_xact_lock({CREATE_LOCK})"))
            self._refuse_foreign_tables(conn)
            meta.create_all(conn)
            recorded = dict(conn.execute(sa.select(info.c.key, info.c.value)).all())
            found = recorded.get("digest")
            if found is None:
                conn.execute(info.insert(), [{"key": "digest", "value": digest}])
            elif found != digest:
                raise UserError(f"--db {shown_url(self.url)}: holds the graph of other "
                                "fragments (another input, block size or method); give an empty "
                                "database, or the output this database was made for")
            if run:
                self._claim(conn, recorded, run, output, resumed)

    def _refuse_foreign_tables(self, conn: Any) -> None:
        """A table named as one of ours with other columns is someone else's: refused."""
        import sqlalchemy as sa

        inspector = sa.inspect(conn)
        existing = set(inspector.get_table_names())
        foreign = []
        for table in _tables()[0].sorted_tables:
            if table.name not in existing:
                continue
            columns = sorted(c["name"] for c in inspector.get_columns(table.name))
            if columns != sorted(c.name for c in table.columns):
                foreign.append(f"{table.name} ({', '.join(columns)})")
        if foreign:
            raise UserError(f"--db {shown_url(self.url)}: its table{'s' * (len(foreign) > 1)} "
                            f"{'; '.join(foreign)} {'are' if len(foreign) > 1 else 'is'} not "
                            "emrun's graph; give an empty database (nothing was changed)")

    def _claim(self, conn: Any, recorded: dict[str, str], run: str, output: str,
               resumed: bool) -> None:
        """Record ``run`` as the one filling the graph, unless another run's graph is in."""
        import sqlalchemy as sa

        info, blocks, agglomerated = _tables()[1], _tables()[4], _tables()[6]
        owner = recorded.get("run")
        if owner == run:
            return
        holds = any(conn.execute(sa.select(t.c.block).limit(1)).first() is not None
                    for t in (blocks, agglomerated))
        if holds and (owner is not None or not resumed):
            other = recorded.get("output") or "another output"
            raise UserError(f"--db {shown_url(self.url)}: holds the graph of another run on "
                            f"these affinities ({other}), which may have been rewritten since; "
                            "give an empty database, or finish that run with --resume on its "
                            "output")
        conn.execute(info.delete().where(info.c.key.in_(["run", "output"])))
        conn.execute(info.insert(), [{"key": "run", "value": run},
                                     {"key": "output", "value": output}])

    def done_blocks(self) -> set[int]:
        import sqlalchemy as sa

        blocks = _tables()[4]
        with self._connection("read") as conn:
            return {int(b) for b in conn.execute(sa.select(blocks.c.block)).scalars()}

    def write_block(self, block: int, graph: BlockGraph) -> bool:
        """Insert one block's nodes and edges and its marker in one transaction; False if
        the block was already in (another worker, or an earlier run, finished it)."""

        _, _, nodes, edges, blocks, *_ = _tables()
        node_rows = [(i, block, s, *c) for i, s, c in zip(
            graph.ids.tolist(), graph.sizes.tolist(), graph.centres.tolist(), strict=True)]
        hist = graph.hist.astype("<u4")
        edge_rows = [(a, b, block, t, n, h.tobytes()) for a, b, t, n, h in zip(
            graph.u.tolist(), graph.v.tolist(), graph.total.tolist(), graph.count.tolist(),
            hist, strict=True)]
        return self._write_once(blocks, {"block": block}, [(nodes, node_rows),
                                                            (edges, edge_rows)])

    def read(self, histograms: bool = True) -> GraphData:
        """The whole graph, edges summed over the blocks that saw them; without
        ``histograms`` (mean scoring needs none) their column is not even read. Rows are
        fetched in batches straight into arrays, so memory holds arrays, not row objects."""
        return self._read(None, histograms).graph

    def read_region(self, around: Neighbourhood, histograms: bool) -> RegionGraph:
        """The graph one block agglomerates (`Neighbourhood`): selected in the database, so
        only those rows travel."""
        return self._read(around, histograms)

    def _read(self, around: Neighbourhood | None, histograms: bool) -> RegionGraph:
        import sqlalchemy as sa

        if around is not None:
            return _region_graph(*self._region_rows(around, histograms), histograms)
        _, _, nodes, edges, *_ = _tables()
        node_columns, node_fields = _node_columns(nodes, centres=False)
        edge_columns, edge_fields = _edge_columns(edges, histograms, blocks=False)
        with self._connection("read") as conn:
            node_rows = _rows(conn, sa.select(*node_columns).order_by(nodes.c.id), node_fields)
            edge_rows = _rows(conn, sa.select(*edge_columns), edge_fields)
        return _region_graph(node_rows, edge_rows, histograms)

    def drop_region_rows(self) -> None:
        """Forget the blocks' rows kept for neighbourhoods (`read_region`)."""
        self._cache.clear()
        self._held = 0

    def _region_rows(self, around: Neighbourhood, histograms: bool
                     ) -> tuple[np.ndarray, np.ndarray]:
        """The node and edge rows of ``around``, picked from its blocks' rows. A block's rows
        never change once its graph is in, and neighbouring blocks share most of their
        neighbourhoods, so a worker keeps blocks it read (up to ``REGION_CACHE_BYTES``):
        each block is then read about once per worker instead of once per neighbour, and
        the database answers the simple query it has an index for (rows by block)."""
        import sqlalchemy as sa

        info, nodes, edges = _tables()[1], _tables()[2], _tables()[3]
        with self._connection("read") as conn:
            key = (conn.execute(sa.select(info.c.value).where(info.c.key == "digest"))
                   .scalar(), histograms)
            if key != self._cache_key:  # another graph (or the histograms now wanted)
                self.drop_region_rows()
                self._cache_key = key
            missing = [b for b in around.blocks if b not in self._cache]
            if missing:
                node_columns, node_fields = _node_columns(nodes, centres=True)
                edge_columns, edge_fields = _edge_columns(edges, histograms, blocks=True)
                node_rows = _rows(conn, sa.select(*node_columns).where(
                    nodes.c.block.in_(missing)).order_by(nodes.c.id), node_fields)
                edge_rows = _rows(conn, sa.select(*edge_columns).where(
                    edges.c.block.in_(missing)), edge_fields)
                self._keep(missing, node_rows, edge_rows)
        for block in around.blocks:
            self._cache.move_to_end(block)
        node_rows = np.concatenate([self._cache[b][0] for b in around.blocks])
        edge_rows = np.concatenate([self._cache[b][1] for b in around.blocks])
        # The bytes held are counted as blocks come and go: summed over every kept block at
        # each read, they cost a worker of n blocks O(n^2) (a run of 10^5 blocks: 10^10).
        while self._held > REGION_CACHE_BYTES and len(self._cache) > len(around.blocks):
            _, (n, e) = self._cache.popitem(last=False)  # least recently used first
            self._held -= n.nbytes + e.nbytes
        return _picked(node_rows, edge_rows, around)

    def _keep(self, blocks: list[int], node_rows: np.ndarray, edge_rows: np.ndarray) -> None:
        """Keep the rows of ``blocks`` (read together) by block: one stable sort by block
        (the rows keep their order within a block) rather than a pass over all the rows
        for each block."""
        for block, nodes_of, edges_of in zip(blocks, _by_block(node_rows, blocks),
                                             _by_block(edge_rows, blocks), strict=True):
            self._cache[block] = (nodes_of, edges_of)
            self._held += nodes_of.nbytes + edges_of.nbytes

    def agglomerated_blocks(self, key: str) -> set[int]:
        """The blocks whose levels under ``key`` are in."""
        import sqlalchemy as sa

        table = _tables()[6]
        with self._connection("read") as conn:
            return {int(b) for b in conn.execute(
                sa.select(table.c.block).where(table.c.key == key)).scalars()}

    def write_levels(self, key: str, block: int, u: np.ndarray, v: np.ndarray,
                     level: np.ndarray) -> bool:
        """One block's join levels and its marker in one transaction; False if they were in."""

        *_, levels, agglomerated = _tables()
        rows = [(key, block, a, b, x)
                for a, b, x in zip(u.tolist(), v.tolist(), level.tolist(), strict=True)]
        return self._write_once(agglomerated, {"key": key, "block": block}, [(levels, rows)])

    def read_levels(self, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every block's join levels under ``key``: fragment ids u, v and the level."""
        import sqlalchemy as sa

        levels = _tables()[5]
        query = sa.select(levels.c.u, levels.c.v, levels.c.level).where(levels.c.key == key)
        with self._connection("read") as conn:
            rows = _rows(conn, query, [("u", "<i8"), ("v", "<i8"), ("level", "<f8")])
        return (_column(rows, "u").view(np.uint64), _column(rows, "v").view(np.uint64),
                _column(rows, "level"))

    def read_nodes(self) -> tuple[np.ndarray, np.ndarray]:
        """Every node's id (sorted) and size."""
        import sqlalchemy as sa

        nodes = _tables()[2]
        query = sa.select(nodes.c.id, nodes.c.size).order_by(nodes.c.id)
        with self._connection("read") as conn:
            rows = _rows(conn, query, [("id", "<i8"), ("size", "<i8")])
        return _column(rows, "id").view(np.uint64), _column(rows, "size")

    def size_bytes(self) -> int | None:
        """The database's size on disk (SQLite: its file; PostgreSQL: the database)."""
        import sqlalchemy as sa

        if self.engine.dialect.name == "sqlite":
            path = Path(self.engine.url.database or "")
            return sum(p.stat().st_size for p in path.parent.glob(path.name + "*")
                       if p.is_file()) if path.name else None
        with self._connection("read") as conn:
            return int(conn.execute(sa.text("SELECT pg_database_size(current_database())"))
                       .scalar())

    def dispose(self) -> None:
        self.engine.dispose()

    def _write_once(self, markers: Any, marker: dict[str, Any],
                    inserts: list[tuple[Any, list[tuple[Any, ...]]]]) -> bool:
        """Insert ``marker`` into ``markers`` and the rows of ``inserts`` (a table, tuples
        in its columns' order) in one transaction, the marker first (it claims the block); False
        if the marker was in already (another worker, or an earlier run, finished the
        block). The rows go to the driver's executemany as plain tuples: 3-4x faster than
        SQLAlchemy's insert of dictionaries (10,000 rows: 10 ms against 33-70 ms)."""
        import sqlalchemy as sa

        start = time.perf_counter()
        match = sa.and_(*(markers.c[k] == v for k, v in marker.items()))
        try:
            with self._connection("write to") as conn:
                if conn.execute(sa.select(*markers.c).where(match)).first() is not None:
                    return False
                conn.execute(markers.insert(), [marker])
                for table, rows in inserts:
                    if rows:
                        conn.exec_driver_sql(_insert_sql(conn.dialect, table), rows)
        except sa.exc.IntegrityError as exc:  # another worker committed this block
            with self._connection("read") as conn:  # meanwhile, or a row broke a key
                if conn.execute(sa.select(*markers.c).where(match)).first() is not None:
                    return False
            raise RuntimeError(f"the graph of {marker} broke a key of the graph database "
                               f"({_first_line(exc.orig or exc)}): ids shared with another "
                               "block's") from None
        finally:
            self.seconds += time.perf_counter() - start
        return True

    @contextmanager
    def _connection(self, what: str) -> Iterator[Any]:
        import sqlalchemy as sa

        try:
            with self.engine.begin() as conn:
                yield conn
        except sa.exc.DBAPIError as exc:
            if not _users_fault(exc):
                raise
            if self.engine.dialect.name == "sqlite":
                _check_sqlite_file(self.url, shown_url(self.url))
            raise UserError(f"--db {shown_url(self.url)}: cannot {what} the graph database "
                            f"({_first_line(exc.orig or exc)}){_password_hint(exc)}") from None


def _region_graph(node_rows: np.ndarray, edge_rows: np.ndarray, histograms: bool
              ) -> RegionGraph:
    """The graph of ``node_rows`` (sorted by id) and ``edge_rows``: edges to nodes it lacks
    dropped, a pair seen by two blocks summed."""
    from ..graph import Edges

    ids = _column(node_rows, "id").view(np.uint64)
    sizes, node_blocks = _column(node_rows, "size"), _column(node_rows, "block")
    u = _positions(ids, _column(edge_rows, "u").view(np.uint64))
    v = _positions(ids, _column(edge_rows, "v").view(np.uint64))
    inside = (u >= 0) & (v >= 0)  # a region's edges to nodes beyond it are dropped
    total, count = _column(edge_rows, "total"), _column(edge_rows, "count")
    hist = _column(edge_rows, "hist").view("<u4").reshape(-1, BINS) if histograms else None
    if not inside.all():
        u, v, total, count = u[inside], v[inside], total[inside], count[inside]
        hist = None if hist is None else hist[inside]
    merged = Edges.aggregate(u, v, total, count)  # a pair seen by two blocks: summed
    summed = np.zeros((merged.u.size, BINS if histograms else 0), np.int64)
    if hist is not None and merged.u.size:
        summed = _summed_rows(hist, np.searchsorted(
            merged.u * (ids.size + 1) + merged.v,
            np.minimum(u, v) * (ids.size + 1) + np.maximum(u, v)), merged.u.size)
    graph = GraphData(ids, sizes, merged.u, merged.v, merged.total, merged.count, summed)
    return RegionGraph(graph, node_blocks)


def _insert_sql(dialect: Any, table: Any) -> str:
    """INSERT of every column of ``table``, in order, with the driver's own placeholders
    (sqlite3: ?, psycopg: %s)."""
    quote = dialect.identifier_preparer.quote
    mark = "?" if dialect.paramstyle == "qmark" else "%s"
    names = [quote(column.name) for column in table.columns]
    return (f"INSERT INTO {quote(table.name)} ({', '.join(names)}) "
            f"VALUES ({', '.join([mark] * len(names))})")


def _node_columns(nodes: Any, centres: bool) -> tuple[list[Any], list[tuple[str, str]]]:
    """The node columns a read selects, and their fields in the array it fills."""
    fields = [("id", "<i8"), ("size", "<i8"), ("block", "<i8")]
    if centres:
        fields += [("z", "<f8"), ("y", "<f8"), ("x", "<f8")]
    return [nodes.c[name] for name, _ in fields], fields


def _edge_columns(edges: Any, histograms: bool, blocks: bool
                  ) -> tuple[list[Any], list[tuple[str, str]]]:
    """The edge columns a read selects, and their fields in the array it fills."""
    fields = [("u", "<i8"), ("v", "<i8"), ("total", "<f8"), ("count", "<i8")]
    if blocks:
        fields.append(("block", "<i8"))
    if histograms:
        fields.append(("hist", f"S{4 * BINS}"))  # the blob of BINS uint32
    return [edges.c[name] for name, _ in fields], fields


def _picked(node_rows: np.ndarray, edge_rows: np.ndarray, around: Neighbourhood
            ) -> tuple[np.ndarray, np.ndarray]:
    """The rows of ``around`` among its blocks' rows: its own nodes, those whose centre lies
    in its box, those an edge joins to its own; the edges between any two of them."""
    ids = node_rows["id"]
    centre = np.stack([node_rows["z"], node_rows["y"], node_rows["x"]], axis=1)
    in_box = ((centre >= np.array(around.begin)) & (centre < np.array(around.end))).all(1)
    near = ids[(node_rows["block"] == around.block) | in_box]
    u, v = edge_rows["u"], edge_rows["v"]
    after = v[(u >= around.first) & (u <= around.last)]
    before = u[(v >= around.first) & (v <= around.last)]
    taken = np.unique(np.concatenate([near, after, before]))
    nodes = node_rows[_positions(taken, ids) >= 0]  # binary search: isin sorts all rows
    return (nodes[np.argsort(nodes["id"], kind="stable")],
            edge_rows[(_positions(taken, u) >= 0) & (_positions(taken, v) >= 0)])


CREATE_LOCK = 0x656D72756E  # "emrun"
"""The PostgreSQL advisory lock under which a run creates the tables and claims them."""

BATCH = 1_000_000
"""Rows a PostgreSQL server-side cursor sends at a time when reading the graph."""


def _rows(conn: Any, query: Any, fields: list[tuple[str, str]]) -> np.ndarray:
    """The result of ``query`` as one structured array (``fields``: name and dtype of each
    column). The driver's row tuples go straight into it (`np.fromiter` over the DBAPI
    cursor, PostgreSQL's on the server side), never all held as Python objects: several
    times faster than rows through SQLAlchemy, and the memory is the array's. The query's
    parameters are emrun's own numbers (blocks, ids, voxels), written into its text."""
    sql = str(query.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
    raw = conn.connection.dbapi_connection
    if conn.dialect.name == "postgresql":
        cursor = raw.cursor(name="emrun_read")
        cursor.itersize = BATCH
    else:
        cursor = raw.cursor()
    try:
        cursor.execute(sql)
        return np.fromiter(cursor, np.dtype(fields))
    finally:
        cursor.close()


@numba.njit(cache=True, nogil=True)
def _summed_rows(rows: np.ndarray, group: np.ndarray, groups: int
                 ) -> np.ndarray:  # pragma: no cover - compiled
    """``rows`` summed by ``group`` (0..groups-1), as int64; compiled (``np.add.at`` took
    1.7 s for a million histograms, this 0.03 s)."""
    out = np.zeros((groups, rows.shape[1]), np.int64)
    for i in range(rows.shape[0]):
        for j in range(rows.shape[1]):
            out[group[i], j] += rows[i, j]
    return out


def _by_block(rows: np.ndarray, blocks: list[int]) -> list[np.ndarray]:
    """``rows`` split by their ``block`` field, one array for each of ``blocks`` (empty for
    a block with none), each in the rows' order; copies, so that each block's bytes are
    its own to count and to free."""
    order = np.argsort(rows["block"], kind="stable")
    ordered = rows[order]
    keys = np.asarray(blocks, np.int64)
    begin = np.searchsorted(ordered["block"], keys, side="left")
    end = np.searchsorted(ordered["block"], keys, side="right")
    return [ordered[b:e].copy() for b, e in zip(begin.tolist(), end.tolist(),
                                                strict=True)]


def _column(rows: np.ndarray, name: str) -> np.ndarray:
    """One column of a structured array, contiguous."""
    return np.ascontiguousarray(rows[name])


def _positions(ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Where each of ``values`` is in the sorted ``ids``; -1 where it is not there."""
    if ids.size == 0:
        return np.full(values.size, -1, np.int64)
    at = np.minimum(np.searchsorted(ids, values), ids.size - 1)
    return np.where(ids[at] == values, at, -1).astype(np.int64)


def _sqlite_settings(connection: Any, _record: Any) -> None:
    """WAL: readers do not block the workers writing blocks."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _users_fault(exc: Exception) -> bool:
    """A database that does not answer, refuses, lacks a table or is no database at all
    (sqlite: 'file is not a database', plain DatabaseError); not a constraint violated
    (IntegrityError: `_write_once` reads it as a block another worker finished)."""
    import sqlalchemy as sa

    return isinstance(exc, (sa.exc.OperationalError, sa.exc.ProgrammingError,
                            sa.exc.InterfaceError)) or type(exc) is sa.exc.DatabaseError


def _password_hint(exc: BaseException) -> str:
    """What to do when the server asks for a password that no one gave (libpq: 'no password
    supplied'): the job's file keeps none, so a resume that takes the job's --db, or a
    worker started elsewhere, has it only from PGPASSWORD or ~/.pgpass."""
    if "no password supplied" not in str(exc):
        return ""
    return ("; the server asks for a password: set PGPASSWORD or add the password to "
            "~/.pgpass (the job's file in the output keeps none), or give it in --db")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
