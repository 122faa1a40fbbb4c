"""The ``minillm`` verbs other than LightningCLI's: each module exposes ``main``-style functions taking argv,
registered by name in ``minillm_lightning.cli.EXTRA_VERBS`` and imported only when used."""
