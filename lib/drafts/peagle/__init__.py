"""P-EAGLE: parallel drafting EAGLE (draft=peagle). EAGLE-3's draft with a layer stack and mask slots,
so one draft forward proposes k tokens; trained on conditionally dropped chains of mask slots."""

# Importing the package registers the family (lib/drafts/base.py get_strategy imports it by name).
from lib.drafts.peagle import strategy as _strategy  # noqa: F401
