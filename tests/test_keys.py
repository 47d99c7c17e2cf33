"""Key templates and argument escaping."""

from __future__ import annotations

import enum
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cached_aside import (
    KeyArgumentError,
    KeyTemplateError,
    cache_aside,
)
from cached_aside._keys import (
    MAX_RENDERED_LENGTH,
    KeyTemplate,
    entry_keys,
    render_argument,
    validate_prefix,
)


def orders(user_id: int, page: int = 1, *, db: object = None) -> None: ...


def pair(a: object, b: object) -> None: ...


def test_render_with_defaults_and_keywords() -> None:
    template = KeyTemplate("user:<user_id>:orders:<page>", orders)
    assert template.render((7,), {}) == "user:7:orders:1"
    assert template.render((7, 2), {"db": object()}) == "user:7:orders:2"
    assert template.render((), {"user_id": 7, "page": 3}) == "user:7:orders:3"


def test_bad_call_raises_like_the_function_would() -> None:
    with pytest.raises(TypeError):
        KeyTemplate("user:<user_id>", orders).render((1, 2, 3), {})


def test_unknown_placeholder_names_function_and_parameters() -> None:
    with pytest.raises(KeyTemplateError, match=r"<userid>.*orders.*<user_id>, <page>, <db>"):
        KeyTemplate("user:<userid>", orders)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "non-empty"),
        ("a:{<a>}", "reserved"),
        ("a:<a>#", "reserved"),
        ("a:<a><b>", "separator"),
        ("a:<a>-<b>", "separator"),
        ("a:<a b>", "placeholder"),
        ("a:<a", "outside a placeholder"),
        ("a:\n<a>", "outside a placeholder"),
    ],
)
def test_bad_templates(text: str, message: str) -> None:
    with pytest.raises(KeyTemplateError, match=message):
        KeyTemplate(text, pair)


def test_var_args_cannot_be_placeholders() -> None:
    def variadic(*ids: int) -> None: ...

    with pytest.raises(KeyTemplateError, match="not a named parameter"):
        KeyTemplate("x:<ids>", variadic)


def test_readable_rendering() -> None:
    assert render_argument("p-001") == "p-001"
    assert render_argument(42) == "42"
    assert render_argument("a:b c") == "a%3Ab%20c"
    assert render_argument("1") == "%31"  # never the same as the int 1
    assert render_argument("None") == "%4Eone"
    assert render_argument(None) == "None"
    assert render_argument(1.5) == "1.5"
    assert render_argument(b"\x01") == "0x01"
    u = uuid.UUID(int=5)
    assert render_argument(u) == str(u)

    class Colour(enum.Enum):
        RED = "red"

    assert render_argument(Colour.RED) == "red"


def test_objects_without_identity_are_rejected() -> None:
    with pytest.raises(KeyArgumentError, match="memory address"):
        render_argument(object())
    with pytest.raises(KeyArgumentError, match="memory address"):
        render_argument([object()])


def test_long_keys_are_bounded_and_distinct() -> None:
    template = KeyTemplate("doc:<a>", pair)
    first = template.render(("x" * 1000, 0), {})
    second = template.render(("x" * 999 + "y", 0), {})
    assert len(first) <= MAX_RENDERED_LENGTH
    assert first.startswith("doc:xxxx")
    assert first != second


def test_prefix_validation() -> None:
    assert validate_prefix("app:cache") == "app:cache"
    for bad in ("", "a{b", "a b", 3):
        with pytest.raises(ValueError, match="prefix"):
            validate_prefix(bad)


arguments = st.one_of(
    st.text(), st.integers(), st.floats(allow_nan=False), st.booleans(), st.none(), st.binary()
)


def identity(value: object) -> tuple[type, object]:
    return (type(value), value)


@given(st.tuples(arguments, arguments), st.tuples(arguments, arguments))
def test_different_arguments_give_different_keys(
    x: tuple[object, object], y: tuple[object, object]
) -> None:
    template = KeyTemplate("p:<a>:<b>", pair)
    if tuple(map(identity, x)) != tuple(map(identity, y)):
        assert template.render(x, {}) != template.render(y, {})


@given(st.tuples(arguments, arguments), st.tuples(arguments, arguments))
def test_no_key_is_another_entrys_internal_key(
    x: tuple[object, object], y: tuple[object, object]
) -> None:
    template = KeyTemplate("p:<a>:<b>", pair)
    value_key = "cache:{" + template.render(x, {}) + "}"
    other = entry_keys("cache:{" + template.render(y, {}) + "}")
    assert value_key not in (other.lock, other.waiters, other.wake)


def test_keys_remembered_by_text_match_rendering_and_stay_bounded() -> None:
    """The hit path looks a one-str-argument key up by its text instead of rendering
    it: what it finds must be what rendering gives, for text and for nothing else."""

    def read(id: object) -> None: ...

    template = KeyTemplate("p:<id>", read)
    for text in ("plain", "with space", "ü", "a:b"):
        rendered = template.render((text,), {})
        assert template.by_text[text] == rendered
    template.render((7,), {})
    template.render(("x" * 300,), {})  # shortened: never remembered
    assert set(template.by_text) == {"plain", "with space", "ü", "a:b"}
    for number in range(5_000):
        template.render((f"id-{number}",), {})
    assert 0 < len(template.by_text) <= 4096

    def two(a: str, b: str) -> None: ...

    pair = KeyTemplate("p:<a>", two)
    pair.render(("x", "y"), {})
    assert pair.by_text == {}  # a call of one argument could not mean the same key


def test_a_key_argument_that_is_not_valid_text_is_a_key_error() -> None:
    fn = cache_aside(key="file:<name>", ttl=1)(lambda name: name)
    with pytest.raises(KeyArgumentError, match="not valid text"):
        fn.key("report\udcff.pdf")  # as os.fsdecode makes of undecodable bytes


def test_a_calls_remembered_key_is_the_rendered_one_for_every_argument() -> None:
    """The hit path remembers a str argument's whole key (per engine): a call must
    reach the entry fn.key() names, for text, for what equals text without being
    str (a str enum), for numbers that equal each other, and for a long text."""
    import fakeredis

    from cached_aside import CacheEngine

    class Colour(str, enum.Enum):
        RED = "red"

    server = fakeredis.FakeServer()
    engine = CacheEngine(fakeredis.FakeRedis(server=server), prefix="keys")
    seen: list[object] = []

    @cache_aside(key="item:<id>", ttl=30, engine=engine)
    def item(id: object) -> str:
        seen.append(id)
        return repr(id)

    arguments: list[object] = ["red", Colour.RED, 1, True, 1.0, "x" * 300, "red"]
    for argument in arguments:
        assert item(argument) == repr(argument) or argument == "red"
    raw = fakeredis.FakeRedis(server=server)
    for argument in arguments:
        assert raw.exists(item.key(argument)) == 1, argument
    # Each distinct key loaded once; "red" twice from its memo, a hit the second time.
    assert len(seen) == len({item.key(argument) for argument in arguments})
    engine.close()
