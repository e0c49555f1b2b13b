"""One file per stage: each reads top to bottom and hands its loss to the shared engine."""
