"""Typed, layered configuration in the style of detectron2's CfgNode.

Every key is declared once (``declare``) with a default, a type and a one-line doc. A config is
built from the defaults, then YAML files (``_BASE_`` inheritance, paths relative to the file),
then ``KEY VALUE`` overrides; every value is converted to its key's type, and unknown keys are
errors that name the closest valid key.

Over 400 lines on purpose: declaration, YAML loading (``_BASE_``, ``surgdino://`` names) and
``KEY VALUE`` overrides share one value-conversion and one error path.
"""

from __future__ import annotations

import ast
import copy
import difflib
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from surgdino.config.official import ARCHITECTURE_KEY, is_official_config, unsupported_reason
from surgdino.config.validate import normalize_dataset_item, validate
from surgdino.errors import ConfigError
from surgdino.log import get_logger

logger = get_logger(__name__)

# Types a key may have. ``list[...]`` values accept YAML lists and detectron2-style tuple strings.
_SCALARS = {"bool": bool, "int": int, "float": float, "str": str}
TYPES = ("bool", "int", "float", "str", "list[int]", "list[float]", "list[str]", "list[dict]", "dict")


@dataclass(frozen=True)
class Key:
    name: str
    default: Any
    type: str
    doc: str
    choices: tuple[Any, ...] | None = None


_SCHEMA: dict[str, Key] = {}


def declare(name: str, default: Any, type: str, doc: str, choices: Iterable[Any] | None = None) -> None:
    """Declare a config key. Called at import time by the ``surgdino.config.keys`` modules."""
    if type not in TYPES:
        raise ValueError(f"{name}: unknown type {type!r}; one of {TYPES}")
    key = Key(name, None, type, doc, tuple(choices) if choices is not None else None)
    value = convert(key, default, source="schema default") if default is not None else None
    _SCHEMA[name] = Key(name, value, type, doc, key.choices)


def schema() -> dict[str, Key]:
    """All declared keys, by full dotted name."""
    import surgdino.config.keys  # noqa: F401  (fills _SCHEMA on import)

    return _SCHEMA


# Deepest nesting a value may have (YAML, JSON or the command line); far above any real config.
MAX_DEPTH = 100
PACKAGE_SCHEME = "surgdino://"


def _parse_string(text: str) -> Any:
    """Parse a command-line or tuple-string value: Python literal first, then YAML, else the text."""
    if _bracket_depth(text) > MAX_DEPTH:
        raise ConfigError(f"value {text[:20]}... is nested more than {MAX_DEPTH} levels deep; flatten it")
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    except RecursionError:
        raise ConfigError(f"value {text[:20]}... is nested too deeply to read; flatten it") from None


def _bracket_depth(text: str) -> int:
    """Deepest nesting of brackets and braces in ``text`` (quotes not respected: an upper bound)."""
    depth = deepest = 0
    for ch in text:
        if ch in "[{(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]})":
            depth = max(0, depth - 1)
    return deepest


def nesting_depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """Depth of nested lists/dicts in ``value``, counted iteratively (stops past ``limit``)."""
    deepest = 0
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        if isinstance(item, Mapping):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def _scalar(key: Key, value: Any, want: str, source: str) -> Any:
    if want == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif want == "int":
        if isinstance(value, bool):
            pass
        elif isinstance(value, int):
            return value
        elif isinstance(value, float) and value.is_integer():
            return int(value)
        elif isinstance(value, str):
            parsed = _parse_string(value)
            if isinstance(parsed, int) and not isinstance(parsed, bool):
                return parsed
            if isinstance(parsed, float) and parsed.is_integer():
                return int(parsed)
    elif want == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            parsed = _parse_string(value)
            if isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
                return float(parsed)
    elif want == "str":
        if isinstance(value, str):
            return value
        if value is None:
            return ""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(
        f"{source}: {key.name} = {value!r} is not a valid {want}"
        + (f" (expected {key.type}, e.g. {key.default!r})" if key.default is not None else "")
    )


def convert(key: Key, value: Any, source: str = "config") -> Any:
    """Convert ``value`` to ``key``'s type or raise a ConfigError naming key, value and type."""
    if key.type in _SCALARS:
        out = _scalar(key, value, key.type, source)
    elif key.type.startswith("list["):
        inner = key.type[5:-1]
        if isinstance(value, str):
            value = _parse_string(value) if value.strip() else []
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and inner != "dict":
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key.name} = {value!r} is not a valid {key.type} (e.g. {key.default!r})")
        if inner == "dict":
            for item in value:
                if not isinstance(item, Mapping):
                    raise ConfigError(f"{source}: {key.name} items must be mappings, got {item!r}")
            out = [dict(item) for item in value]
        else:
            out = [_scalar(key, item, inner, source) for item in value]
    else:  # dict
        if isinstance(value, str):
            value = _parse_string(value)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {key.name} = {value!r} is not a mapping")
        out = dict(value)
    if key.choices is not None:
        items = out if isinstance(out, list) else [out]
        for item in items:
            if item not in key.choices:
                close = difflib.get_close_matches(str(item), [str(c) for c in key.choices], n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(
                    f"{source}: {key.name} = {item!r} is not one of {list(key.choices)}{hint}"
                )
    return out


def closest_key(name: str) -> str | None:
    """The declared key closest to ``name`` (case-insensitive, then fuzzy)."""
    keys = list(schema())
    upper = {k.upper(): k for k in keys}
    if name.upper() in upper:
        return upper[name.upper()]
    leaf = name.split(".")[-1].upper()
    same_leaf = [k for k in keys if k.split(".")[-1].upper() == leaf]
    if len(same_leaf) == 1:
        return same_leaf[0]
    close = difflib.get_close_matches(name, keys, n=1, cutoff=0.6)
    if close:
        return close[0]
    close = difflib.get_close_matches(name.upper(), list(upper), n=1, cutoff=0.5)
    return upper[close[0]] if close else None


def _unknown(name: str, source: str) -> ConfigError:
    why = unsupported_reason(name)
    if why is not None:
        return ConfigError(f"{source}: {name} (a key of the official MaskDINO / detectron2 configs) is not "
                           f"implemented: {why}")
    best = closest_key(name)
    hint = f"; did you mean {best}?" if best else "; run `surgdino config keys` to list valid keys"
    return ConfigError(f"{source}: unknown config key {name}{hint}")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Flatten a nested YAML mapping into dotted keys; mappings stop at keys whose type is dict."""
    known = schema()
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping) and name not in known:
            yield from _flatten(v, name + ".")
        else:
            yield name, v


class Config(Mapping):
    """A frozen, nested view of a flat {dotted key: value} dict: ``cfg.MODEL.MaskDINO.DEC_LAYERS``."""

    def __init__(self, values: dict[str, Any], prefix: str = ""):
        object.__setattr__(self, "_values", values)
        object.__setattr__(self, "_prefix", prefix)

    def __getattr__(self, item: str) -> Any:
        if item.startswith("__"):
            raise AttributeError(item)
        name = self._prefix + item
        values = self._values
        if name in values:
            return values[name]
        if any(k.startswith(name + ".") for k in values):
            return Config(values, name + ".")
        raise AttributeError(f"config has no key {name}" + (f" (did you mean {closest_key(name)}?)"
                                                             if closest_key(name) else ""))

    def __setattr__(self, key: str, value: Any) -> None:
        raise ConfigError(f"config is frozen; use cfg.merge({{'{self._prefix}{key}': ...}}) for a changed copy")

    def _children(self) -> list[str]:
        n = len(self._prefix)
        seen: dict[str, None] = {}
        for k in self._values:
            if k.startswith(self._prefix):
                seen.setdefault(k[n:].split(".")[0], None)
        return list(seen)

    def __getitem__(self, item: str) -> Any:
        try:
            return getattr(self, item)
        except AttributeError as e:
            raise KeyError(item) from e

    def __iter__(self) -> Iterator[str]:
        return iter(self._children())

    def __len__(self) -> int:
        return len(self._children())

    def get(self, dotted: str, default: Any = None) -> Any:
        return self._values.get(self._prefix + dotted, default)

    def flat(self) -> dict[str, Any]:
        """A copy of the flat {dotted key: value} dict under this node."""
        n = len(self._prefix)
        return {k[n:]: copy.deepcopy(v) for k, v in self._values.items() if k.startswith(self._prefix)}

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dicts, as written to ``config.yaml``."""
        out: dict[str, Any] = {}
        for k, v in self.flat().items():
            node = out
            parts = k.split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = v
        return out

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)

    def merge(self, updates: Mapping[str, Any], source: str = "override") -> Config:
        """A new Config with ``updates`` ({dotted key: value}) converted and applied."""
        if self._prefix:
            updates = {self._prefix + k: v for k, v in updates.items()}
        values = dict(self._values)
        known = schema()
        for name, value in updates.items():
            if name not in known:
                raise _unknown(name, source)
            values[name] = convert(known[name], value, source)
        return Config(values)

    def __repr__(self) -> str:
        return f"Config({self._prefix or 'root'}, {len(self.flat())} keys)"

    def __reduce__(self):  # picklable for spawned worker processes
        return (Config, (dict(self._values), self._prefix))


def default_config() -> Config:
    return Config({k: copy.deepcopy(v.default) for k, v in schema().items()})


def packaged_config_dir() -> str:
    """The folder of the configs shipped inside the package (``surgdino://NAME`` names a file there)."""
    from importlib import resources

    return str(resources.files("surgdino") / "configs")


def packaged_configs() -> list[str]:
    """Names of the packaged configs, e.g. ``demo/dimaskdino_atto_trays.yaml`` (as ``surgdino://`` takes them)."""
    root = packaged_config_dir()
    names = []
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith((".yaml", ".yml")):
                names.append(os.path.relpath(os.path.join(folder, f), root).replace(os.sep, "/"))
    return sorted(names)


def _suggest(path: str) -> str:
    """A hint naming an existing config close to a missing ``path`` (packaged ones by ``surgdino://``)."""
    names = packaged_configs()
    tail = path.replace(os.sep, "/").split("configs/")[-1] if "configs/" in path else os.path.basename(path)
    same = [n for n in names if n == tail or n.endswith("/" + os.path.basename(path))
            or os.path.splitext(n)[0] == os.path.splitext(tail)[0]]
    close = same or difflib.get_close_matches(tail, names, n=1, cutoff=0.5)
    if close:
        return f"; did you mean {PACKAGE_SCHEME}{close[0]}? (`surgdino config list` lists the packaged configs)"
    return "; `surgdino config list` lists the packaged configs (use them as surgdino://NAME)"


def resolve_config_path(path: str, base_dir: str | None = None) -> str:
    """An absolute config path: ``surgdino://NAME`` (``.yaml`` optional) is a packaged config; other
    relative paths are relative to ``base_dir`` (the including file's folder for ``_BASE_``) or the cwd."""
    if path.startswith(PACKAGE_SCHEME):
        name = path[len(PACKAGE_SCHEME):].strip("/")
        root = packaged_config_dir()
        names = packaged_configs()
        for candidate in (name, name + ".yaml", name + ".yml"):
            if candidate in names:
                return os.path.join(root, *candidate.split("/"))
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.4)
        hint = f"did you mean {PACKAGE_SCHEME}{close[0]}? " if close else ""
        raise ConfigError(f"no packaged config {path}; {hint}packaged: {', '.join(names)}")
    path = os.path.expanduser(path)
    if base_dir is not None and not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    return os.path.abspath(path)


def _read_yaml(path: str, chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a YAML file and its ``_BASE_`` chain into one flat {dotted key: value} dict."""
    where = f" (named as _BASE_ in {chain[-1]})" if chain else ""
    given = path
    path = resolve_config_path(path)
    if path in chain:
        raise ConfigError(f"{path}: _BASE_ cycle: {' -> '.join(chain + (path,))}")
    if os.path.isdir(path):
        raise ConfigError(f"config file {given} is a directory, not a YAML file{where}")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}{where}{_suggest(given)}")
    try:
        with open(path, encoding="utf-8") as f:
            tree = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to read (more than {MAX_DEPTH} levels); flatten it") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file (is it a YAML config?)") from None
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{path}: top level must be a mapping of config keys, got {type(tree).__name__}")
    if nesting_depth(tree) > MAX_DEPTH:
        raise ConfigError(f"{path}: nested more than {MAX_DEPTH} levels deep; flatten it")
    flat: dict[str, Any] = {}
    bases = tree.pop("_BASE_", None)
    if bases:
        for base in [bases] if isinstance(bases, str) else bases:
            if not isinstance(base, str):
                raise ConfigError(f"{path}: _BASE_ must be a file name or a list of them, got {base!r}")
            flat.update(_read_yaml(resolve_config_path(base, os.path.dirname(path))
                                   if not base.startswith(PACKAGE_SCHEME) else base, chain + (path,)))
    for name, value in _flatten(tree):
        if name == "DATASETS.REGISTER" and isinstance(value, list):
            value = [_resolve_paths(normalize_dataset_item(item), os.path.dirname(path)) for item in value]
        flat[name] = (value, path)
    return flat


def _resolve_paths(item: Any, base: str) -> Any:
    """Dataset paths in a config file are relative to that file."""
    if not isinstance(item, Mapping):
        return item
    out = dict(item)
    for k in ("json_file", "image_root"):
        v = out.get(k)
        if isinstance(v, str) and v and not os.path.isabs(os.path.expanduser(v)):
            out[k] = os.path.normpath(os.path.join(base, v))
    return out


def merge_opts(cfg: Config, opts: list[str] | None) -> Config:
    """``cfg`` with detectron2-style ``KEY VALUE`` overrides applied (typed, unknown keys rejected)."""
    opts = list(opts or [])
    if len(opts) % 2:
        raise ConfigError(f"overrides must come in KEY VALUE pairs; {opts[-1]!r} has no value")
    for name, value in zip(opts[0::2], opts[1::2]):
        cfg = cfg.merge({name: value}, source="command line")
    return cfg


def load_config(config_file: str | None = None, opts: list[str] | None = None) -> Config:
    """Defaults ← YAML file (with its ``_BASE_`` chain) ← ``KEY VALUE`` overrides."""
    cfg = default_config()
    known = schema()
    if config_file:
        flat = _read_yaml(config_file)
        problems = []
        for name, (value, path) in flat.items():
            if name in known:
                cfg = cfg.merge({name: value}, source=path)
            else:
                problems.append(_unknown(name, path))
        if len(problems) == 1:
            raise problems[0]
        if problems:
            raise ConfigError(f"{config_file}: {len(problems)} keys cannot be used; remove or fix them: "
                              + "; ".join(str(e) for e in problems))
        backbone = flat.get("MODEL.BACKBONE.NAME", (None,))[0]
        if ARCHITECTURE_KEY in known and is_official_config(flat, backbone):
            cfg = cfg.merge({ARCHITECTURE_KEY: "official"}, source=config_file)
            logger.info("%s uses only keys of the official MaskDINO / DI-MaskDINO configs: %s official (the "
                        "official computation; set it to surgdino for ours)", config_file, ARCHITECTURE_KEY)
    cfg = merge_opts(cfg, opts)
    items = [normalize_dataset_item(item) for item in cfg.DATASETS.REGISTER]
    if items != cfg.DATASETS.REGISTER:  # given on the command line in the other spelling
        cfg = cfg.merge({"DATASETS.REGISTER": items})
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str) -> None:
    """Write the merged config (loadable again with ``load_config``)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(cfg.dump())
    os.replace(tmp, path)
