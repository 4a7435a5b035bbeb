"""bench/data/smollm2_rq5.tar.xz, the data `bash bench/real_quality.sh data` wrote on the GPU machine
(SmolLM2-135M-Instruct answering its own questions and the project's training prompts), shipped so a
device call can `unpack` it instead of regenerating: it must keep the held-out split out of training
and leave cut-off answers marked, or every figure measured on it is wrong."""
import json
import os
import tarfile

import pytest

pytestmark = pytest.mark.unit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _user_turns(rows):
    return {turn["content"].strip() for row in rows for turn in row["conversations"] if turn["role"] == "user"}


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory):
    work = tmp_path_factory.mktemp("rq5")
    with tarfile.open(os.path.join(ROOT, "bench", "data", "smollm2_rq5.tar.xz"), "r:xz") as archive:
        archive.extractall(work, filter="data")
    read = lambda name: [json.loads(line) for line in open(work / name)]  # noqa: E731
    return read("train.jsonl"), read("heldout.jsonl"), read("prompts/heldout.jsonl")


def test_held_out_prompts_never_appear_in_training(unpacked):
    train, heldout, split = unpacked
    held = _user_turns(split)
    assert len(held) >= 150
    assert _user_turns(heldout) == held  # the answered held-out file holds exactly the split's prompts
    assert not held & _user_turns(train)


def test_every_answer_records_how_it_ended(unpacked):
    train, _, _ = unpacked
    finishes = [f for row in train for f in row["regenerated"]["finish"]]
    answers = sum(1 for row in train for turn in row["conversations"] if turn["role"] == "assistant")
    assert len(finishes) == answers
    assert set(finishes) <= {"stop", "length"}
    assert 0 < finishes.count("length") < len(finishes)  # answers at the 320-token limit stay marked
