"""Command-line options defined once, on a config dataclass (PEFT's `LoraConfig` style).

Each field's `metadata` holds its `help` and, where it has them, its `choices`, `min` and `metavar`; the field's
type and default give the rest. `add_config_arguments` turns the fields into argparse options and
`check_options` enforces the same choices and minimums on a config however it was made (CLI or Python), with
one message each. No torch here: `kdlora --help` builds these options.
"""

import argparse
import dataclasses
import types

from hub.errors import KdloraError


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_ranks(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ranks like 4,8,16, got '{text}'") from None


def shown(default) -> str:
    """A default as the help text says it: `on`/`off` for switches, `1,2,4` for rank lists."""
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, tuple):
        return ",".join(map(str, default))
    return str(default)


def add_config_arguments(parser: argparse.ArgumentParser, config_class, optional=()) -> None:
    """One option per field that has help. Each defaults to None, so that the dataclass's default applies to
    what the user did not give; fields without a default are required unless named in `optional`."""
    for field in dataclasses.fields(config_class):
        if "help" not in field.metadata:
            continue
        kind = field.type
        if isinstance(kind, types.UnionType):  # `int | None`: the value's type is int
            kind = next(t for t in kind.__args__ if t is not type(None))
        help_text = field.metadata["help"].replace("%", "%%")  # argparse formats help with %
        if field.default not in (None, dataclasses.MISSING):  # a None default's meaning is in the help itself
            help_text += f" (default {shown(field.default)})"
        required = field.default is dataclasses.MISSING and field.name not in optional
        option = dict(default=None, help=help_text, required=required)
        if kind is bool:  # a switch that is on by default needs its --no- form
            option["action"] = argparse.BooleanOptionalAction if field.default else "store_true"
        else:
            option["type"] = parse_ranks if kind == tuple[int, ...] else kind
            # choices shown, not enforced by argparse: check_options says what is wrong in one message, CLI or not
            choices = field.metadata.get("choices")
            option["metavar"] = field.metadata.get("metavar", "{" + ",".join(choices) + "}" if choices else None)
        parser.add_argument(flag(field.name), **option)


def check_options(config) -> None:
    """Refuse a value outside its field's choices or below its minimum, naming the flag the user knows."""
    for field in dataclasses.fields(config):
        value, choices, least = getattr(config, field.name), field.metadata.get("choices"), field.metadata.get("min")
        if choices is not None and value not in choices:
            raise KdloraError(f"{flag(field.name)} {value}: use one of {', '.join(choices)}")
        if least is not None and value < least:
            raise KdloraError(f"{flag(field.name)} must be at least {least}")
