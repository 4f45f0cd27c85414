"""Settings from a TOML file and DUME_* environment variables, applied as defaults to a command line's parser.

Precedence, lowest first: the flags' built-in defaults, the file, the environment, the flags typed on the command
line. The file is ``--config FILE`` (accepted by every subcommand) or ``$DUME_CONFIG``. Its keys are the long flag
names without the dashes, in one table per program, optionally refined per subcommand::

    [coordinator]            # every dume-coordinator subcommand that has the flag
    state = "/var/lib/dume"
    [coordinator.init]       # only `dume-coordinator init`; wins over [coordinator]
    listen = "0.0.0.0:7600"

An environment variable is ``DUME_`` plus the flag name in capitals with ``_`` for ``-`` (``DUME_STATE``,
``DUME_TOKEN``) and applies to every subcommand of the running program that has the flag. A key that names no
flag, or a value the flag would refuse, stops the program with one line naming the key and the file.
"""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dume.shared.errors import DumeError

CONFIG_ENVIRONMENT = "DUME_CONFIG"
ENVIRONMENT_PREFIX = "DUME_"
SECRET_OPTIONS = frozenset({"token"})  # shown as "<set>" by `config show`, never printed
MASK = "<set, not shown>"
PROGRAM_TABLES = ("coordinator", "node", "dume")  # one per program: dume-coordinator, dume-node, dume
TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off"}


class ConfigError(DumeError):
    """A configuration problem, already phrased as the one line the user sees."""


@dataclass(frozen=True)
class Setting:
    """One option's effective default and where it came from ("default", the file's path, or the variable)."""

    value: Any
    source: str


def program_table(parser: argparse.ArgumentParser) -> str:
    """The file's table for this program: ``coordinator`` for dume-coordinator, ``node``, ``dume``."""
    return parser.prog.removeprefix("dume-")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Long flag name without dashes -> its action, for every option a configuration may set."""
    found = {}
    for action in parser._actions:
        long_flags = [flag for flag in action.option_strings if flag.startswith("--")]
        if long_flags and action.dest not in ("help", "config"):
            found[long_flags[0][2:]] = action
    return found


def convert(action: argparse.Action, raw: Any, where: str) -> Any:
    """``raw`` (a TOML value or an environment string) as the flag would have parsed it, or a ConfigError."""
    if isinstance(action, argparse._StoreTrueAction):
        if isinstance(raw, str) and raw.strip().lower() in TRUE_WORDS | FALSE_WORDS:
            return raw.strip().lower() in TRUE_WORDS
        if not isinstance(raw, bool):
            raise ConfigError(f"{where}: {raw!r} is not true or false")
        return raw
    if isinstance(action, argparse._AppendAction):
        items = raw if isinstance(raw, list) else [raw]
        return [convert_one(action, item, where) for item in items]
    return convert_one(action, raw, where)


def convert_one(action: argparse.Action, raw: Any, where: str) -> Any:
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise ConfigError(f"{where}: {raw!r} is not a string or a number")
    text = str(raw)
    try:
        value = action.type(text) if action.type else text
    except (argparse.ArgumentTypeError, ValueError, TypeError) as error:
        raise ConfigError(f"{where}: {error or repr(text) + ' is not a valid value'}") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where}: {text!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def read_file(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist: fix --config or ${CONFIG_ENVIRONMENT}") from None
    except OSError as error:
        raise ConfigError(f"cannot read configuration file {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"configuration file {path} is not valid TOML: {error}") from None


def file_settings(parser: argparse.ArgumentParser, path: Path) -> dict[str, dict[str, Setting]]:
    """Subcommand -> option -> the file's value; refuses any key that names no flag of this program."""
    program = program_table(parser)
    commands = subcommands(parser)
    document = read_file(path)
    for name in document:
        if name not in PROGRAM_TABLES:
            raise ConfigError(f"{path}: unknown key {name!r} at the top level: settings go in a "
                              f"[{'], ['.join(PROGRAM_TABLES)}] table")
    table = document.get(program, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [{program}] must be a table")
    found: dict[str, dict[str, Setting]] = {name: {} for name in commands}
    all_options = {key for command in commands.values() for key in options(command)}
    for key, value in table.items():
        if key in commands and isinstance(value, dict):
            continue
        if key not in all_options:
            raise ConfigError(f"{path}: unknown key {key!r} in [{program}]: no {parser.prog} command has --{key}")
        for name, command in commands.items():
            if key in options(command):
                where = f"{path}: [{program}] {key}"
                found[name][key] = Setting(convert(options(command)[key], value, where), str(path))
    for name, command in commands.items():
        refined = table.get(name, {})
        for key, value in refined.items():
            if key not in options(command):
                raise ConfigError(f"{path}: unknown key {key!r} in [{program}.{name}]: "
                                  f"`{parser.prog} {name}` has no --{key}")
            where = f"{path}: [{program}.{name}] {key}"
            found[name][key] = Setting(convert(options(command)[key], value, where), str(path))
    return found


def environment_variable(key: str) -> str:
    return ENVIRONMENT_PREFIX + key.upper().replace("-", "_")


def effective_settings(parser: argparse.ArgumentParser, config: Path | None,
                       environment: Mapping[str, str]) -> dict[str, dict[str, Setting]]:
    """Subcommand -> option -> its value before the command line: built-in default, then file, then environment."""
    from_file = file_settings(parser, config) if config else {}
    settings: dict[str, dict[str, Setting]] = {}
    for name, command in subcommands(parser).items():
        settings[name] = {}
        for key, action in options(command).items():
            setting = from_file.get(name, {}).get(key, Setting(action.default, "default"))
            variable = environment_variable(key)
            if environment.get(variable):
                setting = Setting(convert(action, environment[variable], f"${variable}"), f"${variable}")
            settings[name][key] = setting
    return settings


def config_path(argv: Sequence[str], environment: Mapping[str, str]) -> Path | None:
    """``--config FILE`` wherever it stands on the command line, else ``$DUME_CONFIG``, else None."""
    finder = argparse.ArgumentParser(add_help=False)
    finder.add_argument("--config", type=Path)
    found, _ = finder.parse_known_args(argv)
    return found.config or (Path(environment[CONFIG_ENVIRONMENT]) if environment.get(CONFIG_ENVIRONMENT) else None)


def parse_with_configuration(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with the file's and the environment's values as the flags' defaults.

    A configuration problem exits with status 2 and one line on stderr, before any command runs.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    for command in subcommands(parser).values():
        if "--config" not in command._option_string_actions:
            command.add_argument("--config", type=Path, metavar="FILE",
                                 help=f"TOML configuration file (default: ${CONFIG_ENVIRONMENT}); flags win over it")
    try:
        settings = effective_settings(parser, config_path(argv, os.environ), os.environ)
    except ConfigError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    for name, command in subcommands(parser).items():
        for key, action in options(command).items():
            setting = settings[name][key]
            if setting.source != "default":
                action.default = setting.value
                action.required = False
    return parser.parse_args(argv)


def show(parser: argparse.ArgumentParser, config: Path | None, environment: Mapping[str, str]) -> str:
    """The effective configuration as TOML, each value's source in a comment, secrets masked."""
    program = program_table(parser)
    lines = [f"# effective configuration of {parser.prog}; file: {config or 'none'}"]
    for name, values in effective_settings(parser, config, environment).items():
        if name == "config":
            continue
        lines.append(f"\n[{program}.{name}]")
        for key, setting in values.items():
            if setting.value is None:
                lines.append(f"# {key} is not set")
                continue
            shown = MASK if key in SECRET_OPTIONS else setting.value
            lines.append(f"{key} = {toml_value(shown)}  # {setting.source}")
    return "\n".join(lines)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def read_secret_file(path: Path, what: str) -> str:
    """A secret kept in a file (so that it is not on the command line, where `ps` shows it), stripped."""
    try:
        secret = path.read_text().strip()
    except OSError as error:
        raise ConfigError(f"cannot read {what} from {path}: {error.strerror}") from None
    if not secret:
        raise ConfigError(f"{path} is empty: it should hold {what}")
    return secret


def join_token(token: str | None, token_file: Path | None) -> str:
    """The join token from ``--token``/``$DUME_TOKEN`` or from ``--token-file``, never both."""
    if token and token_file:
        raise ConfigError("both a join token (--token or $DUME_TOKEN) and --token-file are given: keep one")
    return token or read_secret_file(token_file, "a join token")


def add_config_command(commands: argparse._SubParsersAction, parser: argparse.ArgumentParser) -> None:
    """``PROGRAM config show``: print the effective configuration of every subcommand, secrets masked."""
    command = commands.add_parser("config", help="show the effective configuration (file, DUME_* variables, "
                                  "defaults), secrets masked")
    command.add_argument("action", choices=("show",), help="show: print it as TOML")

    def run(args: argparse.Namespace) -> None:
        print(show(parser, args.config or config_path([], os.environ), os.environ))

    command.set_defaults(run=run)
