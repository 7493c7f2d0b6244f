"""OpenRLHF's `train_ppo_ray` arguments, parsed and validated by OpenRLHF's own CLI module.

OpenRLHF 0.11.2 builds its parser and validates inside `if __name__ == "__main__":` with no
factory to call. We run that block for real and stop it where it hands the finished
arguments to `get_strategy` (the first thing `train()` does), so every default, rename and
validation rule is OpenRLHF's, never a copy that could drift.
"""

from __future__ import annotations

import runpy
import sys
from collections.abc import Sequence
from types import SimpleNamespace
from unittest import mock


class _ParsedArgs(Exception):
    def __init__(self, args: SimpleNamespace):
        super().__init__()
        self.parsed = args


def _capture(args, *_, **__):
    raise _ParsedArgs(args)


def parse_train_ppo_ray_args(argv: Sequence[str]) -> SimpleNamespace:
    """The hierarchical args `train()` would receive for `train_ppo_ray ARGV` (nothing starts).

    Raises SystemExit like the CLI does on a flag it does not know or a value it rejects, and
    AssertionError for OpenRLHF's own cross-flag checks.
    """
    import openrlhf.utils

    # ray.is_initialized() -> True makes train() skip ray.init; get_strategy is bound from
    # openrlhf.utils when the module body runs, so patching it there intercepts the call.
    with (
        mock.patch.object(openrlhf.utils, "get_strategy", _capture),
        mock.patch("ray.is_initialized", return_value=True),
        mock.patch.object(sys, "argv", ["train_ppo_ray", *argv]),
    ):
        try:
            runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__", alter_sys=False)
        except _ParsedArgs as parsed:
            return parsed.parsed
    raise RuntimeError("openrlhf.cli.train_ppo_ray finished without reaching train(): not OpenRLHF 0.11.2?")
