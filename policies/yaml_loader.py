"""Strict YAML loading for policy files: the text becomes plain data for msgspec, or one PolicyError.

Every refusal is a `PolicyError` reading `<source>:<line>: <$.path>: <message>`.

Rules:
- Size: at most MAX_POLICY_BYTES (4 MiB) of UTF-8, checked before any parsing (and, from a file,
  before reading more than that).
- One document. Mapping keys are scalars.
- No anchors (`&a`), aliases (`*a`) or merge keys (`<<`). The composer turns an alias into a
  marker node instead of sharing the anchored one, and the walk refuses the first anchor or alias
  before building data from it, so an alias bomb is never expanded.
- No duplicate keys, at any depth, in block and flow mappings alike: the error is at the second
  key's line and names the first's.
- Booleans are YAML 1.2's: true/True/TRUE and false/False/FALSE. A plain (unquoted) scalar that
  YAML 1.1 reads as a boolean (yes/no/on/off in the cases PyYAML resolves: `yes`, `Yes`, `YES`, ...)
  is refused wherever it appears, keys included, with a hint to write true/false or to quote the
  word if a string was meant. A quoted scalar is always a string. `y` and `n` stay strings
  (PyYAML's resolver never read them as booleans).
- Unknown fields: where the schema expects a msgspec Struct with `forbid_unknown_fields`, a key
  that is not one of its fields is refused, with a did-you-mean (difflib) over the fields at that path.
- Only YAML's standard tags. Ints, floats, nulls and timestamps read as PyYAML's safe loader reads
  them (YAML 1.1 numbers), except that a numeric key where the schema expects a string key (a
  tenant named `2024`) keeps its text.

How: libyaml's event parser where PyYAML has it (else PyYAML's own), a Python composer, and then
one walk over the node tree, guided by `msgspec.inspect.type_info` of the schema, that checks all
of the above and builds the plain dicts, lists and scalars that `msgspec.convert` takes. The node
tree is returned too, for the line numbers of later (conversion and semantic) errors.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec.inspect as mi
import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent, Event, MappingStartEvent, ScalarEvent, SequenceStartEvent
from yaml.nodes import MappingNode, Node, ScalarNode
from yaml.resolver import Resolver

MAX_POLICY_BYTES = 4 * 1024 * 1024

_Y = "tag:yaml.org,2002:"
_STR, _BOOL, _INT, _FLOAT, _NULL = _Y + "str", _Y + "bool", _Y + "int", _Y + "float", _Y + "null"
_MAP, _SEQ, _MERGE = _Y + "map", _Y + "seq", _Y + "merge"
_ALIAS = "!tiergate/alias"      # marker node the composer puts where an alias was
_BOOLS_12 = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_SAFE = SafeConstructor()
_SCALARS = {_INT: _SAFE.construct_yaml_int, _FLOAT: _SAFE.construct_yaml_float, _NULL: _SAFE.construct_yaml_null,
            _Y + "timestamp": _SAFE.construct_yaml_timestamp, _Y + "binary": _SAFE.construct_yaml_binary}
_ANY = mi.AnyType()
_SEQ_TYPES = (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType, mi.TupleType)
_MAP_TYPES = (mi.StructType, mi.DictType, mi.TypedDictType, mi.DataclassType)


class PolicyError(ValueError):
    def __init__(self, path: str, message: str, line: int | None, source: str) -> None:
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {path}: {message}")
        self.path = path
        self.line = line


def _too_big(size: int, source: str) -> PolicyError:
    return PolicyError("$", f"the policy file is {size:,} bytes; the limit is {MAX_POLICY_BYTES:,} "
                       "(MAX_POLICY_BYTES in policies/yaml_loader.py)", None, source)


def read_policy_text(path: Path) -> str:
    """The file's text, refusing a file over the cap before reading past it."""
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_POLICY_BYTES:
                raise _too_big(size, str(path))
            data = f.read(MAX_POLICY_BYTES + 1)     # st_size is 0 for pipes and some special files
    except OSError as exc:
        raise PolicyError("$", f"cannot read policy file: {exc.strerror}", None, str(path)) from None
    if len(data) > MAX_POLICY_BYTES:
        raise _too_big(len(data), str(path))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError("$", f"not UTF-8 text (byte {exc.start})", None, str(path)) from None


class _Composer(Composer):
    """PyYAML's composer, except that an alias becomes a marker node and anchored nodes are noted."""

    peek_event: Callable[[], Event | None]     # the parser's, mixed in below
    get_event: Callable[[], Event | None]

    def __init__(self) -> None:
        super().__init__()
        self.anchored: dict[int, str] = {}

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            self.get_event()
            return ScalarNode(_ALIAS, event.anchor or "", event.start_mark, event.end_mark)  # type: ignore[arg-type]
        anchor = event.anchor if isinstance(event, (ScalarEvent, SequenceStartEvent, MappingStartEvent)) else None
        node: Node
        if isinstance(event, ScalarEvent):
            node = self.compose_scalar_node(anchor)     # type: ignore[arg-type]  # the stub says dict
        elif isinstance(event, SequenceStartEvent):
            node = self.compose_sequence_node(anchor)   # type: ignore[arg-type]
        else:
            node = self.compose_mapping_node(anchor)    # type: ignore[arg-type]
        if anchor is not None:
            self.anchored[id(node)] = anchor
        return node


try:
    from yaml._yaml import CParser as _Parser
except ImportError:  # PyYAML without libyaml
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _Parser(Reader, Scanner, Parser):  # type: ignore[no-redef]
        def __init__(self, stream: str) -> None:
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)


class _Loader(_Composer, _Parser, Resolver):
    def __init__(self, text: str) -> None:
        _Parser.__init__(self, text)
        _Composer.__init__(self)
        Resolver.__init__(self)


@functools.cache
def _schema(typ: Any) -> mi.Type:
    return mi.type_info(typ)


def load_yaml(text: str, schema: Any, source: str) -> tuple[Any, Node]:
    """Plain data for `msgspec.convert(data, schema)`, and the node tree it came from."""
    if len(text) > MAX_POLICY_BYTES or len(text.encode("utf-8", "replace")) > MAX_POLICY_BYTES:
        raise _too_big(len(text.encode("utf-8", "replace")), source)
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise PolicyError("$", f"invalid YAML: {getattr(exc, 'problem', exc)}",
                          mark.line + 1 if mark else None, source) from None
    finally:
        loader.dispose()
    if root is None:
        raise PolicyError("$", "the policy file is empty", None, source)
    return _Walk(source, loader.anchored).value(root, _schema(schema), "$"), root


def _pick(typ: mi.Type, node: Node) -> mi.Type:
    """The part of `typ` that a mapping or sequence node can be (a Struct out of `Struct | None`)."""
    while isinstance(typ, mi.Metadata):
        typ = typ.type
    if not isinstance(typ, mi.UnionType):
        return typ
    kinds = _MAP_TYPES if isinstance(node, MappingNode) else _SEQ_TYPES
    fits = [t.type if isinstance(t, mi.Metadata) else t for t in typ.types]
    fits = [t for t in fits if isinstance(t, kinds)]
    if len(fits) == 1:
        return fits[0]
    if isinstance(node, MappingNode) and fits and all(isinstance(t, mi.StructType) and t.tag_field for t in fits):
        for k, v in node.value:     # a tagged union: the member whose tag the mapping names
            for t in fits:
                if isinstance(t, mi.StructType) and k.value == t.tag_field and v.value == str(t.tag):
                    return t
    return _ANY


class _Walk:
    def __init__(self, source: str, anchored: dict[int, str]) -> None:
        self.source = source
        self.anchored = anchored

    def error(self, path: str, node: Node, message: str) -> PolicyError:
        return PolicyError(path, message, node.start_mark.line + 1, self.source)

    def value(self, node: Node, typ: mi.Type, path: str) -> Any:
        if self.anchored and id(node) in self.anchored:
            raise self.error(path, node, f"YAML anchors (&{self.anchored[id(node)]}) are not allowed in a "
                             "policy file; write the value out where it is used")
        if isinstance(node, ScalarNode):
            return self.scalar(node, path, typ)
        typ = _pick(typ, node)
        if isinstance(node, MappingNode):
            if node.tag != _MAP:
                raise self.error(path, node, f"unsupported YAML tag {_short(node.tag)} on a mapping")
            return self.mapping(node, typ, path)
        if node.tag != _SEQ:
            raise self.error(path, node, f"unsupported YAML tag {_short(node.tag)} on a sequence")
        if isinstance(typ, mi.TupleType):
            types = typ.item_types
            return [self.value(n, types[i] if i < len(types) else _ANY, f"{path}[{i}]")
                    for i, n in enumerate(node.value)]
        item = typ.item_type if isinstance(typ, _SEQ_TYPES) and not isinstance(typ, mi.TupleType) else _ANY
        return [self.value(n, item, f"{path}[{i}]") for i, n in enumerate(node.value)]

    def scalar(self, node: ScalarNode, path: str, typ: mi.Type = _ANY) -> Any:
        tag, text = node.tag, node.value
        if tag == _STR:
            return text
        if tag == _INT and text.isdigit() and (text[0] != "0" or len(text) == 1):
            return int(text)    # the common case; 0-prefixed and 1_000 forms follow YAML 1.1 below
        if tag == _FLOAT:
            try:
                return float(text)  # the common case; .inf, .nan and 1:30.5 forms follow YAML 1.1 below
            except ValueError:
                pass
        if tag in _SCALARS:
            return _SCALARS[tag](node)
        if tag == _BOOL:
            if text in _BOOLS_12:
                return _BOOLS_12[text]
            if _takes_str(typ):
                raise self.error(path, node, f"unquoted {text} reads as a boolean in YAML 1.1 and is refused "
                                 f"(policy files take YAML 1.2 booleans only); this field is a string: quote it "
                                 f"({json.dumps(text)})")
            raise self.error(path, node, f"{text!r} is not a boolean in a policy file (YAML 1.2 booleans only); "
                             f"write true or false, or quote it ({json.dumps(text)}) if a string was meant")
        if tag == _ALIAS:
            raise self.error(path, node, f"YAML aliases (*{text}) are not allowed in a policy file; write the "
                             "value out where it is used")
        if tag == _MERGE:
            raise self.error(path, node, "merge keys (<<) are not allowed in a policy file; write the fields out")
        raise self.error(path, node, f"unsupported YAML tag {_short(tag)}")

    def mapping(self, node: MappingNode, typ: mi.Type, path: str) -> dict[Any, Any]:
        fields: dict[str, mi.Type] | None = None
        values: mi.Type = _ANY
        text_keys = False
        if isinstance(typ, mi.StructType | mi.TypedDictType | mi.DataclassType):
            fields = {f.encode_name: f.type for f in typ.fields}
            text_keys = True
        elif isinstance(typ, mi.DictType):
            values = typ.value_type
            text_keys = isinstance(typ.key_type, mi.StrType)
        forbid = isinstance(typ, mi.StructType) and typ.forbid_unknown_fields
        out: dict[Any, Any] = {}
        for knode, vnode in node.value:
            if not isinstance(knode, ScalarNode):
                raise self.error(path, knode, "mapping keys must be plain scalars")
            if id(knode) in self.anchored:
                self.value(knode, _ANY, path)   # raises: an anchored key
            if text_keys and knode.tag in (_INT, _FLOAT):
                key: Any = knode.value
            else:
                key = self.scalar(knode, f"{path}.{knode.value}")
            kpath = f"{path}.{key}"
            if key in out:
                first = next(k for k, _ in node.value if k is not knode and self._same(k, key, text_keys)).start_mark
                at = f"line {first.line + 1}"
                if first.line == knode.start_mark.line:
                    at += f", column {first.column + 1}"
                raise self.error(kpath, knode, f"duplicate key {key!r} (first at {at})")
            if fields is None:
                out[key] = self.value(vnode, values, kpath)
            elif key in fields:
                out[key] = self.value(vnode, fields[key], kpath)
            elif forbid:
                raise self.error(kpath, knode, _unknown_field(key, fields))
            else:
                out[key] = self.value(vnode, _ANY, kpath)
        return out

    def _same(self, knode: Node, key: Any, text_keys: bool) -> bool:
        if not isinstance(knode, ScalarNode):
            return False
        if text_keys and knode.tag in (_INT, _FLOAT):
            return bool(knode.value == key)
        return bool(self.scalar(knode, "$") == key)


def _short(tag: str) -> str:
    return "!!" + tag.removeprefix(_Y) if tag.startswith(_Y) else tag


def _takes_str(typ: mi.Type) -> bool:
    while isinstance(typ, mi.Metadata):
        typ = typ.type
    members = typ.types if isinstance(typ, mi.UnionType) else (typ,)
    return any(isinstance(t.type if isinstance(t, mi.Metadata) else t, mi.StrType) for t in members) and not any(
        isinstance(t, mi.BoolType) for t in members)


def _unknown_field(key: Any, fields: dict[str, mi.Type]) -> str:
    close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
    if close:
        return f"unknown field {key!r}; did you mean {close[0]!r}?"
    return f"unknown field {key!r}; the fields here are: {', '.join(fields)}"

