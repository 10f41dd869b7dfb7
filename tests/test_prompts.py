"""Prompt sources: jsonl, parquet and dataset directories; bad rows fail naming file, line and field."""

from __future__ import annotations

import json

import pytest

from vapo_pl.prompts import DataError, load_prompts


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_rows_and_answer_after(tmp_path):
    f = _write_jsonl(tmp_path / "gsm.jsonl", [{"question": "1+1?", "answer": "so 2\n#### 2", "idx": 7}])
    (rec,) = load_prompts(str(f), prompt_key="question", answer_key="answer", answer_after="####")
    assert rec.prompt == "1+1?" and rec.answer == "2" and rec.extra == {"idx": 7}
    assert rec.source == f"{f}:1"


def test_missing_prompt_field_names_file_line_and_field(tmp_path):
    f = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "1"}, {"problem": "b", "answer": "2"}])
    with pytest.raises(DataError) as e:
        load_prompts(str(f))
    msg = str(e.value)
    assert f"{f}:2" in msg and "'prompt'" in msg and "\n" not in msg


def test_missing_answer_field_names_file_line_and_field(tmp_path):
    f = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "3"},
                                            {"prompt": "c"}])
    with pytest.raises(DataError, match=r"d\.jsonl:3: missing or empty field 'answer'"):
        load_prompts(str(f))


def test_unlabeled_data_allowed_without_answer_key(tmp_path):
    f = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a"}])
    assert load_prompts(str(f), answer_key=None)[0].answer is None


def test_empty_dataset_one_line(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n")
    with pytest.raises(DataError) as e:
        load_prompts(str(f))
    assert "no prompts" in str(e.value) and "\n" not in str(e.value)


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_prompts(str(tmp_path / "nope.jsonl"))
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        load_prompts(str(f))


def test_parquet_and_dataset_dir(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"problem": "p1", "sol": "4"}, {"problem": "p2", "sol": "5"}])
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "dsdir"))
    for src in (tmp_path / "d.parquet", tmp_path / "dsdir"):
        recs = load_prompts(str(src), prompt_key="problem", answer_key="sol")
        assert [(r.prompt, r.answer) for r in recs] == [("p1", "4"), ("p2", "5")]
    bad = datasets.Dataset.from_list([{"problem": "p1", "sol": "4"}, {"problem": "", "sol": "5"}])
    bad.to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=r"bad\.parquet\[1\]: missing or empty field 'problem'"):
        load_prompts(str(tmp_path / "bad.parquet"), prompt_key="problem", answer_key="sol")
