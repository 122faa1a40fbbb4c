"""The ``minillm`` verbs other than LightningCLI's: each module exposes ``main``-style functions taking argv,
registered by name in ``minillm_lightning.cli.EXTRA_VERBS`` and imported only when used."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help text with each option's default appended where it has one worth showing and the text does not already
    say it: ``--steps STEPS  measured optimizer steps per repetition (default: 20)``. A flag that takes no value
    (``--no_chat``) shows none: the default of a ``store_false`` is True whatever the option it shares means."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        shown = action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in text.lower()
        shown = shown and action.nargs != 0
        return f"{text} (default: %(default)s)" if shown and action.option_strings else action.help


class CommandParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose long options answer to both spellings, ``--max_new_tokens`` and
    ``--max-new-tokens``: the verbs' own options are written one way or the other (LightningCLI's flags use
    underscores), and a user should not have to remember which. ``--help`` shows the spelling each was defined with,
    and the defaults (:class:`_DefaultsFormatter`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: Any = None
    ) -> tuple[Any, list[str]]:
        argv = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args([self._as_defined(a) for a in argv], namespace)

    def _as_defined(self, token: str) -> str:
        if not token.startswith("--") or token == "--":
            return token
        name, eq, value = token.partition("=")
        defined = self._option_string_actions  # every option string, across argument groups
        if name in defined:
            return token
        for other in ("--" + name[2:].replace("-", "_"), "--" + name[2:].replace("_", "-")):
            if other in defined:
                return other + eq + value
        return token
