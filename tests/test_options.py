"""`GenerationOptions`, the one model of sampling options (pure logic, no model loaded)."""

from __future__ import annotations

import pytest

from myllm.errors import InvalidOptions
from myllm.registry.schema import ModelRow
from myllm.registry.store import Registry
from myllm.runtime.request.options import PARAMETERS, GenerationOptions, parameter_value
from myllm.runtime.service import Runtime
from myllm.settings import Settings


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"temperature": 3}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"num_predict": 0}, "max_tokens"),
        ({"repeat_penalty": -1}, "repeat_penalty"),
        ({"temprature": 0.5}, "temprature"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["x"] * 17}, "stop"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 51}, "logprobs"),
        ({"format": "xml"}, "format"),
        ({"format": ["not", "a", "schema"]}, "format"),
        ({"temperature": float("nan")}, "temperature"),
    ],
)
def test_invalid_options_name_the_field(values: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidOptions) as info:
        GenerationOptions.parse(values)
    assert info.value.field == field
    assert f"'{field}'" in info.value.message


def test_parse_drops_none_and_maps_aliases() -> None:
    options = GenerationOptions.parse({"num_predict": 7, "seed": None, "stop": "END", "logprobs": 50, "format": "json"})
    assert options.model_fields_set == {"max_tokens", "stop", "logprobs", "format"}
    assert (options.max_tokens, options.seed, options.stop, options.logprobs) == (7, None, ("END",), 50)
    assert GenerationOptions.parse(None) == GenerationOptions()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert GenerationOptions.parse({"format": schema}).format == schema


def test_request_options_over_model_defaults() -> None:
    defaults = GenerationOptions.parse({"temperature": 0.6, "num_predict": 256, "stop": ["User:"], "top_k": 10})
    request = GenerationOptions.parse({"temperature": 0.0, "top_p": 0.5, "top_k": 40})
    merged = request.over(defaults)
    assert merged.temperature == 0.0 and merged.top_p == 0.5, "what the request set wins"
    assert merged.top_k == 40, "even when the request sets the built-in default value"
    assert merged.max_tokens == 256 and merged.stop == ("User:",), "the model's defaults fill the rest"
    assert merged.min_p == GenerationOptions().min_p, "neither set it: the built-in default"
    assert merged.model_fields_set == {"temperature", "top_p", "top_k", "max_tokens", "stop"}


def test_runtime_lays_the_request_over_the_stored_parameters(registry: Registry) -> None:
    row = ModelRow(parameters={"temperature": 0.6, "num_predict": 256})
    runtime = Runtime(registry, Settings())
    options = runtime.options_for(row, GenerationOptions(temperature=0.0))
    assert (options.temperature, options.max_tokens) == (0.0, 256)
    assert runtime.options_for(row, None).temperature == 0.6
    with pytest.raises(InvalidOptions) as info:
        runtime.options_for(ModelRow(parameters={"top_p": 7}), None)
    assert info.value.field == "top_p", "stored defaults go through the same checks"


@pytest.mark.parametrize(("name", "text", "value"), [
    ("temperature", "0.7", 0.7), ("top_k", "40", 40), ("seed", "42", 42), ("num_predict", "128", 128),
    ("stop", "###", ("###",)), ("stop", ["a", "b"], ("a", "b")),
])
def test_parameters_written_as_text(name: str, text: str | list[str], value: object) -> None:
    assert parameter_value(name, text) == value


def test_parameters_are_the_defaultable_options() -> None:
    assert "logprobs" not in PARAMETERS and "format" not in PARAMETERS
    assert {"temperature", "stop", "num_predict", "max_tokens", "presence_penalty"} <= set(PARAMETERS)
    with pytest.raises(InvalidOptions, match="must be <= 2.0"):
        parameter_value("temperature", "9")
