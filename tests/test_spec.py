"""FaultSpec parsing: every error names the key, the bad value and what would be valid."""

import pytest
from lm_eval_faults.core.spec import (
    FaultSpec,
    FaultSpecError,
    parse_fault_args,
    parse_layers,
)


def test_defaults_and_string_values_from_lm_eval():
    spec, rest = parse_fault_args(
        {"pretrained": "m", "p": "1e-5", "target": "attention+mlp", "layers": "28-31+0", "seed": "3", "dtype": "float16"}
    )
    assert spec.p == 1e-5 and spec.target == ("attention", "mlp") and spec.layers == (0, 28, 29, 30, 31) and spec.seed == 3
    assert rest == {"pretrained": "m", "dtype": "float16"}
    assert spec.per_bit and spec.on_weights and not spec.on_activations and spec.active


def test_aliases_and_all():
    assert FaultSpec(target="feed_forward+normalization").target == ("mlp", "norm")
    assert FaultSpec(target="attention+all").target == ("all",)
    assert FaultSpec(p=0).active is False


@pytest.mark.parametrize(
    "args, key, hint",
    [
        ({"p": "2"}, "p", "[0, 1]"),
        ({"p": "often"}, "p", "probability"),
        ({"fault": "flip"}, "fault", "bitflip, stuck0, stuck1, value, zero"),
        ({"site": "weight"}, "site", "weights, activations, kv_cache, weights+activations+kv_cache"),
        ({"target": "attn"}, "target", "embedding, attention, mlp, norm, lm_head"),
        ({"layers": "3-1"}, "layers", "backwards"),
        ({"layers": "first"}, "layers", "0-3"),
        ({"bits": "exponents"}, "bits", "sign, exponent, mantissa"),
        ({"fault": "value", "p": "1e-3", "bits": "sign"}, "bits", "bitflip, stuck0, stuck1"),
        ({"value_range": "1:0"}, "value_range", "low < high"),
        ({"modules": "(unclosed"}, "modules", "regular expression"),
        ({"act_scope": "nested"}, "act_scope", "leaf"),
        ({"p": 0.001, "p01": "1e-3"}, "p", "not both"),
        ({"fault": "stuck0", "p10": "1e-3"}, "fault", "bitflip"),
        ({"seed": "x"}, "seed", "integer"),
    ],
)
def test_bad_values_name_key_value_and_choices(args, key, hint):
    with pytest.raises(FaultSpecError) as error:
        parse_fault_args(args)
    message = str(error.value)
    assert f"{key}=" in message and repr(next(v for k, v in args.items() if k == key)) in message
    assert hint in message


@pytest.mark.parametrize(
    "typo, meant", [("traget", "target"), ("layer", "layers"), ("seeed", "seed"), ("fualt", "fault"), ("value_rnage", "value_range")]
)
def test_typo_of_a_fault_key_is_an_error_with_suggestion(typo, meant):
    with pytest.raises(FaultSpecError, match=f"did you mean '{meant}'"):
        parse_fault_args({typo: "x"}, passthrough=("pretrained", "dtype"))


def test_known_passthrough_keys_are_not_typos():
    _, rest = parse_fault_args({"device": "cpu", "peft": "a", "gguf_file": "x.gguf"}, passthrough=("device", "peft", "gguf_file"))
    assert rest == {"device": "cpu", "peft": "a", "gguf_file": "x.gguf"}


def test_parse_layers():
    assert parse_layers(5) == (5,)
    assert parse_layers("all") is None
    assert parse_layers("0-2+7") == (0, 1, 2, 7)


def test_fingerprint_and_round_trip():
    spec = FaultSpec(p=1e-5, target="attention", layers="0-3", seed=2)
    again = FaultSpec(**spec.to_dict())
    assert again == spec and again.fingerprint() == spec.fingerprint()
    assert FaultSpec(p=1e-5, seed=3).fingerprint() != FaultSpec(p=1e-5, seed=2).fingerprint()
    assert "per bit" in spec.describe() and "per element" in FaultSpec(p=1e-3, fault="zero").describe()


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("p", True, "expected a probability"),
        ("p", "true", "expected a probability"),
        ("p", "1e-400", "underflows"),
        ("seed", 1.5, "expected an integer"),
        ("seed", True, "expected an integer"),
        ("layers", "0-100000000", "not a model's layers"),
        ("bits", "40", "0-31 at most"),
    ],
)
def test_strict_values_name_the_key(key, value, message):
    with pytest.raises(FaultSpecError, match=message) as error:
        FaultSpec(**{key: value})
    assert f"{key}=" in str(error.value)


def test_a_key_given_twice_is_an_error():
    from lm_eval_faults.core.spec import parse_arg_string

    with pytest.raises(FaultSpecError, match="given twice"):
        parse_arg_string("p=1e-3,target=mlp,p=1e-4")
