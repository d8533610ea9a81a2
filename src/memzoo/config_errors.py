"""One-line messages for the configuration errors jsonargparse reports (LightningCLI's parser, ``memzoo summary``).

jsonargparse describes a bad value deep in a config as an indented tree: one ``Parser key "K":`` level per key, one
``Does not validate against any of the Union subtypes`` level per optional section with an entry for every
alternative (most of them ``Expected a <class 'NoneType'>``), the real cause at the bottom. :func:`describe_parse_error`
reads that tree, keeps the failing leaf and says, in one line:

- where: ``FILE, line L`` of the key in the last ``--config`` file that writes it, or the command-line flag;
- an unknown key: its dotted section, the class it configures and the accepted keys closest to it (difflib);
- a wrong value: the dotted key, the value given and the type expected;
- an unknown or abbreviated option (``--trainer.max_step``): the options closest to it;
- YAML syntax errors and keys given twice: file, line and column (from :mod:`memzoo.config_yaml`);
  a missing config file: its path.
"""

from __future__ import annotations

import difflib
import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

UNION_HEAD = "Does not validate against any of the Union subtypes"


class _Class(str):
    """A path segment that is the class a section configures (jsonargparse's ``class_path``), not a key."""


@dataclass
class _Leaf:
    path: list[str]  # keys from the root, with _Class markers where a section names its class
    text: str
    given: str | None = None  # the value of the innermost union the leaf is under, as jsonargparse prints it
    from_command_line: bool = False
    subtypes: str | None = None  # the types of the innermost union, as jsonargparse prints them


@dataclass
class _Where:
    text: str = ""
    keys: list[str] = field(default_factory=list)  # the path as the user wrote it (``init_args`` where given)


# ------------------------------------------------------------------------------------------------ the error tree
def _dedent(lines: list[str]) -> list[str]:
    width = min((len(line) - len(line.lstrip()) for line in lines if line.strip()), default=0)
    return [line[width:] for line in lines]


def _leaves(lines: list[str], path: list[str], given: str | None = None, cli: bool = False) -> list[_Leaf]:
    lines = [line for line in lines if line.strip()]
    if not lines:
        return []
    first = lines[0].strip()
    match = re.match(r'Parser key "([^"]+)":\s*(.*)$', first)
    if match:
        key, rest = match.groups()
        return _leaves(([rest] if rest else []) + _dedent(lines[1:]), path + key.split("."), given, cli)
    match = re.match(r"Problem with given class_path '([^']+)':\s*(.*)$", first)
    if match:
        class_path, rest = match.groups()
        return _leaves(([rest] if rest else []) + _dedent(lines[1:]), path + [_Class(class_path)], given, cli)
    if first.startswith(UNION_HEAD):
        items: list[list[str]] = []
        subtypes = None
        for line in lines[1:]:  # this union's own lines are not indented, its alternatives are
            if line.startswith("Subtypes:"):
                subtypes = line[len("Subtypes:"):].strip()
            elif line.startswith("Given value type:"):
                cli = cli or "NestedArg" in line
            elif line.startswith("Given value:"):
                given = line[len("Given value:"):].strip()
            elif line.startswith("  - "):
                items.append([line[4:]])
            elif line.startswith("    ") and items:
                items[-1].append(line[4:])
        leaves = [leaf for item in items for leaf in _leaves(_dedent(item), path, given, cli)]
        for leaf in leaves:
            leaf.subtypes = leaf.subtypes or subtypes
        return leaves
    if first.startswith("- "):  # alternatives without a union head ("- Expected a path but ...\n- Does not ...")
        items = []
        for line in _dedent(lines):
            if line.startswith("- "):
                items.append([line[2:]])
            elif items:
                items[-1].append(line)  # jsonargparse writes a union's lines at the level of its "- "
        return [leaf for item in items for leaf in _leaves(item, path, given, cli)]
    return [_Leaf(path, "\n".join(line.strip() for line in lines), given, cli)]


def _is_dropped_alternative(leaf: _Leaf) -> bool:
    """Alternatives the user seldom means: ``null``, and a value read as the path of a file to load."""
    return leaf.text.startswith(("Expected a <class 'NoneType'>", "Expected a path but "))


def _expected(text: str) -> str | None:
    match = re.match(r"Expected an? (.+?)(?:\. Got value: .*)?$", text.splitlines()[0])
    if not match:
        return None
    return re.sub(r"<class '(?:builtins\.)?([^']+)'>", r"\1", match.group(1)).replace("NoneType", "null")


def _plain(path: Sequence[str]) -> list[str]:
    return [key for key in path if not isinstance(key, _Class)]


# ------------------------------------------------------------------------------------------------ accepted keys
def _class_keys(class_path: str) -> list[str]:
    """The keys a class's section accepts (its ``__init__`` parameters, as jsonargparse resolves them)."""
    try:
        from jsonargparse import ArgumentParser

        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(cls, fail_untyped=False)
    except Exception:  # noqa: BLE001 - no suggestion rather than a second error
        return []
    return [a.dest for a in parser._actions if a.dest != "help" and not a.dest.endswith(".help")]


def _subparser(parser: Any, verb: str | None) -> Any:
    """``verb``'s parser when ``parser`` has subcommands (LightningCLI's ``fit``...), else ``parser``."""
    action = getattr(parser, "_subcommands_action", None)
    return action._name_parser_map.get(verb, parser) if action is not None and verb else parser


def _parser_keys(parser: Any, verb: str | None) -> list[str]:
    """The dotted keys (``trainer.max_steps``) of ``verb``'s parser (a LightningCLI subcommand) or ``parser``."""
    if parser is None:
        return []
    actions = _subparser(parser, verb)._actions
    return [a.dest for a in actions if a.dest not in ("help", "subcommand") and not a.dest.endswith(".help")]


def _option_strings(parser: Any, verb: str | None) -> list[str]:
    """The long options (``--trainer.max_steps``) of ``verb``'s parser or ``parser``."""
    if parser is None:
        return []
    options = _subparser(parser, verb)._option_string_actions
    return [s for s in options if s.startswith("--") and not s.endswith(".help")]


def _closest(word: str, candidates: Sequence[str]) -> list[str]:
    """Up to 3 of ``candidates``: those ``word`` abbreviates, else those similar to it (difflib ratio >= 0.6, case
    ignored) within 0.1 of the best one."""
    abbreviated = [c for c in candidates if c.startswith(word)]
    if abbreviated:
        return sorted(abbreviated, key=len)[:3]
    scored = sorted(((difflib.SequenceMatcher(None, word.lower(), c.lower()).ratio(), c) for c in candidates),
                    reverse=True)
    scored = [(score, c) for score, c in scored if score >= 0.6]
    return [c for score, c in scored[:3] if score >= scored[0][0] - 0.1]


def _close(word: str, candidates: Sequence[str], quote: str = "'") -> str:
    """``"; did you mean 'x' or 'y'?"``, else the accepted keys; empty when there are none."""
    candidates = sorted(set(candidates))
    matches = _closest(word, candidates)
    if matches:
        return "; did you mean " + " or ".join(f"{quote}{m}{quote}" for m in matches) + "?"
    if candidates and len(candidates) <= 40:
        return "; accepted: " + ", ".join(candidates)
    return ""


# ------------------------------------------------------------------------------------------------ locations
def config_files(args: Sequence[str]) -> list[str]:
    """The ``--config`` files named in ``args``, in order."""
    files = []
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            files.append(args[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def _find_in_file(file: str, path: Sequence[str]) -> _Where | None:
    """The line of the key at ``path`` in YAML file ``file`` (``init_args`` levels followed where written)."""
    import yaml

    try:
        node = yaml.compose(Path(file).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except Exception:  # noqa: BLE001 - unreadable or invalid: not the place to report it
        return None
    keys: list[str] = []
    key_node = None
    for segment in path:
        if not isinstance(node, yaml.MappingNode):
            return None
        entries = {k.value: (k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode)}
        if isinstance(segment, _Class):
            if "init_args" in entries:
                key_node, node = entries["init_args"]
                keys.append("init_args")
            continue
        if segment not in entries:
            return None
        key_node, node = entries[segment]
        keys.append(segment)
    if key_node is None:
        return None
    return _Where(f"{file}, line {key_node.start_mark.line + 1}", keys)


def _find_flag(args: Sequence[str], path: Sequence[str], value: str | None = None) -> _Where | None:
    """The command-line flag (``--a.init_args.b``) that sets the key at ``path``, as written (with ``value``, if
    given)."""
    wanted = [k for key in _plain(path) for k in key.split(".") if k != "init_args"]
    for i in reversed(range(len(args))):
        arg = str(args[i])
        if not arg.startswith("--"):
            continue
        name, _, inline = arg[2:].partition("=")
        name = name.removesuffix("+")  # --trainer.callbacks+=X appends
        written = name.split(".")
        given = inline if "=" in arg else (args[i + 1] if i + 1 < len(args) else None)
        if [k for k in written if k != "init_args"] == wanted and (value is None or given == value):
            return _Where(f"--{name}", written)
    return None


def _locate(path: Sequence[str], args: Sequence[str], files: Sequence[str], prefer_flag: bool,
            value: str | None = None) -> _Where:
    """Where the key at ``path`` is set: the flag (first when ``prefer_flag``, or when it gives ``value``), else the
    last config file that writes it."""
    flag = _find_flag(args, path)
    if flag is not None and (prefer_flag or not files or (value is not None and _find_flag(args, path, value))):
        return flag
    for file in reversed(files):
        found = _find_in_file(file, path)
        if found is not None:
            return found
    if flag is not None:
        return flag
    keys = []
    for segment in path:
        keys.extend(["init_args"] if isinstance(segment, _Class) else segment.split("."))
    return _Where("", keys)


# ------------------------------------------------------------------------------------------------ messages
def describe_parse_error(error: BaseException, parser: Any = None, args: Sequence[str] = (),
                         files: Sequence[str] = ()) -> str:
    """One line for a jsonargparse parse ``error``: see the module docstring. ``parser`` (the parser that failed)
    and ``args`` (its command line, the verb first for LightningCLI) give suggestions and locations; ``files`` are
    config files read besides the ``--config`` ones in ``args``."""
    text = str(error).strip()
    verb = args[0] if args and not str(args[0]).startswith("-") else None
    files = [*files, *config_files(args)]

    match = re.match(r"unrecognized arguments: (.*)$", text, re.S)
    if match:
        tokens = match.group(1).split()
        option = next((t for t in tokens if t.startswith("-")), tokens[0] if tokens else "")
        name = option.split("=", 1)[0]
        hint = _close(name, _option_strings(parser, verb), quote="")
        return f"unknown option {name} (options are never abbreviated){hint}"
    match = re.match(r"argument (--\S+): expected one argument$", text)
    if match:
        flag = next((a for a in reversed(args) if str(a).startswith(match.group(1))), match.group(1))
        return f"{flag}: expected a value after it"
    match = re.match(r"the following arguments are required: (.*)$", text)
    if match:
        names = [name.strip().removeprefix(f"{verb}.") for name in match.group(1).split(",")]
        return (f"{'this config has' if files else 'no config given:'} no {' and no '.join(names)} section"
                f"{'s' if len(names) > 1 else ''}; give {'them' if len(names) > 1 else 'it'} in a --config file "
                f"(e.g. configs/quickstart.yaml) or as --{names[0]}.class_path ...")
    match = re.match(r"Problems parsing config\s*:\s*(.*)$", text, re.S)
    if match:  # jsonargparse reads a config file from inside its folder: it names the file by its bare name
        message = match.group(1).strip()
        named = next((f for f in reversed(files) if message.startswith(f"{Path(f).name}, line ")), None)
        return _one_line(f"{named}{message[len(Path(named).name):]}" if named else message)
    match = re.match(r'Parser key "config":\s*File does not exist:\s*(.*)$', text, re.S)
    if match:
        return f"--config: file {match.group(1).strip()} does not exist"
    match = re.search(r"(?:Subcommand '[^']+'|Group '([^']+)') does not accept option '([^']+)'", text)
    if match:
        group, key = match.groups()
        return _unknown_top_level_key(f"{group}.{key}" if group else key, parser, verb, args, files)

    leaves = _leaves(text.splitlines(), [])
    chosen = [leaf for leaf in leaves if not _is_dropped_alternative(leaf)] or leaves
    if not chosen:
        return _one_line(text)
    depth = max(len(leaf.path) for leaf in chosen)
    deepest = [leaf for leaf in chosen if len(leaf.path) == depth]
    leaf = deepest[0]

    unknown = re.search(r"Option '([^']+)' is not accepted", leaf.text)
    if unknown:
        path = list(leaf.path)
        owner = re.search(r"class_path='([^']+)'", leaf.text)
        if owner and not (path and isinstance(path[-1], _Class)):
            path.append(_Class(owner.group(1)))
        return _unknown_key(unknown.group(1), path, args, files, leaf.from_command_line)
    missing_class = re.search(r"module '([^']+)' has no attribute '([^']+)'", leaf.text)
    if missing_class and _plain(leaf.path):
        section = leaf.path[:-1] if isinstance(leaf.path[-1], _Class) else leaf.path
        return _unknown_class(leaf, section, *missing_class.groups(), args, files)

    import_path = re.match(r"Expected a dot import path string: (.*)$", leaf.text)
    if import_path and _plain(leaf.path):
        where = _locate(leaf.path, args, files, leaf.from_command_line, import_path.group(1))
        classes = re.sub(r"<class '([^']+)'>", r"\1", leaf.subtypes or "").strip("[]").replace(", NoneType", "")
        return (f"{_named(where)}: got {import_path.group(1)!r}, expected a class (module.Class) or a mapping "
                f"of the keys of {classes or 'its class'}")
    expected = [_expected(other.text) for other in leaves
                if other.path == leaf.path and not other.text.startswith("Expected a path but ")]
    if all(expected) and _plain(leaf.path):
        got = re.search(r"\. Got value: (.*)$", leaf.text, re.S)
        value = got.group(1).strip() if got else leaf.given
        where = _locate(leaf.path, args, files, leaf.from_command_line, value)
        return f"{_named(where)}: got {value!r}, expected {' or '.join(dict.fromkeys(expected))}"
    where = _locate(leaf.path, args, files, leaf.from_command_line) if _plain(leaf.path) else _Where()
    return _one_line(f"{_named(where)}: {leaf.text}" if where.keys else leaf.text)


def _named(where: _Where) -> str:
    """``FILE, line L: a.b.c`` for a key in a file, ``--a.b.c`` for a flag, ``a.b.c`` when neither is known."""
    key = ".".join(where.keys)
    if where.text.startswith("--") or not where.text:
        return where.text or key
    return f"{where.text}: {key}"


def _unknown_key(key: str, path: list[str], args: Sequence[str], files: Sequence[str], cli: bool) -> str:
    """``key`` is not a parameter of the class configured at ``path``: where, which section, the closest ones."""
    owner = next((segment for segment in reversed(path) if isinstance(segment, _Class)), None)
    where = _locate([*path, key], args, files, cli)
    section = ".".join(where.keys[:-1]) if where.keys else ".".join(_plain(path))
    hint = _close(key, _class_keys(owner)) if owner else ""
    prefix = f"{where.text}: " if where.text else ""
    about = f" ({owner})" if owner else ""
    return f"{prefix}unknown key '{key}' {'in ' + section if section else 'at the top level'}{about}{hint}"


def _unknown_top_level_key(dotted: str, parser: Any, verb: str | None, args: Sequence[str],
                           files: Sequence[str]) -> str:
    """``trainr.max_steps`` (a key no option of the parser starts with): the first unknown part and its siblings."""
    known = [key.split(".") for key in _parser_keys(parser, verb)]
    parts = dotted.split(".")
    i = 0
    while i < len(parts) - 1 and any(k[: i + 1] == parts[: i + 1] for k in known):
        i += 1
    siblings = [k[i] for k in known if len(k) > i and k[:i] == parts[:i]]
    where = _locate(parts[: i + 1], args, files, prefer_flag=False)
    prefix = f"{where.text}: " if where.text else ""
    section = f"in {'.'.join(parts[:i])}" if i else "at the top level"
    return f"{prefix}unknown key '{parts[i]}' {section}{_close(parts[i], siblings)}"


def _unknown_class(leaf: _Leaf, section: list[str], module: str, name: str, args: Sequence[str],
                   files: Sequence[str]) -> str:
    """The ``class_path`` of ``section`` names a class its module lacks: where, and the module's closest classes."""
    path = [*section, "class_path"]
    where = _find_flag(args, section, f"{module}.{name}") or _locate(path, args, files, leaf.from_command_line)
    try:
        found = importlib.import_module(module)
        names = [n for n in {*dir(found), *getattr(found, "__all__", ())} if n[:1].isupper()]
    except Exception:  # noqa: BLE001 - no suggestion rather than a second error
        names = []
    matches = _closest(name, names)
    hint = "; did you mean " + " or ".join(f"'{module}.{m}'" for m in matches) + "?" if matches else ""
    return f"{_named(where)}: no class '{name}' in module '{module}'{hint}"


def _one_line(text: str, limit: int = 400) -> str:
    line = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 1] + "…"
