"""DFlash: a block-diffusion draft (draft=dflash). One forward denoises a block of mask tokens after an
anchor token, conditioned on hidden states captured from several target layers."""

# Importing the package registers the family (lib/drafts/base.py get_strategy imports it by name).
from lib.drafts.dflash import strategy as _strategy  # noqa: F401
