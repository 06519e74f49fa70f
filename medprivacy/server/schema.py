"""Every request parameter the server accepts, with its type and bounds, in one place (pydantic models).

A route validates its JSON body with ``parse_json(body, Model)`` and its query string with
``parse_query(request.query_params, Model)``; both raise ``RequestError(422, one line)`` naming the field, the
rule and the value, so nothing a client sends can reach the code as an unbounded number (a population of 1e300
would allocate terabytes), a wrong type, or an unknown field. JSON parsing itself is bounded too: pydantic's
parser refuses deeply nested documents instead of recursing until Python's stack runs out.

New routes: subclass ``RequestModel`` (unknown fields refused, strict types, finite numbers) and give every
number bounds with ``Field(ge=..., le=...)`` and every string and list a ``max_length``.
"""

from __future__ import annotations

from typing import Annotated, Any, Dict, List, Literal, Mapping, Optional, Type, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

#: Bounds of the MedLocker search (the paper uses population 50, 3 generations, step 10, 3 local iterations).
MAX_POPULATION = 1000
MAX_GENERATIONS = 1000
MAX_LOCAL_ITERATIONS = 100
MAX_STEP = 16384  # the largest image side: a larger step moves nothing further
MAX_MODELS = 64
MAX_NAME = 128
MAX_SEED = 2**63 - 1


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` and a one-line ``detail`` for the client."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers


class RequestModel(BaseModel):
    """Base of every request schema: unknown fields refused, no type coercion, no NaN or infinity."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


Model = TypeVar("Model", bound=RequestModel)

Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
NameList = Annotated[str, Field(max_length=MAX_MODELS * (MAX_NAME + 1))]  # "a,b,c"


def parse_json(body: bytes, model: Type[Model], what: str = "request body") -> Model:
    """``body`` (JSON bytes) validated against ``model``, or RequestError(422) with one line."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise RequestError(422, _one_line(exc, what, model)) from None


def parse_object(document: Mapping[str, Any], model: Type[Model], what: str) -> Model:
    """A part of a JSON body the route has already parsed, validated against ``model``, or RequestError(422)."""
    try:
        return model.model_validate(dict(document))
    except ValidationError as exc:
        raise RequestError(422, _one_line(exc, what, model)) from None


def parse_query(query: Mapping[str, str], model: Type[Model]) -> Model:
    """Query parameters (each given once) validated against ``model``, or RequestError(422) with one line."""
    items = getattr(query, "multi_items", lambda: list(query.items()))()
    names = [name for name, _ in items]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise RequestError(422, f"query parameter {repeated[0][:40]!r} is given more than once; give it once")
    try:
        return model.model_validate(dict(items))
    except ValidationError as exc:
        raise RequestError(422, _one_line(exc, "query", model)) from None


def _fields_at(model: type, path: list[str]) -> list[str]:
    """The field names accepted at ``path`` inside ``model`` (following nested models), for error messages."""
    import typing

    for part in path:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _one_line(exc: ValidationError, what: str, model: type) -> str:
    errors = exc.errors(include_url=False)
    first = errors[0]
    # Union members add tags such as "constrained-str" to the location; the user only needs the field path.
    path = [str(p) for p in first["loc"] if isinstance(p, int) or str(p).isidentifier()]
    kind, loc, message = first["type"], ".".join(path), first["msg"]
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    if kind == "json_invalid":
        return f"{what} is not valid JSON ({message.removeprefix('Invalid JSON: ')})"
    if kind == "extra_forbidden":
        accepted = ", ".join(_fields_at(model, path[:-1])) or "none"
        return f"unknown field {loc!r} in the {what}; accepted there: {accepted}{more}"
    if kind == "missing":
        return f"{what} has no {loc!r}; it is required{more}"
    if not loc:
        return f"{what}: {message[0].lower()}{message[1:]}{more}"
    value = repr(first.get("input"))
    value = value if len(value) <= 40 else value[:37] + "..."
    return f"{loc}: {message[0].lower()}{message[1:]} (got {value}){more}"


# --- MedLocker ----------------------------------------------------------------------------------------------------


class MaskParamsModel(RequestModel):
    kernel: Optional[int] = Field(None, ge=1, le=1025)
    iterations: Optional[int] = Field(None, ge=0, le=100)
    min_area: Optional[int] = Field(None, ge=0, le=16384 * 16384)
    gamma: Optional[float] = Field(None, ge=0.0, le=1.0)


class OptimizeParams(RequestModel):
    """``params`` of ``POST /v1/watermark/optimize`` (see watermark.py for their meaning)."""

    mode: Optional[str] = Field(None, max_length=32)
    lesions: Optional[Literal["mask", "server", "none"]] = None
    mask_threshold: Optional[float] = Field(None, gt=0.0, lt=1.0)
    mask_params: Optional[MaskParamsModel] = None
    models: Optional[Union[NameList, Annotated[List[Name], Field(max_length=MAX_MODELS)]]] = None
    weights: Optional[Annotated[List[Annotated[float, Field(ge=0.0, le=1e6)]], Field(max_length=MAX_MODELS)]] = None
    sl: Optional[float] = Field(None, gt=0.0, le=1000.0)
    population: Optional[int] = Field(None, ge=1, le=MAX_POPULATION)
    generations: Optional[int] = Field(None, ge=0, le=MAX_GENERATIONS)
    crossover_rate: Optional[float] = Field(None, ge=0.0, le=1.0)
    step: Optional[int] = Field(None, ge=1, le=MAX_STEP)
    local_iterations: Optional[int] = Field(None, ge=0, le=MAX_LOCAL_ITERATIONS)
    alpha_range: Optional[
        Annotated[List[Annotated[float, Field(ge=0.0, le=255.0)]], Field(min_length=2, max_length=2)]
    ] = None
    alpha_step: Optional[float] = Field(None, gt=0.0, le=255.0)
    mutation: Optional[Literal["basin-hopping", "random"]] = None
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
    label: Optional[int] = Field(None, ge=0, le=1023)
    max_evaluations: Optional[int] = Field(None, ge=1)  # its upper bound is the server's, checked with its message
    window: Optional[
        Annotated[List[Annotated[float, Field(ge=0.0, le=65535.0)]], Field(min_length=2, max_length=2)]
    ] = None

    def given(self) -> Dict[str, Any]:
        """The parameters the client set (None means: the server's default)."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class OptimizeRequest(RequestModel):
    """Body of ``POST /v1/watermark/optimize``: base64 wire tensors and the search parameters."""

    image: str = Field(min_length=1)
    logo: str = Field(min_length=1)
    mask: Optional[str] = None
    params: Optional[OptimizeParams] = None


class ClassifyQuery(RequestModel):
    models: Optional[NameList] = None


class LesionsQuery(RequestModel):
    model: Optional[Name] = None


class NoQuery(RequestModel):
    """Routes that take no query parameters."""
