"""Calibration data sources, tokenization and seeded windows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moeconvert.errors import BadInputError
from moeconvert.quant.calibration import calibration_tokens, load_text, sample_windows, tokens_digest


def test_default_corpus_is_shipped() -> None:
    text = load_text(None)
    assert len(text) > 2000 and "mixture-of-experts" in text


def test_text_and_jsonl_files(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello world")
    assert load_text(str(tmp_path / "a.txt")) == "hello world"
    lines = [json.dumps({"text": "first"}), "", json.dumps({"text": "second", "id": 2})]
    (tmp_path / "b.jsonl").write_text("\n".join(lines))
    assert load_text(str(tmp_path / "b.jsonl")) == "first\n\nsecond"
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(BadInputError, match="bad.jsonl:1"):
        load_text(str(tmp_path / "bad.jsonl"))
    with pytest.raises(BadInputError, match="no such file"):
        load_text(str(tmp_path / "missing.txt"))


def test_windows_are_seeded_and_in_range() -> None:
    stream = torch.arange(1000)
    a, b = sample_windows(stream, 4, 50, seed=1), sample_windows(stream, 4, 50, seed=1)
    assert torch.equal(a, b) and a.shape == (4, 50)
    assert not torch.equal(a, sample_windows(stream, 4, 50, seed=2))
    assert all(torch.equal(row, torch.arange(row[0], row[0] + 50)) for row in a), "windows are contiguous"
    short = sample_windows(torch.arange(7), 2, 20, seed=0)
    assert short.shape == (2, 20) and int(short.max()) < 7


def test_byte_tokens_without_a_tokenizer() -> None:
    tokens = calibration_tokens(None, None, 256, 3, 32, seed=0)
    assert tokens.shape == (3, 32) and int(tokens.max()) < 256
    assert tokens_digest(tokens) == tokens_digest(calibration_tokens(None, None, 256, 3, 32, seed=0))
    with pytest.raises(BadInputError, match="vocabulary"):
        calibration_tokens(None, None, 100, 1, 8)


def test_checkpoint_tokenizer_is_used(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "the": 1, "river": 2, "rose": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path)
    (tmp_path / "calib.txt").write_text("the river rose " * 20)
    tokens = calibration_tokens(str(tmp_path / "calib.txt"), tmp_path, 4, 2, 6, seed=0)
    assert set(tokens.flatten().tolist()) <= {1, 2, 3}


def test_dataset_source_through_the_datasets_package(tmp_path: Path) -> None:
    """``name[:config]:split:column`` goes through ``datasets.load_dataset`` (optional extra); a local
    dataset folder exercises the same path a Hub id does, without a network."""
    pytest.importorskip("datasets", reason="the optional 'datasets' extra is not installed")
    folder = tmp_path / "corpus"
    folder.mkdir()
    rows = [{"body": f"line {i} of the calibration set", "id": i} for i in range(5)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    text = load_text(f"{folder}:train:body")
    assert text.split("\n\n") == [r["body"] for r in rows]
    with pytest.raises(BadInputError, match="no column 'text'"):
        load_text(f"{folder}:train:text")
    with pytest.raises(BadInputError, match="cannot load calibration dataset"):
        load_text(f"{tmp_path / 'missing'}:train:body")
