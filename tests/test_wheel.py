"""The wheel path of README's "GPU install": a wheel built from the checkout holds the whole
`openrlhf_cropi` package and its console scripts, and, installed on its own beside the host
stack, its `cropi` and `train_ppo_ray` CLIs run from the installed copy, not the checkout.

The checkout is copied first (without .git, .venv, build/, dist/, runs/, *.egg-info and
caches): an in-tree build would write build/ and *.egg-info into the checkout, and a stale
build/lib there could hide a module the packaging no longer picks up. Nothing is downloaded
(--no-index, --no-build-isolation: setuptools and wheel come from this environment).
"""

from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.host

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "openrlhf_cropi"
# What README's install sections and launchers name.
SCRIPTS = {"cropi": "openrlhf_cropi.cli.cropi:main", "cropi-train-ppo-ray": "openrlhf_cropi.cli.train_ppo_ray:main"}
EXTRAS = {"gpu": "openrlhf[vllm]==0.11.2", "math": "math-verify==0.9.0"}
TOP_LEVEL_SKIP = {".git", ".venv", "build", "dist", "runs", ".pytest_cache"}


def _ignore(directory: str, names: list[str]) -> set[str]:
    skip = {n for n in names if n == "__pycache__" or n.endswith((".pyc", ".egg-info"))}
    if Path(directory) == ROOT:
        skip |= TOP_LEVEL_SKIP & set(names)
    return skip


def _run(cmd: list, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def package_files(src: Path) -> set[str]:
    """Every file of the package in the source tree, as wheel paths (openrlhf_cropi/...)."""
    return {
        p.relative_to(src).as_posix()
        for p in (src / PACKAGE).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def entry_points(text: str) -> dict[str, dict[str, str]]:
    """entry_points.txt (an INI file) -> {group: {name: target}}."""
    groups: dict[str, dict[str, str]] = {}
    group = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            group = groups.setdefault(line[1:-1], {})
        elif "=" in line and group is not None:
            name, target = (s.strip() for s in line.split("=", 1))
            group[name] = target
    return groups


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(source copy, wheel path): the wheel `pip wheel --no-deps` builds from the checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_ignore, symlinks=True)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", tmp / "dist", src], cwd=tmp)  # fmt: skip
    wheels = list((tmp / "dist").glob("openrlhf_cropi-*.whl"))
    assert len(wheels) == 1, wheels
    return src, wheels[0]


def check_wheel(wheel: Path, src: Path) -> dict[str, str]:
    """Asserts the wheel holds every package file of `src` and README's scripts and extras;
    returns its console scripts."""
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        dist_info = {n.split("/", 1)[0] for n in names if n.split("/", 1)[0].endswith(".dist-info")}
        assert len(dist_info) == 1, dist_info
        (dist_info,) = dist_info
        scripts = entry_points(zf.read(f"{dist_info}/entry_points.txt").decode()).get("console_scripts", {})
        metadata = email.parser.Parser().parsestr(zf.read(f"{dist_info}/METADATA").decode())

    expected = package_files(src)
    assert f"{PACKAGE}/__init__.py" in expected
    missing = sorted(expected - names)
    assert not missing, f"{wheel.name} lacks files of the source tree (a subpackage without __init__.py?): {missing}"
    extra = sorted(n for n in names if n.startswith(f"{PACKAGE}/") and n not in expected)
    assert not extra, f"{wheel.name} holds files the source tree does not: {extra}"

    assert {k: v for k, v in scripts.items() if k in SCRIPTS} == SCRIPTS, scripts
    assert set(EXTRAS) <= set(metadata.get_all("Provides-Extra") or []), metadata.get_all("Provides-Extra")
    requires = [r.replace(" ", "") for r in metadata.get_all("Requires-Dist") or []]
    for extra_name, requirement in EXTRAS.items():
        assert any(r.startswith(requirement.replace(" ", "") + ";") and f'extra=="{extra_name}"' in r for r in requires), (
            extra_name, requires)  # fmt: skip
    return scripts


def test_wheel_installs_and_runs_outside_the_checkout(built, tmp_path):
    pytest.importorskip("openrlhf", reason="host stack not installed: run launch/local/setup_cpu.sh")
    src, wheel = built
    scripts = check_wheel(wheel, src)

    # Installed alone into a fresh target; the host stack (OpenRLHF, torch, ...) is this venv's.
    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", site, wheel], cwd=tmp_path)
    bin_dir = site / "bin"
    for name in scripts:
        assert (bin_dir / name).is_file(), f"pip install --target wrote no {name} script: {sorted(os.listdir(site))}"

    cwd = tmp_path / "elsewhere"  # outside the checkout: nothing importable by the current directory
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONSTARTUP", None)

    where = _run([sys.executable, "-c", f"import {PACKAGE}, {PACKAGE}.cli.cropi as c; print({PACKAGE}.__file__); print(c.__file__)"],
                 cwd=cwd, env=env).stdout.split()  # fmt: skip
    for f in where:
        assert Path(f).resolve().is_relative_to(site.resolve()), f"{f} is not the installed copy under {site}"
        assert not Path(f).resolve().is_relative_to(ROOT), f

    # The installed console script, run by its own shebang (this venv's python).
    out = _run([bin_dir / "cropi", "--help"], cwd=cwd, env=env).stdout
    for sub in ("rollouts", "score", "select"):
        assert sub in out, out
    out = _run([bin_dir / "cropi", "rollouts", "--help"], cwd=cwd, env=env).stdout
    assert "import" in out and "generate" in out, out

    # The entrypoint the Ray launchers submit: OpenRLHF's parser plus the --cropi.* group.
    out = _run([sys.executable, "-m", "openrlhf_cropi.cli.train_ppo_ray", "--help"], cwd=cwd, env=env).stdout
    for flag in ("--cropi.enable", "--actor.model_name_or_path"):
        assert flag in out, out[-3000:]
