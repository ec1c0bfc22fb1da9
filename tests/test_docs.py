"""README.md and docs/*.md name only commands, flags, config names, YAML keys, modules and files that exist.

Docs go stale silently when code moves (issue 29 found a config list, a YAML section list and a restart claim
out of date). These tests read every code span and fenced block of the docs and check what they name against
the code itself, in-process, starting nothing:

- ``loomtrain <command>`` and its flags against the CLI's own argparse parser (``launch/cli.py::build_parser``;
  a command with no placeholder is parsed whole), flag values against the flag's ``choices``;
  ``-m loomtrain.<module>`` flags against that module's ``--help``; ``scripts/*.py`` flags against the script;
- a command's CONFIG through ``resolve_config_path``, its ``--set`` overrides through ``load_config``;
- dotted ``section.key`` names against the config dataclasses (``trainer/config.py``), else as a ``loomtrain.``
  Python name (``parallel.cp.choose``); ``yaml`` blocks through ``load_config`` (or the cluster-description reader);
- repository paths and ``path::name`` symbols, links and their ``#anchors``, imports in ``python`` blocks;

and the other way round, that every CLI command and flag, every shipped config and every YAML section is
documented, and that the README stays a short path (contents, CI's test command). Exclusions only through the
commented allow-lists below.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import glob
import importlib
import importlib.util
import io
import os
import re
import shlex
import tempfile
from functools import lru_cache
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 250  # issue 29: "the README stays under about 250 lines"; details belong in docs/

# ---------------------------------------------------------------------------- allow-lists (each entry says why)
ALLOWED_KEYS = {
    "train.stepz": "the README's example of the one-line error a misspelt key gets",
    "dp_sync.build_sync": "docs/ARCHITECTURE.md's 'before (commit d612699)' column: a function as it was then",
}
ALLOWED_CONFIGS = {
    "my.yaml": "the reader's own experiment file in the README's walkthrough (a copy of a shipped config)",
}
ALLOWED_FLAGS = {  # flags of other tools, named in prose without their command
    "--requeue": "sbatch's (#SBATCH line of the generated script)",
    "--signal": "sbatch's (#SBATCH line of the generated script)",
    "--open-mode": "sbatch's (#SBATCH line of the generated script)",
    "--nnodes": "torchrun's",
    "--nproc-per-node": "torchrun's",
    "--split-sentences": "Megatron-LM's tools/preprocess_data.py",
    "--data-path": "Megatron-LM's pretrain_gpt.py (the weighted blend data.sources follows)",
}
EXTERNAL_TOOLS = {  # a command line starting with one of these: its flags are not loomtrain's (until a loomtrain
    # anchor such as `-m loomtrain.launch.train` takes over), and not checked
    "srun", "sbatch", "scancel", "torchrun", "pip", "git", "cd", "touch", "python", "#SBATCH",
}
PLACEHOLDER_WORDS = {"...", "section.key=value"}  # the generic forms in the commands list

# ---------------------------------------------------------------------------- reading the docs
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
INLINE = re.compile(r"`((?:[^`\n]|\n(?![ \t]*\n))+)`")  # a code span may wrap, not across a blank line
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)
SEPARATORS = {"&&", "||", ";", "|"}
FILE_EXTS = {"py", "yaml", "yml", "json", "jsonl", "md", "txt", "bin", "idx", "lock", "png", "safetensors", "sbatch",
             "out", "tmp"}
TOP_DIRS = ("launch", "trainer", "parallel", "data", "comms", "faulttol", "loomtrain", "configs", "tests", "scripts",
            "docs", r"\.ci")
TOP_FILES = ("setup.py", "BENCHMARKS.md", "README.md", "pytest.ini")
PATH_RE = re.compile(r"(?<![\w./<$~-])((?:(?:%s)/[\w./*-]*|(?:%s)))(?:::([A-Za-z_][\w.]*))?"
                     % ("|".join(TOP_DIRS), "|".join(re.escape(f) for f in TOP_FILES)))


@dataclasses.dataclass
class Snippet:
    doc: Path
    line: int
    kind: str  # "inline", or a fenced block's language ("" when none)
    text: str

    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@lru_cache(maxsize=None)
def snippets(doc: Path) -> tuple[list[Snippet], str]:
    """The doc's code (fenced blocks and inline spans) and its prose (fenced blocks blanked, lines kept)."""
    text = doc.read_text()
    found = [Snippet(doc, text.count("\n", 0, m.start()) + 2, m.group(1).strip().lower(), m.group(2))
             for m in FENCE.finditer(text)]
    prose = FENCE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)  # same offsets and lines
    for m in INLINE.finditer(prose):
        found.append(Snippet(doc, prose.count("\n", 0, m.start()) + 1, "inline", " ".join(m.group(1).split())))
    return found, prose


def all_snippets() -> list[Snippet]:
    return [s for doc in doc_files() for s in snippets(doc)[0]]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (not - or _), spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(doc: Path) -> set[str]:
    prose = snippets(doc)[1] if doc.suffix == ".md" and doc.is_relative_to(ROOT) else doc.read_text()
    seen: dict[str, int] = {}
    out = set()
    for m in HEADING.finditer(prose):
        s = slug(m.group(2))
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


# ---------------------------------------------------------------------------- what the code offers
@lru_cache(maxsize=None)
def cli():
    """(top-level parser, {command words: subparser}) from ``launch/cli.py``, nested commands as 'data prepare'."""
    from loomtrain.launch.cli import build_parser

    parser = build_parser()
    commands = {}

    def walk(p, prefix):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                        walk(sub, prefix + (name,))
                    else:
                        commands[prefix + (name,)] = sub

    walk(parser, ())
    return parser, commands


def option_strings(parser) -> set[str]:
    return set(parser._option_string_actions)


@lru_cache(maxsize=None)
def module_flags(module: str) -> frozenset | None:
    """Flags a ``python -m loomtrain.<module>`` accepts, from its own ``--help``; None when it has no ``main``."""
    mod = importlib.import_module(module)
    if not hasattr(mod, "main"):
        return None
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()), contextlib.suppress(SystemExit):
        mod.main(["--help"])
    return frozenset(re.findall(r"(?<![\w-])--[\w-]+", out.getvalue()))


DOC_MODULES = ("loomtrain.launch.train", "loomtrain.faulttol.hang_monitor", "loomtrain.faulttol.smp")


@lru_cache(maxsize=None)
def known_flags() -> frozenset:
    """Every flag of the loomtrain CLI and of the modules the docs run with ``python -m``."""
    _, commands = cli()
    flags = {f for sub in commands.values() for f in option_strings(sub)}
    for m in DOC_MODULES:
        flags |= module_flags(m) or set()
    return frozenset(flags)


@lru_cache(maxsize=None)
def sections() -> tuple[str, ...]:
    from loomtrain.trainer.config import Experiment

    exp = Experiment()
    return tuple(f.name for f in dataclasses.fields(exp) if dataclasses.is_dataclass(getattr(exp, f.name)))


_MISSING = object()


def config_field(dotted: str):
    """The default value of the config field ``section.key[.key]`` names (trainer/config.py), or _MISSING."""
    from loomtrain.trainer.config import Experiment

    obj = Experiment()
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            return _MISSING
        obj = getattr(obj, part)
    return obj


def key_exists(dotted: str) -> bool:
    return config_field(dotted) is not _MISSING


def python_name_exists(dotted: str) -> bool:
    """``loomtrain.a.b.c``: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def is_placeholder(word: str) -> bool:
    return (word in PLACEHOLDER_WORDS or "..." in word or "<" in word
            or bool(re.fullmatch(r"[A-Z][A-Z0-9_]*", word)))


def check_overrides(config: str | None, overrides: list[str], where: str, errors: list[str]) -> None:
    from loomtrain.trainer.config import ConfigError, load_config

    overrides = [o for o in overrides if o.partition("=")[0] not in ALLOWED_KEYS]
    concrete = [o for o in overrides if not is_placeholder(o) and not is_placeholder(o.partition("=")[2])]
    for o in concrete:
        if "=" not in o:
            errors.append(f"{where}: --set {o}: not section.key=value")
    if overrides and len(concrete) == len(overrides) and (config is None or not is_placeholder(config)):
        try:
            load_config(None if config in ALLOWED_CONFIGS else config, concrete)
        except ConfigError as e:
            errors.append(f"{where}: {' '.join(['--set ' + o for o in overrides])}: {e}")


# ---------------------------------------------------------------------------- commands
def command_lines(s: Snippet) -> list[str]:
    """Shell-like lines of a snippet: inline spans whole; bash/console/plain blocks joined at ``\\`` and cut at
    comments and ``$`` prompts."""
    if s.kind == "inline":
        return [s.text]
    if s.kind not in ("", "bash", "sh", "shell", "console"):
        return []
    lines = []
    for line in s.text.replace("\\\n", " ").splitlines():
        line = re.sub(r"^\s*\$ ", "", line)
        line = re.sub(r"(^|\s)#(?!SBATCH).*$", "", line)
        if line.strip():
            lines.append(line)
    return lines


def words(line: str) -> list[str]:
    try:
        out = shlex.split(line)
    except ValueError:
        out = line.split()
    return [w.strip("[]") for w in out if w.strip("[]")]


def segments(ws: list[str]) -> list[list[str]]:
    out, cur = [], []
    for w in ws:
        if w in SEPARATORS:
            out.append(cur)
            cur = []
        else:
            cur.append(w)
    return out + [cur]


def check_loomtrain_command(ws: list[str], where: str, errors: list[str]) -> None:
    """``ws`` starts after the word ``loomtrain``."""
    parser, commands = cli()
    if not ws or is_placeholder(ws[0]):  # `loomtrain`, `loomtrain <command> --help`
        for w in ws[1:]:
            name = w.partition("=")[0]
            if w.startswith("--") and name not in known_flags() | {"--help"}:
                errors.append(f"{where}: loomtrain: no command has the flag {name}")
        return
    key = next((k for k in commands if tuple(ws[:len(k)]) == k), None)
    if key is None:
        errors.append(f"{where}: loomtrain {' '.join(ws[:2])}: no such command (commands: "
                      f"{', '.join(' '.join(k) for k in commands)})")
        return
    sub, rest = commands[key], ws[len(key):]
    actions = sub._option_string_actions
    config, overrides, i = None, [], 0
    while i < len(rest):
        w = rest[i]
        if w.startswith("--") and len(w) > 2:
            name, eq, value = w.partition("=")
            action = actions.get(name)
            if action is None:
                errors.append(f"{where}: loomtrain {' '.join(key)}: no flag {name} (flags: "
                              f"{', '.join(sorted(a for a in actions if a.startswith('--')))})")
                i += 1
                continue
            if action.nargs != 0 and not eq and i + 1 < len(rest) and not rest[i + 1].startswith("-"):
                value = rest[i + 1]
                i += 1
            if name == "--set" and value:
                overrides.append(value)
            if action.choices and value and not is_placeholder(value):
                for alt in value.split("|"):
                    if alt not in action.choices:
                        errors.append(f"{where}: loomtrain {' '.join(key)} {name} {alt}: not one of "
                                      f"{', '.join(map(str, action.choices))}")
        elif not w.startswith("-") and config is None and key not in (("export",), ("eval",)):  # CHECKPOINT, SOURCE
            config = w
            for alt in w.split("|"):
                if not is_placeholder(alt) and alt not in ALLOWED_CONFIGS:
                    from loomtrain.trainer.config import ConfigError, resolve_config_path

                    try:
                        resolve_config_path(alt)
                    except ConfigError as e:
                        errors.append(f"{where}: loomtrain {' '.join(key)} {alt}: {e}")
        i += 1
    check_overrides(config, overrides, where, errors)
    if rest and not any(is_placeholder(w) or "|" in w for w in ws):  # a whole example: argparse's own verdict
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                parser.parse_args(list(ws))
        except SystemExit as e:
            if e.code:
                errors.append(f"{where}: loomtrain {' '.join(ws)}: {err.getvalue().strip().splitlines()[-1]}")


def check_segment(ws: list[str], where: str, errors: list[str]) -> None:
    """One command of a line: anchors (``loomtrain``, ``-m loomtrain.X``, ``scripts/X.py``) own the flags after
    them; a line of another tool owns its flags; bare flags in prose must be loomtrain's (or allow-listed)."""
    owner, i = ("external" if ws and (ws[0] in EXTERNAL_TOOLS or re.fullmatch(r"\w+=\S*", ws[0])) else "prose"), 0
    while i < len(ws):
        w = ws[i]
        if w == "loomtrain":
            end = next((j for j in range(i + 1, len(ws)) if ws[j] == "--"), len(ws))
            check_loomtrain_command(ws[i + 1:end], where, errors)
            i, owner = end, "external"
            continue
        if w == "-m" and i + 1 < len(ws) and ws[i + 1].startswith("loomtrain."):
            module = ws[i + 1]
            if importlib.util.find_spec(module) is None:
                errors.append(f"{where}: -m {module}: no such module")
                owner = "external"
            else:
                owner = ("module", module)
            i += 2
            continue
        if re.fullmatch(r"scripts/[\w-]+\.py", w):
            owner = ("script", w)
            if not (ROOT / w).is_file():
                errors.append(f"{where}: {w}: no such script")
        elif w == "--":
            owner = "external"
        elif w.startswith("--") and len(w) > 2:
            name = w.partition("=")[0]
            if owner == "prose" and name not in known_flags() | ALLOWED_FLAGS.keys():
                errors.append(f"{where}: {name}: no loomtrain command or module has this flag")
            elif isinstance(owner, tuple) and owner[0] == "module":
                flags = module_flags(owner[1])
                if flags is None or name not in flags | {"--help"}:
                    errors.append(f"{where}: python -m {owner[1]}: no flag {name}")
            elif isinstance(owner, tuple) and owner[0] == "script" and (ROOT / owner[1]).is_file():
                if not re.search(r"""["']%s["']""" % re.escape(name), (ROOT / owner[1]).read_text()):
                    errors.append(f"{where}: {owner[1]}: no flag {name}")
            if owner == "prose" and name == "--set" and i + 1 < len(ws):
                check_overrides(None, [ws[i + 1]], where, errors)
        i += 1


def test_docs_name_only_existing_commands_flags_and_configs():
    """Every ``loomtrain`` command, flag, flag value and config name, and every flag of ``python -m loomtrain.X``
    and ``scripts/X.py``, in README.md and docs/*.md, exists in the code (argparse, ``resolve_config_path``)."""
    errors: list[str] = []
    for s in all_snippets():
        for line in command_lines(s):
            for seg in segments(words(line)):
                check_segment(seg, s.where(), errors)
    assert not errors, "docs name commands, flags or configs that do not exist:\n" + "\n".join(errors)


# ---------------------------------------------------------------------------- YAML keys
def key_re() -> re.Pattern:
    return re.compile(r"(?<![\w./-])((?:%s)(?:\.[A-Za-z_*][\w*]*)+)" % "|".join(sections()))


def check_dotted(token: str, where: str, errors: list[str]) -> None:
    parts = token.split(".")
    while parts and parts[-1] == "*":
        parts.pop()
    dotted = ".".join(parts)
    if parts[-1] in FILE_EXTS or dotted in ALLOWED_KEYS:
        return
    if not key_exists(dotted) and not python_name_exists("loomtrain." + dotted):
        errors.append(f"{where}: {token}: neither a config key (trainer/config.py) nor a loomtrain Python name")


def flatten(values: dict, prefix: str = "") -> list[str]:
    """Dotted keys of a YAML mapping, descending wherever the config has a section (a dataclass) of that name."""
    out = []
    for k, v in values.items():
        path = f"{prefix}.{k}" if prefix else str(k)
        section = dataclasses.is_dataclass(config_field(path))
        out += flatten(v, path) if isinstance(v, dict) and section else [path]
    return out


def check_yaml_block(s: Snippet, errors: list[str]) -> None:
    from loomtrain.launch.topology import cluster_from_dict
    from loomtrain.trainer.config import ConfigError, load_config

    try:
        values = yaml.safe_load(s.text)
    except yaml.YAMLError as e:
        errors.append(f"{s.where()}: not valid YAML ({str(e).splitlines()[0]})")
        return
    if not isinstance(values, dict):
        errors.append(f"{s.where()}: a yaml block that is not a mapping")
        return
    if set(values) <= set(sections()) | {"plugins"}:
        # names a plugin file or a model directory of the reader's: the keys are checked, not the values
        if "plugins" in values or "init_from" in (values.get("model") or {}):
            for path in flatten({k: v for k, v in values.items() if k != "plugins"}):
                if not key_exists(path):
                    errors.append(f"{s.where()}: {path}: no such config key")
            return
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(s.text)
        try:
            load_config(f.name)
        except ConfigError as e:
            errors.append(f"{s.where()}: this experiment YAML does not load: {e}")
        finally:
            os.unlink(f.name)
    elif set(values) <= {"fabrics", "hosts", "between", "intra_host_gbps"}:
        try:
            cluster_from_dict(values, s.where())
        except ConfigError as e:
            errors.append(f"{s.where()}: this cluster description does not load: {e}")
    else:
        errors.append(f"{s.where()}: a yaml block that is neither an experiment nor a cluster description "
                      f"(top-level keys {sorted(values)})")


def check_choice(text: str, where: str, errors: list[str]) -> None:
    """An inline ``section.key: a | b`` whose key has a fixed set of values names only values of that set."""
    from loomtrain.trainer.config import CHOICES, registries

    m = re.fullmatch(r"((?:%s)\.[\w.]+): (.+)" % "|".join(sections()), text.strip())
    if not m:
        return
    choices = dict(CHOICES)
    choices.update({k: r.choices() for k, r in registries().items()})
    if m.group(1) in choices:
        for alt in (a.strip() for a in m.group(2).split("|")):
            if alt not in choices[m.group(1)]:
                errors.append(f"{where}: {m.group(1)}: {alt!r} is not one of {', '.join(choices[m.group(1)])}")


def test_docs_name_only_existing_yaml_keys():
    """Every dotted ``section.key`` in code spans and blocks (``--set`` examples included) is a field of the config
    dataclasses or a loomtrain Python name; every ``yaml`` block loads (``load_config`` or the cluster reader);
    every inline ``key: value`` of a key with fixed values names a valid one."""
    errors: list[str] = []
    pattern = key_re()
    for s in all_snippets():
        if s.kind == "python":
            continue
        for m in pattern.finditer(s.text):
            check_dotted(m.group(1), s.where(), errors)
        if s.kind in ("yaml", "yml"):
            check_yaml_block(s, errors)
        if s.kind == "inline":
            check_choice(s.text, s.where(), errors)
    assert not errors, "docs name YAML keys that do not exist:\n" + "\n".join(errors)


# ---------------------------------------------------------------------------- files, symbols, links, imports
def defines(path: Path, name: str) -> bool:
    text = path.read_text()
    return bool(re.search(r"^\s*(?:async\s+def|def|class)\s+%s\b|^\s*%s\s*(?::[^=\n]*)?=" % (name, name), text, re.M))


def check_path(path: str, symbol: str | None, where: str, errors: list[str]) -> None:
    path = path.rstrip(".")
    full = ROOT / path
    if "*" in path:
        if not glob.glob(str(full)):
            errors.append(f"{where}: {path}: matches no file")
        return
    if not full.exists():
        module, _, name = path.rpartition(".")  # `comms/traffic.install`: a function of comms/traffic.py
        if not (module and (ROOT / f"{module}.py").is_file() and defines(ROOT / f"{module}.py", name)):
            errors.append(f"{where}: {path}: no such file or folder")
        return
    if symbol and full.is_file():
        for part in symbol.split("."):
            if not defines(full, part):
                errors.append(f"{where}: {path}::{symbol}: {path} defines no {part}")
                return


def test_docs_name_only_existing_files_symbols_and_links():
    """Every repository path in code (``trainer/config.py``, ``path::name`` with the name defined there) and every
    relative link, with its ``#anchor`` a heading of the target, exists."""
    errors: list[str] = []
    for s in all_snippets():
        for m in PATH_RE.finditer(s.text):
            check_path(m.group(1), m.group(2), s.where(), errors)
    for doc in doc_files():
        prose = snippets(doc)[1]
        for m in LINK.finditer(prose):
            target = m.group(1)
            where = f"{doc.relative_to(ROOT)}:{prose.count(chr(10), 0, m.start()) + 1}"
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                errors.append(f"{where}: link to {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                errors.append(f"{where}: link to {target}: {dest.name} has no heading with that anchor")
    assert not errors, "docs name files, symbols or links that do not exist:\n" + "\n".join(errors)


def test_docs_python_examples_import_what_exists():
    """Every ``python`` block parses, and every module and name it imports exists."""
    errors: list[str] = []
    for s in all_snippets():
        if s.kind != "python":
            continue
        try:
            tree = ast.parse(s.text)
        except SyntaxError as e:
            errors.append(f"{s.where()}: python block does not parse: {e}")
            continue
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if not python_name_exists(name):
                    errors.append(f"{s.where()}: imports {name}, which does not exist")
    assert not errors, "docs' Python examples import what does not exist:\n" + "\n".join(errors)


# ---------------------------------------------------------------------------- the other way round
def test_every_command_flag_config_and_section_is_documented():
    """Every CLI command and flag appears in the docs' code, every shipped config in the README as
    ``configs/<name>.yaml``, every YAML section in the README in backticks: a new one cannot go unmentioned."""
    code = "\n".join(s.text for s in all_snippets())
    readme = (ROOT / "README.md").read_text()
    _, commands = cli()
    missing = []
    for key, sub in commands.items():
        if f"loomtrain {' '.join(key)}" not in code:
            missing.append(f"the command loomtrain {' '.join(key)}")
        for flag in option_strings(sub) - {"-h", "--help"}:
            if flag.startswith("--") and not re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(flag), code):
                missing.append(f"loomtrain {' '.join(key)} {flag}")
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        if f"configs/{path.name}" not in readme:
            missing.append(f"the shipped config configs/{path.name} (README's table)")
    for name in (*sections(), "plugins"):
        if f"`{name}`" not in readme:
            missing.append(f"the YAML section `{name}` (README's Configuration)")
    assert not missing, "not documented:\n" + "\n".join(missing)


def test_readme_is_a_short_path_with_contents_and_the_ci_command():
    """The README stays under README_MAX_LINES with a contents list linking every section, and holds the exact test
    command ``.ci/run`` runs (CI runs the README's command: the two must not drift apart)."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    n = text.count("\n")
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move details to docs/"
    prose = snippets(readme)[1]
    contents = prose.split("## Contents", 1)[1].split("\n## ", 1)[0] if "## Contents" in prose else ""
    assert contents, "README.md has no '## Contents' section"
    linked = set(re.findall(r"\]\(#([^)]+)\)", contents))
    sections_ = [slug(m.group(2)) for m in HEADING.finditer(prose) if len(m.group(1)) == 2]
    assert set(sections_) - {"contents"} <= linked, f"not in the contents: {sorted(set(sections_) - linked - {'contents'})}"
    ci_command = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()][-1].strip()
    blocks = [s.text for s in snippets(readme)[0] if s.kind == "bash"]
    assert any(ci_command in b.splitlines() for b in blocks), f"README.md has no bash block with: {ci_command}"
