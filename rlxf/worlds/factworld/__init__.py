"""FactWorld: a seeded gold world for hallucination, credit assignment and dense rewards (design.md, "FactWorld").

A knowledge base of invented entities ("Zorbin", "Kalmo", ...) with four attributes (colour, city, pet, food),
each drawn from a small value set. Three kinds of prompt, all plain strings; a completion is appended to its
prompt as is (it starts with a space):

  kind    prompt                                             a correct completion
  fact    "Q: What are the colour and pet of Zorbin?\\nA:"   " Zorbin's colour is red. Zorbin's pet is cat."
  list    "Q: Name 3 colours other than red.\\nA:"           " blue, green, yellow."
  retain  "Q: Reverse the words: sun map cup\\nA:"           " cup map sun"

Fact prompts are closed-ended (one right answer), list prompts open-ended (any k distinct valid items), retain
prompts are a forgetting probe: a skill SFT teaches that preference data never mentions.

Gold score (`score_response`). A response is cut into judged pieces (facts: one sentence each; lists: comma
separated items; retain: words). Each piece gets a reward:
  +1                       requested and right (a fact's true value; a new, valid list item; the right word),
  -1                       wrong (a false fact, requested or not; an invalid or repeated list item; a wrong word),
  -UNREQUESTED_PENALTY     everything else: a true but unrequested fact (or an attribute stated twice), an extra
                           valid list item beyond k, an extra retain word, a sentence that is not a fact about
                           the asked entity (unparsed or about another entity).
Each requested fact / item / word that is absent costs MISSING_PENALTY. With k requested pieces,
    raw   = sum(piece rewards) - MISSING_PENALTY * n_missing
    score = raw / k          (1.0 = perfect; a missing piece costs as much as a wrong one, so omitting a fact
                              never beats guessing it; unbounded below, since junk sentences keep costing)
Token-level gold: one character span (start, end, reward) per judged piece, end exclusive (a slice), so
`response[start:end]` is the fact's VALUE (e.g. "red", not the sentence), the list item or the word; an
unparsed sentence's span is the whole sentence (whitespace stripped). sum(span rewards) - MISSING_PENALTY *
n_missing == raw exactly.

Simulated human labels (`simulated_preference`):
    P(a > b) = sigmoid((g(a) - g(b)) / T + length_bias * (len(a) - len(b)) / LENGTH_UNIT_WORDS)
with g the gold score, len in whitespace-separated words and LENGTH_UNIT_WORDS = 4, the length of one fact
sentence ("Zorbin's colour is red."): with T = 1 and length_bias = 1, one extra sentence weighs as much as a
gold-score difference of 1. T = 0 gives hard labels (ties fall back to the length term alone).

Modules: `kb` (knowledge base, config, prompt rows), `gold` (the scorer and win rate), `human` (the simulated
labeller), `world` (build, write, load). Everything is re-exported here: `from rlxf.worlds.factworld import ...`.
"""

from rlxf.worlds.factworld.gold import (
    MISSING_PENALTY,
    UNREQUESTED_PENALTY,
    GoldScore,
    Verdict,
    evaluate_responses,
    gold_win_rate,
    score_response,
)
from rlxf.worlds.factworld.human import (
    LENGTH_UNIT_WORDS,
    simulated_preference,
)
from rlxf.worlds.factworld.kb import (
    ABSTENTION,
    ATTRIBUTE_VALUES,
    ATTRIBUTES,
    KINDS,
    LIST_CATEGORIES,
    LIST_SIZES,
    RETAIN_SIZES,
    RETAIN_WORDS,
    FactWorldConfig,
    KnowledgeBase,
    abstention_response,
    fact_response,
    fact_row,
    fact_sentence,
    false_premise_row,
    list_response,
    list_row,
    make_knowledge_base,
    parse_prompt,
    retain_response,
    retain_row,
)
from rlxf.worlds.factworld.world import (
    FILES,
    FORMAT,
    FactWorld,
    FactWorldData,
    build_factworld,
    load_factworld,
    logger,
    noisy_response,
    write_factworld,
)

__all__ = [
    "ABSTENTION",
    "abstention_response",
    "ATTRIBUTES",
    "ATTRIBUTE_VALUES",
    "FILES",
    "FORMAT",
    "FactWorld",
    "FactWorldConfig",
    "FactWorldData",
    "GoldScore",
    "KINDS",
    "KnowledgeBase",
    "LENGTH_UNIT_WORDS",
    "LIST_CATEGORIES",
    "LIST_SIZES",
    "MISSING_PENALTY",
    "RETAIN_SIZES",
    "RETAIN_WORDS",
    "UNREQUESTED_PENALTY",
    "Verdict",
    "build_factworld",
    "evaluate_responses",
    "fact_response",
    "fact_row",
    "false_premise_row",
    "fact_sentence",
    "gold_win_rate",
    "list_response",
    "list_row",
    "load_factworld",
    "logger",
    "make_knowledge_base",
    "noisy_response",
    "parse_prompt",
    "retain_response",
    "retain_row",
    "score_response",
    "simulated_preference",
    "write_factworld",
]
