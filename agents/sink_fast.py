"""The sink's fast decoding path: msgspec Structs derived from the pydantic event models.

The pydantic model stays the one source of truth: each Struct is built from the
model's fields (types, defaults, numeric and length constraints, literals,
nested models, discriminated unions), never written by hand. A Struct must be
at least as strict as its model: whatever it accepts the model accepts, with
the same values. What it refuses is handed back to the model, whose verdict
(and reason text) counts.

String patterns are not given to msgspec: Python's ``re`` is not pydantic's
regex engine (``$`` alone differs), and it is slower. The distinct values of
each patterned field are validated by pydantic itself, once per batch.

A model this module cannot mirror exactly (validators, aliases, transforming
string options, unknown metadata) raises :class:`Unsupported`; its topic then
keeps the pydantic batch path.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Annotated, Any, Literal, Union, cast, get_args, get_origin

import annotated_types as at
import msgspec
from pydantic import BaseModel, StringConstraints, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from agents import AgentsError

# Model settings that change nothing a Struct decodes (the rest may: refuse them).
_HARMLESS_CONFIG = frozenset({"extra", "strict", "frozen", "ser_json_bytes", "val_json_bytes",
                              "title"})
_NUMERIC = {at.Ge: "ge", at.Gt: "gt", at.Le: "le", at.Lt: "lt"}
_LENGTH = {at.MinLen: "min_length", at.MaxLen: "max_length"}


class Unsupported(AgentsError):
    """The model has something a Struct would not decode exactly like pydantic."""


_StructKey = tuple[type[BaseModel], str | None]  # a model, and its tag field in a union


@dataclass(frozen=True)
class _PatternCheck:
    struct: type  # the Struct whose field it is (a union has several)
    name: str
    values: TypeAdapter[list[Any]]  # pydantic's own validator of the field's strings

    def passes(self, items: Sequence[Any], mixed: bool) -> bool:
        name, struct = self.name, self.struct
        if mixed:
            distinct = {getattr(o, name) for o in items if type(o) is struct}
        else:
            distinct = set(map(attrgetter(name), items))  # the loop in C
        distinct.discard(None)
        try:
            self.values.validate_python(list(distinct), strict=True)
        except ValidationError:
            return False
        return True


class FastDecoder:
    """One JSON array of ``kind`` documents -> Structs, or None if any is refused."""

    def __init__(self, kind: Any) -> None:
        self._patterns: list[tuple[_StructKey, str, TypeAdapter[list[Any]]]] = []
        self._structs: dict[_StructKey, type] = {}
        item = self._convert(kind, top=True)
        self._checks = [_PatternCheck(self._structs[key], name, values)
                        for key, name, values in self._patterns]
        self._mixed = get_origin(item) in (Union, types.UnionType)
        self._decoder = msgspec.json.Decoder(list[item])  # type: ignore[valid-type]

    def decode(self, joined: bytes) -> list[Any] | None:
        try:
            items: list[Any] = self._decoder.decode(joined)
        except msgspec.MsgspecError:  # ValidationError and DecodeError
            return None
        for check in self._checks:
            if not check.passes(items, self._mixed):
                return None
        return items

    # -- deriving ------------------------------------------------------------------------
    def _convert(self, tp: Any, meta: tuple[Any, ...] = (), *, top: bool = False,
                 field: tuple[_StructKey, str] | None = None) -> Any:
        """The msgspec type of pydantic type ``tp`` with constraint metadata ``meta``."""
        origin, args = get_origin(tp), get_args(tp)
        if origin is Annotated:
            return self._convert(args[0], (*meta, *tp.__metadata__), top=top, field=field)
        discriminator, constraints, pattern_meta = _split(meta)
        if origin in (Union, types.UnionType):
            return self._union(args, discriminator, constraints, pattern_meta, top=top,
                               field=field)
        if discriminator is not None:
            raise Unsupported(f"discriminator on {tp!r}")
        if pattern_meta:
            self._pattern(tp, pattern_meta, field)
        if origin is Literal:
            if constraints or not all(type(a) in (str, int) for a in args):
                raise Unsupported(f"{tp!r}: only plain str/int literals are mirrored")
            return tp
        if tp in (str, int, float, bool):
            if tp is bool and constraints:
                raise Unsupported("constrained bool")
            return Annotated[tp, msgspec.Meta(**constraints)] if constraints else tp
        if origin is list and len(args) == 1:
            items = cast(Any, list)[self._convert(args[0])]
            return Annotated[items, msgspec.Meta(**constraints)] if constraints else items
        if isinstance(tp, type) and issubclass(tp, BaseModel) and not constraints:
            return self._struct(tp, None, top=top)
        raise Unsupported(f"type {tp!r} (constraints {constraints})")

    def _union(self, args: tuple[Any, ...], discriminator: str | None,
               constraints: dict[str, Any], pattern_meta: tuple[Any, ...], *, top: bool,
               field: tuple[_StructKey, str] | None) -> Any:
        members = [a for a in args if a is not type(None)]
        optional = len(members) < len(args)
        if len(members) == 1:
            inner = self._convert(members[0], pattern_meta, top=top, field=field)
            if constraints:
                raise Unsupported("constraints on an optional type")
            return inner | None if optional else inner
        if discriminator is None or constraints or pattern_meta or optional:
            raise Unsupported(f"union {args!r} without a plain discriminator")
        if not all(isinstance(m, type) and issubclass(m, BaseModel) for m in members):
            raise Unsupported(f"discriminated union of non-models {args!r}")
        structs = [self._struct(m, discriminator, top=top) for m in members]
        return Union[tuple(structs)]  # noqa: UP007  # built at run time

    def _struct(self, model: type[BaseModel], tag_field: str | None, *, top: bool) -> type:
        key = (model, tag_field)
        if key in self._structs:
            return self._structs[key]
        _refuse_unmirrorable(model)
        tag: str | int | None = None
        fields: list[tuple[str, Any, Any]] = []
        for name, info in model.model_fields.items():
            if name == tag_field:
                tag = _single_literal(model, info)
                continue
            # Nested models are not top-level: their patterned fields are refused.
            ftype = self._convert(info.annotation, tuple(info.metadata),
                                  field=(key, name) if top else None)
            fields.append((name, ftype, _default(info, self)) if not info.is_required()
                          else (name, ftype, msgspec.NODEFAULT))
        struct = msgspec.defstruct(
            f"{model.__name__}Struct",
            [(n, t) if d is msgspec.NODEFAULT else (n, t, d) for n, t, d in fields],
            kw_only=True, forbid_unknown_fields=True, gc=False, tag_field=tag_field, tag=tag)
        if tag_field is not None:
            # Row builders read the tag as the model's attribute; pydantic has it as a field.
            setattr(struct, tag_field, tag)
        self._structs[key] = struct
        return struct

    def _pattern(self, tp: Any, pattern_meta: tuple[Any, ...],
                 field: tuple[_StructKey, str] | None) -> None:
        if tp is not str or field is None:
            raise Unsupported("string patterns are mirrored on top-level fields only")
        adapter: TypeAdapter[list[Any]] = TypeAdapter(
            cast(Any, list)[Annotated[(str, *pattern_meta)]])
        self._patterns.append((field[0], field[1], adapter))


def _split(meta: tuple[Any, ...]) -> tuple[str | None, dict[str, Any], tuple[Any, ...]]:
    """Metadata -> (discriminator, msgspec constraints, metadata pydantic must check)."""
    discriminator: str | None = None
    constraints: dict[str, Any] = {}
    patterns: list[Any] = []
    for m in meta:
        if isinstance(m, FieldInfo):
            if m.discriminator is not None:
                if not isinstance(m.discriminator, str):
                    raise Unsupported("callable discriminator")
                discriminator = m.discriminator
            inner_disc, inner, inner_patterns = _split(tuple(m.metadata))
            discriminator = inner_disc or discriminator
            constraints.update(inner)
            patterns.extend(inner_patterns)
        elif isinstance(m, StringConstraints):
            if m.strip_whitespace or m.to_upper or m.to_lower or m.ascii_only:
                raise Unsupported(f"transforming string constraint {m!r}")
            if m.min_length is not None:
                constraints["min_length"] = m.min_length
            if m.max_length is not None:
                constraints["max_length"] = m.max_length
            if m.pattern is not None:
                patterns.append(StringConstraints(pattern=m.pattern))
        elif type(m) in _NUMERIC:
            key = _NUMERIC[type(m)]
            constraints[key] = getattr(m, key)
        elif type(m) in _LENGTH:
            key = _LENGTH[type(m)]
            constraints[key] = getattr(m, key)
        else:
            raise Unsupported(f"metadata {m!r}")
    return discriminator, constraints, tuple(patterns)


def _refuse_unmirrorable(model: type[BaseModel]) -> None:
    decorators = model.__pydantic_decorators__
    if (decorators.model_validators or decorators.field_validators or decorators.validators
            or decorators.root_validators):
        raise Unsupported(f"{model.__name__} has validators")
    if unknown := set(model.model_config) - _HARMLESS_CONFIG:
        raise Unsupported(f"{model.__name__} config {sorted(unknown)}")
    for name, info in model.model_fields.items():
        if info.alias not in (None, name) or info.validation_alias not in (None, name):
            raise Unsupported(f"{model.__name__}.{name} has an alias")


def _single_literal(model: type[BaseModel], info: FieldInfo) -> str | int:
    args = get_args(info.annotation)
    if get_origin(info.annotation) is not Literal or len(args) != 1 or info.metadata:
        raise Unsupported(f"{model.__name__}: the discriminator must be a one-value Literal")
    return cast(str | int, args[0])


def _default(info: FieldInfo, deriver: FastDecoder) -> Any:
    """The model's default as a msgspec default (a factory for anything mutable)."""
    if info.default_factory is not None:
        if info.default_factory_takes_validated_data:
            raise Unsupported("default factory taking data")
        return msgspec.field(default_factory=cast(Callable[[], Any], info.default_factory))
    value = info.default
    if value is PydanticUndefined:
        raise Unsupported("required field without a default")
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, BaseModel):
        struct = deriver._struct(type(value), None, top=False)
        instance: Any = msgspec.convert(value.model_dump(), struct)
        return msgspec.field(default_factory=lambda: instance)  # read-only: one is enough
    if isinstance(value, list) and not value:
        return msgspec.field(default_factory=list)
    raise Unsupported(f"default {value!r}")
