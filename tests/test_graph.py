"""Graph contrastive learning (hardneg.graph): encoder, HCL's JSD_hard, frameworks, data, eval."""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _same import assert_same

pytest.importorskip("torch_geometric", reason="the graph extra (torch_geometric) is not installed")

from torch_geometric.data import Batch, Data  # noqa: E402

from hardneg.contrast import build_contrast  # noqa: E402
from hardneg.graph import augment as aug  # noqa: E402
from hardneg.graph.data import (  # noqa: E402
    MOTIFS,
    degree_histograms,
    finish_graphs,
    load_tu,
    motif_graphs,
)
from hardneg.graph.encoder import (  # noqa: E402
    GINEncoder,
    OneHotDegree,
    StandardisedDegree,
    degree_feature_transform,
)
from hardneg.graph.evaluate import knn_accuracy, linear_accuracy, svm_accuracy  # noqa: E402
from hardneg.graph.graphcl import GraphCL  # noqa: E402
from hardneg.graph.infograph import InfoGraph  # noqa: E402
from hardneg.graph.jsd_hard import jsd_hard_loss  # noqa: E402
from hardneg.graph.train import embed, train_graphs  # noqa: E402
from hardneg.registry import list_losses  # noqa: E402


@pytest.fixture(autouse=True)
def tu_cache(monkeypatch, tmp_path_factory):
    """load_tu's processing cache of these tests: the session's own folder, not the user's
    ~/.cache/hardneg/tu (the digest-named copies are shared by the tests of one session)."""
    monkeypatch.setenv("HARDNEG_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "hardneg-cache"))


SHARED_TU = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "TU"
if not SHARED_TU.is_dir():
    SHARED_TU = Path("/work/shared/data/TU")


# --- HCL's JSD_hard, restated the way the authors' code writes it --------------------------------
def authors_jsd_hard(l_enc, g_enc, batch, beta, tau_plus=0.5, sign=-1.0):
    """graph/losses.py local_global_loss_ with graph/cortex_DIM/functions/gan_losses.py JSD_hard,
    restated term by term: 0/1 masks multiply the score matrix, sums over all cells."""
    n, g = l_enc.shape[0], g_enc.shape[0]
    pos_mask = torch.zeros(n, g, dtype=l_enc.dtype)
    pos_mask[torch.arange(n), batch] = 1.0
    neg_mask = 1.0 - pos_mask
    res = l_enc @ g_enc.T
    log_2 = math.log(2.0)
    p = res * pos_mask
    ep = log_2 - F.softplus(-p) - (tau_plus / (1 - tau_plus)) * (F.softplus(-p) + p)
    e_pos = ep.sum() / n
    q = res * neg_mask
    if beta == 0:
        eq = (F.softplus(-q) + q - log_2) / (1 - tau_plus)
    else:
        eq = F.softplus(-q) + q
        reweight = sign * 2 * q / max(q.max(), q.min().abs())
        reweight = (beta * reweight).exp()
        reweight = reweight / reweight.mean(dim=1).view(-1, 1)
        eq = reweight * eq / (1 - tau_plus) - log_2
    e_neg = eq.sum() / (n * (g - 1))
    return e_neg - e_pos


def random_node_graph(seed, n=40, g=6, d=8):
    gen = torch.Generator().manual_seed(seed)
    batch = torch.sort(torch.randint(0, g, (n,), generator=gen)).values
    batch[:g] = torch.arange(g)  # every graph has a node
    batch = torch.sort(batch).values
    l_enc = torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    g_enc = torch.randn(g, d, generator=gen, dtype=torch.float64, requires_grad=True)
    return l_enc, g_enc, batch


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 2.0, 10.0])
@pytest.mark.parametrize("direction", ["authors", "hard"])
def test_jsd_hard_equals_the_authors_formula(beta, direction):
    for seed in range(3):
        l_enc, g_enc, batch = random_node_graph(seed)
        contrast = build_contrast(
            l_enc, g_enc, positive_index=batch[:, None], normalize=False, temperature=1.0
        )
        ours = jsd_hard_loss(contrast, beta=beta, direction=direction)
        theirs = authors_jsd_hard(
            l_enc, g_enc, batch, beta, sign=-1.0 if direction == "authors" else 1.0
        )
        assert torch.allclose(ours, theirs, atol=1e-6, rtol=0), (float(ours), float(theirs))
        g1 = torch.autograd.grad(ours, (l_enc, g_enc))
        g2 = torch.autograd.grad(theirs, (l_enc, g_enc))
        for a, b in zip(g1, g2):
            assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_jsd_hard_float32_and_the_directions_differ():
    l_enc, g_enc, batch = random_node_graph(7)
    l32, g32 = l_enc.detach().float(), g_enc.detach().float()
    contrast = build_contrast(
        l32, g32, positive_index=batch[:, None], normalize=False, temperature=1.0
    )
    ours = jsd_hard_loss(contrast, beta=2.0)
    assert abs(float(ours) - float(authors_jsd_hard(l32, g32, batch, 2.0))) < 1e-5
    hard = jsd_hard_loss(contrast, beta=2.0, direction="hard")
    assert abs(float(ours) - float(hard)) > 1e-3


def test_authors_weights_favour_low_scores():
    # the direction of the code: a lower-scoring negative gets the larger weight
    q = torch.tensor([[0.0, -2.0, 1.0, 3.0]])
    m = max(q.max(), q.min().abs())
    w = torch.exp(-2 * q / m)
    w = w / w.mean(1, keepdim=True)
    assert w[0, 1] > w[0, 0] > w[0, 2] > w[0, 3]


def test_jsd_hard_needs_two_graphs_and_valid_options():
    l_enc, g_enc, batch = random_node_graph(0, g=1)
    contrast = build_contrast(
        l_enc,
        g_enc[:1],
        positive_index=torch.zeros(40, 1, dtype=torch.long),
        normalize=False,
        temperature=1.0,
    )
    with pytest.raises(ValueError, match="at least 2 graphs"):
        jsd_hard_loss(contrast, beta=1.0)
    l_enc, g_enc, batch = random_node_graph(0)
    contrast = build_contrast(
        l_enc, g_enc, positive_index=batch[:, None], normalize=False, temperature=1.0
    )
    with pytest.raises(ValueError, match="direction"):
        jsd_hard_loss(contrast, beta=1.0, direction="easy")
    with pytest.raises(ValueError, match="beta"):
        jsd_hard_loss(contrast, beta=-1.0)


@pytest.mark.parametrize("beta", [0.0, 2.0])
@pytest.mark.parametrize("tau", [0.2, 0.7])
@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("num_graphs", [2, 5])
def test_jsd_hard_equals_the_authors_formula_for_any_tau_temperature_and_two_graphs(
    beta, tau, temperature, num_graphs
):
    # the authors' code scores raw products l g^T whatever the contrast set's temperature (its
    # logits are products / t), takes tau_plus as the class prior, and runs from two graphs up
    l_enc, g_enc, batch = random_node_graph(3, n=12, g=num_graphs)
    contrast = build_contrast(
        l_enc, g_enc, positive_index=batch[:, None], normalize=False, temperature=temperature
    )
    ours = jsd_hard_loss(contrast, beta=beta, tau=tau)
    theirs = authors_jsd_hard(l_enc, g_enc, batch, beta, tau_plus=tau)
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0), (float(ours), float(theirs))
    for a, b in zip(
        torch.autograd.grad(ours, (l_enc, g_enc)), torch.autograd.grad(theirs, (l_enc, g_enc))
    ):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_jsd_hard_refuses_bad_settings_and_contrast_sets_with_the_exact_message():
    l_enc, g_enc, batch = random_node_graph(0, n=12, g=3)
    pairs = build_contrast(
        l_enc, g_enc, positive_index=batch[:, None], normalize=False, temperature=1.0
    )
    for kwargs, message in [
        ({"beta": -1.0}, "beta must be in [0, inf), got -1.0"),
        ({"beta": 1.0, "tau": -0.1}, "tau must be in [0, 1), got -0.1"),
        ({"beta": 1.0, "tau": 1.0}, "tau must be in [0, 1), got 1.0"),  # rho = tau / (1 - tau)
        ({"beta": 1.0, "tau": 1.5}, "tau must be in [0, 1), got 1.5"),
        (
            {"beta": 1.0, "direction": "easy"},
            "direction must be one of 'authors', 'hard', got 'easy'",
        ),
    ]:
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            jsd_hard_loss(pairs, beta=kwargs.pop("beta"), **kwargs)
    # each node has exactly one graph: a second positive or extra per-node columns are refused
    two_positives = build_contrast(
        l_enc,
        g_enc,
        positive_index=torch.stack([batch, (batch + 1) % 3], dim=1),
        normalize=False,
        temperature=1.0,
    )
    extra_columns = build_contrast(
        l_enc,
        g_enc,
        positive_index=batch[:, None],
        anchor_columns=torch.randn(12, 2, 8, dtype=torch.float64),
        normalize=False,
        temperature=1.0,
    )
    for contrast in (two_positives, extra_columns):
        with pytest.raises(
            ValueError,
            match="^jsd_hard_loss expects node-graph pairs: one positive column per node$",
        ):
            jsd_hard_loss(contrast, beta=1.0)
    one_graph = build_contrast(
        l_enc,
        g_enc[:1],
        positive_index=torch.zeros(12, 1, dtype=torch.long),
        normalize=False,
        temperature=1.0,
    )
    with pytest.raises(
        ValueError,
        match="^the Jensen-Shannon graph objective needs at least 2 graphs per batch$",
    ):
        jsd_hard_loss(one_graph, beta=1.0)


# --- small graphs ---------------------------------------------------------------------------------
def cycle(n, label=0, features=None):
    src = torch.arange(n)
    dst = (src + 1) % n
    ei = torch.cat([torch.stack([src, dst]), torch.stack([dst, src])], dim=1)
    x = None if features is None else torch.eye(features)[torch.arange(n) % features]
    return Data(x=x, edge_index=ei, num_nodes=n, y=torch.tensor([label]))


def small_set(num=12, features=3):
    return finish_graphs([cycle(4 + i % 5, i % 2, features) for i in range(num)], "cycles")


# --- encoder --------------------------------------------------------------------------------------
def test_gin_encoder_structure_and_pooling():
    enc = GINEncoder(5, hidden=32, num_layers=3)
    assert enc.embedding_dim == 96
    for conv, norm in zip(enc.convs, enc.norms):
        layers = list(conv.nn)
        assert [type(m).__name__ for m in layers] == ["Linear", "ReLU", "Linear"]
        assert isinstance(norm, torch.nn.BatchNorm1d)
    batch = Batch.from_data_list([cycle(4, features=5), cycle(6, features=5)])
    enc.eval()
    y, m = enc(batch.x, batch.edge_index, batch.batch)
    assert y.shape == (2, 96) and m.shape == (10, 96)
    # the graph embedding is the sum of the node encodings of each layer
    assert torch.allclose(y[0], m[:4].sum(0), atol=1e-5)
    assert torch.allclose(y[1], m[4:].sum(0), atol=1e-5)
    # layer l is BN(ReLU(GINConv(h_{l-1})))
    h = enc.norms[0](F.relu(enc.convs[0](batch.x, batch.edge_index)))
    assert torch.allclose(m[:, :32], h, atol=1e-6)


def test_encoder_rejects_mismatched_or_missing_features():
    enc = GINEncoder(5)
    batch = Batch.from_data_list([cycle(4, features=3), cycle(5, features=3)])
    with pytest.raises(ValueError, match="expects node features of dimension 5"):
        enc(batch.x, batch.edge_index, batch.batch)
    with pytest.raises(ValueError, match="no node features"):
        enc(None, batch.edge_index, batch.batch)


def test_degree_features_one_hot_and_standardised():
    graphs = [cycle(5), cycle(3)]
    t = degree_feature_transform(graphs)
    assert isinstance(t, OneHotDegree) and t.max_degree == 2
    x = t(graphs[0].clone()).x
    assert x.shape == (5, 3) and torch.equal(x.argmax(1), torch.full((5,), 2))
    # a star with 1000 leaves: the degree is standardised instead (InfoGraph / HCL)
    leaves = torch.arange(1, 1001)
    ei = torch.cat(
        [
            torch.stack([torch.zeros(1000, dtype=torch.long), leaves]),
            torch.stack([leaves, torch.zeros(1000, dtype=torch.long)]),
        ],
        dim=1,
    )
    star = Data(edge_index=ei, num_nodes=1001, y=torch.tensor([0]))
    t = degree_feature_transform([star])
    assert isinstance(t, StandardisedDegree)
    x = t(star.clone()).x
    assert x.shape == (1001, 1) and abs(float(x.mean())) < 1e-5


def test_import_error_names_the_extra(monkeypatch):
    import importlib

    for mod in [m for m in sys.modules if m == "hardneg.graph" or m.startswith("hardneg.graph.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "torch_geometric", None)  # "not installed"
    with pytest.raises(ImportError, match=r'pip install "hardneg\[graph\]"'):
        importlib.import_module("hardneg.graph")


# --- augmentations --------------------------------------------------------------------------------
def tensors(num=6):
    batch = Batch.from_data_list([cycle(5 + i, features=4) for i in range(num)])
    return batch.x, batch.edge_index, batch.batch


def _check_graph(x, ei, b, num_graphs):
    assert x.shape[0] == b.shape[0]
    assert int(ei.max()) < x.shape[0] if ei.numel() else True
    assert torch.equal(b[ei[0]], b[ei[1]])  # edges stay inside their graph
    assert torch.equal(torch.unique(b), torch.arange(num_graphs))  # no graph lost


@pytest.mark.parametrize("name", list(aug.AUGMENTATIONS))
def test_augmentations_are_seeded_and_keep_every_graph(name):
    x, ei, b = tensors()
    a = aug.augment(x, ei, b, name, ratio=0.4, generator=torch.Generator().manual_seed(3))
    c = aug.augment(x, ei, b, name, ratio=0.4, generator=torch.Generator().manual_seed(3))
    d = aug.augment(x, ei, b, name, ratio=0.4, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(u, v) for u, v in zip(a, c))
    assert not all(u.shape == v.shape and torch.equal(u, v) for u, v in zip(a, d))
    _check_graph(*a, 6)
    # an extreme ratio still leaves one node per graph
    _check_graph(
        *aug.augment(x, ei, b, name, ratio=0.99, generator=torch.Generator().manual_seed(0)), 6
    )


def test_drop_nodes_keeps_the_induced_subgraph():
    x, ei, b = tensors()
    x = torch.arange(x.shape[0], dtype=torch.float).unsqueeze(1)  # node ids as features
    nx, nei, nb = aug.drop_nodes(x, ei, b, ratio=0.3, generator=torch.Generator().manual_seed(1))
    kept = nx[:, 0].long()
    old_edges = {(int(u), int(v)) for u, v in ei.T}
    new_edges = {(int(kept[u]), int(kept[v])) for u, v in nei.T}
    expected = {(u, v) for u, v in old_edges if u in set(kept.tolist()) and v in set(kept.tolist())}
    assert new_edges == expected and nx.shape[0] < x.shape[0]


def test_subgraph_is_connected_and_of_the_target_size():
    x, ei, b = tensors()
    sizes = torch.bincount(b)
    nx, nei, nb = aug.sample_subgraph(
        x, ei, b, ratio=0.4, generator=torch.Generator().manual_seed(2)
    )
    got = torch.bincount(nb)
    assert got.tolist() == [aug.expected_kept(int(s), 0.4) for s in sizes]
    for g in range(6):  # cycles: a grown region of a cycle is a path, connected
        nodes = (nb == g).nonzero().view(-1).tolist()
        adj = {n: set() for n in nodes}
        for u, v in nei.T.tolist():
            if u in adj:
                adj[u].add(v)
        seen, stack = {nodes[0]}, [nodes[0]]
        while stack:
            for w in adj[stack.pop()] - seen:
                seen.add(w)
                stack.append(w)
        assert seen == set(nodes)


def test_perturb_edges_stays_undirected_and_mask_zeroes_rows():
    x, ei, b = tensors()
    _, nei, _ = aug.perturb_edges(x, ei, b, ratio=0.5, generator=torch.Generator().manual_seed(0))
    pairs = {(int(u), int(v)) for u, v in nei.T}
    assert all((v, u) in pairs for u, v in pairs) and all(u != v for u, v in pairs)
    assert pairs != {(int(u), int(v)) for u, v in ei.T}
    nx, _, _ = aug.mask_attributes(x, ei, b, ratio=0.5, generator=torch.Generator().manual_seed(0))
    zero = (nx == 0).all(1)
    assert 0 < int(zero.sum()) < x.shape[0] and torch.equal(nx[~zero], x[~zero])


# --- frameworks: every registered strategy --------------------------------------------------------
def one_batch(num=8):
    data = small_set(num)
    return data, Batch.from_data_list(data.graphs)


def test_infograph_contrast_pairs_nodes_with_their_graph():
    data, batch = one_batch()
    model = InfoGraph(data.num_features, loss="infonce")
    contrast, _ = model.contrast(batch)
    assert torch.equal(contrast.positive_index[:, 0], batch.batch)
    assert contrast.num_negatives == 8 - 1
    assert torch.isinf(contrast.negative_logits[torch.arange(batch.num_nodes), batch.batch]).all()


def test_infograph_jsd_is_infographs_loss():
    # InfoGraph's measure 'JSD' through local_global_loss_ (masked cells add 0 for JSD)
    data, batch = one_batch()
    torch.manual_seed(0)
    model = InfoGraph(data.num_features, loss="infonce")
    contrast, _ = model.contrast(batch)
    n, g = contrast.negative_logits.shape
    res = contrast.anchors @ contrast.columns.T
    pos = torch.zeros(n, g)
    pos[torch.arange(n), batch.batch] = 1
    log2 = math.log(2.0)
    e_pos = (log2 - F.softplus(-(res * pos))).sum() / n
    e_neg = (F.softplus(-(res * (1 - pos))) + res * (1 - pos) - log2).sum() / (n * (g - 1))
    torch.manual_seed(0)
    assert torch.allclose(model(batch), e_neg - e_pos, atol=1e-5)


def test_infograph_defaults_and_errors():
    data, _ = one_batch()
    assert InfoGraph(data.num_features, loss="hcl").objective == "jsd_hard"
    assert InfoGraph(data.num_features, loss="infonce").objective == "jsd"
    with pytest.raises(ValueError, match="needs the 'hcl' strategy"):
        InfoGraph(data.num_features, loss="ring", objective="jsd_hard")
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        InfoGraph(data.num_features, loss="hcl", loss_hparams={"betta": 1.0})


@pytest.mark.parametrize("direction", ["authors", "hard"])
def test_infograph_with_hcl_is_the_authors_jsd_hard_of_its_heads(direction):
    # InfoGraph's default (loss 'hcl'): the authors' JSD_hard on the raw products of the two
    # heads' outputs, with the strategy's (annealed) beta and the given tau
    data, batch = one_batch()
    torch.manual_seed(0)
    model = InfoGraph(
        data.num_features,
        loss_hparams={"beta": 2.0, "beta_anneal": "down"},
        direction=direction,
        jsd_tau=0.3,
    ).double()
    batch.x = batch.x.double()
    assert (model.loss_name, model.objective) == ("hcl", "jsd_hard")
    y, m = model.encoder(batch.x, batch.edge_index, batch.batch, batch.num_graphs)
    local, graph = model.local_head(m), model.global_head(y)
    beta = 1.25  # HCL's 'down' schedule at progress 0.5: 2 - 4 * 2 / 8 (ninths of training)
    sign = -1.0 if direction == "authors" else 1.0
    want = authors_jsd_hard(local, graph, batch.batch, beta, tau_plus=0.3, sign=sign)
    got = model(batch, progress=0.5)
    assert torch.allclose(got, want, atol=1e-9, rtol=0), (float(got), float(want))
    # two graphs are enough
    two = Batch.from_data_list(data.graphs[:2])
    two.x = two.x.double()
    assert torch.isfinite(model(two, progress=0.5))


def test_infograph_heads_and_encoder_defaults():
    from hardneg.graph.infograph import FF

    torch.manual_seed(0)
    head = FF(4)
    linears = [m for m in head.block if isinstance(m, torch.nn.Linear)]
    relus = [m for m in head.block if isinstance(m, torch.nn.ReLU)]
    assert len(linears) == 3 and len(relus) == 3
    x = torch.randn(5, 4)
    h = x
    for layer in linears:  # three Linear-ReLU layers, plus the linear shortcut
        h = torch.relu(layer(h))
    torch.testing.assert_close(head(x), h + head.shortcut(x))
    model = InfoGraph(3)
    assert (model.encoder.hidden, model.encoder.num_layers) == (32, 3)
    assert (model.jsd_tau, model.direction) == (0.5, "authors")
    small = InfoGraph(3, hidden=8, num_layers=2)
    assert (small.encoder.hidden, small.encoder.num_layers) == (8, 2)


def test_infograph_refusals_carry_their_exact_message():
    data, batch = one_batch()
    for kwargs, message in [
        (
            {"objective": "dot"},
            "objective must be one of 'jsd', 'jsd_hard', 'infonce', got 'dot'",
        ),
        ({"direction": "easy"}, "direction must be one of 'authors', 'hard', got 'easy'"),
        (
            {"loss": "hcl", "loss_hparams": {"betta": 1.0, "gamma": 2.0}},
            "unknown hyper-parameter(s) 'betta', 'gamma' for loss 'hcl'; allowed: ",
        ),
        (
            {"loss": "hcl", "loss_hparams": {"temperature": 0.2, "tau_plus": 0.1}},
            "objective 'jsd_hard' does not use 'temperature', 'tau_plus': ",
        ),
    ]:
        with pytest.raises(ValueError, match="^" + re.escape(message)):
            InfoGraph(data.num_features, **kwargs)
    one = Batch.from_data_list(data.graphs[:1])
    with pytest.raises(
        ValueError,
        match="^" + re.escape("InfoGraph needs at least 2 graphs per batch (negatives)") + "$",
    ):
        InfoGraph(data.num_features)(one)


def test_infograph_draws_from_the_given_generator_and_reads_progress():
    data, batch = one_batch()
    torch.manual_seed(0)
    # MoCHi draws its mixes: from the given generator, whatever the global one
    model = InfoGraph(data.num_features, loss="mochi", objective="infonce")
    torch.manual_seed(1)
    a = model(batch, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(2)
    assert torch.equal(model(batch, generator=torch.Generator().manual_seed(3)), a)
    assert not torch.equal(model(batch, generator=torch.Generator().manual_seed(4)), a)
    annealed = InfoGraph(
        data.num_features, loss="hcl", objective="infonce", loss_hparams={"beta_anneal": "down"}
    )
    with pytest.raises(ValueError, match="progress"):
        annealed(batch)
    assert torch.isfinite(annealed(batch, progress=0.5))


@pytest.mark.parametrize(
    "loss, objective, hparams, unused",
    [
        ("hcl", None, {"temperature": 0.2}, "temperature"),
        ("hcl", None, {"tau_plus": 0.1, "beta": 2.0}, "tau_plus"),
        ("hcl", "jsd_hard", {"normalize": True}, "normalize"),
        ("infonce", None, {"temperature": 0.2}, "temperature"),
        ("ring", "jsd", {"filter": "fnc"}, "filter"),
        ("infonce", "infonce", {"objective": "jsd"}, "objective"),
    ],
)
def test_infograph_refuses_settings_its_objective_never_reads(loss, objective, hparams, unused):
    # JSD_hard keeps the authors' tau_plus = 0.5 and InfoGraph's JSD scores raw products at
    # temperature 1: a value given for them was recorded with the run but changed nothing
    data, _ = one_batch()
    with pytest.raises(ValueError, match=f"does not use '{unused}'"):
        InfoGraph(data.num_features, loss=loss, objective=objective, loss_hparams=hparams)


def test_infograph_applies_the_settings_its_objective_reads():
    data, _ = one_batch()
    jsd = InfoGraph(data.num_features, loss="infonce", loss_hparams={"tau_plus": 0.2})
    assert (jsd.objective, jsd.tau_plus, jsd.temperature, jsd.normalize) == ("jsd", 0.2, 1.0, False)
    nce = InfoGraph(
        data.num_features, loss="hcl", objective="infonce", loss_hparams={"temperature": 0.3}
    )
    assert (nce.temperature, nce.tau_plus, nce.normalize) == (0.3, 0.1, True)


@pytest.mark.parametrize("name", list_losses())
@pytest.mark.parametrize("objective", ["jsd", "infonce"])
def test_infograph_trains_with_every_strategy(name, objective):
    data, batch = one_batch()
    torch.manual_seed(0)
    model = InfoGraph(data.num_features, loss=name, objective=objective)
    loss = model(batch, progress=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    loss.backward()
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all() for p in model.encoder.parameters()
    )


@pytest.mark.parametrize("name", list_losses())
def test_graphcl_trains_with_every_strategy(name):
    data, batch = one_batch()
    torch.manual_seed(0)
    model = GraphCL(data.num_features, loss=name)
    loss = model(batch, progress=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.encoder.parameters())


def test_graphcl_views_are_reproducible_with_a_generator():
    data, batch = one_batch()
    torch.manual_seed(0)
    model = GraphCL(data.num_features, loss="infonce").eval()
    a = model(batch, generator=torch.Generator().manual_seed(5))
    b = model(batch, generator=torch.Generator().manual_seed(5))
    c = model(batch, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_training_checks_run_before_the_first_step():
    data = small_set(12, features=3)
    with pytest.raises(ValueError, match="expects 4 node features but 'cycles' has 3"):
        train_graphs(InfoGraph(4, loss="infonce"), data, epochs=1, batch_size=4)
    with pytest.raises(ValueError, match="last batch of one graph"):
        train_graphs(InfoGraph(3, loss="infonce"), small_set(9), epochs=1, batch_size=4)


def test_training_lowers_the_loss_and_embeds():
    data = small_set(16)
    torch.manual_seed(0)
    model = InfoGraph(data.num_features, loss="hcl", loss_hparams={"beta": 1.0})
    losses = []
    train_graphs(model, data, epochs=15, batch_size=8, log=lambda e, v: losses.append(v))
    assert losses[-1] < losses[0]
    emb, y = embed(model.encoder, data)
    assert emb.shape == (16, 96) and torch.equal(y, data.labels)


# --- data -----------------------------------------------------------------------------------------
def write_tu(root: Path, name: str, graphs: list[tuple[int, list[tuple[int, int]]]], labels=True):
    """Write graphs [(num_nodes, edges), ...] in the TU raw format under root/name/raw."""
    raw = root / name / "raw"
    raw.mkdir(parents=True)
    a, ind, offset = [], [], 0
    for gi, (n, edges) in enumerate(graphs):
        ind += [gi + 1] * n
        for u, v in edges:
            a += [(u + offset + 1, v + offset + 1), (v + offset + 1, u + offset + 1)]
        offset += n
    (raw / f"{name}_A.txt").write_text("".join(f"{u}, {v}\n" for u, v in a))
    (raw / f"{name}_graph_indicator.txt").write_text("".join(f"{i}\n" for i in ind))
    (raw / f"{name}_graph_labels.txt").write_text(
        "".join(f"{gi % 2}\n" for gi in range(len(graphs)))
    )
    if labels:
        (raw / f"{name}_node_labels.txt").write_text("".join(f"{i % 3}\n" for i in range(len(ind))))
    return raw


TRIANGLE = (3, [(0, 1), (1, 2), (2, 0)])
PATH = (4, [(0, 1), (1, 2), (2, 3)])


def test_load_tu_from_files_written_here(tmp_path):
    write_tu(tmp_path, "TOY", [TRIANGLE, PATH, TRIANGLE, PATH])
    data = load_tu(tmp_path, "TOY")
    assert len(data) == 4 and data.num_features == 3 and data.num_classes == 2
    assert data.labels.tolist() == [0, 1, 0, 1]


def test_load_tu_caches_in_the_users_cache_folder(tmp_path, monkeypatch):
    # not a shared /tmp folder: one made by another user is not writable
    monkeypatch.setenv("HARDNEG_CACHE_DIR", str(tmp_path / "cache"))
    write_tu(tmp_path, "TOY", [TRIANGLE, PATH])
    assert len(load_tu(tmp_path, "TOY")) == 2
    cache = tmp_path / "cache" / "tu"
    assert len(list(cache.glob("TOY-*/TOY/processed"))) == 1
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no staging left
    assert len(load_tu(tmp_path, "TOY")) == 2  # the second load reads the processed copy


def test_load_tu_when_another_process_processed_the_same_files_first(tmp_path, monkeypatch):
    # the staging folder cannot be renamed onto a finished copy: that copy is used
    import hardneg.graph.data as gd

    write_tu(tmp_path, "TOY", [TRIANGLE, PATH])
    cache = tmp_path / "cache"
    load_tu(tmp_path, "TOY", cache_dir=cache)
    (done,) = cache.glob("TOY-*")
    real_is_dir = Path.is_dir
    seen = []

    def first_look_misses(self):  # as if the other process finished just after our look
        if self == done / "TOY" / "processed" and not seen:
            seen.append(self)
            return False
        return real_is_dir(self)

    monkeypatch.setattr(gd.Path, "is_dir", first_look_misses)
    assert _tu_graphs(load_tu(tmp_path, "TOY", cache_dir=cache)) == [
        (3, {(0, 1), (1, 2), (0, 2)}, 0),
        (4, {(0, 1), (1, 2), (2, 3)}, 1),
    ]
    assert seen and sorted(p.name for p in cache.iterdir()) == [done.name]


def test_load_tu_expands_a_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_tu(tmp_path / "TU", "TOY", [TRIANGLE, PATH])
    assert len(load_tu("~/TU", "TOY", cache_dir=tmp_path / "cache")) == 2


def test_load_tu_unlabelled_nodes_get_degrees_or_a_clear_error(tmp_path):
    write_tu(tmp_path, "BARE", [TRIANGLE, PATH], labels=False)
    data = load_tu(tmp_path, "BARE")
    assert data.num_features == 3  # one-hot degree 0..2
    assert "OneHotDegree" in data.info["node_features"]
    with pytest.raises(ValueError, match="no node features and degree=None"):
        load_tu(tmp_path, "BARE", degree=None)


def test_load_tu_missing_or_misplaced_files(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"NOPE_A\.txt.*NOPE_graph_indicator\.txt.*NOPE_graph_labels\.txt.* in .*NOPE/raw",
    ):
        load_tu(tmp_path, "NOPE")
    raw = write_tu(tmp_path, "FLAT", [TRIANGLE, PATH])
    for f in raw.iterdir():  # wrong layout: the files next to raw/ instead of in it
        shutil.move(str(f), str(tmp_path / "FLAT" / f.name))
    raw.rmdir()
    with pytest.raises(FileNotFoundError, match="move the .txt files into raw/"):
        load_tu(tmp_path, "FLAT")


def test_load_tu_read_only_folder_uses_a_cache(tmp_path):
    write_tu(tmp_path / "ro", "TOY", [TRIANGLE, PATH])
    folder = tmp_path / "ro" / "TOY"
    os.chmod(folder, 0o555)
    try:
        data = load_tu(tmp_path / "ro", "TOY", cache_dir=tmp_path / "cache")
    finally:
        os.chmod(folder, 0o755)
    assert len(data) == 2 and len(list((tmp_path / "cache").glob("TOY-*/TOY/processed"))) == 1
    assert not (folder / "processed").exists()


def _tu_graphs(data) -> list[tuple[int, set[tuple[int, int]], int]]:
    """(nodes, undirected edges, label) of each loaded graph."""
    return [
        (g.num_nodes, {tuple(sorted(e)) for e in g.edge_index.T.tolist()}, int(g.y))
        for g in data.graphs
    ]


def test_load_tu_reads_edited_files_and_never_writes_the_data_folder(tmp_path):
    # PyG's processed/ is never checked against raw/ again: an edited label file, or a second
    # data set of the same name, must not be served the graphs processed before
    raw = write_tu(tmp_path / "a", "TOY", [TRIANGLE, PATH, TRIANGLE, PATH])
    cache = tmp_path / "cache"
    assert load_tu(tmp_path / "a", "TOY", cache_dir=cache).labels.tolist() == [0, 1, 0, 1]
    (raw / "TOY_graph_labels.txt").write_text("1\n1\n0\n0\n")
    assert load_tu(tmp_path / "a", "TOY", cache_dir=cache).labels.tolist() == [1, 1, 0, 0]
    write_tu(tmp_path / "b", "TOY", [PATH, PATH, TRIANGLE])
    other = load_tu(tmp_path / "b", "TOY", cache_dir=cache)
    assert [n for n, _, _ in _tu_graphs(other)] == [4, 4, 3]
    assert sorted(p.name for p in (tmp_path / "a" / "TOY").iterdir()) == ["raw"]


def test_load_tu_keeps_a_last_line_without_newline_and_any_label_values(tmp_path):
    # PyG's reader drops the last line of a file without a final newline (an edge, a node, a
    # label); graph labels -1 / 1 (MUTAG's) are numbered 0 / 1 in sorted order
    raw = write_tu(tmp_path, "TOY", [TRIANGLE, PATH, PATH])
    for f in raw.iterdir():
        f.write_text(f.read_text().rstrip("\n"))
    (raw / "TOY_graph_labels.txt").write_text("1\n-1\n1")
    expected = [
        (3, {(0, 1), (1, 2), (0, 2)}, 1),
        (4, {(0, 1), (1, 2), (2, 3)}, 0),
        (4, {(0, 1), (1, 2), (2, 3)}, 1),
    ]
    data = load_tu(tmp_path, "TOY", cache_dir=tmp_path / "cache")
    assert _tu_graphs(data) == expected and data.num_classes == 2


def _edit_line(path: Path, line: int, text: str | None) -> None:
    """Replace (or, text None, delete) 1-based line ``line`` of a file."""
    lines = path.read_text().splitlines()
    if text is None:
        del lines[line - 1]
    else:
        lines[line - 1] = text
    path.write_text("".join(f"{x}\n" for x in lines))


@pytest.mark.parametrize(
    "part, line, text, message",
    [
        ("A", 3, "2; x", r"TOY_A\.txt: line 3: expected whole numbers separated by commas, got '2; x'"),
        ("A", 2, "2, 99", r"TOY_A\.txt: line 2: node 99 does not exist .*nodes 1\.\.7\)"),
        ("A", 2, "2, 4", r"TOY_A\.txt: line 2: edge 2, 4 joins graph 1 to graph 2"),
        ("A", 2, "1, 2, 3", r"TOY_A\.txt: line 2 holds 3 value\(s\), the lines before it 2"),
        ("graph_labels", 2, "abc", r"TOY_graph_labels\.txt: line 2: expected a whole number, got 'abc'"),
        ("graph_labels", 2, None, r"TOY_graph_labels\.txt has 1 labels but .* numbers 2 graphs"),
        ("graph_indicator", 1, "2", r"TOY_graph_indicator\.txt: line 2: graph 1 after graph 2"),
        ("graph_indicator", 1, "0", r"TOY_graph_indicator\.txt: line 1: graph numbers start at 1"),
        ("node_labels", 7, None, r"TOY_node_labels\.txt has 6 lines but TOY_graph_indicator\.txt has 7 nodes"),
        ("node_labels", 2, "1, 0", r"TOY_node_labels\.txt: line 2 holds 2 value\(s\), the lines before it 1"),
        ("edge_labels", 1, None, r"TOY_edge_labels\.txt has 11 lines but TOY_A\.txt has 12 edges"),
    ],
)  # fmt: skip
def test_load_tu_bad_files_name_the_file_the_line_and_the_problem(
    tmp_path, part, line, text, message
):
    raw = write_tu(tmp_path, "TOY", [TRIANGLE, PATH])  # nodes 1-3: graph 1, 4-7: graph 2
    (raw / "TOY_edge_labels.txt").write_text("0\n" * 12)
    _edit_line(raw / f"TOY_{part}.txt", line, text)
    with pytest.raises(ValueError, match=message):
        load_tu(tmp_path, "TOY", cache_dir=tmp_path / "cache")


def test_load_tu_empty_edge_file_is_an_error_naming_it(tmp_path):
    raw = write_tu(tmp_path, "TOY", [TRIANGLE, PATH])
    (raw / "TOY_A.txt").write_text("")
    with pytest.raises(ValueError, match=r"TOY_A\.txt: the file is empty"):
        load_tu(tmp_path, "TOY", cache_dir=tmp_path / "cache")


def test_empty_graphs_and_mixed_features_are_rejected():
    empty = Data(edge_index=torch.zeros(2, 0, dtype=torch.long), num_nodes=0, y=torch.tensor([0]))
    with pytest.raises(ValueError, match="empty graph"):
        finish_graphs([cycle(3), empty], "bad")
    with pytest.raises(ValueError, match="some graphs have node features"):
        finish_graphs([cycle(3, features=2), cycle(3)], "bad")


@pytest.mark.skipif(
    not (SHARED_TU / "MUTAG" / "raw").is_dir(), reason="shared TU data (MUTAG) not on this machine"
)
def test_mutag_from_the_shared_folder(tmp_path):
    data = load_tu(SHARED_TU, "MUTAG", cache_dir=tmp_path)
    assert len(data) == 188 and data.num_features == 7 and data.num_classes == 2
    # MUTAG's labels are -1 / 1: -1 becomes class 0, in the file's graph order
    raw = (SHARED_TU / "MUTAG" / "raw" / "MUTAG_graph_labels.txt").read_text().split()
    assert data.labels.tolist() == [0 if x == "-1" else 1 for x in raw]
    assert data.labels.bincount().tolist() == [63, 125]
    # the checked, cached copy gives PyG's own graphs of a plain copy, in the same order
    from torch_geometric.datasets import TUDataset

    shutil.copytree(SHARED_TU / "MUTAG" / "raw", tmp_path / "plain" / "MUTAG" / "raw")
    plain = TUDataset(str(tmp_path / "plain"), "MUTAG")
    assert len(plain) == len(data)
    for ours, theirs in zip(data.graphs, plain):
        assert torch.equal(ours.edge_index, theirs.edge_index) and torch.equal(ours.y, theirs.y)
        assert torch.equal(ours.x, theirs.x.float())


def test_loading_tu_files_prints_nothing_unless_the_data_logger_is_at_debug(
    tmp_path, monkeypatch, capfd, caplog
):
    """PyG printed "Processing..." and "Done!" on stderr at a first load (it keeps quiet under
    pytest, which it recognises by PYTEST_CURRENT_TEST: removed here)."""
    import logging

    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)
    toy_tu(tmp_path / "tu")
    data = load_tu(tmp_path / "tu", "TOY", cache_dir=tmp_path / "cache")
    assert len(data) == 24 and capfd.readouterr() == ("", "")
    # verbose: with hardneg.graph.data's logger at DEBUG, a first load (another cache) says it
    caplog.set_level(logging.DEBUG, logger="hardneg.graph.data")
    again = load_tu(tmp_path / "tu", "TOY", cache_dir=tmp_path / "other-cache")
    assert capfd.readouterr().err.split() == ["Processing...", "Done!"]
    assert again.labels.tolist() == data.labels.tolist()


def test_hardneg_cache_lists_and_clears_the_processed_tu_sets(tmp_path, monkeypatch, capsys):
    """The processing cache was never pruned: ``hardneg cache`` shows each processed set and
    ``--clear`` removes it; the next load processes the files again."""
    from hardneg.cli import main

    monkeypatch.setenv("HARDNEG_CACHE_DIR", str(tmp_path / "cache"))
    toy_tu(tmp_path / "tu")
    data = load_tu(tmp_path / "tu", "TOY")
    entry = tmp_path / "cache" / "tu" / f"TOY-{data.info['files_sha256'][:16]}"
    assert (entry / "TOY" / "processed").is_dir()
    assert main(["cache"]) == 0
    listed = [line.split()[-1] for line in capsys.readouterr().out.splitlines()[1:2]]
    assert listed == [f"tu/{entry.name}"]
    assert main(["cache", "--clear"]) == 0
    assert capsys.readouterr().out.startswith("removed 1 entry (")
    assert not entry.exists() and list((tmp_path / "tu").rglob("*"))  # the data: untouched
    assert load_tu(tmp_path / "tu", "TOY").labels.tolist() == data.labels.tolist()
    assert (entry / "TOY" / "processed").is_dir()


def test_motif_degree_sequences_are_identical():
    seqs = set()
    for edges in MOTIFS.values():
        deg = np.bincount(np.array(edges).ravel(), minlength=6)
        seqs.add(tuple(sorted(deg)))
        assert len(edges) == 7
    assert seqs == {(2, 2, 2, 2, 3, 3)}

    # and the wirings differ (different numbers of triangles or squares)
    def triangles(edges):
        adj = {(u, v) for u, v in edges} | {(v, u) for u, v in edges}
        return sum(
            (a, b) in adj and (b, c) in adj and (a, c) in adj
            for a in range(6)
            for b in range(a + 1, 6)
            for c in range(b + 1, 6)
        )

    assert sorted(triangles(e) for e in MOTIFS.values()) == [0, 0, 1, 2]


def test_motif_graphs_are_seeded_and_degree_histograms_do_not_solve_them():
    a, b = motif_graphs(40, seed=1), motif_graphs(40, seed=1)
    assert all(torch.equal(g.edge_index, h.edge_index) for g, h in zip(a.graphs, b.graphs))
    assert not torch.equal(a.graphs[0].edge_index, motif_graphs(40, seed=2).graphs[0].edge_index)
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    data = motif_graphs(200, seed=0)
    x = degree_histograms(data.graphs)
    acc = cross_val_score(LogisticRegression(max_iter=2000), x, data.labels.numpy(), cv=5).mean()
    assert acc < 0.35  # 4 classes: chance is 0.25


# --- evaluation -----------------------------------------------------------------------------------
def test_svm_knn_linear_on_separable_and_random_labels():
    gen = np.random.default_rng(0)
    y = np.repeat([0, 1], 30)
    x = gen.normal(size=(60, 5)) + 6.0 * np.eye(5)[y]  # apart in direction too (cosine kNN)
    assert svm_accuracy(x, y, c_grid=(1.0, 10.0))["svm"] == 100.0
    assert knn_accuracy(x, y, folds=3) == 100.0 and linear_accuracy(x, y, folds=3) == 100.0
    noise = gen.normal(size=(60, 5))
    assert svm_accuracy(noise, y, c_grid=(1.0, 10.0))["svm"] < 80.0
    with pytest.raises(ValueError, match="NaN"):
        svm_accuracy(np.full((4, 2), np.nan), [0, 1, 0, 1])


def test_graph_demo_runs_end_to_end(tmp_path, monkeypatch):
    import hardneg.graph.demo as gd

    evaluated = []

    def fake_eval(emb, labels, seed):  # the protocol's scorers are tested above; keep this fast
        evaluated.append(emb.shape)
        return {"svm": 50.0, "svm_std": 1.0, "knn": 40.0, "linear": 45.0}

    monkeypatch.setattr(gd, "evaluate_quick", fake_eval)
    rows = gd.run_graph_demo(
        tmp_path,
        strategies=["infonce", "hcl"],
        num_graphs=40,
        epochs=1,
        batch_size=20,
        log=lambda s: None,
    )
    assert all("error" not in r for r in rows)
    assert len(rows) == 2 + 2 + 3 and len(evaluated) == 1 + 2 + 3
    assert all(shape == (40, 96) for shape in evaluated)
    report = (tmp_path / "report.md").read_text()
    assert "| graphcl | hcl | 50.0 ± 1.0 | 40.0 | 45.0 |" in report
    assert (tmp_path / "accuracy.png").is_file()


def test_demo_cli_hook_dispatches_to_the_graph_demo(monkeypatch, tmp_path):
    import hardneg.graph.demo as gd
    from hardneg.cli import main

    seen = {}
    monkeypatch.setattr(gd, "run_graph_demo", lambda out, **kw: seen.update(kw, out=out) or [])
    assert main(["demo", "--modality", "graph", "--out", str(tmp_path), "epochs=2"]) == 0
    assert seen["strategies"] is None and seen["epochs"] == 2


def test_graph_config_reads_numbers_written_with_an_exponent():
    # YAML 1.1 reads 1e-3 as a string: lr=1e-3 must stay a learning rate of 0.001
    from hardneg.graph.protocol import check_graph_config

    cfg = check_graph_config({"dataset": "X", "epochs": 1, "lr": "1e-3", "betas": ["1e1", 0]})
    assert cfg["lr"] == 0.001 and cfg["betas"] == [10.0, 0.0]
    with pytest.raises(ValueError, match="lr must be a number, got 'fast'"):
        check_graph_config({"dataset": "X", "epochs": 1, "lr": "fast", "betas": [0]})


def test_graph_command_lines_name_the_option_of_a_bad_number(monkeypatch, tmp_path, capsys):
    # both said only "invalid literal for int() / could not convert string to float"
    import hardneg.graph.demo as gd
    from hardneg.cli import main
    from hardneg.graph import protocol

    monkeypatch.setattr(gd, "run_graph_demo", lambda out, **kw: [])
    assert main(["demo", "--modality", "graph", "--out", str(tmp_path), "epochs=two"]) == 2
    assert "graph demo override epochs must be a whole number, got 'two'" in capsys.readouterr().err
    toy_tu(tmp_path / "tu")
    config = str(graph_config(tmp_path / "toy.yaml"))
    argv = ["--config", config, "--data-dir", str(tmp_path / "tu"), "--betas", "0,a"]
    assert protocol.main(argv) == 2
    assert "betas must be a number, got 'a'" in capsys.readouterr().err


def test_packaged_graph_configs():
    from hardneg.graph.protocol import list_graph_configs, load_graph_config

    assert list_graph_configs() == ["mutag", "nci1", "proteins", "ptc_mr"]
    for name in list_graph_configs():
        cfg = load_graph_config(name)
        assert cfg["betas"] == [0.0, 1.0, 2.0, 10.0] and cfg["epochs"] == 200
        assert cfg["dataset"].lower() == name
        # the published InfoGraph figure also sits beside InfoGraph's own JSD objective (the
        # infonce row), not only beside HCL's beta = 0 (NCI1, PROTEINS, PTC_MR left it blank)
        published = cfg["published"]
        assert published["rows"]["infonce"].startswith(published["beta_0"].split(" (")[0])


# --- hardneg compare on graph configs -------------------------------------------------------------
def toy_tu(root: Path, name: str = "TOY", num: int = 24, labels: bool = True) -> Path:
    """A TU-format set of small graphs: triangles / squares + a tail, two classes (the label is
    ``i % 2``; every fifth graph has the other class's ring, so the accuracy is not 100 %)."""
    graphs = []
    for i in range(num):
        ring = 3 if (i % 2 == 0) != (i % 5 == 0) else 4
        tail = 1 + i % 3
        edges = [(k, (k + 1) % ring) for k in range(ring)]
        edges += [(ring - 1 + k, ring + k) for k in range(tail)]
        graphs.append((ring + tail, edges))
    write_tu(root, name, graphs, labels=labels)
    return root


def graph_config(path: Path, **extra) -> Path:
    cfg = {
        "dataset": "TOY",
        "framework": "infograph",
        "loss": "hcl",
        "objective": "jsd_hard",
        "direction": "authors",
        "betas": [0.0, 2.0],
        "repeats": 2,
        "epochs": 1,
        "batch_size": 8,
        "lr": 0.001,
        "hidden": 8,
        "num_layers": 2,
        "svm_folds": 3,
        "published": {"source": "nowhere", "beta_0": "99.9", "rows": {"infonce": "11.1"}},
        **extra,
    }
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


def table_rows(report: str) -> dict[str, list[str]]:
    """``{'strategy beta': [cells]}`` of the comparison table in a report."""
    rows = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[2] in ("jsd_hard", "jsd", "infonce"):
            rows[f"{cells[0]} {cells[1]}".strip()] = cells
    return rows


def test_compare_runs_a_graph_config_and_its_table_matches_the_runs(tmp_path, capsys):
    import json
    import statistics

    from hardneg.cli import main
    from hardneg.graph.protocol import load_graph_config, run_protocol

    toy_tu(tmp_path / "tu")
    config = graph_config(tmp_path / "toy.yaml")
    out = tmp_path / "out"
    argv = ["compare", "--config", str(config), "--data-dir", str(tmp_path / "tu"),
            "--strategies", "hcl,infonce", "--out", str(out), "betas=1"]  # fmt: skip
    assert main(argv) == 0
    report = (out / "report.md").read_text()
    rows = table_rows(report)
    assert sorted(rows) == ["hcl 1", "infonce"]  # hcl swept over betas=[1]; infonce has none
    assert rows["hcl 1"][2] == "jsd_hard" and rows["infonce"][2] == "jsd"
    assert rows["infonce"][5] == "11.1" and rows["hcl 1"][5] == ""
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 2 * 2
    for label, key in (("hcl beta=1", "hcl 1"), ("infonce", "infonce")):
        accs = [r["svm"] for r in results["runs"] if r["setting"] == label]
        per_run = [
            json.loads(Path(r["file"]).read_text())["svm"]
            for r in results["runs"]
            if r["setting"] == label
        ]
        assert accs == per_run and len(accs) == 2
        assert accs[0] != accs[1]  # else the std below checks nothing
        mean, std = rows[key][3].split(" ± ")
        assert float(mean) == round(statistics.mean(accs), 2)
        assert float(std) == round(statistics.stdev(accs), 2)
        assert rows[key][4] == "2"
    # the hcl runs are the protocol's runs (same seeds, same data order)
    cfg = load_graph_config(str(config))
    cfg["betas"] = [1.0]
    protocol = run_protocol(cfg, load_tu(tmp_path / "tu", "TOY"), log=lambda s: None)
    hcl = [r["svm"] for r in results["runs"] if r["setting"] == "hcl beta=1"]
    assert protocol[1.0] == pytest.approx(hcl, abs=1e-9)
    # a second call reuses every finished run and writes the same table
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out.count("(reused)") == 4
    assert table_rows((out / "report.md").read_text()) == rows
    # another plan in the same folder is refused
    assert main([*argv[:-1], "betas=2"]) == 2
    assert "does not include" in capsys.readouterr().err


def test_the_published_beta_0_figure_sits_beside_the_configs_own_strategy_only():
    # a comparison with --strategies all put InfoGraph's published MUTAG figure beside
    # UnReMix at beta = 0 too
    from hardneg.graph.compare import format_graph_table

    cfg = {"dataset": "TOY", "loss": "hcl", "published": {"beta_0": "99.9", "rows": {"ring": "7"}}}
    rows = [
        {"label": f"{s} beta=0", "strategy": s, "beta": 0.0, "objective": o, "accuracies": [50.0],
         "mean": 50.0, "std": 0.0}
        for s, o in (("hcl", "jsd_hard"), ("unremix", "jsd"))
    ]  # fmt: skip
    rows.append({"label": "ring", "strategy": "ring", "beta": None, "objective": "jsd",
                 "accuracies": [], "mean": None, "std": None})  # fmt: skip
    table = table_rows(format_graph_table(cfg, rows))
    assert (table["hcl 0"][5], table["unremix 0"][5], table["ring"][5]) == ("99.9", "", "7")


def test_compare_reuses_a_run_only_on_the_same_data_files(tmp_path, capsys):
    import json

    from hardneg.cli import main

    raw = toy_tu(tmp_path / "tu") / "TOY" / "raw"
    config = graph_config(tmp_path / "toy.yaml", betas=[0.0], repeats=1)
    out = tmp_path / "out"
    argv = ["compare", "--config", str(config), "--data-dir", str(tmp_path / "tu"),
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert main(argv) == 0 and "(reused)" in capsys.readouterr().out
    # edited labels: the saved run was trained and scored on other graphs
    labels = (raw / "TOY_graph_labels.txt").read_text().split()
    (raw / "TOY_graph_labels.txt").write_text("".join(f"{1 - int(y)}\n" for y in labels))
    assert main(argv) == 2
    assert "holds a run with other settings (trained on other data files)" in (
        capsys.readouterr().err
    )
    # a run saved before the digest was recorded is still reused, as before
    saved = out / "hcl-beta0" / "repeat0.json"
    old = json.loads(saved.read_text())
    del old["settings"]["data_sha256"]
    saved.write_text(json.dumps(old))
    assert main(argv) == 0 and "(reused)" in capsys.readouterr().out


def test_compare_graph_settings_enumerate_the_registry():
    from hardneg.graph.compare import plan_settings
    from hardneg.registry import loss_hparams, strategy_class

    cfg = {"betas": [0.0, 1.0, 2.0, 10.0], "objective": "jsd_hard"}
    settings = plan_settings(cfg, list_losses())
    for name in list_losses():
        mine = [s for s in settings if s.strategy == name]
        if "beta" in loss_hparams(name):
            assert [s.beta for s in mine] == cfg["betas"]
        else:
            assert [s.beta for s in mine] == [None]
        expected = "jsd_hard" if hasattr(strategy_class(name), "current_beta") else "jsd"
        assert {s.objective for s in mine} == {expected}
    assert [s.label for s in settings if s.strategy == "hcl"] == [
        "hcl beta=0", "hcl beta=1", "hcl beta=2", "hcl beta=10"
    ]  # fmt: skip
    pinned = plan_settings(cfg, ["hcl"], per_strategy={"hcl": {"beta": 5.0}})
    assert [s.label for s in pinned] == ["hcl beta=5"]
    with pytest.raises((ValueError, KeyError), match="nope"):
        plan_settings(cfg, ["nope"])


def test_compare_finds_graph_configs_without_the_graph_import(tmp_path):
    from hardneg.commands.compare import find_graph_config, graph_config_names

    assert graph_config_names() == ["mutag", "nci1", "proteins", "ptc_mr"]
    assert find_graph_config("mutag", "mnist1d") == "mutag"
    assert find_graph_config(None, "MUTAG") == "mutag"
    assert find_graph_config(None, "PTC-MR") == "ptc_mr"
    assert find_graph_config(None, "mnist1d") is None
    assert find_graph_config("mnist1d_simclr_hcl", "mnist1d") is None
    assert find_graph_config(str(graph_config(tmp_path / "g.yaml")), "x") == str(
        tmp_path / "g.yaml"
    )
    image = tmp_path / "image.yaml"
    image.write_text("train:\n  epochs: 2\n")
    assert find_graph_config(str(image), "mnist1d") is None


@pytest.fixture
def no_training(monkeypatch):
    import hardneg.graph.compare as gc

    def refuse(*args, **kwargs):
        raise AssertionError("training started before the inputs were checked")

    import hardneg.graph.run as gr

    monkeypatch.setattr(gc, "train_and_score", refuse)
    monkeypatch.setattr(gr, "fit_and_score", refuse)


def compare_error(argv, capsys) -> str:
    from hardneg.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    return capsys.readouterr().err


def test_compare_graph_bad_input_fails_before_training(tmp_path, capsys, no_training):
    config = str(graph_config(tmp_path / "toy.yaml"))
    out = ["--out", str(tmp_path / "out")]
    base = ["compare", "--config", config, *out]
    # no data folder
    assert "--data-dir" in compare_error(base, capsys)
    # a data set folder in the wrong layout: the files next to raw/ instead of in it
    raw = toy_tu(tmp_path / "flat") / "TOY" / "raw"
    for f in raw.iterdir():
        shutil.move(str(f), str(raw.parent / f.name))
    raw.rmdir()
    err = compare_error([*base, "--data-dir", str(tmp_path / "flat")], capsys)
    assert "TOY_A.txt" in err and "move the .txt files into raw/" in err
    # the data set's own folder instead of the folder above it
    toy_tu(tmp_path / "tu")
    err = compare_error([*base, "--data-dir", str(tmp_path / "tu" / "TOY")], capsys)
    assert f"give the folder above it, {tmp_path / 'tu'}" in err
    # graphs without node features and no degree option
    toy_tu(tmp_path / "bare", labels=False)
    err = compare_error([*base, "--data-dir", str(tmp_path / "bare"), "degree=none"], capsys)
    assert "no node features and degree=None" in err
    # an empty graph: graph 24 keeps its label but no node names it (its nodes become graph 25)
    empty = toy_tu(tmp_path / "empty") / "TOY" / "raw"
    indicator = (empty / "TOY_graph_indicator.txt").read_text().split()
    (empty / "TOY_graph_indicator.txt").write_text(
        "".join(f"{25 if i == '24' else i}\n" for i in indicator)
    )
    with open(empty / "TOY_graph_labels.txt", "a") as f:
        f.write("0\n")
    err = compare_error([*base, "--data-dir", str(tmp_path / "empty")], capsys)
    assert "1 empty graph(s)" in err and "index [23]" in err
    # a label file that does not match the graphs
    extra = toy_tu(tmp_path / "extra") / "TOY" / "raw"
    with open(extra / "TOY_graph_labels.txt", "a") as f:
        f.write("0\n")
    err = compare_error([*base, "--data-dir", str(tmp_path / "extra")], capsys)
    assert "has 25 labels but TOY_graph_indicator.txt numbers 24 graphs" in err
    # a batch size that leaves a one-graph batch (24 graphs in batches of 23)
    good = ["--data-dir", str(tmp_path / "tu")]
    assert "last batch of one graph" in compare_error([*base, *good, "batch_size=23"], capsys)
    # unknown strategy, override, framework
    assert "nope" in compare_error([*base, *good, "--strategies", "hcl,nope"], capsys)
    assert "graph override 'temperatur=1'" in compare_error([*base, *good, "temperatur=1"], capsys)
    assert "infograph" in compare_error([*base, *good, "--framework", "moco"], capsys)
    # image-only options: refused, not ignored
    for flag in (["--no-linear"], ["--tsne-points", "0"], ["--progress"]):
        err = compare_error([*base, *good, *flag], capsys)
        assert f"{flag[0]}: image comparisons only" in err
    # values checked before the first run: svm_folds=1 failed in scoring, after training
    assert "svm_folds must be in [2, inf)" in compare_error([*base, *good, "svm_folds=1"], capsys)
    assert "betas must be in [0, inf)" in compare_error([*base, *good, "betas=-1"], capsys)
    labels = toy_tu(tmp_path / "single") / "TOY" / "raw" / "TOY_graph_labels.txt"
    labels.write_text(labels.read_text().replace("1\n", "7\n", 1))
    err = compare_error([*base, "--data-dir", str(tmp_path / "single")], capsys)
    assert "class(es) [2] have a single graph" in err
    assert "epochs must be an integer" in compare_error(
        [*base, *good, "--epochs", "0"] + ["epochs=0.5"], capsys
    )
    err = compare_error(
        [*base, *good, "--strategies", "infonce,hcl", "loss.temperature=0.2"], capsys
    )
    assert "objective 'jsd' does not use 'temperature'" in err
    assert not (tmp_path / "out").exists()


def test_load_tu_names_the_folder_above_a_data_sets_own_folder(tmp_path):
    toy_tu(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"give the folder above it, {tmp_path}"):
        load_tu(tmp_path / "TOY", "TOY")
    with pytest.raises(FileNotFoundError, match=f"give the folder above it, {tmp_path}"):
        load_tu(tmp_path / "TOY" / "raw", "TOY")


# --- hardneg train on graph configs ---------------------------------------------------------------
def test_train_on_a_graph_config_saves_the_trained_weights_and_the_protocol_score(tmp_path, capsys):
    import json

    from hardneg.cli import main
    from hardneg.graph.protocol import build_model, fit_and_score, load_graph_config, run_seed
    from hardneg.train.checkpoint import load_checkpoint

    toy_tu(tmp_path / "tu")
    config = graph_config(tmp_path / "toy.yaml", epochs=2)
    run = tmp_path / "run"
    argv = ["train", "--config", str(config), "--data-dir", str(tmp_path / "tu"),
            "--run-dir", str(run), "loss.beta=2", "seed=1"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((run / "results.json").read_text())
    assert (results["strategy"], results["beta"], results["objective"]) == ("hcl", 2.0, "jsd_hard")
    # another repeat into the same folder is refused, not written over this one
    assert main([*argv[:-1], "seed=0"]) == 2
    assert f"{run} already holds a graph run (model.pt)" in capsys.readouterr().err
    assert json.loads((run / "results.json").read_text()) == results
    assert results["seed"] == 1000 * 1 + 20 and results["repeat"] == 1
    assert results["data_dir"] == str(tmp_path / "tu") and len(results["data_sha256"]) == 64
    assert results["node_features"] == "the data set's node labels (3 columns)"
    # the score is repeat 1 of the protocol at beta = 2: the protocol's run function, called here
    # with that repeat's seed, trains the same weights and gets the same score
    cfg = load_graph_config(str(config))
    data = load_tu(tmp_path / "tu", "TOY")
    hp = {"loss": "hcl", "loss_hparams": {"beta": 2.0}, "objective": "jsd_hard"}
    trained, scores = fit_and_score(cfg, data, **hp, seed=run_seed(1, 2.0))
    assert scores["svm"] == pytest.approx(results["svm"])
    torch.manual_seed(results["seed"])
    initial = build_model(cfg, data, **hp)
    saved = load_checkpoint(run / "model.pt")
    assert saved["model"].keys() == trained.state_dict().keys()
    for key, value in trained.state_dict().items():
        assert_same(saved["model"][key], value, key)
    assert any(not torch.equal(saved["model"][k], v) for k, v in initial.state_dict().items())
    assert (
        saved["setting"]["hparams"] == {"beta": 2.0} and saved["in_features"] == data.num_features
    )


def test_train_on_unlabelled_nodes_records_the_degree_features_it_used(tmp_path):
    import json

    from hardneg.cli import main

    toy_tu(tmp_path / "bare", labels=False)
    config = str(graph_config(tmp_path / "toy.yaml", epochs=0))
    run = tmp_path / "run"
    argv = [
        "train",
        "--config",
        config,
        "--data-dir",
        str(tmp_path / "bare"),
        "--run-dir",
        str(run),
    ]
    assert main(argv) == 0
    assert "OneHotDegree" in json.loads((run / "results.json").read_text())["node_features"]


def test_train_on_a_graph_config_that_diverges_is_one_line_and_status_3(tmp_path, capsys):
    from hardneg.cli import main

    toy_tu(tmp_path / "tu")
    config = str(graph_config(tmp_path / "toy.yaml", epochs=3))
    run = tmp_path / "run"
    argv = ["train", "--config", config, "--data-dir", str(tmp_path / "tu"), "lr=1.0e12",
            "--run-dir", str(run)]  # fmt: skip
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert "training hcl beta=1 on TOY stopped: non-finite loss" in err
    assert "Traceback" not in err and not (run / "model.pt").exists()


def test_quiet_train_on_a_graph_config_prints_the_score_line_only(tmp_path, capsys):
    from hardneg.cli import main

    toy_tu(tmp_path / "tu")
    config = graph_config(tmp_path / "toy.yaml", epochs=1)
    argv = ["train", "--config", str(config), "--data-dir", str(tmp_path / "tu"), "seed=1"]
    assert main([*argv, "--run-dir", str(tmp_path / "loud")]) == 0
    loud = capsys.readouterr().out.splitlines()
    assert [line.split(" ")[0] for line in loud] == ["training", "SVM"]
    assert main([*argv, "--run-dir", str(tmp_path / "quiet"), "--quiet"]) == 0
    quiet = capsys.readouterr().out.splitlines()
    assert quiet == [loud[1].replace(str(tmp_path / "loud"), str(tmp_path / "quiet"))]


def test_train_on_a_graph_config_checks_its_input_before_training(
    tmp_path, capsys, monkeypatch, no_training
):
    from hardneg.cli import main

    monkeypatch.chdir(tmp_path)  # the default run folder is runs/ here

    toy_tu(tmp_path / "tu")
    # one graph of class 7: the SVM's stratified folds fail, after the training before
    labels = toy_tu(tmp_path / "single") / "TOY" / "raw" / "TOY_graph_labels.txt"
    labels.write_text(labels.read_text().replace("1\n", "7\n", 1))
    config = str(graph_config(tmp_path / "toy.yaml"))
    data = ["--data-dir", str(tmp_path / "tu")]
    cases = [
        ([], "needs the TU data folder"),
        ([*data, "loss.name=nosuch"], "nosuch"),
        ([*data, "seed=-1"], "seed must be a whole number >= 0"),
        ([*data, "epochs=-1"], "epochs must be in [0, inf), got -1"),
        ([*data, "bogus=1"], "graph override 'bogus=1'"),
        (["--data-dir", str(tmp_path)], "TOY"),
        # each value is checked before training: svm_folds=1 failed only in scoring, after
        # the training; epochs=1.5 trained 1 epoch; betas=0,2 trained beta = 1
        ([*data, "epochs=1.5"], "epochs must be an integer, got 1.5"),
        ([*data, "svm_folds=1"], "svm_folds must be in [2, inf), got 1"),
        ([*data, "lr=abc"], "lr must be a number, got 'abc'"),
        ([*data, "batch_size=1"], "batch_size must be in [2, inf), got 1"),
        ([*data, "hidden=0"], "hidden must be in [1, inf), got 0"),
        ([*data, "betas=0,2"], "one run trains one beta: loss.beta=X"),
        ([*data, "loss.temperature=0.5"], "objective 'jsd_hard' does not use 'temperature'"),
        ([*data, "hcl.tau_plus=0.1"], "objective 'jsd_hard' does not use 'tau_plus'"),
        ([*data, "--resume"], "keeps no checkpoint to resume"),
        (["--data-dir", str(tmp_path / "single")], "class(es) [2] have a single graph"),
    ]
    for extra, message in cases:
        assert main(["train", "--config", config, *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "runs").exists()


# --- benchmarks/graph_selection.py: the evaluation epoch chosen on test accuracy -------------------
def _graph_selection():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "graph_selection.py"
    spec = importlib.util.spec_from_file_location("graph_selection", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_graph_selection_scores_every_epoch_without_changing_the_protocols_run(tmp_path):
    """Scoring the frozen embeddings during training leaves the run as the protocol trains it:
    the last epoch's score is the protocol's own run (``fit_and_score``, trained without any
    scoring in between) for that repeat; 'scale' is the protocol's SVM."""
    from hardneg.graph.protocol import fit_and_score, load_graph_config, run_seed

    bench = _graph_selection()
    toy_tu(tmp_path / "tu")
    cfg = load_graph_config(str(graph_config(tmp_path / "toy.yaml", epochs=3)))
    data = load_tu(tmp_path / "tu", "TOY")
    got = bench.scores_over_training(cfg, data, repeat=1, every=2, gammas=("scale", "auto"))
    assert sorted(got["scale"]) == [0, 2, 3]  # epoch 0, every 2nd, and the last
    _, want = fit_and_score(
        cfg, data, loss="infonce", loss_hparams={}, objective="jsd", seed=run_seed(1, None)
    )
    assert got["scale"][3] == pytest.approx(want["svm"])


def test_graph_selection_summary_picks_the_best_mean_epoch():
    """Against the numbers by hand: epoch means (80, 85, 83) -> the best is epoch 10 (85,
    population std 1), the final epoch 83 ± 1.414 (sample std), each run's best averaged 85.5."""
    bench = _graph_selection()
    runs = [{0: 80.0, 10: 84.0, 20: 82.0}, {0: 80.0, 10: 86.0, 20: 84.0}]
    s = bench.summarise(runs)
    assert (s["best_epoch"], s["best"], s["best_std"]) == (10.0, 85.0, 1.0)
    assert s["final"] == 83.0 and s["final_std"] == pytest.approx(math.sqrt(2.0))
    assert s["per_run_best"] == 85.0


def test_graph_selection_main_prints_the_table(tmp_path, capsys):
    bench = _graph_selection()
    toy_tu(tmp_path / "tu")
    config = graph_config(tmp_path / "toy.yaml", epochs=2)
    argv = ["--data-dir", str(tmp_path / "tu"), "--config", str(config), "--repeats", "2",
            "--every", "1", "--gamma", "scale,auto"]  # fmt: skip
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "| epoch | 0 | 1 | 2 |" in out
    assert out.count("final epoch") == 2 and "gamma = 'auto'" in out
    with pytest.raises(SystemExit):
        bench.main(["--data-dir", str(tmp_path / "tu"), "--every", "0"])


def test_fewer_folds_than_asked_are_announced():
    """A class with 3 graphs allows 3 stratified folds, not the 10 asked for: the scores run
    on 3 (as scikit-learn requires) and a warning names both numbers (the reports print the
    folds asked for); with enough graphs per class nothing is said."""
    import warnings

    rng = np.random.default_rng(0)
    x = rng.normal(size=(23, 4))
    y = np.array([0] * 20 + [1] * 3)
    with pytest.warns(UserWarning, match="10-fold .* runs 3 folds: the smallest class has 3"):
        svm_accuracy(x, y, folds=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        knn_accuracy(x, y, folds=3, k=3)


def test_importing_the_graph_package_shows_no_deprecation_warning_of_pyg():
    """PyG calls the deprecated ``torch.jit.script`` at import; ``hardneg.graph`` silences that
    one warning (every graph command printed it) and nothing else: in a fresh process that
    turns FutureWarnings into errors, the import succeeds."""
    import subprocess

    code = "import hardneg.graph.data, hardneg.graph.encoder"
    run = subprocess.run(
        [sys.executable, "-W", "error::FutureWarning", "-c", code], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("epochs=-1", "epochs must be in [0, inf), got -1"),
        ("batch_size=0", "batch_size must be in [2, inf), got 0"),
        ("seed=-1", "seed must be in [0, inf), got -1"),  # numpy said "expected non-negative"
        ("threads=0", "threads must be in [1, inf), got 0"),
    ],
)
def test_graph_demo_out_of_range_options_fail_before_any_work(
    override, message, monkeypatch, tmp_path, capsys
):
    # they trained the baselines first, then failed every strategy's row with the same error
    import hardneg.graph.demo as gd
    from hardneg.cli import main

    def no_work(*args, **kwargs):
        raise AssertionError("data were generated before the options were checked")

    monkeypatch.setattr(gd, "motif_graphs", no_work)
    args = ["demo", "--modality", "graph", "--strategies", "hcl", "--out", str(tmp_path / "o")]
    assert main([*args, override]) == 2
    assert capsys.readouterr().err == f"hardneg demo: error: {message}\n"
    assert not (tmp_path / "o").exists()
