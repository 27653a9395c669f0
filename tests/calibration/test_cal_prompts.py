"""Prompt files: shipped sets, user files, deterministic selection, and calibration/held-out disjointness."""
import pytest

from k3trt.calibration import prompts as P
from k3trt.contract.errors import InvalidArgumentError


def test_shipped_sets_load_and_are_disjoint():
    calib, heldout = P.calibration_prompts(), P.heldout_prompts()
    assert len(calib) == 240 and len(heldout) == 24
    assert not set(calib.prompts) & set(heldout.prompts)
    assert any(any("а" <= ch <= "я" for ch in p.lower()) for p in calib.prompts)  # Russian prompts are kept


def test_selection_is_a_deterministic_prefix():
    a, b = P.calibration_prompts(count=5), P.calibration_prompts(count=12)
    assert a.prompts == b.prompts[:5] == P.calibration_prompts(count=5).prompts
    assert a.digest() != b.digest()


@pytest.mark.parametrize("count", [0, -1, 241, True])
def test_num_prompts_out_of_range_is_a_typed_error(count):
    with pytest.raises(InvalidArgumentError, match="1..240"):
        P.calibration_prompts(count=count)


def test_user_file_skips_blanks_comments_and_duplicates(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# header\n\n a fox  \nкот на окне\n# note\na fox\n", encoding="utf-8")
    chosen = P.calibration_prompts(path)
    assert chosen.prompts == ("a fox", "кот на окне")
    assert chosen.source == str(path)


@pytest.mark.parametrize("content", [None, "", "# only a comment\n\n   \n", b"\xff\xfe bad bytes"])
def test_missing_empty_or_undecodable_file_names_the_file(tmp_path, content):
    path = tmp_path / "prompts.txt"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(InvalidArgumentError) as err:
        P.calibration_prompts(path)
    assert str(path) in str(err.value) and err.value.fix


def test_calibrating_on_a_heldout_prompt_is_refused(tmp_path):
    heldout = P.heldout_prompts()
    path = tmp_path / "leaky.txt"
    path.write_text(f"a fox\n{heldout.prompts[3].upper()}\n", encoding="utf-8")  # case/space-insensitive
    with pytest.raises(InvalidArgumentError, match="held-out"):
        P.calibration_prompts(path)


def test_heldout_count_out_of_range_names_its_flag():
    assert len(P.heldout_prompts(24)) == 24
    with pytest.raises(InvalidArgumentError, match="--heldout-prompts 25"):
        P.heldout_prompts(25)
