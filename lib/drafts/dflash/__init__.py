"""DFlash: a block-diffusion draft (draft=dflash). One forward denoises a block of mask tokens after an
anchor token, conditioned on hidden states captured from several target layers."""
