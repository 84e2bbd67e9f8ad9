"""The YAML file: read with a size bound, parsed refusing duplicate keys, flattened to dotted keys.

Every problem is a ConfigError that names the file and, where PyYAML knows it, the line and column;
on the token's line only the place is given. Unknown keys are refused with the nearest known one.
"""

import difflib
import re
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml

from agent import const
from agent.configvalues import (
    _SHOWN_MAX,
    ConfigError,
    _clip,
    _kind,
    _private,
    _read_bounded,
    _reason,
    _show,
    _show_path,
)

_TOKEN_LINE = re.compile(r"\s*['\"]?token['\"]?\s*:")
_COMMENT = re.compile(r"(?:^|\s)#.*", re.MULTILINE)  # YAML 1.1 §9.2: '#' after a space
_TOKEN_WORD = re.compile(r"(?<![\w-])token(?![\w-])")
_QUOTED = re.compile(r"['\"].*['\"]")  # from the first quote to the last
_SECTIONS: dict[str, tuple[str, ...]] = {
    "mdns": ("interface", "dbus", "wire_proof", "debug"),
    "metrics": ("listen",),
    "report": ("path",),
    "log": ("redact_addresses",),
}
_TOP_KEYS = ("cluster", "env", "servers", "token", "token_file", *_SECTIONS)
_LEAF_KEYS = (
    *(key for key in _TOP_KEYS if key not in _SECTIONS),
    *(f"{section}.{key}" for section, keys in _SECTIONS.items() for key in keys),
)


def _read_yaml(path: Path | None, root: Path, owner: int) -> tuple[Path | None, object]:
    """(the file read or None, its YAML document); a missing default file is (None, None).

    A file that holds a token must be owned by `owner` (root) and unreadable by others.
    """
    file = path if path is not None else root / const.DEFAULT_CONFIG_PATH.relative_to("/")
    shown = _show_path(file)
    try:
        data, info = _read_bounded(file, const.CONFIG_MAX_BYTES)
    except FileNotFoundError as exc:
        if path is None:
            return None, None
        raise ConfigError(
            f"config file {shown} does not exist; create it or name an existing file"
        ) from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read config file {shown}: {_reason(exc)}") from exc
    if len(data) > const.CONFIG_MAX_BYTES:
        raise ConfigError(
            f"config file {shown} is larger than {const.CONFIG_MAX_BYTES} bytes; "
            "name the agent's YAML file"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {shown} is not UTF-8 text (bad byte at offset {exc.start}); "
            "save it as UTF-8"
        ) from exc
    doc = _parse_yaml(text, shown)
    if isinstance(doc, dict) and doc.get("token") is not None:
        _private(file, info, owner)
    return file, doc


def _parse_yaml(text: str, shown: str) -> object:
    """The YAML document in text, or a ConfigError with the line and column of the problem."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (_Loader is a SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or "invalid YAML"
        if exc.context and exc.problem:
            problem = f"{exc.context}, {problem}"
        problem = problem if len(problem) <= 2 * _SHOWN_MAX else problem[: 2 * _SHOWN_MAX] + "..."
        problem += "; fix the file"
        # PyYAML quotes the text at fault ('found undefined alias', a '!tag'): on the token's
        # line that text is the token, so only the place is given. The token can also be on
        # another line (`token:` then the value below, a flow mapping, `? token`): in a file
        # that mentions a token anywhere outside comments, no quoted text is shown.
        lines = text.splitlines()
        if mark and mark.line < len(lines) and _TOKEN_LINE.match(lines[mark.line]):
            problem = "the token is not valid YAML as written; put it in single quotes"
        elif _TOKEN_WORD.search(_COMMENT.sub("", text)):
            problem = _QUOTED.sub(_hide_quoted, problem)
        raise ConfigError(f"YAML error in {shown}{where}: {problem}") from exc
    except yaml.reader.ReaderError as exc:
        raise ConfigError(
            f"YAML error in {shown}: control character #x{exc.character:04x} at character "
            f"{exc.position}; remove it"
        ) from exc
    except yaml.YAMLError as exc:  # no mark: not one raised while loading, kept as a backstop
        raise ConfigError(f"YAML error in {shown}: {type(exc).__name__}") from exc
    except RecursionError as exc:
        raise ConfigError(f"YAML error in {shown}: nested too deeply") from exc
    except Exception as exc:
        # PyYAML's constructors fail on explicitly tagged nonsense with plain exceptions:
        # `!!int ""` IndexError, `!!bool x` KeyError, `!!timestamp x` AttributeError, and
        # ValueError for a 5000-digit number or 2001-02-30.
        raise ConfigError(
            f"YAML error in {shown}: a value cannot be converted ({type(exc).__name__}); "
            "check numbers, dates and !! tags"
        ) from exc


def _hide_quoted(match: re.Match[str]) -> str:
    """A quoted single character (`':'`) as it is, any longer quoted text hidden."""
    return match[0] if len(match[0]) <= 3 else "(not shown: the file holds a token)"


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, which PyYAML would silently resolve to the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                ident = (key_node.tag, key_node.value)
                if ident in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                    )
                seen.add(ident)
        return super().construct_mapping(node, deep=deep)


def _flatten(doc: object, file: Path) -> dict[str, object]:
    """{dotted key: value} of the document's settings; null values count as absent."""
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(
            f"config file {_show_path(file)} holds {_kind(doc)}, not a mapping of settings; "
            "write one 'key: value' per line"
        )
    flat: dict[str, object] = {}
    # `token:` with its value on the next line, unindented, makes the value a key of its own.
    hide = "token" in doc
    for key, value in doc.items():
        name = str(key)
        if name not in _TOP_KEYS:
            raise _unknown(name, file, _TOP_KEYS, hide=hide)
        if value is None:
            continue
        if name not in _SECTIONS:
            flat[name] = value
            continue
        if not isinstance(value, dict):
            raise ConfigError(
                f"{name}{_show(value)} in {_show_path(file)}: must be a mapping of "
                f"{', '.join(_SECTIONS[name])}"
            )
        for sub, sub_value in value.items():
            dotted = f"{name}.{sub}"
            if str(sub) not in _SECTIONS[name]:
                raise _unknown(dotted, file, _SECTIONS[name], prefix=f"{name}.", hide=hide)
            if sub_value is not None:
                flat[dotted] = sub_value
    return flat


def _unknown(
    key: str, file: Path, known: tuple[str, ...], prefix: str = "", *, hide: bool = False
) -> ConfigError:
    """The error for a key the schema lacks, with the closest known key when one is near; with
    hide (the file has a token key) a key near none is not shown: it may be the token."""
    close = difflib.get_close_matches(key, _LEAF_KEYS, n=1, cutoff=0.75)
    hint = f"did you mean {close[0]!r}?" if close else f"known keys: {prefix}{', '.join(known)}"
    if hide and not close:
        return ConfigError(
            f"unknown key in {_show_path(file)} (not shown: the file holds a token); {hint}"
        )
    return ConfigError(f"unknown key {_clip(key)!r} in {_show_path(file)}; {hint}")
