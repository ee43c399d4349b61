"""Graph data: TU data sets from a folder, and motif graphs the library generates offline.

**TU data sets** (:func:`load_tu`). The TU Dortmund raw text files are read from
``<root>/<name>/raw/``. The folder is checked first (one message naming the missing files and
where to put them, no download), then every file against the others (:func:`read_tu_raw`: one
message naming the file, the line and the problem). PyTorch Geometric's ``TUDataset`` then
processes a copy in a cache folder named by the files' contents: PyG never re-checks its
``processed/`` against ``raw/``, so processing beside the user's files would keep serving the old
graphs after a file is edited. Nodes without features get degree features
(:func:`hardneg.graph.encoder.degree_feature_transform`) unless ``degree=None``.

**Motif graphs** (:func:`motif_graphs`). Every graph is a random tree (its size drawn in
``[min_nodes, max_nodes]``) with a few random extra edges, and one planted 6-node motif joined to
it by one edge; the motif's type is the class. The four motifs have the **same degree sequence**
(two nodes of degree 3, four of degree 2, seven edges) and differ only in how they are wired:

* ``ladder``: two squares sharing an edge (a 2 x 3 grid);
* ``fused_rings``: a triangle and a pentagon sharing an edge;
* ``dumbbell``: two triangles joined by an edge;
* ``theta``: two degree-3 nodes joined by three paths of 2, 2 and 3 edges.

So a degree histogram carries no class information beyond chance (measured: see
``docs/graphs.md``), while a message-passing encoder can tell the cycle structure apart.
Nodes have no features; the loader gives them one-hot degrees, as for unlabelled TU sets.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch_geometric.data import Data
from torch_geometric.datasets import TUDataset

from hardneg._checks import check_number
from hardneg.data.datasets import default_cache_dir
from hardneg.graph.encoder import degree_feature_transform

TU_REQUIRED = ("A", "graph_indicator", "graph_labels")
TU_OPTIONAL = ("node_labels", "node_attributes", "edge_labels", "edge_attributes")
DEGREE_OPTIONS = ("auto", None)

#: the motifs' edge lists over nodes 0..5 (all with degree sequence 3, 3, 2, 2, 2, 2)
MOTIFS: dict[str, tuple[tuple[int, int], ...]] = {
    "ladder": ((0, 1), (1, 2), (3, 4), (4, 5), (0, 3), (1, 4), (2, 5)),
    "fused_rings": ((0, 1), (1, 2), (2, 0), (1, 3), (3, 4), (4, 5), (5, 0)),
    "dumbbell": ((0, 1), (1, 2), (2, 0), (3, 4), (4, 5), (5, 3), (2, 3)),
    "theta": ((0, 2), (2, 1), (0, 3), (3, 1), (0, 4), (4, 5), (5, 1)),
}


@dataclass
class GraphSet:
    """A list of PyG ``Data`` graphs with node features, labels ``y`` and a description."""

    graphs: list
    name: str
    num_features: int
    num_classes: int
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.graphs)

    @property
    def labels(self) -> torch.Tensor:
        return torch.cat([g.y.view(-1) for g in self.graphs])


def tu_files(name: str) -> list[str]:
    return [f"{name}_{part}.txt" for part in TU_REQUIRED]


def check_tu_folder(root: str | os.PathLike, name: str) -> Path:
    """``<root>/<name>/raw`` after checking that the TU raw files are there."""
    raw = Path(root) / name / "raw"
    missing = [f for f in tu_files(name) if not (raw / f).is_file()]
    if missing:
        found = sorted(p.name for p in raw.iterdir()) if raw.is_dir() else []
        hint = ""
        root_path = Path(root)
        own_raw = all((root_path / "raw" / f).is_file() for f in tu_files(name))
        flat = all((root_path / f).is_file() for f in tu_files(name))
        if own_raw or (flat and root_path.name == "raw"):
            # the data set's own folder (or its raw/) was given instead of the folder above it
            above = root_path.parent if own_raw else root_path.parent.parent
            hint = (
                f" ({root_path} is the data set's own folder: give the folder above it, "
                f"{above}, which holds {name}/raw/)"
            )
        elif flat and root_path.name == name:
            hint = (
                f" ({root_path} holds the files themselves: put them in {root_path}/raw/ and "
                f"give the folder above, {root_path.parent})"
            )
        elif flat:
            hint = f" (they sit directly in {root_path}: move them into {raw})"
        elif not raw.is_dir() and (Path(root) / name).is_dir():
            loose = sorted(p.name for p in (Path(root) / name).iterdir())
            hint = f" ({Path(root) / name} holds {', '.join(loose) or 'nothing'}: move the .txt files into raw/)"
        elif found:
            hint = f" (it holds {', '.join(found)})"
        raise FileNotFoundError(
            f"TU data set {name!r} not found: put {', '.join(tu_files(name))} "
            f"(and any {name}_node_labels.txt etc.) in {raw}{hint}. "
            f"They are at https://chrsmrrs.github.io/datasets/ (hardneg never downloads)"
        )
    return raw


def _read_tu_table(
    path: Path, number: type, width: int | None = None
) -> tuple[np.ndarray, list[str]]:
    """``([rows, columns], the lines)`` of a TU text file: one record a line, numbers separated
    by commas.

    Trailing blank lines are dropped; any other line that does not parse is an error naming
    the file, the line and what it holds (PyG's reader would stop on it with a bare
    ``invalid literal for int()``, or read a wrongly shaped array)."""
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise ValueError(
            f"{path}: not a text file (TU files hold numbers, one record a line)"
        ) from None
    while lines and not lines[-1].strip():
        lines.pop()
    kind = "whole number" if number is int else "number"
    what = f"a {kind}" if width == 1 else f"{kind}s separated by commas"
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            row = [number(cell) for cell in line.split(",")]
        except ValueError:
            raise ValueError(f"{path}: line {i}: expected {what}, got {line.strip()!r}") from None
        if number is float and not all(math.isfinite(v) for v in row):
            # float() reads 'nan' and 'inf': such node features made every loss NaN
            raise ValueError(
                f"{path}: line {i}: expected finite numbers, got {line.strip()!r} "
                "(NaN or Inf attributes make every loss NaN)"
            )
        if width is None:
            width = len(row)
        if len(row) != width:
            raise ValueError(
                f"{path}: line {i} holds {len(row)} value(s), the lines before it {width}"
            )
        rows.append(row)
    dtype = np.int64 if number is int else np.float64
    return np.asarray(rows, dtype=dtype).reshape(len(rows), width or 0), lines


def read_tu_raw(raw: Path, name: str) -> dict[str, str]:
    """Check the TU files in ``raw`` against each other; ``{file name: its lines}``.

    Checked, each error naming the file: every line parses; the graph indicator is sorted
    (PyG slices the graphs by it); every edge joins two nodes of one graph; the graph labels
    number the graphs; node labels / attributes number the nodes and edge labels / attributes
    the edges. The text returned holds each file's lines with a final newline (PyG's reader
    silently drops the last line of a file that has none). Only these files are returned: a
    ``graph_attributes`` file (a regression target, which PyG would read instead of the
    labels) is left out, since the protocol classifies by ``graph_labels``."""
    texts: dict[str, str] = {}
    tables: dict[str, np.ndarray] = {}
    for part in TU_REQUIRED + TU_OPTIONAL:
        path = raw / f"{name}_{part}.txt"
        if not path.is_file():
            continue
        number = float if part.endswith("attributes") else int
        width = 2 if part == "A" else 1 if part in ("graph_indicator", "graph_labels") else None
        tables[part], lines = _read_tu_table(path, number, width)
        texts[path.name] = "".join(f"{line}\n" for line in lines)
    indicator = tables["graph_indicator"][:, 0]
    where = raw / f"{name}_graph_indicator.txt"
    if indicator.size == 0:
        raise ValueError(f"{where}: the file is empty (it gives each node's graph)")
    if indicator.min() < 1:
        line = int(np.argmax(indicator < 1)) + 1
        raise ValueError(
            f"{where}: line {line}: graph numbers start at 1, got {indicator[line - 1]}"
        )
    if (np.diff(indicator) < 0).any():
        line = int(np.argmax(np.diff(indicator) < 0)) + 2
        raise ValueError(
            f"{where}: line {line}: graph {indicator[line - 1]} after graph "
            f"{indicator[line - 2]}: the nodes must be listed graph by graph, in order"
        )
    num_nodes, num_graphs = len(indicator), int(indicator.max())
    edges = tables["A"]
    where = raw / f"{name}_A.txt"
    if edges.size == 0:
        raise ValueError(f"{where}: the file is empty (it lists the edges, one 'u, v' a line)")
    bad = (edges < 1) | (edges > num_nodes)
    if bad.any():
        line = int(np.argmax(bad.any(1))) + 1
        raise ValueError(
            f"{where}: line {line}: node {int(edges[line - 1][bad[line - 1]][0])} does not "
            f"exist ({name}_graph_indicator.txt numbers the nodes 1..{num_nodes})"
        )
    crossing = indicator[edges[:, 0] - 1] != indicator[edges[:, 1] - 1]
    if crossing.any():
        line = int(np.argmax(crossing)) + 1
        u, v = (int(n) for n in edges[line - 1])
        raise ValueError(
            f"{where}: line {line}: edge {u}, {v} joins graph {indicator[u - 1]} to graph "
            f"{indicator[v - 1]} (by {name}_graph_indicator.txt)"
        )
    labels = tables["graph_labels"]
    if len(labels) != num_graphs:
        raise ValueError(
            f"{raw}: {name}_graph_labels.txt has {len(labels)} labels but "
            f"{name}_graph_indicator.txt numbers {num_graphs} graphs: the files do not match"
        )
    for part, count, of in (
        ("node_labels", num_nodes, "nodes"),
        ("node_attributes", num_nodes, "nodes"),
        ("edge_labels", len(edges), "edges"),
        ("edge_attributes", len(edges), "edges"),
    ):
        if part in tables and len(tables[part]) != count:
            source = "graph_indicator" if of == "nodes" else "A"
            raise ValueError(
                f"{raw}: {name}_{part}.txt has {len(tables[part])} lines but "
                f"{name}_{source}.txt has {count} {of}: the files do not match"
            )
    return texts


log = logging.getLogger(__name__)


class _TUDataset(TUDataset):
    """PyG's ``TUDataset`` without its "Processing..." / "Done!" on stderr, which only say that a
    first load takes a moment; they show when this module's logger is at DEBUG. PyG's warnings
    are left as they are."""

    # Dataset.__init__ stores its `log=True` argument (which TUDataset does not pass on) and
    # reads it around process(): this property answers instead
    @property
    def log(self) -> bool:
        return log.isEnabledFor(logging.DEBUG)

    @log.setter
    def log(self, value: bool) -> None:
        pass


def tu_digest(texts: dict[str, str]) -> str:
    """The SHA-256 of the checked TU files (:func:`read_tu_raw`): names a data set's contents,
    for the processing cache and for runs that must not be reused on other data."""
    digest = hashlib.sha256()
    for file_name in sorted(texts):
        digest.update(f"{file_name}\0{texts[file_name]}\0".encode())
    return digest.hexdigest()


def _processed_root(texts: dict[str, str], name: str, cache_dir: str | os.PathLike | None) -> Path:
    """A folder holding ``<name>/raw/`` with ``texts`` and PyG's ``processed/`` of them.

    The folder is named by a digest of the files' contents, so PyG's ``processed/`` (which
    it never re-checks against ``raw/``) always belongs to these very files: an edited file
    gets a new folder, and two data sets of one name never share one. The user's data folder
    is never written to (as root, a read-only folder would be). PyG processes in a staging
    folder that is then renamed into place, so a process loading the same files at the same
    time never reads a half-written ``processed/`` (PyG writes it in place)."""
    # per user (a /tmp folder made by one user is not writable by the next), and kept
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir() / "tu"
    root = cache / f"{name}-{tu_digest(texts)[:16]}"
    if (root / name / "processed").is_dir():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
    try:
        raw = staging / name / "raw"
        raw.mkdir(parents=True)
        for file_name, text in texts.items():
            (raw / file_name).write_text(text)
        _TUDataset(str(staging), name=name)  # processes into staging/<name>/processed
        try:
            os.rename(staging, root)
        except OSError:
            if not (root / name / "processed").is_dir():
                raise
            # another process renamed its copy of the same files into place first
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def finish_graphs(
    graphs: list, name: str, degree: str | None = "auto", info: dict | None = None
) -> GraphSet:
    """Check the graphs (none empty), give featureless nodes degree features, count classes."""
    if not graphs:
        raise ValueError(f"data set {name!r} has no graphs")
    empty = [i for i, g in enumerate(graphs) if g.num_nodes == 0]
    if empty:
        raise ValueError(
            f"data set {name!r} has {len(empty)} empty graph(s) (no nodes), e.g. index "
            f"{empty[:5]}: remove them before training"
        )
    has_x = [g.x is not None and g.x.numel() > 0 for g in graphs]
    if any(has_x) and not all(has_x):
        raise ValueError(f"data set {name!r}: some graphs have node features and some do not")
    if not has_x[0]:
        if degree is None:
            raise ValueError(
                f"the graphs of {name!r} have no node features and degree=None: "
                "use degree='auto' (one-hot degrees, as InfoGraph / HCL) or give node features"
            )
        if degree not in DEGREE_OPTIONS:
            raise ValueError(f"degree must be 'auto' or None, got {degree!r}")
        transform = degree_feature_transform(graphs)
        graphs = [transform(g.clone()) for g in graphs]
        info = {**(info or {}), "node_features": repr(transform)}
    widths = {int(g.x.shape[1]) for g in graphs}
    if len(widths) != 1:
        raise ValueError(f"data set {name!r}: node feature widths differ {sorted(widths)}")
    for g in graphs:
        g.x = g.x.float()
    labels = torch.cat([g.y.view(-1) for g in graphs])
    return GraphSet(
        graphs=graphs,
        name=name,
        num_features=widths.pop(),
        num_classes=int(labels.max()) + 1,
        info=dict(info or {}),
    )


def load_tu(
    root: str | os.PathLike,
    name: str,
    *,
    degree: str | None = "auto",
    cache_dir: str | os.PathLike | None = None,
) -> GraphSet:
    """A TU data set from ``<root>/<name>/raw/`` (never downloads).

    Args:
        root: the folder holding ``<name>/raw/<name>_A.txt`` etc.
        name: the data set's name (``MUTAG``, ``PTC_MR``, ``NCI1``, ``PROTEINS``...).
        degree: ``'auto'`` gives featureless nodes degree features; None raises instead.
        cache_dir: where the checked raw files are copied for PyG to process, in a folder
            named by their contents (default: ``tu/`` in ``$HARDNEG_CACHE_DIR`` or
            ``~/.cache/hardneg``); ``root`` itself is only read.
    """
    root = Path(root).expanduser()  # data.data_dir=~/TU reaches us unexpanded, as for images
    raw = check_tu_folder(root, name)
    texts = read_tu_raw(raw, name)
    dataset = _TUDataset(str(_processed_root(texts, name, cache_dir)), name=name)
    graphs = [dataset[i] for i in range(len(dataset))]
    for g in graphs:
        if g.x is not None and g.x.numel() == 0:
            g.x = None
    info = {"root": str(root), "files_sha256": tu_digest(texts)}
    return finish_graphs(graphs, name, degree, info=info)


def _motif_graph(
    rng: np.random.Generator, motif: str, min_nodes: int, max_nodes: int, extra: float
):
    n_base = int(rng.integers(min_nodes, max_nodes + 1))
    edges = [(i, int(rng.integers(0, i))) for i in range(1, n_base)]  # random recursive tree
    present = {tuple(sorted(e)) for e in edges}
    for _ in range(int(rng.poisson(extra))):
        u, v = (int(a) for a in rng.integers(0, n_base, size=2))
        if u != v and tuple(sorted((u, v))) not in present:
            present.add(tuple(sorted((u, v))))
            edges.append((u, v))
    # the motif, its node labels permuted, joined by one edge to a random tree node
    perm = rng.permutation(6) + n_base
    edges += [(int(perm[a]), int(perm[b])) for a, b in MOTIFS[motif]]
    edges.append((int(rng.integers(0, n_base)), int(perm[int(rng.integers(0, 6))])))
    # shuffle node ids so that the motif is not always at the end
    n = n_base + 6
    relabel = rng.permutation(n)
    e = torch.tensor([[relabel[u], relabel[v]] for u, v in edges], dtype=torch.long).T
    return torch.cat([e, e.flip(0)], dim=1), n


def motif_graphs(
    num_graphs: int = 400,
    *,
    seed: int = 0,
    min_nodes: int = 4,
    max_nodes: int = 10,
    extra_edges: float = 0.5,
    motifs: tuple[str, ...] = tuple(MOTIFS),
    degree: str | None = "auto",
) -> GraphSet:
    """The embedded motif classification set (see the module docstring); balanced classes.

    Args:
        num_graphs: number of graphs (classes take turns).
        seed: seeds the generator: the same arguments give the same graphs.
        min_nodes, max_nodes: range of the random tree's size.
        extra_edges: mean (Poisson) number of random extra edges in the tree.
        motifs: the classes, names from :data:`MOTIFS`.
        degree: ``'auto'`` gives one-hot degree features; None leaves ``x`` empty (an error).
    """
    num_graphs = int(check_number("num_graphs", num_graphs, low=2, integer=True))
    min_nodes = int(check_number("min_nodes", min_nodes, low=1, integer=True))
    max_nodes = int(check_number("max_nodes", max_nodes, low=min_nodes, integer=True))
    extra_edges = check_number("extra_edges", extra_edges, low=0.0)
    unknown = [m for m in motifs if m not in MOTIFS]
    if unknown or len(motifs) < 2:
        raise ValueError(f"motifs must be at least two of {', '.join(MOTIFS)}, got {motifs!r}")
    rng = np.random.default_rng(seed)
    graphs = []
    for i in range(num_graphs):
        label = i % len(motifs)
        edge_index, n = _motif_graph(rng, motifs[label], min_nodes, max_nodes, extra_edges)
        graphs.append(Data(edge_index=edge_index, num_nodes=n, y=torch.tensor([label])))
    info = {"motifs": list(motifs), "seed": seed}
    return finish_graphs(graphs, "motifs", degree, info=info)


def degree_histograms(graphs: list, max_degree: int | None = None) -> np.ndarray:
    """``[graphs, max_degree + 1]`` counts of nodes of each degree (a raw-feature baseline)."""
    from torch_geometric.utils import degree

    degs = [degree(g.edge_index[0], num_nodes=g.num_nodes, dtype=torch.long) for g in graphs]
    top = max(int(d.max()) for d in degs) if max_degree is None else max_degree
    out = np.zeros((len(graphs), top + 1))
    for i, d in enumerate(degs):
        out[i] = np.bincount(d.clamp(max=top).numpy(), minlength=top + 1)
    return out
