"""Conformance of every registered defence (scikit-learn ``parametrize_with_checks`` style).

Parametrized over the registry, so defences added later are covered automatically.
"""

from __future__ import annotations

import inspect

import pytest

from trojanscope._utils.registry import Registry
from trojanscope.defenses import DEFENSES, Defense, ModelDetector, ScanResult, list_defenses

REGISTERED = DEFENSES.items()
IDS = [name for name, _ in REGISTERED]


def _defaults(cls: type) -> dict:
    sig = inspect.signature(cls.__init__)
    return {p.name: p.default for p in sig.parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _same(a, b) -> bool:
    try:
        return bool(a == b) or a is b
    except Exception:  # tensors / arrays as defaults
        return a is b


@pytest.mark.parametrize("name, cls", REGISTERED, ids=IDS)
def test_default_constructible_and_params_stored_verbatim(name, cls):
    assert issubclass(cls, Defense) and cls.family in ("model", "data", "input", "repair", "explain")
    assert name in list_defenses(cls.family)
    defaults = _defaults(cls)
    assert all(v is not inspect.Parameter.empty for v in defaults.values()), f"{name}: every argument needs a default"
    obj = cls()
    params = obj.get_params()
    assert list(params) == list(defaults)
    assert all(_same(params[k], v) for k, v in defaults.items()), f"{name}: __init__ must store its arguments as given"


@pytest.mark.parametrize("name, cls", REGISTERED, ids=IDS)
def test_init_only_stores_params(name, cls):
    obj = cls()
    public = {k for k in vars(obj) if not k.startswith("_")}
    assert public == set(_defaults(cls)), f"{name}: __init__ sets {sorted(public - set(_defaults(cls)))}"
    assert not [k for k in vars(obj) if k.endswith("_") and not k.startswith("_")], "learned state before fitting"


@pytest.mark.parametrize("name, cls", REGISTERED, ids=IDS)
def test_repr_and_unknown_kwargs(name, cls):
    text = repr(cls())
    assert text.startswith(f"{cls.__name__}(") and text.endswith(")")
    with pytest.raises(TypeError):
        cls(no_such_parameter=1)


def test_registry_machinery_with_a_dummy():
    reg: Registry[type] = Registry("defence")

    @reg.register("dummy")
    class Dummy(ModelDetector):
        """A detector that never finds anything."""

        def __init__(self, *, threshold: float = 2.0, seed: int | None = 0) -> None:
            self.threshold = threshold
            self.seed = seed

        def _scan(self, model, clean_data, *, callback) -> ScanResult:
            import torch

            return ScanResult(infected=False, flagged_labels=[], scores=torch.zeros(2), params=self.get_params())

    assert reg.names() == ["dummy"] and "dummy" in reg and reg.get("dummy") is Dummy
    assert Dummy.registry_name == "dummy"
    d = reg.create("dummy", threshold=3.0)
    assert d.get_params() == {"threshold": 3.0, "seed": 0}
    assert repr(d) == "Dummy(threshold=3.0, seed=0)"
    import torch
    from trojanscope.data.dataset import ImageDataset

    data = ImageDataset(torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long), 2)
    assert d.scan(torch.nn.Linear(4, 2), data).to_dict()["params"] == {"threshold": 3.0, "seed": 0}
    with pytest.raises(ValueError, match="twice"):
        reg.register("dummy")(Dummy)
    from trojanscope.errors import ConfigError
    with pytest.raises(ConfigError, match="unknown defence"):
        reg.get("nope")
    with pytest.raises(TypeError):
        Dummy(no_such_parameter=1)
