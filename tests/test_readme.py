"""The README's commands work and its links resolve: a reader's first five minutes must not hit a dead end.

The cheap commands of its code blocks (`--help`, `python -m spidr_fast.info`) run as written; every `python -m`
module it names exists; every flag it gives a command is one that command's `--help` lists; every relative link of
the README and of docs/ reaches a file, and its #anchor a heading there.
"""

import functools
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
LINKED_PAGES = [README, ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CHEAP = re.compile(r"--help$|^python -m spidr_fast\.info$")


def shell_commands(markdown: str) -> list[str]:
    """Each command of the ```bash blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.DOTALL):
        for command in block.replace("\\\n", " ").splitlines():
            command = " ".join(shlex.split(command, comments=True))
            if command:
                commands.append(command)
    return commands


def module_of(command: str) -> str | None:
    """The module a `python -m M ...` or `torchrun ... -m M ...` command runs."""
    words = command.split()
    if words[0] in ("python", "torchrun") and "-m" in words:
        return words[words.index("-m") + 1]
    return None


def runnable(module: str) -> bool:
    """Whether `python -m module` finds something to run: a module, or a package with a __main__."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        return False
    return spec.submodule_search_locations is None or importlib.util.find_spec(f"{module}.__main__") is not None


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(page: Path) -> set[str]:
    """The anchors of a Markdown page's headings (a `#` comment in a code block is none)."""
    prose = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    return {slug(heading) for heading in re.findall(r"^#+ (.+)$", prose, re.MULTILINE)}


@functools.cache
def run(command: str) -> subprocess.CompletedProcess:
    """A README command, `python` being this environment's (each run imports torch: seconds, so once)."""
    words = [sys.executable, *command.split()[1:]]
    return subprocess.run(words, check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_readme_has_cheap_commands_to_run():
    # The tests below are only as good as what they find: a change of the block syntax must not empty them.
    commands = shell_commands(README.read_text())
    assert sum(bool(CHEAP.search(command)) for command in commands) >= 4
    assert {"spidr_fast.train", "spidr_fast.evaluate", "spidr_fast.extract"} <= set(map(module_of, commands))


@pytest.mark.parametrize("command", [c for c in shell_commands(README.read_text()) if CHEAP.search(c)])
def test_each_cheap_readme_command_runs(command):
    done = run(command)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_every_module_the_readme_names_runs():
    modules = {module.rstrip(".") for module in re.findall(r"python -m ([\w.]+)", README.read_text())}
    assert "spidr_fast.data.manifest" in modules
    missing = sorted(module for module in modules if not runnable(module))
    assert not missing, f"the README names modules that python -m cannot run: {missing}"


def program(command: str) -> str | None:
    """What a README command runs, as `python` would take it: `-m spidr_fast...` or a script of this repository."""
    words = command.split()
    module = module_of(command)
    if module is not None:
        return f"-m {module}" if module.startswith("spidr_fast") else None
    return words[1] if words[0] == "python" and words[1].endswith(".py") else None


def test_every_flag_the_readme_gives_a_command_is_in_its_help():
    checked, unknown = set(), []
    for command in shell_commands(README.read_text()):
        target = program(command)
        if target is None:
            continue
        checked.add(target)
        listed = run(f"python {target} --help").stdout
        after = command.split(target, 1)[1]  # torchrun's own flags come before it
        flags = re.findall(r"(?<!\S)(--[\w-]+)", after)
        unknown += [f"{target} {flag}" for flag in flags if not re.search(rf"{flag}(?![\w-])", listed)]
    assert "-m spidr_fast.train" in checked
    assert not unknown, f"flags the README gives that --help does not list: {unknown}"


@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    text = page.read_text()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or (anchor and anchor not in headings(linked)):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to what does not exist: {broken}"


def test_the_first_paragraph_claims_what_the_generated_summary_shows():
    """The opening's measured state is the latest card's generated headline rows: new results that change them make
    this fail until the paragraph says what they say."""
    text = README.read_text()
    opening = text.split("\n\n")[1]
    summary = text.split("<!-- perf-summary:start -->", 1)[1].split("<!-- perf-summary:end -->", 1)[0]
    device, date = re.match(r"\*\*(.+?)\*\*, (\S+) ", summary.strip()).groups()
    model = device.split()[1]  # NVIDIA H200 → H200
    assert f"{model} on {date}" in opening, f"the README's opening should name the latest card, {model} on {date}"
    ratios = re.findall(r"\d+\.\d\d(?:-\d+\.\d\d)?x", opening)
    assert ratios
    stale = [ratio for ratio in ratios if f"| {ratio} |" not in summary]
    assert not stale, f"the README's opening cites {stale}, which the generated headline rows do not show"
