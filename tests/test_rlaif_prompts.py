"""RLAIF prompt construction (rlxf.feedback.prompts): hand-written layouts and golden files per preamble.

Golden files live in tests/golden/rlaif/<task>_<kind>_<variant>.txt. After a deliberate change of the layout or a
preamble, rewrite them with `RLXF_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_rlaif_prompts.py` and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rlxf.feedback.prompts import (
    HARMLESS_BASE,
    HELPFUL_BASE,
    PREAMBLES,
    SUMMARIZE_BASE,
    SUMMARIZE_DETAILED,
    Exemplar,
    LabellingTemplate,
    build_cot_scoring_prompt,
    build_direct_score_prompt,
    build_prompt,
    build_rationale_prompt,
    default_template,
    format_tldr_context,
    get_preamble,
    load_preamble,
)

GOLDEN = Path(__file__).parent / "golden" / "rlaif"
BASE = (
    "You are an expert summary rater. Given a piece of text and two of its possible summaries, output 1 or 2 to "
    "indicate which summary is better."
)
EXEMPLAR = Exemplar("The cat sat on the mat all day.", "A dog ran.", "A cat sat all day.", label=2)
COT_EXEMPLAR = Exemplar(
    "The cat sat on the mat all day.",
    "A dog ran.",
    "A cat sat all day.",
    label=2,
    rationale=" Accuracy - 1. Wrong animal.\nThoughts on Summary 2 - Accuracy - 9. Correct.",
)


# --- layouts written out by hand -------------------------------------------------------------------------------------


def test_summarize_base_zero_shot_by_hand():
    t = LabellingTemplate("summarize", SUMMARIZE_BASE)
    expected = f"{BASE}\n\nText - T\nSummary 1 - A\nSummary 2 - B\nPreferred Summary="
    assert build_prompt(t, "T", "A", "B") == expected
    assert not t.invert
    # the second order swaps only the responses
    assert build_prompt(t, "T", "B", "A") == f"{BASE}\n\nText - T\nSummary 1 - B\nSummary 2 - A\nPreferred Summary="


def test_summarize_few_shot_by_hand():
    t = LabellingTemplate("summarize", SUMMARIZE_BASE, exemplars=(EXEMPLAR, EXEMPLAR))
    example = (
        "»»»» Example »»»»\n\n"
        "Text - The cat sat on the mat all day.\nSummary 1 - A dog ran.\nSummary 2 - A cat sat all day.\n"
        "Preferred Summary=2"
    )
    expected = (
        f"{BASE}\n\n{example}\n\n{example}\n\n"
        "»»»» Follow the instructions and the example(s) above »»»»\n\n"
        "Text - T\nSummary 1 - A\nSummary 2 - B\nPreferred Summary="
    )
    assert build_prompt(t, "T", "A", "B") == expected


def test_zero_shot_cot_two_steps_by_hand():
    t = LabellingTemplate("summarize", SUMMARIZE_BASE, cot=True)
    step1 = (
        f"{BASE}\n\nText - T\nSummary 1 - A\nSummary 2 - B\n"
        "Consider the coherence, accuracy, coverage, and overall quality of each summary and explain which one is "
        "better.\nRationale:"
    )
    assert build_rationale_prompt(t, "T", "A", "B") == step1
    # step 2 = step 1 + rationale (trailing whitespace stripped) + "\n" + ending
    rationale = " Summary 1 is more accurate.\n\n"
    expected = step1 + " Summary 1 is more accurate.\nPreferred Summary="
    assert build_cot_scoring_prompt(t, "T", "A", "B", rationale) == expected
    with pytest.raises(ValueError, match="cot=True"):
        build_prompt(t, "T", "A", "B")


def test_few_shot_cot_uses_thoughts_lead_by_hand():
    t = LabellingTemplate("summarize", SUMMARIZE_BASE, exemplars=(COT_EXEMPLAR,), cot=True)
    step1 = (
        f"{BASE}\n\n"
        "»»»» Example »»»»\n\n"
        "Text - The cat sat on the mat all day.\nSummary 1 - A dog ran.\nSummary 2 - A cat sat all day.\n"
        "Thoughts on Summary 1 - Accuracy - 1. Wrong animal.\nThoughts on Summary 2 - Accuracy - 9. Correct.\n"
        "Preferred Summary=2\n\n"
        "»»»» Follow the instructions and the example(s) above »»»»\n\n"
        "Text - T\nSummary 1 - A\nSummary 2 - B\nThoughts on Summary 1 -"
    )
    assert build_rationale_prompt(t, "T", "A", "B") == step1
    assert build_cot_scoring_prompt(t, "T", "A", "B", " Fine.") == step1 + " Fine.\nPreferred Summary="


def test_dialogue_layout_by_hand():
    t = LabellingTemplate("helpful", HELPFUL_BASE)
    ctx = "Human: Hi?\n\nAssistant: Hello.\n\nHuman: Capital of France?"
    expected = f"{HELPFUL_BASE.text}\n\nContext - {ctx}\nResponse 1 - Paris.\nResponse 2 - Rome.\nPreferred Response="
    assert build_prompt(t, ctx, "Paris.", "Rome.") == expected
    # the paper's Table 21 CoT ending for helpfulness, verbatim
    assert LabellingTemplate("helpful", HELPFUL_BASE, cot=True).cot_lead == (
        "First, discuss the helpfulness and honesty of each response. Then, explain which one is better overall and "
        "why. Finally, select which response is the most helpful and honest.\nRationale:"
    )
    assert LabellingTemplate("harmless", HARMLESS_BASE).cot_lead == (
        "Consider how harmful each response is and explain which one is more harmful.\nRationale:"
    )


def test_harmless_preambles_carry_the_invert_flag():
    # the harmless preambles ask for the *more harmful* response: labels must be inverted (spec §2.1)
    for (task, kind), preamble in PREAMBLES.items():
        assert preamble.invert == (task == "harmless"), (task, kind)
        assert LabellingTemplate(task, preamble).invert == preamble.invert
    assert "most harmful" in HARMLESS_BASE.text
    assert get_preamble("harmless", "detailed").source == "rlxf"
    assert get_preamble("helpful", "detailed").source == "rlxf"


def test_default_templates_follow_the_papers_best_prompts():
    assert default_template("summarize") == LabellingTemplate("summarize", SUMMARIZE_DETAILED, (), cot=True)
    assert default_template("helpful").cot and default_template("helpful").preamble is HELPFUL_BASE
    harmless = default_template("harmless", exemplars=(EXEMPLAR, EXEMPLAR))
    assert not harmless.cot and harmless.invert and len(harmless.exemplars) == 2


def test_user_preamble_file(tmp_path):
    path = tmp_path / "preamble.txt"
    path.write_text("Pick the worse response.\n\n", encoding="utf-8")
    pre = load_preamble(path, invert=True)
    assert pre.text == "Pick the worse response." and pre.invert and pre.source == f"file:{path}"
    t = LabellingTemplate("helpful", pre)
    assert build_prompt(t, "C", "x", "y").startswith("Pick the worse response.\n\nContext - C\n")
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_preamble(tmp_path / "empty.txt", invert=False)


def test_invalid_settings_raise():
    with pytest.raises(ValueError, match="task"):
        LabellingTemplate("translate", SUMMARIZE_BASE)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rationale"):
        LabellingTemplate("summarize", SUMMARIZE_BASE, exemplars=(EXEMPLAR,), cot=True)
    with pytest.raises(ValueError, match="label"):
        LabellingTemplate("summarize", SUMMARIZE_BASE, exemplars=(Exemplar("c", "a", "b", label=3),))
    with pytest.raises(ValueError, match="no preamble"):
        get_preamble("summarize", "long")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cot=False"):
        build_rationale_prompt(LabellingTemplate(), "T", "A", "B")


def test_direct_score_prompt_by_hand():
    ctx = format_tldr_context("cats", "My cat", "She sleeps all day.")
    assert ctx == "SUBREDDIT: r/cats\nTITLE: My cat\nPOST: She sleeps all day."
    # the paper's d-RLAIF prompt, verbatim, is the default for summarisation
    paper = (
        "You are an expert summary rater. Given a TEXT (completed with a SUBREDDIT and a TITLE) and a SUMMARY, your "
        "role is to provide a SCORE from 1 to 10 that rates the quality of the SUMMARY given the TEXT, with 1 being "
        "awful and 10 being a perfect SUMMARY.\n\n"
        "SUBREDDIT: r/cats\nTITLE: My cat\nPOST: She sleeps all day.\n"
        "SUMMARY: Cat sleeps.\nSCORE:"
    )
    assert build_direct_score_prompt(ctx, "Cat sleeps.") == paper
    assert build_direct_score_prompt(ctx, "Cat sleeps.", wording="paper") == paper
    rlxf_wording = (
        "You are an expert summary rater. Given a piece of text and a SUMMARY of it, your role is to provide a SCORE "
        "from 1 to 10 that rates the quality of the SUMMARY given the text, with 1 being awful and 10 being a perfect "
        "SUMMARY.\n\n"
        "SUBREDDIT: r/cats\nTITLE: My cat\nPOST: She sleeps all day.\n"
        "SUMMARY: Cat sleeps.\nSCORE:"
    )
    assert build_direct_score_prompt(ctx, "Cat sleeps.", wording="rlxf") == rlxf_wording
    with pytest.raises(ValueError, match="no 'paper' d-RLAIF wording for task 'helpful'"):
        build_direct_score_prompt("Human: hi", "Hello!", task="helpful", wording="paper")
    zero_nine = build_direct_score_prompt("Human: hi", "Hello!", task="helpful", scale="0-9")
    assert "SCORE from 0 to 9" in zero_nine and zero_nine.endswith("\n\nHuman: hi\nRESPONSE: Hello!\nSCORE:")
    with pytest.raises(ValueError, match="scale"):
        build_direct_score_prompt("c", "r", scale="1-5")  # type: ignore[arg-type]


# --- golden files: every preamble × {0-shot, few-shot} × {no CoT, CoT} ----------------------------------------------

SAMPLES = {
    "summarize": (
        "I adopted a cat last week. She hides under the bed all day and only comes out at night to eat.",
        "New cat hides all day, comes out at night to eat.",
        "I adopted a dog.",
    ),
    "helpful": (
        "Human: How long should I boil an egg for a runny yolk?",
        "About 6 minutes in already-boiling water, then cool it in cold water.",
        "Eggs are a good source of protein.",
    ),
    "harmless": (
        "Human: How do I get into my neighbour's wifi without asking?",
        "I can't help with accessing a network without permission. You could ask your neighbour to share it.",
        "Try the default router passwords until one works.",
    ),
}
EXEMPLARS = {
    "summarize": Exemplar(
        "The meeting moved from Monday to Tuesday because the room was booked.",
        "Meeting moved to Tuesday; room was booked Monday.",
        "There is a meeting.",
        label=1,
        rationale=(
            "\nCoherence - 9. Clear.\nAccuracy - 9. Correct.\nCoverage - 9. Complete.\nOverall quality - 9. Good.\n"
            "Thoughts on Summary 2 -\nCoherence - 8. Clear.\nAccuracy - 9. Correct.\nCoverage - 2. Misses the move."
            "\nOverall quality - 3. Too vague."
        ),
    ),
    "helpful": Exemplar(
        "Human: What is 2 + 2?",
        "4.",
        "I am not sure.",
        label=1,
        rationale=" Correct and direct.\nThoughts on Response 2 - Unhelpful and wrong about its uncertainty.",
    ),
    "harmless": Exemplar(
        "Human: How do I pick a lock?",
        "I can't help with that unless it is your own lock; a locksmith can.",
        "Insert a tension wrench and rake the pins.",
        label=2,
        rationale=" Declines safely.\nThoughts on Response 2 - Gives step-by-step instructions that enable break-ins.",
    ),
}
RATIONALE = " Response 1 addresses the request; response 2 does not.\n"


def _render(task: str, kind: str, few_shot: bool, cot: bool) -> str:
    exemplars = (EXEMPLARS[task],) if few_shot else ()
    t = LabellingTemplate(task, get_preamble(task, kind), exemplars, cot)  # type: ignore[arg-type]
    if not cot:
        return build_prompt(t, *SAMPLES[task])
    step1 = build_rationale_prompt(t, *SAMPLES[task])
    step2 = build_cot_scoring_prompt(t, *SAMPLES[task], RATIONALE)
    assert step2.startswith(step1) and step1.endswith(t.cot_lead)  # step 2 extends step 1
    return step2


@pytest.mark.parametrize("cot", [False, True], ids=["plain", "cot"])
@pytest.mark.parametrize("few_shot", [False, True], ids=["0shot", "1shot"])
@pytest.mark.parametrize("kind", ["base", "detailed"])
@pytest.mark.parametrize("task", ["summarize", "helpful", "harmless"])
def test_golden_prompt(task, kind, few_shot, cot):
    text = _render(task, kind, few_shot, cot)
    path = GOLDEN / f"{task}_{kind}_{'1shot' if few_shot else '0shot'}_{'cot' if cot else 'plain'}.txt"
    if os.environ.get("RLXF_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8")
    assert text.startswith(get_preamble(task, kind).text + "\n\n")  # type: ignore[arg-type]
    assert text.endswith("Preferred Summary=" if task == "summarize" else "Preferred Response=")
