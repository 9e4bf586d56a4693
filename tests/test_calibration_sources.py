"""The typed calibration data options and where their sources are (no data set is read here)."""

from __future__ import annotations

import pytest

from quantport.calibration_sources import CalibrationData, CalibrationSource, FileFormat, LocalFiles, locate
from quantport.errors import CalibrationDataError


def test_source_defaults_and_validation():
    source = CalibrationSource("a.jsonl")
    assert (source.weight, source.split, source.text_field, source.messages_field) == (1.0, "train", None, None)
    for weight in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(CalibrationDataError, match="not a positive number"):
            CalibrationSource("a.jsonl", weight=weight)
    with pytest.raises(CalibrationDataError, match="not both"):
        CalibrationSource("a.jsonl", text_field="text", messages_field="messages")
    with pytest.raises(CalibrationDataError, match="needs a name"):
        CalibrationSource("")


def test_data_takes_one_or_more_sources():
    one = CalibrationSource("a.jsonl")
    assert CalibrationData(one).sources == (one,)
    assert CalibrationData([one, one]).sources == (one, one)
    with pytest.raises(CalibrationDataError, match="one or more"):
        CalibrationData(())
    with pytest.raises(CalibrationDataError, match="shuffle_buffer"):
        CalibrationData(one, shuffle_buffer=0)


def test_from_names_pairs_weights_in_order():
    data = CalibrationData.from_names(["a.jsonl", "b.parquet"], [0.7, 0.3], split="validation", text_field=None)
    assert [(s.name, s.weight, s.split) for s in data.sources] == [
        ("a.jsonl", 0.7, "validation"),
        ("b.parquet", 0.3, "validation"),
    ]
    with pytest.raises(CalibrationDataError, match="one weight per data set"):
        CalibrationData.from_names(["a.jsonl", "b.parquet"], [1.0])


@pytest.mark.parametrize(
    ("name", "kind"),
    [("x.jsonl", FileFormat.JSON), ("x.JSON", FileFormat.JSON), ("x.parquet", FileFormat.PARQUET)]
    + [("x.csv", FileFormat.CSV), ("x.txt", FileFormat.TEXT)],
)
def test_local_files_by_suffix(tmp_path, name, kind):
    (tmp_path / name).write_text("")
    assert locate(CalibrationSource(str(tmp_path / name))) == LocalFiles(kind, (tmp_path / name,))


def test_directory_sources(tmp_path):
    (tmp_path / "b.jsonl").write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.jsonl").write_text("")
    (tmp_path / "README.md").write_text("")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "c.jsonl").write_text("")
    found = locate(CalibrationSource(str(tmp_path)))
    assert found == LocalFiles(FileFormat.JSON, (tmp_path / "b.jsonl", tmp_path / "sub" / "a.jsonl"))
    (tmp_path / "c.parquet").write_text("")
    with pytest.raises(CalibrationDataError, match="mixes file kinds"):
        locate(CalibrationSource(str(tmp_path)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CalibrationDataError, match="a directory without"):
        locate(CalibrationSource(str(empty)))


def test_unknown_suffix_and_missing_paths(tmp_path):
    (tmp_path / "data.xlsx").write_text("")
    with pytest.raises(CalibrationDataError, match="unknown file type '.xlsx'"):
        locate(CalibrationSource(str(tmp_path / "data.xlsx")))
    for missing in (str(tmp_path / "nope"), "calib.jsonl", "./calib", "~/calib", r"C:\data\calib", "a b"):
        with pytest.raises(CalibrationDataError, match="does not exist"):
            locate(CalibrationSource(missing))


@pytest.mark.parametrize("name", ["allenai/c4", "wikitext", "HuggingFaceH4/ultrachat_200k", "org/name.v2"])
def test_hub_ids_are_not_local(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert locate(CalibrationSource(name)) is None
