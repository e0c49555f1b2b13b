"""Feedback: judges that label preferences (the FactWorld simulated human; LLM labellers) and pair building."""

from rlxf.feedback.label_math import debias, invert_for_harmless, preference_from_logprobs

__all__ = ["debias", "invert_for_harmless", "preference_from_logprobs"]
