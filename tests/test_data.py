"""The data pipeline: word list -> vocabulary -> context windows -> splits, and finding names.txt."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading

import pytest
import torch

from backprop_ninja.data import names as data
from backprop_ninja.cli import main
from backprop_ninja.data import (
    END_TOKEN, Vocabulary, build_dataset, distinct_contexts, load_dataset, read_words, split_words,
)
from backprop_ninja.errors import UserError


def test_names_splits_have_the_lecture_shapes(names_path):
    ds = load_dataset(names_path, block_size=3)
    assert ds.train.X.shape == (182625, 3) and ds.train.Y.shape == (182625,)
    assert ds.val.X.shape == (22655, 3)
    assert ds.test.X.shape == (22866, 3)
    assert ds.vocab.size == 27 and "".join(ds.vocab.chars) == "abcdefghijklmnopqrstuvwxyz"


def test_split_is_the_lectures_random_seed_42_shuffle(names_path):
    import random

    words = read_words(names_path)
    expected = list(words)
    random.seed(42)
    random.shuffle(expected)
    splits = split_words(words)
    assert splits["train"] + splits["val"] + splits["test"] == expected
    assert words == read_words(names_path), "split_words must not shuffle its input in place"


def test_context_windows_start_with_end_tokens_and_end_with_the_end_token():
    vocab = Vocabulary.from_words(["ab"])
    X, Y = build_dataset(["ab"], vocab, block_size=3)
    a, b = vocab.stoi["a"], vocab.stoi["b"]
    assert X.tolist() == [[0, 0, 0], [0, 0, a], [0, a, b]]
    assert Y.tolist() == [a, b, END_TOKEN]


def test_dot_inside_a_word_is_an_ordinary_character():
    words = ["st. john", "a.b"]
    vocab = Vocabulary.from_words(words)
    assert "." in vocab.chars and vocab.stoi["."] != END_TOKEN
    X, Y = build_dataset(["a.b"], vocab, block_size=2)
    assert Y.tolist() == [vocab.stoi["a"], vocab.stoi["."], vocab.stoi["b"], END_TOKEN]
    assert vocab.decode(vocab.encode("st. john") + [END_TOKEN]) == "st. john"


def test_vocabulary_comes_from_the_data(write_words):
    path = write_words(["Zoë", "jean-luc", "o'neil", "r2d2", "mary ann"])
    vocab = load_dataset(path).vocab
    for ch in "Zë-'2 ":
        assert ch in vocab.chars
    assert vocab.size == len(set("Zoëjean-luco'neilr2d2mary ann")) + 1


def test_read_words_strips_whitespace_skips_blank_lines_and_accepts_crlf(tmp_path):
    path = tmp_path / "w.txt"
    path.write_bytes(b"  emma \r\n\r\n\tolivia\r\n   \r\nava")
    assert read_words(path) == ["emma", "olivia", "ava"]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b"\n  \n\t\n", "only blank lines"),
        (b"caf\xe9\n", "not UTF-8"),
        (b"\x00\x01\x02binary", "not a text file"),
    ],
)
def test_bad_word_lists_are_refused_with_one_line_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as err:
        read_words(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_word_list_and_directory_are_refused(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_words(tmp_path / "nope.txt")
    with pytest.raises(UserError, match="directory"):
        read_words(tmp_path)


@pytest.mark.parametrize("content", [b"", b"caf\xe9\n"])
def test_cli_reports_a_bad_word_list_in_one_line_without_traceback(tmp_path, capsys, content):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    code = main(["check", "--input", str(path)])
    err = capsys.readouterr().err
    assert code != 0
    assert err.count("\n") == 1 and str(path) in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# finding names.txt: $BACKPROP_NINJA_DATA, the user cache, a verified download


@pytest.fixture
def http_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving files from tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """No $BACKPROP_NINJA_DATA, and a user cache inside tmp_path."""
    cache = tmp_path / "cache"
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.setattr(data, "cache_dir", lambda: cache)
    return cache


def test_names_are_downloaded_once_verified_and_cached(names_path, http_server, isolated_cache, monkeypatch):
    root, url = http_server
    (root / "names.txt").write_bytes(names_path.read_bytes())
    monkeypatch.setenv(data.URL_ENV, f"{url}/names.txt")
    first = data.resolve_names()
    assert first == isolated_cache / "names.txt"
    assert hashlib.sha256(first.read_bytes()).hexdigest() == data.NAMES_SHA256
    (root / "names.txt").unlink()  # a second resolve must not download again
    assert data.resolve_names() == first
    assert not list(isolated_cache.glob("*.tmp")), "no temporary file may be left behind"


def test_a_download_with_the_wrong_checksum_is_refused_and_not_kept(http_server, isolated_cache, monkeypatch):
    root, url = http_server
    (root / "names.txt").write_text("emma\nmallory\n")
    monkeypatch.setenv(data.URL_ENV, f"{url}/names.txt")
    with pytest.raises(UserError, match="sha256"):
        data.resolve_names()
    assert not (isolated_cache / "names.txt").exists()


def test_offline_download_error_says_so_and_suggests_input(isolated_cache, monkeypatch):
    with socket.socket() as s:  # a port with nothing listening on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(data.URL_ENV, f"http://127.0.0.1:{port}/names.txt")
    with pytest.raises(UserError, match="--input"):
        data.resolve_names()


def test_data_env_folder_is_used_before_the_cache(names_path, isolated_cache, monkeypatch):
    monkeypatch.setenv(data.DATA_ENV, str(names_path.parent))
    assert data.resolve_names() == names_path
    assert not isolated_cache.exists()


def lecture_build_dataset(words, vocab, block_size):
    """The lecture's loop, verbatim but for the end token: the reference for the vectorised one."""
    X, Y = [], []
    for w in words:
        context = [END_TOKEN] * block_size
        for ix in [vocab.stoi[ch] for ch in w] + [END_TOKEN]:
            X.append(context)
            Y.append(ix)
            context = context[1:] + [ix]  # crop and append
    return torch.tensor(X, dtype=torch.long).view(-1, block_size), torch.tensor(Y, dtype=torch.long)


@pytest.mark.parametrize("block_size", [1, 3, 8])
def test_vectorised_build_dataset_equals_the_lecture_loop(block_size):
    words = ["st. john", "Zoë", "a", "mary-ann", "o'neil", "x" * 20]
    vocab = Vocabulary.from_words(words)
    X, Y = build_dataset(words, vocab, block_size)
    X_ref, Y_ref = lecture_build_dataset(words, vocab, block_size)
    assert torch.equal(X, X_ref) and torch.equal(Y, Y_ref)


def test_vectorised_build_dataset_equals_the_lecture_loop_on_names(names_path):
    words = read_words(names_path)[:3000]
    vocab = Vocabulary.from_words(words)
    X, Y = build_dataset(words, vocab, 3)
    X_ref, Y_ref = lecture_build_dataset(words, vocab, 3)
    assert torch.equal(X, X_ref) and torch.equal(Y, Y_ref)


def test_build_dataset_refuses_a_character_outside_the_vocabulary():
    with pytest.raises(UserError, match="'q'"):
        build_dataset(["aqa"], Vocabulary.from_words(["a"]), 3)


def test_build_dataset_of_no_words_is_empty():
    X, Y = build_dataset([], Vocabulary.from_words(["a"]), 4)
    assert X.shape == (0, 4) and Y.shape == (0,)


@pytest.mark.parametrize("base", [5, 2**40])  # ids packed into one int64 key; too large to pack: whole rows
def test_distinct_contexts_index_and_count_every_row(base):
    g = torch.Generator().manual_seed(0)
    X = torch.randint(0, 3, (50, 4), generator=g) * (base // 3)  # (N, T): 3**4 possible rows, many repeats
    contexts = distinct_contexts(X)
    assert torch.equal(contexts.rows[contexts.index], X)
    assert torch.unique(contexts.rows, dim=0).shape == contexts.rows.shape  # each context once
    assert torch.equal(contexts.counts, torch.bincount(contexts.index))
    assert contexts.counts.sum() == X.shape[0] and contexts.rows.shape[0] < X.shape[0]
