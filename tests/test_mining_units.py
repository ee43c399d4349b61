"""The mining module's helpers called directly: the cache fingerprint, the candidates' contrast
set, and the row files (jsonl, parquet, csv, txt) with their error messages."""

from __future__ import annotations

import re

import pytest
import torch

from hardneg.mining import (
    candidate_contrast,
    chunked_top_k,
    column_texts,
    embed_texts,
    load_rows,
    model_fingerprint,
    save_rows,
    sharded_top_k,
)


class Encoder:
    """Not a torch module: named by its class alone."""


class Recorder:
    """An encoder that records what each ``encode`` call received: a fixed random vector per
    text (``seed`` tells two recorders apart)."""

    def __init__(self, seed: int = 0, result=None) -> None:
        self.seed, self.result, self.calls = seed, result, []

    def vector(self, text: str) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1000 + sum(map(ord, text)) + len(text))
        return torch.randn(6, generator=gen)

    def encode(self, texts, batch_size=32, convert_to_tensor=True, show_progress_bar=False):
        self.calls.append(
            {
                "texts": list(texts),
                "batch_size": batch_size,
                "convert_to_tensor": convert_to_tensor,
                "show_progress_bar": show_progress_bar,
            }
        )
        return (
            self.result if self.result is not None else torch.stack(list(map(self.vector, texts)))
        )


class PromptArgument(Recorder):
    """``encode`` takes ``prompt`` by name."""

    def encode(
        self, texts, batch_size=32, convert_to_tensor=True, show_progress_bar=False, prompt=None
    ):
        self.calls.append({"texts": list(texts), "prompt": prompt})
        return torch.stack([self.vector((prompt or "") + t) for t in texts])


class AnyKeywords(Recorder):
    """``encode(texts, **kwargs)``, as a wrapper that passes everything on."""

    prompts = {"q": "query: "}

    def encode(self, texts, **kwargs):
        self.calls.append({"texts": list(texts), **kwargs})
        return torch.stack(list(map(self.vector, texts)))


class NoSignature(Recorder):
    """An ``encode`` whose signature cannot be read (as some compiled callables)."""

    def __init__(self) -> None:
        super().__init__()
        outer = self

        class Call:
            __signature__ = "unreadable"  # inspect.signature raises TypeError

            def __call__(self, texts, **kwargs):
                outer.calls.append({"texts": list(texts)})
                return torch.stack(list(map(outer.vector, texts)))

        self.encode = Call()


def test_model_fingerprint_is_the_class_name_then_20_hex_digits_of_the_weights():
    assert model_fingerprint(Encoder()) == "Encoder"
    torch.manual_seed(0)
    linear = torch.nn.Linear(3, 2)
    key = model_fingerprint(linear)
    assert re.fullmatch(r"Linear-[0-9a-f]{20}", key), key
    twin = torch.nn.Linear(3, 2)
    twin.load_state_dict(linear.state_dict())
    assert model_fingerprint(twin) == key  # the same weights: the same cache files
    with torch.no_grad():
        twin.bias.add_(1e-3)
    assert model_fingerprint(twin) != key  # a training step: new cache files


def test_candidate_contrast_holds_the_candidates_as_a_contrast_set():
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(3, 4, generator=gen)
    scores = torch.rand(3, 5, generator=gen).sort(dim=1, descending=True).values
    positive = scores[:, :1] + 0.1
    keep = torch.rand(3, 5, generator=gen) < 0.7
    t = 0.05
    c = candidate_contrast(queries, scores, positive, keep, t)
    # the documented fields: anchors the queries, logits s / t of the survivors, -inf elsewhere
    assert torch.equal(c.anchors, queries.double())
    want = torch.where(keep, scores.double() / t, torch.tensor(float("-inf"), dtype=torch.float64))
    assert torch.equal(c.negative_logits, want)
    assert torch.equal(c.positive_logits, positive.double() / t)
    assert torch.equal(c.negative_mask, keep)
    assert torch.equal(c.num_negatives, keep.sum(dim=1))
    assert c.temperature == t and isinstance(c.temperature, float)
    # and a well-formed set around them: one positive per query (weight 1), [W, d] columns
    assert c.columns.shape == (5, 4) and c.positives.shape == (3, 1, 4)
    assert torch.equal(c.positive_weight, torch.ones(3, 1, dtype=torch.float64))
    assert c.anchor_columns is None and c.positive_index is None and c.single_positive


def test_save_rows_makes_the_folders_and_writes_utf8_text(tmp_path):
    path = save_rows([{"anchor": "café ☕", "n": 1}], tmp_path / "new" / "folder" / "rows.jsonl")
    # the text as written, readable in any editor (no \u escapes)
    assert path.read_text(encoding="utf-8") == '{"anchor": "café ☕", "n": 1}\n'
    assert load_rows(path) == [{"anchor": "café ☕", "n": 1}]


def test_load_rows_reads_a_csv_with_a_line_break_inside_a_quoted_field(tmp_path):
    path = tmp_path / "rows.csv"
    # the csv module's own line handling (newline=""): the \r\n inside the quotes is kept
    path.write_bytes('anchor,positive\r\n"two\r\nlines",café\r\nq,p\r\n'.encode())
    assert load_rows(path) == [
        {"anchor": "two\r\nlines", "positive": "café"},
        {"anchor": "q", "positive": "p"},
    ]


def test_a_jsonl_skips_blank_lines_anywhere_and_names_a_line_that_is_no_object(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": "x"}\n\n   \n{"a": "y"}\n', encoding="utf-8")
    assert load_rows(path) == [{"a": "x"}, {"a": "y"}]
    path.write_text('{"a": "x"}\n[1, 2]\n', encoding="utf-8")
    message = f"{path}, line 2: expected a JSON object with named columns, got a list"
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        load_rows(path)


def test_the_row_files_refusals_carry_their_exact_message(tmp_path):
    with pytest.raises(
        ValueError, match=re.escape("output must end in .jsonl or .parquet, got 'rows.csv'")
    ):
        save_rows([{"a": "x"}], tmp_path / "rows.csv")
    missing = tmp_path / "none.jsonl"
    with pytest.raises(FileNotFoundError, match="^" + re.escape(f"no such file: {missing}") + "$"):
        load_rows(missing)
    tsv = tmp_path / "rows.tsv"
    tsv.write_text("a\tb\n", encoding="utf-8")
    with pytest.raises(
        ValueError,
        match="^" + re.escape("input must be .jsonl, .parquet, .csv or .txt, got 'rows.tsv'") + "$",
    ):
        load_rows(tsv)


def test_column_texts_names_the_row_and_the_option_only_when_there_is_one():
    rows = [{"anchor": "x"}, {"query": "y"}]
    plain = "in.jsonl, row 2: has no column 'anchor' (every row needs a text there; its columns: ['query'])"
    with pytest.raises(ValueError, match="^" + re.escape(plain) + "$"):
        column_texts(rows, "anchor", "in.jsonl")
    hinted = plain[:-1] + "; set --anchor-column for another name)"
    with pytest.raises(ValueError, match="^" + re.escape(hinted) + "$"):
        column_texts(rows, "anchor", "in.jsonl", "--anchor-column")
    assert column_texts(rows[:1], "anchor", "in.jsonl") == ["x"]


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def test_embed_texts_passes_its_settings_to_encode_and_returns_unit_rows_in_input_order():
    model = Recorder()
    texts = ["a", "ccc", "bb"]
    out = embed_texts(model, texts)
    # longest first within the call; batch_size 64 by default; a tensor, no progress bar
    assert model.calls == [
        {
            "texts": ["ccc", "bb", "a"],
            "batch_size": 64,
            "convert_to_tensor": True,
            "show_progress_bar": False,
        }
    ]
    torch.testing.assert_close(out, unit_rows(torch.stack(list(map(model.vector, texts)))))
    embed_texts(model, texts, batch_size=2)
    assert model.calls[-1]["batch_size"] == 2
    # no texts: no rows (and no call), still a [rows, dim] matrix
    empty = embed_texts(model, [])
    assert empty.dim() == 2 and empty.shape[0] == 0 and len(model.calls) == 2


def test_embed_texts_refuses_an_encoder_output_that_is_not_a_matrix():
    for result, got in ((torch.ones(3), "Tensor (3,)"), ([[1.0]], "list ()")):
        message = f"model.encode must return a [batch, dim] embedding tensor, got {got}"
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            embed_texts(Recorder(result=result), ["a", "b", "c"])


def test_embed_texts_cache_makes_its_folder_and_tells_encoders_apart(tmp_path):
    cache = tmp_path / "new" / "cache"
    first = embed_texts(Recorder(seed=1), ["a", "bb"], cache_dir=cache)
    (path,) = cache.glob("*.npy")
    assert re.fullmatch(r"emb_[0-9a-f]{20}\.npy", path.name), path.name
    again = Recorder(seed=1)
    torch.testing.assert_close(embed_texts(again, ["a", "bb"], cache_dir=cache), first)
    assert again.calls == []  # read back from the cache

    class Other(Recorder):
        pass

    # without a model_key the class names the encoder: another class embeds again
    other = Other(seed=2)
    got = embed_texts(other, ["a", "bb"], cache_dir=cache)
    assert len(other.calls) == 1
    torch.testing.assert_close(got, unit_rows(torch.stack([other.vector("a"), other.vector("bb")])))


def test_a_prompt_goes_to_encode_when_it_takes_one_and_before_each_text_otherwise():
    named = PromptArgument()
    embed_texts(named, ["a", "b"], prompt="query: ")
    assert named.calls == [{"texts": ["a", "b"], "prompt": "query: "}]
    anything = AnyKeywords()
    embed_texts(anything, ["a"], prompt="query: ")
    assert anything.calls[-1]["texts"] == ["a"] and anything.calls[-1]["prompt"] == "query: "
    embed_texts(anything, ["a"], prompt_name="q")
    assert anything.calls[-1]["texts"] == ["a"] and anything.calls[-1]["prompt_name"] == "q"
    for model in (Recorder(), NoSignature()):
        embed_texts(model, ["a", "b"], prompt="query: ")
        assert model.calls[-1]["texts"] == ["query: a", "query: b"]


@pytest.mark.parametrize(
    "model, kwargs, message",
    [
        (
            Recorder(),
            {"prompt": "q: ", "prompt_name": "q"},
            "give a prompt or a prompt name, not both",
        ),
        (
            PromptArgument(),
            {"prompt_name": "q"},
            "prompt name 'q': the model has no prompts (a SentenceTransformer saved with "
            "prompts={...} has); give the prompt text itself instead",
        ),
        (
            # prompts, but an encode that cannot take a prompt name
            type("PromptsOnly", (Recorder,), {"prompts": {"q": "query: "}})(),
            {"prompt_name": "q"},
            "prompt name 'q': the model has no prompts (a SentenceTransformer saved with "
            "prompts={...} has); give the prompt text itself instead",
        ),
        (
            type("EmptyPrompts", (AnyKeywords,), {"prompts": {}})(),
            {"prompt_name": "q"},
            "prompt name 'q' is not one of the model's prompts (none)",
        ),
    ],
)
def test_prompt_refusals_carry_their_exact_message(model, kwargs, message):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        embed_texts(model, ["a"], **kwargs)


def test_sharded_top_k_in_one_process_returns_global_indices_and_pads_a_small_shard():
    gen = torch.Generator().manual_seed(4)
    queries, corpus = torch.randn(5, 3, generator=gen), torch.randn(12, 3, generator=gen)
    offset, shard = 5, corpus[5:]  # rows [5, 12) of the corpus: 7 rows
    exclude = [{0, 6}, {5, 11}, set(), {7}, {6, 7, 8}]  # global rows (0 lies outside the shard)
    scores, index = sharded_top_k(queries, shard, offset, 9, exclude=exclude)
    # the 7 shard rows ranked by a plain sort, excluded rows at -inf; then -inf / -1 padding
    for i in range(5):
        row = [
            (float(queries[i] @ corpus[j]) if j not in exclude[i] else float("-inf"), j)
            for j in range(offset, 12)
        ]
        row.sort(key=lambda x: -x[0])
        finite = [(s, j) for s, j in row if s > float("-inf")]
        assert index[i, : len(finite)].tolist() == [j for _, j in finite]
        torch.testing.assert_close(scores[i, : len(finite)], torch.tensor([s for s, _ in finite]))
        assert scores[i, 7:].tolist() == [float("-inf")] * 2
        assert index[i, 7:].tolist() == [-1, -1]
    # one neighbour; no exclusions (the loss's top-k without them)
    s1, i1 = sharded_top_k(queries, shard, offset, 1)
    s_all, i_all = chunked_top_k(queries, shard, 1)
    assert torch.equal(i1, i_all + offset) and torch.equal(s1, s_all)
