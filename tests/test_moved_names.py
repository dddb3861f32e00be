"""Names the module splits moved out are still importable from their old modules, as the very same objects
(models logged before a split import ``nextbest.training.propensity.load_propensity_model``, for one)."""

from __future__ import annotations

import importlib

import pytest

from nextbest.features.moved_names import moved_names

OLD_MODULES = (
    "nextbest.features.importers",
    "nextbest.training.propensity",
    "nextbest.training.cf",
    "nextbest.training.tracking",
    "nextbest.serving.policy",
)


def moved_table(module: str) -> dict[str, str]:
    """name → new module, as the old module's ``__getattr__`` holds it."""
    return importlib.import_module(module).__getattr__.moved


@pytest.mark.parametrize("module", OLD_MODULES)
def test_every_moved_name_is_the_same_object_from_its_old_module(module):
    home = moved_table(module)
    assert home, f"{module} lists no moved names"
    old = importlib.import_module(module)
    for name, target in home.items():
        assert getattr(old, name) is getattr(importlib.import_module(target), name), (module, name)


def test_a_logged_models_old_import_still_works():
    from nextbest.training.propensity import load_propensity_model
    from nextbest.training.propensity_scorer import load_propensity_model as moved

    assert load_propensity_model is moved


def test_a_name_that_never_existed_is_an_attribute_error():
    getattr_ = moved_names("old.module", {"new.module": "a b"})
    with pytest.raises(AttributeError, match=r"'old\.module' has no attribute 'c'"):
        getattr_("c")
    import nextbest.training.cf as cf

    with pytest.raises(AttributeError):
        cf.no_such_name  # noqa: B018 - the access is the test
