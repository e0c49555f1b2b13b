"""Feedback: judges that label preferences (the FactWorld simulated human; LLM labellers) and pair building."""
