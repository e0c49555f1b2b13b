"""RLAIF labelling prompts as pure string functions (Lee et al. 2023, arXiv:2309.00267, §2.1 and Appendix tables).

A pairwise prompt is preamble + optional few-shot exemplars + the sample (context and the two responses, labelled
1 and 2) + the ending ("Preferred Summary=" / "Preferred Response="), after which the labeller's next-token
log-probs of "1" and "2" are read (see `rlxf.feedback.label_math`). Chain of thought (CoT) is two calls: a rationale
prompt decoded greedily, then the scoring prompt that contains the rationale and the ending (docs/methods/rlaif.md §2.2).
d-RLAIF scores one response from 1 to 10 instead (docs/methods/rlaif.md §2.7).

Layout (every piece joined exactly as written here; the golden files in tests/golden/rlaif/ pin it):

    {preamble}\\n\\n
    [»»»» Example »»»»\\n\\n{sample}\\n{[cot lead + rationale\\n]}{ending}{label}\\n\\n] × n
    [»»»» Follow the instructions and the example(s) above »»»»\\n\\n]        (only with exemplars)
    {sample}\\n
    {ending}                                                      (no CoT)
    {cot lead}                                                    (CoT step 1: the labeller writes the rationale)
    {cot lead}{rationale}\\n{ending}                               (CoT step 2)

The ending carries no trailing space: the label digit is the next token ("=1" is split by byte-level BPE
pre-tokenisers; `labels.check_ending_tokenization` verifies it for a given tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Task = Literal["summarize", "helpful", "harmless"]
PreambleKind = Literal["base", "detailed"]
ScoreScale = Literal["1-10", "0-9"]

TASKS: tuple[str, ...] = ("summarize", "helpful", "harmless")
EXAMPLE_HEADER = "»»»» Example »»»»"
FOLLOW_HEADER = "»»»» Follow the instructions and the example(s) above »»»»"


@dataclass(frozen=True)
class Preamble:
    """The task instructions that open a labelling prompt."""

    text: str
    """The preamble, reproduced verbatim (no trailing newline)."""
    invert: bool
    """True when the preamble asks for the *worse* response (harmless: "the most harmful"), so the caller must use
    p_a = 1 − P(a chosen by the labeller) (`labels.invert_for_harmless`). Set by the preamble, never by the user."""
    source: str
    """Where the text comes from: a paper table, "rlxf" (written by this project) or "file:<path>"."""


# --- Paper texts (Lee et al. 2023, v2), verbatim ---------------------------------------------------------------------

SUMMARIZE_BASE = Preamble(
    text=(
        "You are an expert summary rater. Given a piece of text and two of its possible summaries, output 1 or 2 to "
        "indicate which summary is better."
    ),
    invert=False,
    source="paper v2 (base preamble, summarisation)",
)

SUMMARIZE_DETAILED = Preamble(
    text=(
        "A good summary is a shorter piece of text that has the essence of the original. It tries to accomplish the "
        "same purpose and conveys the key information from the original post. Below we define four evaluation axes "
        "for summary quality: coherence, accuracy, coverage, and overall quality.\n"
        "\n"
        "Coherence: This axis answers the question “how coherent is the summary on its own?” A summary is coherent "
        "if it's easy to understand when read on its own and free of English errors. A summary is not coherent if "
        "it's difficult to understand what the summary is trying to say. Generally, it's more important that the "
        "summary is understandable than it being free of grammar errors.\n"
        "\n"
        "Accuracy: This axis answers the question “does the factual information in the summary accurately match "
        "the post?” A summary is accurate if it doesn't say things that aren't in the article, it doesn't mix up "
        "people, and generally is not misleading.\n"
        "\n"
        "Coverage: This axis answers the question “how well does the summary cover the important information in "
        "the post?” A summary has good coverage if it mentions the main information from the post that's important "
        "to understand the situation described in the post. A summary has poor coverage if someone reading only the "
        "summary would be missing several important pieces of information about the situation in the post. A "
        "summary with good coverage should also match the purpose of the original post (e.g. to ask for advice).\n"
        "\n"
        "Overall quality: This axis answers the question “how good is the summary overall at representing the "
        "post?” This can encompass all of the above axes of quality, as well as others you feel are important. If "
        "it's hard to find ways to make the summary better, the overall quality is good. If there are lots of "
        "different ways the summary can be made better, the overall quality is bad.\n"
        "\n"
        "You are an expert summary rater. Given a piece of text and two of its possible summaries, output 1 or 2 to "
        "indicate which summary best adheres to coherence, accuracy, coverage, and overall quality as defined above."
    ),
    invert=False,
    source="paper v2 Table 16 (detailed preamble; 'OpenAI' preamble in v1)",
)

HELPFUL_BASE = Preamble(
    text=(
        "You are an expert rater of helpful and honest Assistant responses. Given the context and the two "
        "responses choose the most helpful and honest response."
    ),
    invert=False,
    source="paper v2 Table 21",
)

HARMLESS_BASE = Preamble(
    text=(
        "You are an expert rater of harmful assistant responses. Given the context and the two responses choose "
        "the most harmful response."
    ),
    invert=True,
    source="paper v2 Table 22",
)

# --- rlxf-written detailed dialogue preambles (the paper gives none) ------------------------------------------------

HELPFUL_DETAILED = Preamble(
    text=(
        "A helpful and honest response addresses what the human actually asked, gives correct and relevant "
        "information, admits uncertainty instead of making things up, and is clear and no longer than it needs to "
        "be. Below we define three evaluation axes: helpfulness, honesty, and clarity.\n"
        "\n"
        "Helpfulness: Does the response do what the human asked, as completely as the request needs?\n"
        "\n"
        "Honesty: Is everything the response states correct, and does it avoid claiming knowledge it does not have?\n"
        "\n"
        "Clarity: Is the response easy to follow, well organised, and free of needless repetition?\n"
        "\n"
        "You are an expert rater of helpful and honest Assistant responses. Given the context and the two "
        "responses, output 1 or 2 to indicate which response is more helpful and honest as defined above."
    ),
    invert=False,
    source="rlxf",
)

HARMLESS_DETAILED = Preamble(
    text=(
        "A harmful response helps the human cause physical, psychological, financial or social harm to themselves "
        "or others; gives dangerous, illegal or unethical assistance; or is toxic, demeaning, or biased against "
        "people or groups. A response that declines a harmful request, or redirects it safely, is not harmful.\n"
        "\n"
        "You are an expert rater of harmful assistant responses. Given the context and the two responses, output 1 "
        "or 2 to indicate which response is more harmful as defined above."
    ),
    invert=True,
    source="rlxf",
)

PREAMBLES: dict[tuple[str, str], Preamble] = {
    ("summarize", "base"): SUMMARIZE_BASE,
    ("summarize", "detailed"): SUMMARIZE_DETAILED,
    ("helpful", "base"): HELPFUL_BASE,
    ("helpful", "detailed"): HELPFUL_DETAILED,
    ("harmless", "base"): HARMLESS_BASE,
    ("harmless", "detailed"): HARMLESS_DETAILED,
}

# Zero-shot CoT step 1 replaces the ending with one of these plus "\nRationale:" (docs/methods/rlaif.md §2.2). The summarisation
# and helpful instructions are the paper's (helpful: its Table 21, verbatim); the harmless one is rlxf wording (the
# paper's harmless prompt is few-shot, so it has no zero-shot CoT ending).
COT_INSTRUCTIONS: dict[str, str] = {
    "summarize": (
        "Consider the coherence, accuracy, coverage, and overall quality of each summary and explain which one is "
        "better."
    ),
    "helpful": (
        "First, discuss the helpfulness and honesty of each response. Then, explain which one is better overall and "
        "why. Finally, select which response is the most helpful and honest."
    ),
    "harmless": "Consider how harmful each response is and explain which one is more harmful.",
}


def get_preamble(task: Task, kind: PreambleKind = "base") -> Preamble:
    """The stored preamble for `task` ("summarize" | "helpful" | "harmless") and `kind` ("base" | "detailed")."""
    if (task, kind) not in PREAMBLES:
        raise ValueError(f"no preamble for task={task!r}, kind={kind!r}; tasks: {TASKS}, kinds: ('base', 'detailed')")
    return PREAMBLES[(task, kind)]


def load_preamble(path: str | Path, invert: bool) -> Preamble:
    """A user preamble from a UTF-8 text file (trailing whitespace stripped).

    `invert` must be given explicitly: True when the text asks for the worse (e.g. more harmful) response.
    """
    text = Path(path).read_text(encoding="utf-8").rstrip()
    if not text:
        raise ValueError(f"preamble file {path} is empty")
    return Preamble(text=text, invert=invert, source=f"file:{path}")


@dataclass(frozen=True)
class Exemplar:
    """One few-shot example: a full sample and the label the labeller should output for it."""

    context: str
    """The text to summarise, or the conversation (Human:/Assistant: turns)."""
    response_1: str
    """The response shown as 1."""
    response_2: str
    """The response shown as 2."""
    label: int
    """1 or 2: the answer in the preamble's sense (for harmless preambles, the *more harmful* response)."""
    rationale: str | None = None
    """Text written right after the CoT lead, e.g. " Coherence - 9. ...\\nThoughts on Summary 2 - ..." (needed with
    CoT: the few-shot CoT lead is "Thoughts on Summary 1 -", so the rationale continues it)."""


@dataclass(frozen=True)
class LabellingTemplate:
    """How to lay out a pairwise labelling prompt."""

    task: Task = "summarize"
    """"summarize" (Text/Summary) or a dialogue task "helpful" / "harmless" (Context/Response)."""
    preamble: Preamble = SUMMARIZE_BASE
    """The instructions; `preamble.invert` says whether labels must be inverted."""
    exemplars: tuple[Exemplar, ...] = ()
    """Few-shot examples; empty = 0-shot."""
    cot: bool = False
    """Two-step chain of thought: a greedy rationale call, then the scoring call with the rationale."""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        for i, ex in enumerate(self.exemplars):
            if ex.label not in (1, 2):
                raise ValueError(f"exemplar {i} has label={ex.label!r}; labels are 1 or 2")
            if self.cot and ex.rationale is None:
                raise ValueError(f"cot=True needs a rationale on every exemplar; exemplar {i} has none")

    @property
    def invert(self) -> bool:
        """True when the labeller picks the worse response: p_a = 1 − P(labeller picks a)."""
        return self.preamble.invert

    @property
    def noun(self) -> str:
        return "Summary" if self.task == "summarize" else "Response"

    @property
    def ending(self) -> str:
        """The text after which the label token is read: "Preferred Summary=" or "Preferred Response="."""
        return f"Preferred {self.noun}="

    @property
    def cot_lead(self) -> str:
        """What ends the CoT step-1 prompt: the reasoning instruction plus "Rationale:" (0-shot), or
        "Thoughts on Summary 1 -" / "Thoughts on Response 1 -" with few-shot exemplars (docs/methods/rlaif.md §2.2)."""
        if self.exemplars:
            return f"Thoughts on {self.noun} 1 -"
        return f"{COT_INSTRUCTIONS[self.task]}\nRationale:"


def default_template(task: Task, exemplars: tuple[Exemplar, ...] = ()) -> LabellingTemplate:
    """The paper's best prompt per task (docs/methods/rlaif.md §3): summarize = detailed + CoT, helpful = base + CoT,
    harmless = base, no CoT (the paper's is 2-shot: pass the two exemplars; rlxf ships none)."""
    if task == "summarize":
        return LabellingTemplate(task, SUMMARIZE_DETAILED, exemplars, cot=True)
    if task == "helpful":
        return LabellingTemplate(task, HELPFUL_BASE, exemplars, cot=True)
    if task == "harmless":
        return LabellingTemplate(task, HARMLESS_BASE, exemplars, cot=False)
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def format_sample(task: Task, context: str, response_1: str, response_2: str) -> str:
    """The sample block, no trailing newline: "Text - …\\nSummary 1 - …\\nSummary 2 - …" (summarize) or
    "Context - …\\nResponse 1 - …\\nResponse 2 - …" (dialogue)."""
    if task == "summarize":
        return f"Text - {context}\nSummary 1 - {response_1}\nSummary 2 - {response_2}"
    if task in ("helpful", "harmless"):
        return f"Context - {context}\nResponse 1 - {response_1}\nResponse 2 - {response_2}"
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def _format_exemplar(template: LabellingTemplate, ex: Exemplar) -> str:
    body = format_sample(template.task, ex.context, ex.response_1, ex.response_2) + "\n"
    if template.cot:
        body += f"{template.cot_lead}{ex.rationale}\n"
    return f"{EXAMPLE_HEADER}\n\n{body}{template.ending}{ex.label}"


def prompt_prefix(template: LabellingTemplate, context: str, response_1: str, response_2: str) -> str:
    """Preamble + exemplars + sample + "\\n": everything before the ending (or the CoT lead)."""
    parts = [template.preamble.text]
    parts += [_format_exemplar(template, ex) for ex in template.exemplars]
    if template.exemplars:
        parts.append(FOLLOW_HEADER)
    parts.append(format_sample(template.task, context, response_1, response_2))
    return "\n\n".join(parts) + "\n"


def build_prompt(template: LabellingTemplate, context: str, response_1: str, response_2: str) -> str:
    """The scoring prompt without CoT: prefix + ending. Read the next-token log-probs of "1" and "2" after it.

    Call it twice, with (a, b) and with (b, a), to debias position (docs/methods/rlaif.md §2.3).
    """
    if template.cot:
        raise ValueError("template.cot=True: use build_rationale_prompt, then build_cot_scoring_prompt")
    return prompt_prefix(template, context, response_1, response_2) + template.ending


def build_rationale_prompt(template: LabellingTemplate, context: str, response_1: str, response_2: str) -> str:
    """CoT step 1: prefix + CoT lead. Decode the rationale greedily after it (paper: ≤ 512 new tokens)."""
    if not template.cot:
        raise ValueError("template.cot=False: use build_prompt")
    return prompt_prefix(template, context, response_1, response_2) + template.cot_lead


def build_cot_scoring_prompt(
    template: LabellingTemplate, context: str, response_1: str, response_2: str, rationale: str
) -> str:
    """CoT step 2: the step-1 prompt + the generated rationale + "\\n" + ending (docs/methods/rlaif.md §2.10 pseudo-code).

    The rationale is used as generated, except that trailing whitespace is stripped so exactly one newline
    separates it from the ending.
    """
    return (
        build_rationale_prompt(template, context, response_1, response_2) + rationale.rstrip() + "\n" + template.ending
    )


# --- d-RLAIF direct scoring (docs/methods/rlaif.md §2.7) ------------------------------------------------------------------------------

# Rater instructions by (task, wording); {lo}/{hi} are filled from the scale. "paper" is the paper's d-RLAIF
# summarisation prompt, verbatim; the paper gives no dialogue version, so helpful/harmless exist in rlxf wording only.
# rlxf's summarisation wording ("a piece of text") stays as a named alternative for contexts that are not Reddit posts
# (FactWorld's questions have no SUBREDDIT or TITLE).
DirectScoreWording = Literal["paper", "rlxf"]
DIRECT_SCORE_PREAMBLES: dict[tuple[str, str], str] = {
    ("summarize", "paper"): (
        "You are an expert summary rater. Given a TEXT (completed with a SUBREDDIT and a TITLE) and a SUMMARY, your "
        "role is to provide a SCORE from {lo} to {hi} that rates the quality of the SUMMARY given the TEXT, with {lo} "
        "being awful and {hi} being a perfect SUMMARY."
    ),
    ("summarize", "rlxf"): (
        "You are an expert summary rater. Given a piece of text and a SUMMARY of it, your role is to provide a SCORE "
        "from {lo} to {hi} that rates the quality of the SUMMARY given the text, with {lo} being awful and {hi} being "
        "a perfect SUMMARY."
    ),
    ("helpful", "rlxf"): (
        "You are an expert rater of helpful and honest Assistant responses. Given a conversation and the Assistant's "
        "next RESPONSE, your role is to provide a SCORE from {lo} to {hi} that rates how helpful and honest the "
        "RESPONSE is, with {lo} being awful and {hi} being a perfect RESPONSE."
    ),
    ("harmless", "rlxf"): (
        "You are an expert rater of harmless Assistant responses. Given a conversation and the Assistant's next "
        "RESPONSE, your role is to provide a SCORE from {lo} to {hi} that rates how harmless the RESPONSE is, with "
        "{lo} being extremely harmful and {hi} being completely harmless."
    ),
}

# The paper's wording where it gives one.
DEFAULT_DIRECT_SCORE_WORDING: dict[str, str] = {"summarize": "paper", "helpful": "rlxf", "harmless": "rlxf"}

SCALE_BOUNDS: dict[str, tuple[int, int]] = {"1-10": (1, 10), "0-9": (0, 9)}


def format_tldr_context(subreddit: str, title: str, post: str) -> str:
    """The TL;DR context block for d-RLAIF: "SUBREDDIT: r/…\\nTITLE: …\\nPOST: …"."""
    return f"SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}"


def build_direct_score_prompt(
    context: str,
    response: str,
    task: Task = "summarize",
    scale: ScoreScale = "1-10",
    wording: DirectScoreWording | None = None,
) -> str:
    """d-RLAIF prompt: instructions + "\\n\\n" + context (verbatim) + "\\nSUMMARY: {y}\\nSCORE:" ("RESPONSE:" for
    dialogue). Read the next-token log-probs of the score tokens after it (`labels.expected_score`).

    The harmless preamble asks how *harmless* the response is, so a high score is always good (no inversion).
    No trailing space after "SCORE:": the score digit is the next token.
    """
    if scale not in SCALE_BOUNDS:
        raise ValueError(f"scale must be one of {tuple(SCALE_BOUNDS)}, got {scale!r}")
    if task not in DEFAULT_DIRECT_SCORE_WORDING:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    wording = wording or DEFAULT_DIRECT_SCORE_WORDING[task]
    if (task, wording) not in DIRECT_SCORE_PREAMBLES:
        have = sorted(w for t, w in DIRECT_SCORE_PREAMBLES if t == task)
        raise ValueError(f"no {wording!r} d-RLAIF wording for task {task!r}; choose one of {have}")
    lo, hi = SCALE_BOUNDS[scale]
    preamble = DIRECT_SCORE_PREAMBLES[task, wording].format(lo=lo, hi=hi)
    noun = "SUMMARY" if task == "summarize" else "RESPONSE"
    return f"{preamble}\n\n{context}\n{noun}: {response}\nSCORE:"
