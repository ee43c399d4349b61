"""The mining module's helpers called directly: the cache fingerprint, the candidates' contrast
set, and the row files (jsonl, parquet, csv, txt) with their error messages."""

from __future__ import annotations

import re

import pytest
import torch

from hardneg.mining import candidate_contrast, column_texts, load_rows, model_fingerprint, save_rows


class Encoder:
    """Not a torch module: named by its class alone."""


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
