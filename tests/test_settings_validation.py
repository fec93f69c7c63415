"""Bad RocketKV settings, fuzzed: each is a ValueError naming the field (HTTP 400 / start-up error)."""
import dataclasses
import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rocketkv_vllm.config import MAX_INT, MODES, REQUEST_KEYS, RequestSettings, RocketKVConfig, request_settings

DEFAULTS = RocketKVConfig()
SELECTING = RocketKVConfig(mode="mt")  # a server whose requests may select pages
# anything a JSON body (or an offline caller) can put in a value
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
fuzz = settings(max_examples=150, deadline=None)
HOSTILE = [True, False, None, math.nan, math.inf, -math.inf, 1.0, 2**80, -(2**80), MAX_INT + 1, -1, 0, "", "12",
           [], [64], {}, {"a": 1}]


def _valid_int(value, minimum: int = 1) -> bool:
    return type(value) is int and minimum <= value <= MAX_INT


def _valid_mode(value) -> bool:
    return isinstance(value, str) and value.lower() in MODES


def test_request_keys_map_to_settings_fields_with_server_defaults():
    fields = [field for field, _ in REQUEST_KEYS.values()]
    assert fields == [f.name for f in dataclasses.fields(RequestSettings)]
    assert request_settings({}, DEFAULTS) == RequestSettings(**{f: getattr(DEFAULTS, f) for f in fields})


@fuzz
@given(json_values)
def test_request_budget(value):
    if _valid_int(value):
        assert request_settings({"rocketkv_budget": value}, DEFAULTS).budget == value
    else:
        with pytest.raises(ValueError, match="rocketkv_budget"):
            request_settings({"rocketkv_budget": value}, DEFAULTS)


@fuzz
@given(json_values | st.sampled_from(MODES + ("MT", "Full")))
def test_request_mode(value):
    if _valid_mode(value):
        # (quest selects pages: a server that may, see test_plan.test_quest_needs_pages_it_may_select)
        assert request_settings({"rocketkv_mode": value}, SELECTING).mode == value.lower()
    else:
        with pytest.raises(ValueError, match="rocketkv_mode"):
            request_settings({"rocketkv_mode": value}, DEFAULTS)


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_request_values_are_rejected(value):
    for key in REQUEST_KEYS:
        with pytest.raises(ValueError, match=key):
            request_settings({key: value}, DEFAULTS)


def test_budget_bound_is_stated():
    with pytest.raises(ValueError, match=f"between 1 and {MAX_INT}, got {2**80}"):
        request_settings({"rocketkv_budget": 2**80}, DEFAULTS)
    assert request_settings({"rocketkv_budget": MAX_INT}, DEFAULTS).budget == MAX_INT


@fuzz
@given(st.text(min_size=1, max_size=12), json_values)
def test_unknown_rocketkv_request_keys_are_rejected(suffix, value):
    key = "rocketkv_" + suffix
    if key in REQUEST_KEYS:
        return
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        request_settings({key: value, "rocketkv_budget": 64}, DEFAULTS)


@pytest.mark.parametrize(
    "key,hint",
    [("rocketkv_budgte", "did you mean 'rocketkv_budget'"), ("rocketkv_mdoe", "did you mean 'rocketkv_mode'"),
     ("rocketkv_top_k", "rocketkv.top_k is a server setting"), ("rocketkv_xyz", "known: rocketkv_budget")],
)
def test_unknown_keys_come_with_a_hint(key, hint):
    with pytest.raises(ValueError, match=re.escape(repr(key))) as error:
        request_settings({key: 1}, DEFAULTS)
    assert hint in str(error.value)


def test_other_extra_args_are_left_to_their_owners():
    assert request_settings({"budget": "x", "rocketkv": 1, 7: None}, DEFAULTS) == request_settings({}, DEFAULTS)


@pytest.mark.parametrize("extra_args", [[("rocketkv_budget", 1)], "rocketkv_budget", 5])
def test_extra_args_must_be_a_mapping(extra_args):
    with pytest.raises(ValueError, match="extra_args must be a mapping"):
        request_settings(extra_args, DEFAULTS)


# server settings: field -> (smallest valid value, whether None means "default")
SERVER_INTS = {"budget": (1, False), "output_tokens": (1, False), "window": (1, False), "pool_kernel": (1, False),
               "page_size": (1, True), "top_channels": (1, True), "top_k": (1, True), "summary_group": (0, True),
               "dense_below": (0, True)}
SERVER_BOOLS = ("attend_newest_page", "decode_graphs")


def _server(**section) -> RocketKVConfig:
    return RocketKVConfig.from_additional_config({"rocketkv": section})


def test_every_server_field_is_fuzzed():
    assert set(SERVER_INTS) | set(SERVER_BOOLS) | {"mode"} == {f.name for f in dataclasses.fields(RocketKVConfig)}


@pytest.mark.parametrize("field", sorted(SERVER_INTS))
@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_server_values_are_rejected(field, value):
    minimum, optional = SERVER_INTS[field]
    if (value is None and optional) or (_valid_int(value, minimum) and value in (1, 0)):
        return  # 1 (and 0 for summary_group) are valid for every integer field
    with pytest.raises(ValueError, match=f"rocketkv.{field}"):
        _server(**{field: value})


@fuzz
@given(st.sampled_from(sorted(SERVER_INTS)), json_values)
def test_server_integer_fields(field, value):
    minimum, optional = SERVER_INTS[field]
    try:
        config = _server(**{field: value})
    except ValueError as error:
        assert f"rocketkv.{field}" in str(error)
        return
    # accepted: a value in range (further rules: odd pool kernel, power-of-two page and group)
    assert (value is None and optional) or _valid_int(value, minimum)
    # (a page size left unset is resolved to the server's default)
    assert getattr(config, field) == (RocketKVConfig().page_size if field == "page_size" and value is None else value)


@fuzz
@given(st.sampled_from(SERVER_BOOLS), json_values)
def test_server_boolean_fields(field, value):
    if isinstance(value, bool):
        assert getattr(_server(**{field: value}), field) is value
    else:
        with pytest.raises(ValueError, match=f"rocketkv.{field}"):
            _server(**{field: value})


@fuzz
@given(json_values)
def test_server_mode(value):
    if _valid_mode(value):
        assert _server(mode=value).mode == value.lower()
    else:
        with pytest.raises(ValueError, match="rocketkv.mode"):
            _server(mode=value)


@pytest.mark.parametrize("section", [[], "budget=64", 3, True])
def test_server_section_must_be_an_object(section):
    with pytest.raises(ValueError, match=r"additional_config\['rocketkv'\] must be a JSON object"):
        RocketKVConfig.from_additional_config({"rocketkv": section})


def test_unknown_server_settings_name_the_key():
    with pytest.raises(ValueError, match=r"'rocketkv.budgte'; did you mean 'rocketkv.budget'"):
        _server(budgte=64)
    assert _server(budget=64, page_size=8).page_size == 8
