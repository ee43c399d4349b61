"""What a sentence-transformers user switching from its losses tries: models whose columns
are a flat token stream (``StaticEmbedding``, rows packed for flash attention), an asymmetric
``Router`` model, a guide across layouts and behind a DDP wrapper, the cached losses' parity,
the ``compute_loss_from_embeddings(embeddings, labels)`` call of sentence-transformers' own
composite losses (``SpladeLoss`` too), other losses' argument names, ``temperature``, an
evaluation before training, a multi-dataset Trainer run to a saved model card, and mining in
sentence-transformers' call form. Tiny local models only (no hub)."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

pytest.importorskip("sentence_transformers")

from _text_models import WORDS, sentences, tiny_model  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.sentence_transformer.losses import (  # noqa: E402
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)

from hardneg.integrations.sentence_transformers import (  # noqa: E402
    CachedHardNegativeLoss,
    HardNegativeLoss,
    text_ids,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def static_model(tmp_path_factory):
    """A ``StaticEmbedding`` model (an ``EmbeddingBag``: one flat token stream per column with
    the row starts in ``offsets``) over the tiny BERT's WordPiece vocabulary."""
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    from transformers import BertTokenizerFast

    folder = tmp_path_factory.mktemp("static")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(vocab), do_lower_case=True)._tokenizer
    with torch.random.fork_rng():  # the same weights every time, the global RNG left alone
        torch.manual_seed(0)
        static = StaticEmbedding(tokenizer, embedding_dim=32)
    return SentenceTransformer(modules=[static], device="cpu")


def columns(k: int, batch: int = 7, seed: int = 3) -> list[list[str]]:
    texts = list(dict.fromkeys(sentences(batch * (2 + k) * 3, seed=seed)))[: batch * (2 + k)]
    assert len(texts) == batch * (2 + k)
    return [texts[i * batch : (i + 1) * batch] for i in range(2 + k)]


def value_and_grads(model, loss, feats):
    model.zero_grad(set_to_none=True)
    value = loss(feats, None)
    value.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return value.detach(), grads


def assert_same(ours, theirs, rtol=1e-4, atol=1e-5):
    (va, ga), (vb, gb) = ours, theirs
    torch.testing.assert_close(va, vb, rtol=rtol, atol=1e-6)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=rtol, atol=atol, msg=name)


# ------------------------------------------------------------------------ StaticEmbedding


@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize("cached", [False, True])
def test_a_static_embedding_model_trains_as_with_mnrl(static_model, k, cached):
    """A StaticEmbedding column is ``input_ids [tokens]`` plus ``offsets [rows]``: the column
    check read the token count as the row count and refused every batch ("got [26, 24, 30] rows
    per column"), and the Cached form cut the token stream as if it were rows. Both now equal
    MultipleNegativesRankingLoss in value and gradient (sentence-transformers' own Cached loss
    refuses these models)."""
    cols = columns(k)
    feats = [static_model.preprocess(c) for c in cols]
    assert feats[0]["input_ids"].dim() == 1 and feats[0]["offsets"].shape == (7,)
    loss = CachedHardNegativeLoss(static_model, mini_batch_size=3) if cached else None
    loss = loss or HardNegativeLoss(static_model)
    ours = value_and_grads(static_model, loss, feats)
    theirs = value_and_grads(static_model, MultipleNegativesRankingLoss(static_model), feats)
    assert_same(ours, theirs)


def test_static_embedding_duplicates_are_masked_as_in_padded_rows(static_model, model):
    """The text hash of the flat form equals that of the same tokens in padded rows (either
    padding side), so a mined negative equal to the positive is masked in both layouts."""
    cols = columns(1, batch=4)
    cols[2][1] = cols[1][1]  # anchor 1's hard negative is its own positive
    cols[1][3] = cols[1][0]  # anchors 0 and 3 share a positive
    flat = [static_model.preprocess(c) for c in cols]
    padded = [model.preprocess(c) for c in cols]  # the same WordPiece vocabulary, with [CLS] [SEP]
    for f, p in zip(flat, padded):
        # the padded rows without [CLS] / [SEP], left-aligned: the flat stream's rows
        keep = p["attention_mask"].bool() & (p["input_ids"] != 2) & (p["input_ids"] != 3)
        rows = [ids[m] for ids, m in zip(p["input_ids"], keep)]
        width = max(len(r) for r in rows)
        ids = torch.stack([torch.cat([r, r.new_zeros(width - len(r))]) for r in rows])
        mask = torch.stack([torch.arange(width) < len(r) for r in rows]).long()
        assert torch.equal(torch.cat(rows), f["input_ids"].long())
        assert torch.equal(text_ids(f), text_ids({"input_ids": ids, "attention_mask": mask}))
    ids = [text_ids(f) for f in flat]
    assert ids[2][1] == ids[1][1] and ids[1][3] == ids[1][0]
    assert len(set(ids[0].tolist() + ids[1].tolist())) == 7  # 8 texts, one repeated
    # masked: the loss equals the mask-free loss only where nothing repeats
    loss = HardNegativeLoss(static_model)
    plain = HardNegativeLoss(static_model, mask_duplicates=False)
    with torch.no_grad():
        assert not torch.allclose(loss(flat, None), plain(flat, None))
        distinct = [static_model.preprocess(c) for c in columns(1, batch=4)]
        torch.testing.assert_close(loss(distinct, None), plain(distinct, None))


def test_a_router_with_a_static_query_encoder_caches_as_the_plain_loss(static_model, model):
    """An asymmetric Router model (a StaticEmbedding for queries, a BERT for documents): the
    Cached form equals MultipleNegativesRankingLoss in value and every parameter gradient of
    both routes, the query column cut as a token stream and the documents as padded rows."""
    from sentence_transformers.base.modules import Router

    router = Router.for_query_document(list(static_model), list(model))
    asym = SentenceTransformer(modules=[router], device="cpu")
    cols = columns(1)
    feats = [asym.preprocess(cols[0], task="query")]
    feats += [asym.preprocess(c, task="document") for c in cols[1:]]
    assert feats[0]["input_ids"].dim() == 1 and feats[1]["input_ids"].dim() == 2
    ours = value_and_grads(asym, CachedHardNegativeLoss(asym, mini_batch_size=3), feats)
    theirs = value_and_grads(asym, MultipleNegativesRankingLoss(asym), feats)
    assert_same(ours, theirs)
    routes = {name.split(".")[2] for name in ours[1]}  # 0.sub_modules.<route>.<module>...
    assert routes == {"query", "document"}  # both encoders got gradients


# ------------------------------------------------------------------- parity and call forms


@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize("symmetric", [False, True])
def test_cached_equals_cached_mnrl_with_the_same_mini_batches(model, k, symmetric):
    """The Cached infonce equals sentence-transformers' CachedMultipleNegativesRankingLoss with
    the same mini_batch_size and scale, in value and every parameter gradient, for pairs and
    two hard-negative columns, and symmetric=True equals its per-direction query <-> document
    form (the replacement of the deprecated CachedMultipleNegativesSymmetricRankingLoss)."""
    cols = columns(k)
    feats = [model.preprocess(c) for c in cols]
    ours = CachedHardNegativeLoss(model, scale=7.0, symmetric=symmetric, mini_batch_size=3)
    directions = {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"}
    theirs = CachedMultipleNegativesRankingLoss(
        model, scale=7.0, mini_batch_size=3, **(directions if symmetric else {})
    )
    assert_same(value_and_grads(model, ours, feats), value_and_grads(model, theirs, feats))


def test_temperature_is_one_over_scale_as_in_mnrl(model):
    """MultipleNegativesRankingLoss offers ``temperature`` (``1 / scale``) beside ``scale``;
    reading it from this loss raised AttributeError. Passing it names the scale to pass."""
    for scale in (20.0, 7.0):
        want = MultipleNegativesRankingLoss(model, scale=scale).temperature
        assert HardNegativeLoss(model, scale=scale).temperature == pytest.approx(want)
        assert CachedHardNegativeLoss(model, scale=scale).temperature == pytest.approx(1 / scale)
    # GISTEmbedLoss's default temperature: the message gives the scale to pass
    with pytest.raises(ValueError, match=r"temperature=0\.01 is scale=100\b"):
        HardNegativeLoss(model, temperature=0.01)


class InfoNCEPlusGOR(torch.nn.Module):
    """sentence-transformers' documented composite (its GlobalOrthogonalRegularizationLoss
    example): the columns embedded once, then ``compute_loss_from_embeddings(embeddings,
    labels)`` of an InfoNCE loss and of the regulariser."""

    def __init__(self, model, info_nce):
        from sentence_transformers.sentence_transformer.losses import (
            GlobalOrthogonalRegularizationLoss,
        )

        super().__init__()
        self.model, self.info_nce = model, info_nce
        self.gor = GlobalOrthogonalRegularizationLoss(model)

    def forward(self, features, labels=None):
        embeddings = [self.model(f)["sentence_embedding"] for f in features]
        out = {"info_nce": self.info_nce.compute_loss_from_embeddings(embeddings, labels)}
        return {**out, **self.gor.compute_loss_from_embeddings(embeddings, labels)}


def test_the_composite_loss_call_with_labels_equals_mnrl_s(model):
    """``compute_loss_from_embeddings(embeddings, labels)`` with a label tensor (a dataset with a
    'label' column) failed inside torch.stack: the labels took the place of the per-column
    ids. They are now noted once and not used, and the composite equals the same composite
    around MultipleNegativesRankingLoss, component by component, in value and gradients."""
    cols = columns(1, batch=5)
    feats = [model.preprocess(c) for c in cols]
    labels = torch.tensor([1, 0, 1, 1, 0])

    def run(info_nce):
        model.zero_grad(set_to_none=True)
        out = InfoNCEPlusGOR(model, info_nce)(feats, labels)
        torch.stack(list(out.values())).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return {k: v.detach() for k, v in out.items()}, grads

    ours_loss = HardNegativeLoss(model, scale=10.0)
    with pytest.warns(UserWarning, match=r"ignores the dataset.s label column \(values 0, 1;"):
        ours = run(ours_loss)
    theirs = run(MultipleNegativesRankingLoss(model, scale=10.0))
    assert ours[0].keys() == theirs[0].keys() and len(ours[0]) >= 2
    for key in ours[0]:
        torch.testing.assert_close(ours[0][key], theirs[0][key], rtol=1e-5, atol=1e-6)
    assert_same((ours[0]["info_nce"], ours[1]), (theirs[0]["info_nce"], theirs[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        run(ours_loss)


# ------------------------------------------------------------ a multi-dataset Trainer run


def test_a_multi_dataset_run_saves_a_model_whose_card_names_each_loss(tmp_path, model):
    """A dict of datasets with a dict of losses (plain and Cached), the NO_DUPLICATES batch
    sampler, column prompts and an InformationRetrievalEvaluator, as a sentence-transformers
    user trains: the run updates the model, the evaluator reports, the saved model reloads to
    the same embeddings, and its card gives each dataset's loss with its settings and cites
    the strategies' papers and GradCache."""
    from datasets import Dataset, DatasetDict
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.evaluation import (
        InformationRetrievalEvaluator,
    )

    trained = tiny_model(tmp_path / "bert", seed=1)  # not the shared fixture: it trains
    cols = columns(1, batch=16, seed=5)
    triplets = Dataset.from_dict({"anchor": cols[0], "positive": cols[1], "negative": cols[2]})
    pairs = Dataset.from_dict({"anchor": cols[2], "positive": cols[0]})
    losses = {
        "triplets": HardNegativeLoss(trained, "hcl", beta=0.5),
        "pairs": CachedHardNegativeLoss(trained, "debiased", tau_plus=0.1, mini_batch_size=3),
    }
    queries = {f"q{i}": text for i, text in enumerate(cols[0])}
    corpus = {f"d{i}": text for i, text in enumerate(cols[1])}
    evaluator = InformationRetrievalEvaluator(
        queries, corpus, {f"q{i}": {f"d{i}"} for i in range(16)}, name="ir"
    )
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-3,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        prompts={"anchor": "the ", "positive": "a "},
        eval_strategy="steps",
        eval_steps=4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    before = [p.detach().clone() for p in trained.parameters()]
    trainer = SentenceTransformerTrainer(
        model=trained,
        args=args,
        train_dataset=DatasetDict({"triplets": triplets, "pairs": pairs}),
        eval_dataset=DatasetDict({"triplets": triplets}),
        loss=losses,
        evaluator=evaluator,
    )
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, trained.parameters()))
    logged = [row for row in trainer.state.log_history if "eval_ir_cosine_ndcg@10" in row]
    assert logged and 0.0 <= logged[-1]["eval_ir_cosine_ndcg@10"] <= 1.0

    trained.save_pretrained(str(tmp_path / "saved"))
    loaded = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    torch.testing.assert_close(
        loaded.encode(cols[0][:4], convert_to_tensor=True),
        trained.encode(cols[0][:4], convert_to_tensor=True),
    )
    card = (tmp_path / "saved" / "README.md").read_text()
    blocks = card.split("#### ")
    triplet_block = next(b for b in blocks if b.startswith("triplets"))
    pair_block = next(b for b in blocks if b.startswith("pairs"))
    assert "HardNegativeLoss</code>" in triplet_block and '"strategy": "hcl"' in triplet_block
    assert '"beta": 0.5' in triplet_block
    assert "CachedHardNegativeLoss</code>" in pair_block and '"tau_plus": 0.1' in pair_block
    assert '"mini_batch_size": 3' in pair_block
    for key in ("robinson2021contrastive", "chuang2020debiased", "gao2021scaling"):
        assert key in card, key


@pytest.mark.parametrize(
    "cached, key, value, other, hint",
    [
        (False, "mini_batch_size", 16, "CachedMultipleNegativesRankingLoss", "CachedHardNegative"),
        (True, "mini_batch_num_tokens", 512, "CachedMultipleNegativesRankingLoss", "rows per"),
        (True, "show_progress_bar", True, "CachedMultipleNegativesRankingLoss", "not offered"),
        (False, "margin", 0.1, "GISTEmbedLoss", "guide_margin=<margin>"),
        (True, "margin", 0.1, "GISTEmbedLoss", "guide_margin=<margin>"),
    ],
)
def test_cached_mnrl_and_gist_arguments_name_our_equivalent(model, cached, key, value, other, hint):
    """CachedMultipleNegativesRankingLoss's mini-batch arguments and GISTEmbedLoss's margin fell
    through to the strategy as "unknown hyper-parameter", listing the strategy's options
    without saying which loss or argument means the same thing."""
    cls = CachedHardNegativeLoss if cached else HardNegativeLoss
    with pytest.raises(ValueError, match=re.escape(hint)) as err:
        cls(model, **{key: value})
    assert other in str(err.value) and f"{key}=" in str(err.value)


@pytest.mark.parametrize(
    "cached, key, meant",
    [
        (False, "symetric", "symmetric"),
        (False, "mask_duplicate", "mask_duplicates"),
        (True, "mini_batchsize", "mini_batch_size"),
        (False, "guide_margins", "guide_margin"),
    ],
)
def test_a_misspelt_argument_of_the_loss_names_the_argument(model, cached, key, meant):
    """A typo of one of the loss's own arguments reached the strategy, whose "unknown
    hyper-parameter" error listed only the strategy's options (temperature among them)."""
    cls = CachedHardNegativeLoss if cached else HardNegativeLoss
    with pytest.raises(ValueError, match=f"unknown argument '{key}' of {cls.__name__}: did you "):
        cls(model, **{key: True})
    with pytest.raises(ValueError, match=f"did you mean '{meant}'"):
        cls(model, **{key: True})


def test_positive_aware_keeps_its_own_margin(model):
    """positive_aware's margin is its own (its filter's absolute margin), not GISTEmbedLoss's."""
    loss = HardNegativeLoss(model, "positive_aware", mode="margin", margin=0.1)
    assert loss.get_config_dict()["margin"] == 0.1


# ------------------------------------------------------------------------------- mining


def test_mining_in_sentence_transformers_call_form_gives_its_rows(model):
    """``mine_hard_negatives(dataset, model, ...)``, sentence-transformers' order, failed with
    "missing 1 required keyword-only argument: 'model'"; it now mines what the keyword form
    mines, and with the top sampler and an explicit window the same n-tuples as
    sentence-transformers' own ``mine_hard_negatives`` on the same model and data."""
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives as st_mine

    from hardneg.mining import mine_hard_negatives

    texts = list(dict.fromkeys(sentences(200, seed=7)))
    queries, positives, extra = texts[:24], texts[24:48], texts[48:120]
    data = Dataset.from_dict({"anchor": queries, "positive": positives})
    options = {"num_negatives": 3, "output_format": "n-tuple", "range_min": 1, "range_max": 9}
    for corpus in (None, positives + extra):
        ours = mine_hard_negatives(data, model, corpus=corpus, batch_size=16, **options)
        keyword = mine_hard_negatives(queries, positives, corpus, model=model, **options)
        assert ours == keyword and len(ours) == 24
        theirs = st_mine(data, model, corpus=corpus, batch_size=16, verbose=False, **options)
        assert ours == [dict(row) for row in theirs]


@pytest.mark.parametrize(
    "key, value, hint",
    [
        ("anchor_column_name", "query", "anchor_column=<anchor_column_name>"),
        ("sampling_strategy", "random", "sampling=<sampling_strategy>"),
        ("cache_folder", "cache", "cache_dir=<cache_folder>"),
        ("use_faiss", True, "not offered"),
        ("margin", 0.1, "absolute_margin=<margin>"),
    ],
)
def test_sentence_transformers_mining_arguments_name_our_equivalent(model, key, value, hint):
    """sentence-transformers' own names fell through to Python's bare "unexpected keyword
    argument"; they now name the argument that means the same here (before any embedding)."""
    from hardneg.mining import mine_hard_negatives

    with pytest.raises(ValueError, match=re.escape(hint)) as err:
        mine_hard_negatives(["a"], ["b"], model=model, **{key: value})
    assert "sentence-transformers' mine_hard_negatives" in str(err.value)
    with pytest.raises(TypeError, match="unexpected keyword argument 'sampling_strategie'"):
        mine_hard_negatives(["a"], ["b"], model=model, sampling_strategie="top")
    with pytest.raises(TypeError, match="pass model="):
        mine_hard_negatives(["a"], ["b"])


def guided_oracle(emb, guide_emb, scale=20.0):
    """Per-anchor cross-entropy over the candidates (positives, then the hard negatives row by
    row) that the guide scores at most the anchor's positive (GISTEmbed, margin 0); an
    independent loop, with the number of candidates it masked."""
    cos = torch.nn.functional.cosine_similarity

    def candidates(e):  # row-major hard negatives: row i's negatives together
        return torch.cat([e[1], torch.stack(e[2:], dim=1).reshape(-1, e[0].shape[1])])

    a, cands, g_cands = emb[0], candidates(emb), candidates(guide_emb)
    total, masked = 0.0, 0
    for i in range(a.shape[0]):
        g = cos(guide_emb[0][i : i + 1], g_cands)
        keep = [j for j in range(cands.shape[0]) if j == i or g[j] <= g[i]]
        masked += cands.shape[0] - len(keep)
        logits = scale * cos(a[i : i + 1], cands[keep])
        total = total + torch.logsumexp(logits, 0) - scale * cos(a[i : i + 1], cands[i : i + 1])[0]
    return total / a.shape[0], masked


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("static_side", ["model", "guide"])
def test_a_static_embedding_model_and_a_bert_guide_either_way(
    static_model, model, static_side, cached
):
    """guide= between a StaticEmbedding model and a padded-rows BERT: a static model's texts
    failed to decode (its tokenizers.Tokenizer has no batch_decode), and a static guide of a
    model with the same vocabulary got the model's padded rows (KeyError 'offsets'). The
    guide now re-reads the texts in its own layout, and the loss equals a per-anchor loop
    over the candidates the guide scores at most the positive, in value and gradients."""
    trained, guide = (static_model, model) if static_side == "model" else (model, static_model)
    cols = columns(1, batch=5)
    loss = CachedHardNegativeLoss(trained, guide=guide, mini_batch_size=2) if cached else None
    loss = loss or HardNegativeLoss(trained, guide=guide)
    ours = value_and_grads(trained, loss, [trained.preprocess(c) for c in cols])
    with torch.no_grad():  # the guide's view of the raw texts
        guide_emb = [guide(guide.preprocess(c))["sentence_embedding"] for c in cols]
    trained.zero_grad(set_to_none=True)
    emb = [trained(trained.preprocess(c))["sentence_embedding"] for c in cols]
    want, masked = guided_oracle(emb, guide_emb)
    want.backward()
    grads = {n: p.grad.clone() for n, p in trained.named_parameters() if p.grad is not None}
    assert 0 < masked < 5 * 9  # the guide masks some candidates, not all
    assert_same(ours, (want.detach(), grads))


def test_an_evaluation_before_training_sees_the_schedule_s_start(tmp_path):
    """With ProgressCallback passed, ``trainer.evaluate()`` before ``train()`` and
    ``eval_on_start=True`` failed with "loss.progress ... is not set: pass
    callbacks=[ProgressCallback(loss)]"; they now see progress 0 (the schedule's start), the
    training steps 0 and 1/2, and the evaluation after the last step 1/2 still."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    from hardneg.integrations.sentence_transformers import ProgressCallback

    seen: list[tuple[bool, float | None]] = []

    class Spy(HardNegativeLoss):
        def compute_loss_from_embeddings(self, embeddings, ids=None):
            seen.append((torch.is_grad_enabled(), self.progress))
            return super().compute_loss_from_embeddings(embeddings, ids)

    cols = columns(0, batch=8)
    data = Dataset.from_dict({"anchor": cols[0], "positive": cols[1]})
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        max_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        eval_on_start=True,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trained = tiny_model(tmp_path / "bert", seed=2)  # not the shared fixture: it trains
    loss = Spy(trained, "hcl", beta=0.5, beta_anneal="down")
    trainer = SentenceTransformerTrainer(
        model=trained,
        args=args,
        train_dataset=data,
        eval_dataset=data,
        loss=loss,
        callbacks=[ProgressCallback(loss)],
    )
    trainer.evaluate()
    trainer.train()
    evaluations = [progress for grad, progress in seen if not grad]
    steps = [progress for grad, progress in seen if grad]
    assert evaluations == [0.0, 0.0, 0.5] and steps == [0.0, 0.5]


class Wrapped(torch.nn.Module):
    """What the Trainer puts in ``loss.model`` under DDP (``override_model_in_loss``): a module
    that embeds as the model does but carries none of its attributes (no ``tokenizer``)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, features):
        return self.module(features)


@pytest.mark.parametrize("cached", [False, True])
def test_a_guide_of_another_vocabulary_re_reads_the_texts_behind_a_ddp_wrapper(
    tmp_path, model, cached
):
    """The texts were decoded with ``self.model.tokenizer`` at every step: once the Trainer had
    replaced the model by its DDP wrapper (which has no tokenizer) a guide with another
    vocabulary failed with AttributeError. The tokenizer is now kept when the loss is built
    (as GISTEmbedLoss keeps it), and the wrapped loss equals GISTEmbedLoss on the bare model
    in value and gradients."""
    from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss

    guide = tiny_model(tmp_path, seed=2, words=tuple(reversed(WORDS)))
    cols = columns(1, batch=6)
    feats = [model.preprocess(c) for c in cols]
    loss = CachedHardNegativeLoss(model, guide=guide, mini_batch_size=4) if cached else None
    loss = loss or HardNegativeLoss(model, guide=guide)
    assert loss._retokenize
    loss.model = Wrapped(model)
    theirs = GISTEmbedLoss(
        model, guide, temperature=0.05, contrast_anchors=False, contrast_positives=False
    )
    assert_same(value_and_grads(model, loss, feats), value_and_grads(model, theirs, feats))


# ---------------------------------------------------- rows packed for flash attention


class PackedEmbedder(torch.nn.Module):
    """A stand-in for a flash-attention encoder (no flash attention on a CPU): token plus
    position embeddings, mean-pooled per row, from padded rows (``input_ids``,
    ``attention_mask``) or from sentence-transformers' packed rows (``input_ids [1, T]``,
    ``position_ids``, ``cu_seq_lens_q``), the same embedding either way."""

    def __init__(self, tokenizer, dim: int = 16):
        super().__init__()
        self.tokenizer, self.max_seq_length = tokenizer, 32
        with torch.random.fork_rng():  # the same weights every time, the global RNG left alone
            torch.manual_seed(0)
            self.tokens = torch.nn.Embedding(len(tokenizer.get_vocab()), dim)
            self.positions = torch.nn.Embedding(32, dim)
            self.out = torch.nn.Linear(dim, dim)

    def forward(self, features):
        ids = features["input_ids"]
        if "cu_seq_lens_q" in features:
            bounds = features["cu_seq_lens_q"].long()
            lengths = bounds[1:] - bounds[:-1]
            rows = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
            x = self.tokens(ids.reshape(-1)) + self.positions(features["position_ids"].reshape(-1))
            pooled = torch.zeros(len(lengths), x.shape[1]).index_add(0, rows, x)
            pooled = pooled / lengths[:, None]
        else:
            mask = features["attention_mask"][..., None].float()
            x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1]))[None]
            pooled = (x * mask).sum(1) / mask.sum(1)
        return {"sentence_embedding": self.out(pooled)}


def packed(tokenizer, texts):
    """The features sentence-transformers' Transformer makes for flash attention 2 (its own
    DataCollatorWithFlattening settings)."""
    from transformers import DataCollatorWithFlattening

    collate = DataCollatorWithFlattening(
        return_seq_idx=True, return_flash_attn_kwargs=True, return_position_ids=True
    )
    out = collate([{"input_ids": ids} for ids in tokenizer(texts)["input_ids"]])
    out.pop("labels")
    return out


@pytest.mark.parametrize("cached", [False, True])
def test_rows_packed_for_flash_attention_train_as_with_mnrl(model, cached):
    """With flash attention 2, sentence-transformers packs a column's rows into one sequence
    (``input_ids [1, T]``, ``cu_seq_lens_q``): the loss counted 1 row per column, hashed the
    whole pack as one text (one id for B rows) and the Cached form cut nothing. The packed
    columns now give MultipleNegativesRankingLoss's value and gradients, the same as the
    padded columns, duplicates masked as in padded rows."""
    embedder = PackedEmbedder(model.tokenizer)
    cols = columns(2)
    cols[2][4] = cols[1][4]  # a mined negative that is the row's own positive
    flat = [packed(model.tokenizer, c) for c in cols]
    padded = [model.preprocess(c) for c in cols]
    assert flat[0]["input_ids"].shape[0] == 1 and flat[0]["cu_seq_lens_q"].shape == (8,)
    for f, p in zip(flat, padded):
        assert torch.equal(text_ids(f), text_ids(p))
    loss = CachedHardNegativeLoss(embedder, mini_batch_size=3) if cached else None
    loss = loss or HardNegativeLoss(embedder)
    ours = value_and_grads(embedder, loss, flat)
    assert_same(ours, value_and_grads(embedder, HardNegativeLoss(embedder), padded))
    plain = HardNegativeLoss(embedder, mask_duplicates=False)
    assert_same(value_and_grads(embedder, plain, flat), value_and_grads(embedder, plain, padded))
    assert not torch.allclose(ours[0], value_and_grads(embedder, plain, flat)[0])  # masked
    distinct = [packed(model.tokenizer, c) for c in columns(2)]
    assert_same(
        value_and_grads(embedder, loss, distinct),
        value_and_grads(embedder, MultipleNegativesRankingLoss(embedder), distinct),
    )


def test_a_guide_of_packed_rows_reads_the_texts_in_its_own_layout(model):
    """The guide (a padded-rows BERT) got the model's packed rows, which it cannot read; it now
    embeds the decoded texts, and the loss equals the per-anchor loop over the candidates the
    guide lets through."""
    embedder = PackedEmbedder(model.tokenizer)
    cols = columns(1, batch=5)
    loss = HardNegativeLoss(embedder, guide=model)
    assert not loss._retokenize  # same vocabulary and length: only the packing differs
    ours = value_and_grads(embedder, loss, [packed(model.tokenizer, c) for c in cols])
    with torch.no_grad():
        guide_emb = [model(model.preprocess(c))["sentence_embedding"] for c in cols]
    embedder.zero_grad(set_to_none=True)
    emb = [embedder(model.preprocess(c))["sentence_embedding"] for c in cols]
    want, masked = guided_oracle(emb, guide_emb)
    want.backward()
    grads = {n: p.grad.clone() for n, p in embedder.named_parameters() if p.grad is not None}
    assert 0 < masked < 5 * 9
    assert_same(ours, (want.detach(), grads))


def test_load_sentence_model_passes_sentence_transformer_s_own_arguments(tmp_path, model):
    """``load_sentence_model(name, truncate_dim=..., prompts=...)`` raised TypeError (only
    ``device`` was taken); sentence-transformers' arguments now reach the model."""
    from hardneg.text.models import load_sentence_model

    model.save(str(tmp_path / "saved"))
    loaded = load_sentence_model(str(tmp_path / "saved"), truncate_dim=8, prompts={"query": "the "})
    assert loaded.prompts["query"] == "the " and loaded.truncate_dim == 8
    full = model.encode(["a red cat", "the dog"], convert_to_tensor=True)
    cut = loaded.encode(["a red cat", "the dog"], convert_to_tensor=True)
    torch.testing.assert_close(cut, full[:, :8])


def test_inside_splade_loss_equals_sparse_mnrl(tmp_path):
    """SpladeLoss (sparse encoders) calls its inner loss as ``compute_loss_from_embeddings(
    embeddings, labels)``: with dot products and scale 1 (``normalize=False, scale=1.0``) this
    loss inside it equals SparseMultipleNegativesRankingLoss inside it, component by
    component and in every parameter gradient, a label column given."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    sparse = pytest.importorskip("sentence_transformers.sparse_encoder")
    from sentence_transformers.sparse_encoder.losses import (
        SparseMultipleNegativesRankingLoss,
        SpladeLoss,
    )
    from sentence_transformers.sparse_encoder.modules import MLMTransformer, SpladePooling

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        BertForMaskedLM(config).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # MLMTransformer, in 6.x too
        encoder = sparse.SparseEncoder(
            modules=[MLMTransformer(str(tmp_path)), SpladePooling("max")], device="cpu"
        )
    cols = columns(1, batch=6)
    feats = [encoder.preprocess(c) for c in cols]
    labels = torch.tensor([1, 0, 1, 1, 0, 1])

    def run(inner):
        loss = SpladeLoss(
            encoder, inner, document_regularizer_weight=3e-5, query_regularizer_weight=5e-5
        )
        encoder.zero_grad(set_to_none=True)
        out = loss(feats, labels)
        torch.stack(list(out.values())).sum().backward()
        grads = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
        return {k: v.detach() for k, v in out.items()}, grads

    with pytest.warns(UserWarning, match="ignores the dataset.s label column"):
        ours = run(HardNegativeLoss(encoder, normalize=False, scale=1.0))
    theirs = run(SparseMultipleNegativesRankingLoss(encoder))
    assert ours[0].keys() == theirs[0].keys() and "base_loss" in ours[0]
    for key in ours[0]:
        torch.testing.assert_close(ours[0][key], theirs[0][key], rtol=1e-5, atol=1e-7)
    assert_same((ours[0]["base_loss"], ours[1]), (theirs[0]["base_loss"], theirs[1]))
