"""Stage configuration: a dataclass per stage, and a command line generated from it.

Fields are int, float, str or bool. Every field has a default and a one-line help (``field(metadata={"help": ...})``). Flags are
``--key=value`` or ``--key value`` (``--flag`` alone sets a boolean); values are converted to the
field's type, and an unknown flag is one clear sentence that lists the valid ones.
"""
import dataclasses
import math
import os
import sys
import typing

from .checkpoint import CheckpointError
from .data import DataError
from .model import ModelError
from .tokenizer import TokenizerError


class ConfigError(ValueError):
    """A command-line flag that cannot be used, with a sentence saying why."""


def arg(default, help: str, *, at_least=None, above=None, at_most=None, one_of=None, form=None):
    """A config field with its default, its one-line help and the values it accepts: a bound
    (``at_least``, ``above``, ``at_most``), a list of choices (``one_of``) or a ``form`` (a function
    that says what is wrong with a value, or None), checked by ``build`` so every command line and every
    stage refuses the same bad values with the same sentence. A float is never NaN."""
    metadata = {"help": help, "at_least": at_least, "above": above, "at_most": at_most, "one_of": one_of, "form": form}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: default, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def named(text: str) -> str | None:
    """The ``form`` of a path flag: a name, not an empty string (which would resolve to the filesystem root)."""
    return None if text.strip() else "needs a file or folder name"


def check_value(name: str, value, metadata) -> None:
    """Refuse a value outside what its field declares, in one sentence naming the flag."""
    m = {key: metadata.get(key) for key in ("at_least", "above", "at_most", "one_of", "form")}
    if m["form"] is not None and m["form"](value) is not None:
        raise ConfigError(f"--{name} {m['form'](value)}, not {value!r}.")
    if m["one_of"] is not None and value not in m["one_of"]:
        raise ConfigError(f"--{name} takes one of {', '.join(map(str, m['one_of']))}, not {value!r}.")
    if m["at_least"] is not None and value < m["at_least"]:
        raise ConfigError(f"--{name} must be at least {m['at_least']}, not {value}.")
    if m["above"] is not None and not value > m["above"]:  # also refuses nan
        raise ConfigError(f"--{name} must be above {m['above']}, not {value}.")
    if m["at_most"] is not None and not value <= m["at_most"]:
        raise ConfigError(f"--{name} must be at most {m['at_most']}, not {value}.")
    if isinstance(value, float) and math.isnan(value):  # a bound with ``<`` lets nan through
        raise ConfigError(f"--{name} must be a number, not nan.")


def convert(name: str, kind, text: str):
    """A flag's text as the field's type (int, float, str or bool), or one sentence saying what it takes."""
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{name} takes true or false, not {text!r}.")
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"--{name} takes a {kind.__name__}, not {text!r}.") from None


def parse_flags(argv: list[str]) -> dict[str, str | None]:
    """``--a=1 --b 2 --c`` -> {"a": "1", "b": "2", "c": None}; anything else is a ConfigError."""
    flags, i = {}, 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r}: flags are written --key=value.")
        key, eq, value = token[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                value = None
        flags[key] = value
        i += 1
    return flags


def build(cls, flags: dict[str, str | None], strict: bool = True):
    """An instance of dataclass ``cls`` with the given flags applied (types converted and checked).

    With ``strict`` an unknown flag is an error; without, flags of other stages are ignored.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, text in flags.items():
        if key not in fields:
            if strict:
                raise ConfigError(f"unknown flag --{key}; valid flags: "
                                  + ", ".join("--" + k for k in fields) + ".")
            continue
        if text is None:
            if hints[key] is not bool:
                raise ConfigError(f"--{key} needs a value (--{key}=...).")
            values[key] = True
        else:
            values[key] = convert(key, hints[key], text)
        check_value(key, values[key], fields[key].metadata)
    return cls(**values)


def check_known(flags: dict, *classes) -> None:
    """Refuse a flag that none of the given config classes has, listing the valid ones."""
    known = {name for cls in classes for name in cls.__dataclass_fields__}
    unknown = sorted(set(flags) - known)
    if unknown:
        raise ConfigError(f"unknown flag --{unknown[0]}; valid flags: " + ", ".join("--" + k for k in sorted(known)) + ".")


def usage(*classes) -> str:
    """A help text listing every field of the given config classes with its default and help."""
    lines = []
    for cls in classes:
        lines.append(f"{cls.__name__}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  --{f.name}={default}".ljust(34) + f" {f.metadata.get('help', '')}")
    return "\n".join(lines)


def main_guard(fn):
    """Run ``fn()``, turning the project's expected errors into one sentence on stderr and exit code 2;
    Ctrl-C into one line (the interrupt's own words, if a caller gave it some) and exit code 130; a
    closed output pipe (``decode.py --eval | head``) into a quiet exit."""
    try:
        return fn()
    except (ConfigError, CheckpointError, ModelError, TokenizerError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as err:
        print(err or "stopped by Ctrl-C.", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more reaches the closed pipe
        sys.exit(141)  # 128 + SIGPIPE, as a shell tool killed by the closed pipe
