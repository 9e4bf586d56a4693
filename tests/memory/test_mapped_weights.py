from __future__ import annotations

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from quantport.memory.mapped_weights import MappedWeights

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise release is Linux-only")


def _rss_file_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    raise AssertionError("no RssFile")


@pytest.fixture
def saved_model(tmp_path, tiny_model):
    model = tiny_model("llama", vocab_size=8192, hidden_size=256, intermediate_size=1024)
    model.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_released_weights_leave_memory_and_come_back_unchanged(saved_model):
    model = AutoModelForCausalLM.from_pretrained(saved_model, dtype="auto")
    mapped = MappedWeights()
    assert mapped.active
    ids = torch.randint(0, 8192, (1, 16))
    with torch.no_grad():
        before = model(ids).logits
    touched = _rss_file_kb()
    mapped.release_all()
    assert _rss_file_kb() < touched - 4000  # the ~11 MB of weights left the process
    hooks = mapped.release_after_forward(model)
    with torch.no_grad():
        after = model(ids).logits
    for hook in hooks:
        hook.remove()
    assert torch.equal(before, after)


def test_copies_and_modified_mappings_are_never_released(saved_model):
    model = AutoModelForCausalLM.from_pretrained(saved_model, dtype="auto")
    with torch.no_grad():
        model.model.norm.weight.mul_(2)  # a write makes the mapping dirty: it must not be touched again
    mapped = MappedWeights()
    ours = str((saved_model / "model.safetensors").resolve())
    assert all(region.path != ours for region in mapped.regions)  # other tests' mappings may be clean
    copy = torch.ones(1024)
    MappedWeights().release_tensor(copy)
    assert torch.equal(copy, torch.ones(1024))
