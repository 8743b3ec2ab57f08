"""The environment part of `run.py`: whether the packages the trainers, the tests and the benchmarks import are there
at the versions we need, installing what is missing from a local folder of wheels (a GPU machine cannot reach a
package index), and the search path every later part runs with.

What is needed: `pyproject.toml`'s dependencies, transformers at our tested version or newer (`TESTED_TRANSFORMERS`),
matplotlib (the cost plots) and pytest (the tests), and, walked from them, every requirement their installed
metadata declares (extras and other platforms' markers left out). torch's own requirements are not walked: a CUDA
build pins its CUDA libraries, which come with it.

A missing distribution, or a top-level requirement out of range, stops the run here (the parts after would fail on
import); a version out of range deeper down is recorded as a warning and the run goes on, since nothing here could
mend it and it may well not matter.

With wheels, this process puts the install folder first on `sys.path` and reads the metadata from there, as the
later parts, whose `PYTHONPATH` starts with it, will. trl_offline is imported from the repository root (on
`PYTHONPATH` too), not installed: nothing in it reads installed package metadata.
"""

import importlib
import importlib.metadata
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path


try:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import Version
except ModuleNotFoundError:  # pip always carries a copy
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename
    from pip._vendor.packaging.version import Version

# The transformers version the test suite runs against (CI installs the newest, 5.24 when this was written); the
# GPU image's older one is replaced from the wheels folder
TESTED_TRANSFORMERS = "5.24"
EXTRA_REQUIREMENTS = (f"transformers>={TESTED_TRANSFORMERS}", "matplotlib>=3.8", "pytest>=8")
NOT_WALKED = {"torch"}
README = "benchmarks/gpu/README.md"


@dataclass
class Unmet:
    """A requirement the environment does not meet."""

    requirement: str
    required_by: str  # "pyproject.toml", "run.py", or the distribution that declares it
    found: str | None  # the installed version, `None` when missing
    top_level: bool

    def describe(self) -> str:
        found = "missing" if self.found is None else f"found {self.found}"
        return f"{self.requirement} (required by {self.required_by}): {found}"


@dataclass
class Check:
    """A walk over the requirements: what is unmet, and every specifier met along the way, by name."""

    unmet: list[Unmet] = field(default_factory=list)
    specifiers: dict = field(default_factory=dict)  # canonical name -> list of Requirement

    @property
    def fatal(self) -> list[Unmet]:
        return [u for u in self.unmet if u.found is None or u.top_level]


def top_level_requirements(root: Path) -> list[tuple[Requirement, str]]:
    """pyproject.toml's dependencies and this run's own."""
    text = (root / "pyproject.toml").read_text()
    try:
        import tomllib

        dependencies = tomllib.loads(text)["project"]["dependencies"]
    except ModuleNotFoundError:  # Python 3.10: the list is simple enough to read
        block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
        dependencies = re.findall(r'^\s*"([^"]+)"', block, re.M)
    return [(Requirement(r), "pyproject.toml") for r in dependencies] + [
        (Requirement(r), "run.py") for r in EXTRA_REQUIREMENTS
    ]


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _applies(requirement: Requirement) -> bool:
    """False for an extra's requirement or another platform's."""
    return requirement.marker is None or requirement.marker.evaluate({"extra": ""})


def check(top_level: list[tuple[Requirement, str]]) -> Check:
    """Walks the requirements breadth first from `top_level`, through each met one's installed metadata."""
    result = Check()
    queue = [(requirement, by, True) for requirement, by in top_level]
    walked = set()
    while queue:
        requirement, by, is_top = queue.pop(0)
        if not _applies(requirement):
            continue
        name = canonicalize_name(requirement.name)
        version = installed_version(name)
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            result.unmet.append(Unmet(str(requirement), by, version, is_top))
            continue
        result.specifiers.setdefault(name, []).append(requirement)
        if name in walked or name in NOT_WALKED:
            continue
        walked.add(name)
        for line in importlib.metadata.requires(name) or []:
            try:
                queue.append((Requirement(line), f"{name} {version}", False))
            except InvalidRequirement:  # old metadata that packaging no longer reads: not ours to judge
                continue
    return result


@dataclass
class Wheel:
    name: str
    version: Version
    path: Path
    requires: list[Requirement]


def read_wheels(folder: Path) -> dict[str, list[Wheel]]:
    """The wheels in `folder` by canonical name, newest first, with the requirements their metadata declares."""
    wheels = {}
    for path in sorted(folder.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(path.name)
        with zipfile.ZipFile(path) as archive:
            metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            lines = archive.read(metadata).decode().splitlines()
        requires = [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]
        wheels.setdefault(canonicalize_name(name), []).append(Wheel(name, version, path, requires))
    return {name: sorted(found, key=lambda w: w.version, reverse=True) for name, found in wheels.items()}


def choose_wheels(result: Check, wheels: dict[str, list[Wheel]]) -> list[Wheel]:
    """For each unmet requirement, the newest wheel that meets it and every other specifier met on that name, and
    whose own requirements are met by what is installed or by some wheel in the folder (e.g. a datasets that accepts
    the installed pyarrow, when the folder holds two datasets and no pyarrow)."""
    unmet_by_name = {}
    for unmet in result.unmet:
        requirement = Requirement(unmet.requirement)
        unmet_by_name.setdefault(canonicalize_name(requirement.name), []).append(requirement)
    chosen = []
    for name, requirements in unmet_by_name.items():
        specifiers = requirements + result.specifiers.get(name, [])
        for wheel in wheels.get(name, []):
            if all(s.specifier.contains(wheel.version, prereleases=True) for s in specifiers) and all(
                _can_meet(r, wheels) for r in wheel.requires if _applies(r)
            ):
                chosen.append(wheel)
                break
    return chosen


def _can_meet(requirement: Requirement, wheels: dict[str, list[Wheel]]) -> bool:
    name = canonicalize_name(requirement.name)
    version = installed_version(name)
    if version is not None and requirement.specifier.contains(version, prereleases=True):
        return True
    return any(requirement.specifier.contains(w.version, prereleases=True) for w in wheels.get(name, []))


def install(wheels: list[Wheel], target: Path, log) -> bool:
    """`pip install --no-index --no-deps --target` of `wheels`; the target goes first on `sys.path` here."""
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    command += ["--no-cache-dir", "--upgrade", "--disable-pip-version-check", "--target", str(target)]
    command += [str(w.path) for w in wheels]
    log(f"$ {' '.join(command)}")
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in done.stdout.splitlines():
        log(line)
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    return done.returncode == 0


def prepare(root: Path, wheels_folder: Path | None, target: Path, log) -> dict:
    """Checks, installs from `wheels_folder` while that mends something (a few rounds: a new wheel can bring new
    requirements), and checks again. Returns the part's findings: `ok`, the wheels installed, what is still unmet,
    and the message to fail with."""
    top_level = top_level_requirements(root)
    result = check(top_level)
    installed = []
    if wheels_folder is not None:
        wheels = read_wheels(wheels_folder)
        log(f"wheels in {wheels_folder}: " + ", ".join(f"{w.name} {w.version}" for v in wheels.values() for w in v))
        for _ in range(4):
            chosen = [w for w in choose_wheels(result, wheels) if w.path.name not in installed]
            if not chosen:
                break
            if not install(chosen, target, log):
                return _findings(result, installed, "pip could not install the chosen wheels (see the log)")
            installed += [w.path.name for w in chosen]
            result = check(top_level)
    message = None
    if result.fatal:
        where = f"the wheels in {wheels_folder} do not provide them" if wheels_folder else "run with --wheels DIR"
        message = (
            "missing or out of range: "
            + "; ".join(u.describe() for u in result.fatal)
            + f". {where}: see {README} for the folder of wheels a GPU machine needs."
        )
    return _findings(result, installed, message)


def _findings(result: Check, installed: list[str], message: str | None) -> dict:
    return {
        "ok": message is None,
        "message": message,
        "wheels_installed": installed,
        "unmet": [u.describe() for u in result.fatal],
        "warnings": [u.describe() for u in result.unmet if u not in result.fatal],
    }
