"""The generic registry: duplicates refused, unknown names answered with the closest matches."""

import pytest

from normbench.errors import UnknownNameError
from normbench.registry import Registry


def test_register_get_and_list_with_glob():
    reg: Registry = Registry("thing")

    @reg.register("alpha", family="greek", capabilities={"fast"})
    def alpha():
        """First letter."""

    reg.register("beta")(lambda: None)
    assert reg.get("alpha").obj is alpha
    assert reg.info("alpha").description == "First letter."
    assert reg.info("alpha").has("fast")
    assert reg.names() == ["alpha", "beta"]
    assert reg.names("a*") == ["alpha"]


def test_duplicate_name_is_refused():
    reg: Registry = Registry("thing")
    reg.register("alpha")(object)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("alpha")(object)


def test_unknown_name_names_closest_matches():
    reg: Registry = Registry("norm")
    for name in ("batchnorm", "groupnorm", "layernorm"):
        reg.register(name)(object)
    with pytest.raises(UnknownNameError) as info:
        reg.get("batchnrom")
    assert "'batchnorm'" in str(info.value)
    assert "normbench list norms" in str(info.value)
    with pytest.raises(UnknownNameError, match="Known norms: batchnorm, groupnorm, layernorm"):
        reg.get("zzzzzz")
