"""The documents cannot drift from the code.

Every command in a fenced block whose info string is ``bash runnable`` (README.md,
docs/, the results index) still parses: ``moa-vllm`` commands against the CLI's own
parser, with every ``--flag`` one of its subcommand's; ``vllm serve`` (and the
vLLM arguments of ``moa-vllm serve``) against vLLM's own serve parser; ``make``
targets against the Makefile; ``pip`` extras against the package's; ``python -m``
modules; and the shipped files a command reads. Blocks that record a past run keep
the plain ``bash`` info string: they say what was run then. The README's
quickstart has runnable blocks only, its environment-variable table is what
``moa_vllm.envs`` renders, the README stays short, relative links lead to files and
headings that exist, and neither the documents nor the code and benchmarks carry
work-log lines. Nothing here starts an engine."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest

from moa_vllm import __version__, envs
from moa_vllm.engine.vllm_surface import contacts as vllm_contacts
from moa_vllm.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md")),
             ROOT / "benchmarks" / "results" / "README.md"]
RUNNABLE = re.compile(r"^```bash runnable\n(.*?)^```", re.M | re.S)
SEPARATORS = {"&&", "||", ";", "|"}
OUTPUT_FLAGS = {"--out", "--png", "--out-dir", "-o"}  # their paths need not exist yet
SHIPPED = ("plans/", "docker/")  # paths a command reads from the repo
README_LINES = 250  # the details live in docs/
WORK_LOG = re.compile("|".join([  # the product says what it is now; git log keeps history
    # the environment a session worked in
    r"\bstop [0-9]|\bwas lent\b|\bdevice (tool|call|image|run)\b|\btimeout_s\b|\bcarry \[",
    r"\brunning beside\b",
    # past corrections and earlier runs
    r"\bearlier (runs?|commits?|plans?|results|rules)\b|\b(was|were) wrong\b",
    # plan lineage, and plans told apart by the date they were searched
    r"\bplan lineage\b|\bonce shipped\b|\b(was|were) replaced\b|\brenamed\b",
    r"\b(before|after|since) \d{4}-\d\d-\d\d\b|\bthe \d{4}-\d\d-\d\d (plans?|rules|transcripts?|runs?)\b",
]), re.I)


def runnable_commands(text: str) -> list[list[str]]:
    """The commands of the runnable blocks as words: continuation lines joined,
    comments and leading ``VAR=value`` assignments dropped, ``&&`` / ``;`` / ``|``
    splitting a line into commands."""
    commands = []
    for block in RUNNABLE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            command: list[str] = []
            for word in shlex.split(line, comments=True) + [";"]:
                if word not in SEPARATORS:
                    command.append(word)
                    continue
                while command and re.match(r"[A-Z_][A-Z0-9_]*=", command[0]):
                    command.pop(0)
                if command:
                    commands.append(command)
                command = []
    return commands


COMMANDS = [(doc, words) for doc in DOCUMENTS for words in runnable_commands(doc.read_text())]


def flags(words: list[str]) -> list[str]:
    return [w.split("=", 1)[0] for w in words if w.startswith("-") and w != "-"]


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def subcommand_parser(parser: argparse.ArgumentParser, args: list[str]) -> argparse.ArgumentParser:
    """The parser of the subcommand ``args`` start with (``plan search ...``: its own)."""
    for word in args:
        subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subparsers:
            break
        parser = subparsers[0].choices[word]
    return parser


@pytest.fixture(scope="module")
def vllm_serve_options() -> set[str]:
    """Every option of ``vllm serve``, from vLLM's own parser (imports vLLM)."""
    serve = pytest.importorskip("vllm.entrypoints.cli.serve")
    subparsers = argparse.ArgumentParser().add_subparsers()
    return options(serve.ServeSubcommand().subparser_init(subparsers))


def check_moa_vllm(args: list[str], vllm_options) -> None:
    parser = build_parser()
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            _, rest = parser.parse_known_args(args)
    except SystemExit:
        pytest.fail(f"moa-vllm {' '.join(args)}: {stderr.getvalue().strip()}")
    sub = subcommand_parser(parser, args)
    ours = [f for f in flags(args) if f in options(sub)]
    if args[0] == "serve":  # the rest goes to vLLM
        unknown = set(flags(args)) - set(ours) - vllm_options()
        assert not unknown, f"moa-vllm serve: vLLM has no {sorted(unknown)}"
    else:
        assert not rest and ours == flags(args), \
            f"moa-vllm {' '.join(args)}: not options of this subcommand: {rest or flags(args)}"


def check_vllm_serve(args: list[str], vllm_options) -> None:
    backend = [args[i + 1] for i, w in enumerate(args[:-1]) if w == "--attention-backend"]
    assert backend == ["moa"] or "--attention-backend=moa" in args, \
        "a vllm serve line of these documents turns MoA on"
    unknown = set(flags(args)) - vllm_options()
    assert not unknown, f"vllm serve has no {sorted(unknown)}"


def check_make(args: list[str]) -> None:
    makefile = (ROOT / "Makefile").read_text()
    for target in args:
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"no make target {target}"


def check_pip(args: list[str]) -> None:
    extras = set(importlib.metadata.metadata("moa-vllm").get_all("Provides-Extra") or [])
    for word in args:
        for group in re.findall(r"\[([^\]]+)\]", word):
            assert set(group.split(",")) <= extras, f"{word}: moa-vllm's extras are {extras}"
        if match := re.search(r"moa_vllm-([^-]+)-py3", word):
            assert match.group(1) == __version__, f"{word}: the version is {__version__}"


def check_shipped_paths(words: list[str]) -> None:
    for before, word in zip([""] + words, words):
        path = word.rsplit("=", 1)[-1]
        if before not in OUTPUT_FLAGS and path.startswith(SHIPPED):
            assert (ROOT / path).exists(), f"{path} is not in the repository"


@pytest.mark.parametrize("doc, words", COMMANDS,
                         ids=[f"{d.relative_to(ROOT)}: {' '.join(w)[:70]}" for d, w in COMMANDS])
def test_runnable_command_parses(doc, words, request):
    vllm_options = lambda: request.getfixturevalue("vllm_serve_options")  # noqa: E731
    check_shipped_paths(words)
    if words[0] == "moa-vllm":
        check_moa_vllm(words[1:], vllm_options)
    elif words[:3] == ["python", "-m", "moa_vllm.cli"]:
        check_moa_vllm(words[3:], vllm_options)
    elif words[:2] == ["python", "-m"]:
        assert importlib.util.find_spec(words[2]), f"no module {words[2]}"
    elif words[:2] == ["vllm", "serve"]:
        check_vllm_serve(words[2:], vllm_options)
    elif words[0] == "make":
        check_make(words[1:])
    elif words[0] == "pip":
        check_pip(words[1:])
    elif words[0] != "docker":  # docker: the files it reads (checked above)
        pytest.fail(f"{doc.name}: no check for `{words[0]}`; runnable blocks hold only "
                    "commands this test can check")


def section(text: str, title: str) -> str:
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_quickstart_commands_are_all_checked():
    quickstart = section(README.read_text(), "Quickstart")
    fences = re.findall(r"^```(bash.*)$", quickstart, re.M)
    assert fences and set(fences) == {"bash runnable"}


def test_vllm_internals_table_is_what_vllm_contacts_renders():
    assert vllm_contacts.markdown_table() in (ROOT / "docs" / "vllm-internals.md").read_text()


def test_readme_environment_table_is_what_envs_renders():
    assert envs.markdown_table() in section(README.read_text(), "Configuration")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda d: str(d.relative_to(ROOT)))
def test_relative_links_lead_somewhere(doc):
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        assert file.exists(), f"{doc.name}: {target} does not exist"
        if anchor and file.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", file.read_text(), re.M)
            assert anchor in {slug(h) for h in headings}, f"{doc.name}: no heading #{anchor}"


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= README_LINES


@pytest.mark.parametrize("line, logged", [
    ("Two earlier runs were wrong and are not kept: dense was forced to block size 32", True),
    ("Machine: vm x86_64 2 cpus, 2026-12-02, with a decode benchmark running beside it", True),
    ("(``excess_vs_uniform``; plans searched before 2026-12-02 carry ``loss_vs_uniform``)", True),
    ("# The GPU evidence in one device call: the equal-memory decode step", True),
    ("# then one device run: `bash benchmarks/gpu_session.sh`, carry [\".bench_vendor\"]", True),
    ("Why each SmolLM2 plan that once shipped was replaced", True),
    ("The 2026-12-02 transcript (a 2-core Intel Xeon VM)", True),
    ("One run on a 2-core Intel Xeon VM, 2026-12-03, fp32", False),
    ("a request that shares a prefix with an earlier one resumes from its longest prefix", False),
    ("blocks the spans no longer read go back to the pool", False),
    ("start_timeout_s: float = 900", False),
])
def test_the_work_log_check_catches_history_not_facts(line, logged):
    assert bool(WORK_LOG.search(line)) == logged


def test_no_work_log_lines():
    files = [*DOCUMENTS, *(ROOT / "moa_vllm").rglob("*.py"),
             *(p for p in (ROOT / "benchmarks").rglob("*")
               if p.suffix in (".md", ".py", ".sh", ".json"))]
    found = [f"{p.relative_to(ROOT)}: {m.group()}" for p in files
             for m in WORK_LOG.finditer(p.read_text(errors="ignore"))]
    assert found == []
