"""Gold worlds: synthetic tasks whose true reward is known, down to the characters of a response."""
