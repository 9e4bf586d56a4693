"""Calibration on data sets: local files only (the Hub is switched off), a tiny tokenizer built here."""

from __future__ import annotations

import json
import random

import pytest
import torch

pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from transformers import PreTrainedTokenizerFast  # noqa: E402

import quantport.calibrate.mixing as mixing  # noqa: E402
from quantport.calibrate.documents import RowField, RowKind, document_ids  # noqa: E402
from quantport.calibrate.mixing import dataset_batches, samples_per_source  # noqa: E402
from quantport.calibration_sources import CalibrationData, CalibrationSource  # noqa: E402
from quantport.errors import CalibrationDataError  # noqa: E402

WORDS = ["alpha", "beta", "gamma", "delta", "one", "two", "three", "four", "five", "six", "seven", "eight"]
WORDS += ["nine", "ten", "hello", "world", "how", "are", "you", "fine"]
SPECIALS = ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test here may reach the Hub."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def make_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """A word-level tokenizer that puts a BOS in front of every text, as Llama's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(["<unk>", *SPECIALS, *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens(SPECIALS)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def text_rows(n, words=("one", "two", "three", "four", "five"), seed=0):
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 9))), "id": i} for i in range(n)]


def chats(n):
    return [
        {
            "messages": [
                {"role": "user", "content": f"hello {WORDS[i % 10]} how are you"},
                {"role": "assistant", "content": f"fine {WORDS[(i + 3) % 10]} world"},
            ]
        }
        for i in range(n)
    ]


def sequences(batches):
    return torch.cat(batches).tolist()


def chunks(ids, seq_len, count):
    return [ids[i * seq_len : (i + 1) * seq_len] for i in range(count)]


def in_order(path, **options):
    """Calibration data read in file order (a shuffle buffer of one row)."""
    return CalibrationData((CalibrationSource(str(path), **options),), shuffle_buffer=1)


def test_jsonl_text_rows_are_packed_with_bos_and_eos(tokenizer, tmp_path):
    rows = text_rows(200)
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    got = dataset_batches(tokenizer, in_order(path), samples=6, seq_len=16, batch_size=4)
    assert [tuple(b.shape) for b in got] == [(4, 16), (2, 16)] and got[0].dtype == torch.long
    stream = []
    for row in rows:  # an independent expectation: the tokenizer's own ids per row, BOS ... EOS
        stream += tokenizer(row["text"])["input_ids"] + [tokenizer.eos_token_id]
    assert stream[0] == tokenizer.bos_token_id
    assert sorted(sequences(got)) == sorted(chunks(stream, 16, 6))


def test_parquet_rows(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = text_rows(100, seed=1)
    path = tmp_path / "b.parquet"
    pq.write_table(pa.table({"body": [r["text"] for r in rows]}), path, row_group_size=10)
    got = dataset_batches(tokenizer, in_order(path, text_field="body"), samples=3, seq_len=20, batch_size=8)
    stream = [i for r in rows for i in tokenizer(r["text"])["input_ids"] + [tokenizer.eos_token_id]]
    assert sorted(sequences(got)) == sorted(chunks(stream, 20, 3))


def test_text_file_lines_are_rows_and_blank_lines_are_skipped(tokenizer, tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("one two three\n\nfour five\n   \nsix seven eight nine\n" * 5)
    got = dataset_batches(tokenizer, in_order(path), samples=2, seq_len=10)
    line_ids = [
        tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]
        for t in ("one two three", "four five", "six seven eight nine")
    ]
    stream = [i for _ in range(5) for ids in line_ids for i in ids]
    assert sorted(sequences(got)) == sorted(chunks(stream, 10, 2))


def test_directory_of_jsonl_files(tokenizer, tmp_path):
    write_jsonl(tmp_path / "part-0.jsonl", text_rows(20, words=("one",)))
    write_jsonl(tmp_path / "part-1.jsonl", text_rows(20, words=("two",)))
    got = dataset_batches(tokenizer, CalibrationData((CalibrationSource(str(tmp_path)),)), samples=4, seq_len=64)
    words = {tokenizer.convert_ids_to_tokens(i) for i in torch.cat(got).flatten().tolist()}
    assert words <= {"<s>", "</s>", "one", "two"} and len(words & {"one", "two"}) >= 1


def test_chat_row_ids_equal_apply_chat_template(tokenizer):
    conversation = chats(1)[0]["messages"]
    expected = tokenizer.apply_chat_template(conversation, tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    ids = document_ids(tokenizer, {"messages": conversation}, RowField(RowKind.MESSAGES, "messages"), "row")
    assert ids == list(expected)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    # what a careless tokenization of the rendered text gives: two BOS in front
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert tokenizer(rendered)["input_ids"][:2] == [tokenizer.bos_token_id] * 2


def test_chat_messages_are_detected_and_rendered_with_the_template(tokenizer, tmp_path):
    rows = chats(30)
    path = write_jsonl(tmp_path / "chats.jsonl", [{**r, "text": "ignored"} for r in rows])
    got = dataset_batches(tokenizer, in_order(path), samples=4, seq_len=24)
    stream = []
    for row in rows:
        templated = tokenizer.apply_chat_template(row["messages"], tokenize=True)
        stream += list(templated["input_ids"] if hasattr(templated, "keys") else templated)
    assert sorted(sequences(got)) == sorted(chunks(stream, 24, 4))
    assert tokenizer.convert_tokens_to_ids("<|assistant|>") in torch.cat(got).flatten().tolist()


def test_an_explicit_text_field_wins_over_messages(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "both.jsonl", [{**r, "text": "one two"} for r in chats(40)])
    got = dataset_batches(tokenizer, in_order(path, text_field="text"), samples=1, seq_len=8)
    one_two = tokenizer.convert_tokens_to_ids(["<s>", "one", "two", "</s>"])
    assert torch.cat(got).flatten().tolist() == one_two * 2


def test_mixing_weights_give_each_source_its_share(tokenizer, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", text_rows(300, words=("alpha",)))
    b = write_jsonl(tmp_path / "b.jsonl", text_rows(300, words=("beta",)))
    data = CalibrationData((CalibrationSource(str(a), weight=0.7), CalibrationSource(str(b), weight=0.3)))
    got = sequences(dataset_batches(tokenizer, data, samples=10, seq_len=12, batch_size=3))
    alpha, beta = tokenizer.convert_tokens_to_ids(["alpha", "beta"])
    assert len(got) == 10
    assert sum(alpha in s and beta not in s for s in got) == 7
    assert sum(beta in s and alpha not in s for s in got) == 3
    assert [alpha in s for s in got] != sorted([alpha in s for s in got], reverse=True)  # the sources interleave


@pytest.mark.parametrize(
    ("weights", "samples", "expected"),
    [
        ([0.7, 0.3], 10, [7, 3]),
        ([7, 3], 10, [7, 3]),
        ([1, 1, 1], 4, [2, 1, 1]),
        ([1, 1, 1], 3, [1, 1, 1]),
        ([0.5, 0.5], 1, [1, 0]),
        ([0.1, 0.2, 0.7], 64, [6, 13, 45]),
        ([1], 5, [5]),
    ],
)
def test_samples_per_source(weights, samples, expected):
    assert samples_per_source(weights, samples) == expected


def test_the_seed_decides_the_data(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", text_rows(500))
    source = CalibrationSource(str(path))

    def run(seed):
        return sequences(dataset_batches(tokenizer, CalibrationData((source,), seed=seed), samples=8, seq_len=16))

    first, again, other = run(0), run(0), run(1)
    assert first == again
    assert first != other
    assert first != sequences(dataset_batches(tokenizer, in_order(path), samples=8, seq_len=16))


def test_a_large_file_is_read_only_as_far_as_calibration_needs(tokenizer, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "big.jsonl", text_rows(100_000))
    read = []
    real_open_rows = mixing.open_rows

    def counting(*args, **kwargs):
        for row in real_open_rows(*args, **kwargs):
            read.append(row["id"])
            yield row

    monkeypatch.setattr(mixing, "open_rows", counting)
    data = CalibrationData((CalibrationSource(str(path)),), shuffle_buffer=64)
    got = dataset_batches(tokenizer, data, samples=4, seq_len=32)
    assert sum(b.shape[0] for b in got) == 4
    assert 64 < len(read) < 64 + 4 * 32, f"{len(read)} of 100000 rows read for 128 tokens"
    assert read == list(range(len(read)))  # in file order; the shuffle happens in the buffer


def test_missing_field_names_the_fields_there_are(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"content": "one two", "id": 1}] * 5)
    with pytest.raises(CalibrationDataError, match=r"no field 'text' \(its fields: content, id\).*--calib-text-field"):
        dataset_batches(tokenizer, in_order(path), samples=1, seq_len=4)


def test_empty_dataset(tokenizer, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(CalibrationDataError, match="empty"):
        dataset_batches(tokenizer, in_order(path), samples=1, seq_len=4)


def test_too_small_dataset_says_how_many_tokens_it_had(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "small.jsonl", [{"text": "one two three"}] * 3)  # 5 tokens a row
    with pytest.raises(CalibrationDataError, match=r"has 15 tokens in 3 rows, fewer than the 64"):
        dataset_batches(tokenizer, in_order(path), samples=2, seq_len=32)


def test_chats_need_a_chat_template(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", chats(3))
    with pytest.raises(CalibrationDataError, match="has no chat template"):
        dataset_batches(make_tokenizer(chat_template=None), in_order(path), samples=1, seq_len=4)


def test_malformed_messages_and_json(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": "hello"}])
    with pytest.raises(CalibrationDataError, match="not a list of"):
        dataset_batches(tokenizer, in_order(path), samples=1, seq_len=4)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "one"}\n{"text": \n')
    with pytest.raises(CalibrationDataError, match="cannot be read"):
        dataset_batches(tokenizer, in_order(broken), samples=1, seq_len=64)


def test_missing_file_and_unreachable_hub_id(tokenizer, tmp_path):
    with pytest.raises(CalibrationDataError, match="does not exist"):
        dataset_batches(tokenizer, in_order(tmp_path / "nope.jsonl"), samples=1, seq_len=4)
    hub = CalibrationData((CalibrationSource("quantport-test/no-such-dataset"),))
    with pytest.raises(CalibrationDataError, match="could not be loaded from the Hugging Face Hub"):
        dataset_batches(tokenizer, hub, samples=1, seq_len=4)


def test_missing_datasets_library_names_the_install_command(tokenizer, tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real_find_spec(name, *a)
    )
    path = write_jsonl(tmp_path / "a.jsonl", text_rows(10))
    with pytest.raises(CalibrationDataError, match=r"pip install 'quantport\[datasets\]'"):
        dataset_batches(tokenizer, in_order(path), samples=1, seq_len=4)


def test_quantize_takes_calibration_data(tiny_model, tokenizer, tmp_path):
    import quantport
    from quantport.state import state_of

    data = CalibrationData(CalibrationSource(str(write_jsonl(tmp_path / "chats.jsonl", chats(40)))))
    options = {"calib_samples": 3, "calib_seq_len": 16, "batch_size": 2, "progress": False}
    model = quantport.quantize(tiny_model("llama"), "fp8", data, tokenizer=tokenizer, **options)
    assert state_of(model).calibration_tokens == 3 * 16
