"""Readers: documents and labelled examples from .txt / .jsonl / .csv, and their clear errors."""

import json

import pytest

from scratchformer.tokenize import iter_documents, read_classification, read_sft, read_token_classification


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_txt_lines_and_paragraphs(tmp_path):
    p = _write(tmp_path / "a.txt", "first line\n\nsecond para, line 1\nline 2\n\n\n  \nlast\n")
    assert list(iter_documents(p)) == ["first line", "second para, line 1", "line 2", "last"]
    assert list(iter_documents(p, txt_split="paragraph")) == ["first line", "second para, line 1\nline 2", "last"]


def test_jsonl_and_csv_documents(tmp_path):
    j = _write(tmp_path / "a.jsonl", json.dumps({"body": "héllo"}) + "\n\n" + json.dumps({"body": "two\nlines"}) + "\n")
    assert list(iter_documents(j, text_field="body")) == ["héllo", "two\nlines"]
    c = _write(tmp_path / "a.csv", 'id,text\n1,"comma, inside"\n2,"multi\nline"\n')
    assert list(iter_documents(c)) == ["comma, inside", "multi\nline"]


def test_classification_labels(tmp_path):
    rows = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}, {"text": "meh", "label": "pos"}]
    j = _write(tmp_path / "c.jsonl", "\n".join(json.dumps(r) for r in rows))
    data = read_classification(j)
    assert data.label_names == ["neg", "pos"] and data.labels == [1, 0, 1] and data.texts == ["good", "bad", "meh"]
    data = read_classification(j, label_names=["pos", "neg"])
    assert data.labels == [0, 1, 0]
    assert data.examples()[1] == {"text": "bad", "label": 1}
    c = _write(tmp_path / "c.csv", "text,second,label\na,b,2\nc,d,0\n")
    data = read_classification(c, text_pair_field="second")
    assert data.labels == [2, 0] and data.label_names == ["0", "1", "2"] and data.text_pairs == ["b", "d"]


def test_token_classification_and_sft(tmp_path):
    rows = [{"tokens": ["Ada", "Lovelace", "wrote"], "ner_tags": ["B-PER", "I-PER", "O"]},
            {"tokens": ["in", "London"], "ner_tags": ["O", "B-LOC"]}]
    p = _write(tmp_path / "n.jsonl", "\n".join(json.dumps(r) for r in rows))
    data = read_token_classification(p)
    assert data.label_names == ["O", "B-LOC", "B-PER", "I-PER"]
    assert data.tags == [[2, 3, 0], [0, 1]] and data.words[1] == ["in", "London"]
    s = _write(tmp_path / "s.jsonl", json.dumps({"prompt": "Q: 2+2?", "response": " 4"}))
    assert read_sft(s) == [{"prompt": "Q: 2+2?", "response": " 4"}]


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_documents(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="unsupported file type '.parquet'"):
        list(iter_documents(_write(tmp_path / "x.parquet", "")))
    with pytest.raises(ValueError, match="empty"):
        list(iter_documents(_write(tmp_path / "e.txt", "\n \n")))
    with pytest.raises(ValueError, match="empty"):
        list(iter_documents(_write(tmp_path / "e.jsonl", "")))
    with pytest.raises(ValueError, match="empty"):
        read_classification(_write(tmp_path / "e.csv", "text,label\n"))
    bad = _write(tmp_path / "bad.jsonl", '{"text": "ok"}\n\n{"text": broken}\n')
    with pytest.raises(ValueError, match="invalid JSON on line 3"):
        list(iter_documents(bad))
    with pytest.raises(ValueError, match="line 2 is not a JSON object"):
        list(iter_documents(_write(tmp_path / "arr.jsonl", '{"text": "a"}\n[1, 2]\n')))
    missing = _write(tmp_path / "m.jsonl", '{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(ValueError, match=r"line 2 has no field 'text' \(fields: \['txt'\]\)"):
        list(iter_documents(missing))
    with pytest.raises(ValueError, match="has no field 'label'"):
        read_classification(_write(tmp_path / "nl.jsonl", '{"text": "a"}\n'))
    with pytest.raises(ValueError, match="line 2: label 'maybe' is not in the label set"):
        read_classification(_write(tmp_path / "l.jsonl", '{"text": "a", "label": "yes"}\n{"text": "b", "label": "maybe"}\n'),
                            label_names=["no", "yes"])
    with pytest.raises(ValueError, match="tag 'B-XYZ' is not in the label set"):
        read_token_classification(_write(tmp_path / "t.jsonl", '{"tokens": ["a"], "ner_tags": ["B-XYZ"]}\n'),
                                  label_names=["O", "B-PER"])
    with pytest.raises(ValueError, match="one tag per word"):
        read_token_classification(_write(tmp_path / "t2.jsonl", '{"tokens": ["a", "b"], "ner_tags": ["O"]}\n'))
    with pytest.raises(ValueError, match="txt_split must be"):
        list(iter_documents(_write(tmp_path / "ok.txt", "a"), txt_split="sentence"))


def test_lines_are_those_of_a_text_mode_file(tmp_path):
    """The binary line reader gives exactly the lines of open(encoding="utf-8"), for both newline modes, on
    random text with \\n, \\r\\n and lone \\r endings and multi-byte characters."""
    import random

    from scratchformer.tokenize.readers import _text_lines

    rng = random.Random()
    text = "".join(rng.choice(["a", "é", "日", " ", ",", "\n", "\r\n", "\r", "\u2028"]) for _ in range(5000))
    p = tmp_path / "mixed.txt"
    p.write_bytes(text.encode())
    for newline in (None, ""):
        with open(p, encoding="utf-8", newline=newline) as f:
            assert list(_text_lines(p, newline)) == list(f)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv"])
def test_non_utf8_file_is_named(tmp_path, suffix):
    """A Latin-1 byte in line 3 of any reader's file: an error naming the file and the line."""
    head = {".txt": "first\nsecond\n", ".jsonl": '{"text": "a"}\n{"text": "b"}\n', ".csv": "text\na\n"}[suffix]
    p = tmp_path / f"latin1{suffix}"
    p.write_bytes(head.encode() + "caf\xe9 noir\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"latin1\{suffix}: line 3 is not UTF-8 text"):
        list(iter_documents(p))


def test_csv_field_longer_than_the_csv_default_limit(tmp_path):
    import random
    import string

    rng = random.Random()
    # 200,000 characters with commas, quotes and newlines inside: over csv's default limit of 131072.
    long = "".join(rng.choice(string.ascii_letters + ' ,"\n') for _ in range(200_000))
    short = "".join(rng.choice(string.ascii_letters) for _ in range(50))
    quoted = '"' + long.replace('"', '""') + '"'
    c = _write(tmp_path / "long.csv", f"id,text\n1,{short}\n2,{quoted}\n3,{short}\n")
    assert list(iter_documents(c)) == [short, long, short]
    data = read_classification(_write(tmp_path / "long_cls.csv", f"text,label\n{quoted},a\n{short},b\n"))
    assert data.texts == [long, short] and data.labels == [0, 1]


def test_malformed_csv_names_file_and_line(tmp_path):
    c = _write(tmp_path / "bad.csv", 'id,text\n1,fine\n2,"closed"then more\n3,fine\n')
    with pytest.raises(ValueError, match=r"bad\.csv: line 3: ',' expected after '\"'$"):
        list(iter_documents(c))
    # An unclosed quote would otherwise swallow the rest of the file into one field.
    c = _write(tmp_path / "open.csv", 'id,text\n1,fine\n2,"never closed\n3,more\n4,text\n')
    with pytest.raises(ValueError, match=r"open\.csv: line 5: unexpected end of data "
                                         r"\(in the record that starts on line 3\)"):
        list(iter_documents(c))
    with pytest.raises(ValueError, match=r"open_sft\.csv: line 5"):
        read_sft(_write(tmp_path / "open_sft.csv", 'prompt,response\na,b\nc,"d\ne,f\n\n'))
