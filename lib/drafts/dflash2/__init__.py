"""DFlash2: DFlash's block draft with a dynamic depthwise convolution around each sublayer and a pairwise
top-K path selector (draft=dflash2). Shares DFlash's capture plan, anchors, masks, flex attention and
layers (lib/drafts/dflash/)."""

# Importing the package registers the family (lib/drafts/base.py get_strategy imports it by name).
from lib.drafts.dflash2 import strategy as _strategy  # noqa: F401
