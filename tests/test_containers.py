"""containers/Dockerfile and containers/neurocurate.def install the same package, torch and entrypoint.

No container engine runs here, so both recipes are parsed: base image,
build arguments, every ``pip install`` (after substituting the arguments'
defaults), the files copied in and the entrypoint, checked against each
other and against pyproject.toml and the CI's torch pin.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "containers" / "Dockerfile"
DEFFILE = REPO / "containers" / "neurocurate.def"
TORCH_INDEX = "https://download.pytorch.org/whl/"


# --------------------------------------------------------------------------- parsers


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """``[(INSTRUCTION, arguments)]`` with comments dropped and continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by docker too
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        instruction, _, args = full.partition(" ")
        out.append((instruction.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def parse_def(text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Header (``Bootstrap``, ``From``) and ``{section: [lines]}`` of an Apptainer definition file."""
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current: str | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("%"):
            current = stripped[1:].split()[0]
            assert current not in sections, f"section %{current} appears twice"
            sections[current] = []
        elif current is None:
            if stripped and not stripped.startswith("#"):
                key, _, value = stripped.partition(":")
                header[key.strip()] = value.strip()
        elif stripped and not stripped.startswith("#"):
            sections[current].append(stripped)
    return header, sections


def docker_args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    args = {}
    for instr, rest in instructions:
        if instr == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
    return args


def def_args(sections: dict[str, list[str]]) -> dict[str, str]:
    return dict(line.split("=", 1) for line in sections.get("arguments", []))


def expand_docker(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def expand_def(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: args[m.group(1)], text)


def shell_commands(script: str) -> list[list[str]]:
    """Simple commands of a shell script, tokenised, split on newlines and on ``&&``, ``||``, ``;``, ``|``."""
    commands: list[list[str]] = []
    for line in script.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        current: list[str] = []
        for token in lexer:
            if token in ("&&", "||", ";", "|"):
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    return [cmd for cmd in commands if cmd]


def pip_installs(commands: list[list[str]]) -> list[list[str]]:
    return [cmd[2:] for cmd in commands if cmd[:2] == ["pip", "install"]]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def docker() -> dict:
    instructions = parse_dockerfile(DOCKERFILE.read_text())
    args = docker_args(instructions)
    runs = "\n".join(expand_docker(rest, args) for instr, rest in instructions if instr == "RUN")
    copies: dict[str, str] = {}
    for instr, rest in instructions:
        if instr == "COPY":
            *sources, dest = shlex.split(rest)
            for src in sources:
                copies[src] = dest.rstrip("/") + "/" + Path(src).name if dest.endswith("/") else dest
    return {
        "instructions": instructions,
        "args": args,
        "from": [rest for instr, rest in instructions if instr == "FROM"],
        "commands": shell_commands(runs),
        "copies": copies,
        "entrypoint": [json.loads(rest) for instr, rest in instructions if instr == "ENTRYPOINT"],
        "raw_runs": [rest for instr, rest in instructions if instr == "RUN"],
    }


@pytest.fixture(scope="module")
def apptainer() -> dict:
    text = DEFFILE.read_text()
    header, sections = parse_def(text)
    args = def_args(sections)
    copies = {}
    for line in sections.get("files", []):
        src, dest = line.split()
        copies[src] = dest.rstrip("/") + "/" + Path(src).name if dest.endswith("/") else dest
    post = expand_def("\n".join(sections.get("post", [])), args)
    return {
        "header": header,
        "sections": sections,
        "args": args,
        "commands": shell_commands(post),
        "copies": copies,
        "raw_post": sections.get("post", []),
    }


# --------------------------------------------------------------------------- tests


def test_same_base_image(docker, apptainer):
    assert docker["from"] == ["python:3.11-slim"]
    assert apptainer["header"] == {"Bootstrap": "docker", "From": "python:3.11-slim"}


def test_same_build_arguments_and_package_version(docker, apptainer, pyproject):
    assert docker["args"] == apptainer["args"]
    assert docker["args"]["NEUROCURATE_VERSION"] == pyproject["project"]["version"]
    assert docker["args"]["TORCH_VARIANT"] == "cpu", "the default image must use the CPU torch wheels"


def test_torch_pinned_like_ci_and_compatible_with_pyproject(docker, pyproject):
    from packaging.requirements import Requirement

    ci_pin = re.search(r"torch==([\w.+-]+)", (REPO / ".ci" / "run").read_text())
    assert ci_pin, ".ci/run no longer pins torch"
    version = docker["args"]["TORCH_VERSION"]
    assert version == ci_pin.group(1)
    spec = next(Requirement(d) for d in pyproject["project"]["dependencies"] if Requirement(d).name == "torch")
    assert spec.specifier.contains(version), (spec, version)


def test_same_pip_installs(docker, apptainer):
    d, a = pip_installs(docker["commands"]), pip_installs(apptainer["commands"])
    assert d == a
    version = docker["args"]["TORCH_VERSION"]
    torch_cmds = [cmd for cmd in d if any(tok.startswith("torch==") for tok in cmd)]
    assert torch_cmds == [["--index-url", TORCH_INDEX + "cpu", f"torch=={version}"]]
    # Torch must come before the project, so its own index (CPU or CUDA) decides the variant.
    assert d.index(torch_cmds[0]) < d.index(["/src/neurocurate"])


def test_cuda_variant_is_a_build_argument(docker, apptainer):
    torch_run = [r for r in docker["raw_runs"] if "torch==" in r]
    assert len(torch_run) == 1 and TORCH_INDEX + "${TORCH_VARIANT}" in torch_run[0]
    assert any(TORCH_INDEX + "{{ TORCH_VARIANT }}" in line for line in apptainer["raw_post"])
    cuda = {**docker["args"], "TORCH_VARIANT": "cu128"}
    assert TORCH_INDEX + "cu128" in expand_docker(torch_run[0], cuda)


def test_same_files_and_they_are_what_the_build_needs(docker, apptainer, pyproject):
    assert docker["copies"] == apptainer["copies"]
    install_dir = "/src/neurocurate"
    copied = {src for src, dest in docker["copies"].items() if dest == f"{install_dir}/{Path(src).name}"}
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    patterns = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    needed |= {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()
               and any(fnmatch.fnmatch(p.name, pat) for pat in patterns)}
    assert needed == copied, f"copied {sorted(copied)}, the build needs {sorted(needed)}"
    for src in copied:
        assert (REPO / src).exists(), src


def test_dockerignore_keeps_what_is_copied(docker):
    ignore = REPO / "containers" / "Dockerfile.dockerignore"
    patterns = [ln.strip() for ln in ignore.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert ".venv" in patterns and ".git" in patterns
    for src in docker["copies"]:
        assert not any(fnmatch.fnmatch(src, pat) for pat in patterns), src


def test_same_entrypoint(docker, apptainer, pyproject):
    assert pyproject["project"]["scripts"]["neurocurate"] == "pipeline.cli:main"
    assert docker["entrypoint"] == [["neurocurate"]]
    assert apptainer["sections"]["runscript"] == ['exec neurocurate "$@"']
    # Both builds refuse to finish when the installed command reports another version.
    check = ["test", "$(neurocurate --version)", "=", f"neurocurate {docker['args']['NEUROCURATE_VERSION']}"]
    assert check in docker["commands"] and check in apptainer["commands"]


def test_installed_command_reports_the_pinned_version(docker, capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"neurocurate {docker['args']['NEUROCURATE_VERSION']}"


def test_parser_sees_a_changed_install():
    # The comparison must notice a drift: a Dockerfile that installs the project editable differs.
    changed = DOCKERFILE.read_text().replace("pip install /src/neurocurate", "pip install -e /src/neurocurate")
    commands = shell_commands("\n".join(rest for instr, rest in parse_dockerfile(changed) if instr == "RUN"))
    assert ["-e", "/src/neurocurate"] in pip_installs(commands)
