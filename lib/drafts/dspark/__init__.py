"""DSpark: a parallel block draft with a Markov head and a confidence head (draft=dspark). DFlash's
backbone proposes a whole block per forward; a low-rank bias from the previous token makes the block
semi-autoregressive, and a confidence head schedules how much of it the target verifies."""

# Importing the package registers the family (lib/drafts/base.py get_strategy imports it by name).
from lib.drafts.dspark import strategy as _strategy  # noqa: F401
