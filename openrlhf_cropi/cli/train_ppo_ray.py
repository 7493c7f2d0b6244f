"""`python -m openrlhf_cropi.cli.train_ppo_ray <train_ppo_ray flags> [--cropi.* flags]`.

Runs OpenRLHF 0.11.2's own `openrlhf.cli.train_ppo_ray` module, unchanged, with the `--cropi.*`
group added to its parser (so `--help`, parsing and OpenRLHF's validation are its own). The
flags are parsed once without starting anything; with `--cropi.enable` the job then runs with
CROPI's trainer and policy actor classes in place of OpenRLHF's, otherwise it is plain OpenRLHF.

OpenRLHF builds its parser inside `if __name__ == "__main__":` with no factory to call, so the
dry run stops that block where `train()` hands the finished args to `get_strategy`.
"""

from __future__ import annotations

import argparse
import contextlib
import runpy
import sys
from collections.abc import Sequence
from types import SimpleNamespace
from unittest import mock

from openrlhf_cropi.flags import CropiFlagError, add_cropi_flags, check_host_args, check_openrlhf_version, cropi_args

PROG = "train_ppo_ray"
_parse_args = argparse.ArgumentParser.parse_args


def _parse_args_with_cropi_flags(parser, args=None, namespace=None):
    # Only OpenRLHF's train_ppo_ray parser gets the group (other parsers may run in-process).
    if "--actor.model_name_or_path" in parser._option_string_actions and not any(
        a.dest == "cropi.enable" for a in parser._actions
    ):
        add_cropi_flags(parser)
    return _parse_args(parser, args, namespace)


def _run_openrlhf_cli(argv: Sequence[str], *patches: contextlib.AbstractContextManager) -> None:
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(argparse.ArgumentParser, "parse_args", _parse_args_with_cropi_flags))
        stack.enter_context(mock.patch.object(sys, "argv", [PROG, *argv]))
        for patch in patches:
            stack.enter_context(patch)
        runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__", alter_sys=False)


class _Parsed(Exception):
    def __init__(self, args: SimpleNamespace):
        super().__init__()
        self.parsed = args


def _capture(args, *_, **__):
    raise _Parsed(args)


def parse_args(argv: Sequence[str]) -> SimpleNamespace:
    """The hierarchical args `train()` would receive, validated by OpenRLHF and by CROPI.

    Starts nothing. Raises SystemExit (2) like argparse for an unknown flag or a value OpenRLHF
    rejects (AssertionError for its cross-flag checks), CropiFlagError for a CROPI flag problem.
    """
    import openrlhf.utils

    # train() skips ray.init when Ray looks initialised, then calls get_strategy, which the
    # module binds from openrlhf.utils when it runs: that is where the args are caught.
    try:
        _run_openrlhf_cli(
            argv,
            mock.patch.object(openrlhf.utils, "get_strategy", _capture),
            mock.patch("ray.is_initialized", return_value=True),
        )
    except _Parsed as caught:
        args = caught.parsed
    else:
        raise RuntimeError("openrlhf.cli.train_ppo_ray finished without reaching train(): not OpenRLHF 0.11.2?")
    if args.cropi.enable:
        cropi_args(args)
        check_host_args(args)
    else:
        given = next((a.split("=")[0] for a in argv if a.startswith("--cropi.")), None)
        if given is not None:  # argparse also takes unambiguous abbreviations: any --cropi. prefix counts
            raise CropiFlagError(
                f"{given}: given without --cropi.enable, which would run plain OpenRLHF with CROPI off; add "
                "--cropi.enable, or drop the --cropi.* flags"
            )
    return args


def _refuse_openrlhf_class(name: str):
    def refuse(*_, **__):
        raise RuntimeError(
            f"CROPI: the job started OpenRLHF's own {name} instead of CROPI's, so it would train without CROPI: "
            f"this openrlhf's train_ppo_ray does not take {name} from where openrlhf-cropi replaces it"
        )

    return refuse


def _tripwires(*actor_classes) -> list:
    """Patches that make OpenRLHF's original Ray actor classes fail on use: if the class swap
    lands on a name train() no longer reads, the job stops instead of silently running without CROPI."""
    return [mock.patch.object(cls, attr, _refuse_openrlhf_class(cls.__ray_actor_class__.__name__))
            for cls in actor_classes for attr in ("remote", "options")]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        check_openrlhf_version()
        args = parse_args(argv)
    except CropiFlagError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if not args.cropi.enable:
        _run_openrlhf_cli(argv)
        return

    import openrlhf.trainer.ppo_trainer as ppo_trainer
    import openrlhf.trainer.ray.ppo_actor as ppo_actor

    from openrlhf_cropi.ray.policy_actor import CropiPolicyModelActor
    from openrlhf_cropi.ray.trainer import CropiPPOTrainer

    originals = (ppo_actor.PolicyModelActor, ppo_trainer.PPOTrainer)
    _run_openrlhf_cli(
        argv,
        *_tripwires(*originals),
        # Bound by `from ... import PolicyModelActor` when the CLI module runs.
        mock.patch.object(ppo_actor, "PolicyModelActor", CropiPolicyModelActor),
        # Imported inside train().
        mock.patch.object(ppo_trainer, "PPOTrainer", CropiPPOTrainer),
    )


if __name__ == "__main__":
    main()
