"""Reading a bench config (TOML, or YAML with PyYAML) into a :class:`BenchConfig`, and checking it
against the data before the first cell runs."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..attacks import ATTACKS
from ..data import ImageDataset
from ..defenses import DEFENSES
from ..errors import ConfigError, TrojanscopeError
from ..triggers import Trigger
from .presets import BENCH_PARAMS, default_config, preset_attack_spec, quick_config
from .spec import CHAIN, RECEIVED, AttackSpec, BenchConfig, DefenseSpec, expand_defenses

_TOP_KEYS = {"dataset", "arch", "epochs", "lr", "batch_size", "recipe", "seeds", "attacks", "defenses", "defences", "attack",
             "defense", "defence", "params", "rate", "target", "sources", "eval_samples", "chain", "victim"}
_ATTACK_KEYS = {"name", "attack", "trigger", "target", "rate", "mode", "source_labels", "cover_rate", "params"}
_DEFENSE_KEYS = {"name", "defense", "params"}
_CHAIN_KEYS = {"name", "steps", "retrain"}
_VICTIM_KEYS = {"name", "model", "trigger", "target", "train", "poison"}


def _expect(value: Any, types: type | tuple[type, ...], where: str) -> Any:
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ConfigError(f"{where} must be {_tname(types)}, got {value!r}")
    if not isinstance(value, types):
        raise ConfigError(f"{where} must be {_tname(types)}, got {type(value).__name__} {value!r}")
    return value


def _tname(types: type | tuple[type, ...]) -> str:
    ts = types if isinstance(types, tuple) else (types,)
    return " or ".join({"str": "a string", "int": "an integer", "float": "a number", "list": "a list",
                        "dict": "a table", "NoneType": "null"}.get(t.__name__, t.__name__) for t in ts)


def _check_keys(d: Mapping[str, Any], allowed: set[str], where: str) -> None:
    bad = sorted(set(d) - allowed)
    if bad:
        raise ConfigError(f"unknown key{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))} in {where}; "
                          f"allowed: {', '.join(sorted(allowed))}")


def _tables(value: Any, where: str) -> list[Any]:
    """An array of tables (``[[attack]]``...), a single table counting as one."""
    return _expect([value] if isinstance(value, Mapping) else value, list, where)


def _unique(names: list[str], what: str, hint: str = "") -> None:
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{what} names repeat: {', '.join(dup)}{hint}")


def parse_config(raw: Mapping[str, Any], *, base: BenchConfig | None = None) -> BenchConfig:
    """Validate a config mapping (from TOML / YAML) into a :class:`BenchConfig`.

    Keys missing from ``raw`` take their value from ``base`` (the defaults, or the quick preset).

    Raises:
        ConfigError: an unknown key, a wrong type, an unknown attack or defence, a bad value.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError("the config must be a table of settings at the top level")
    _check_keys(raw, _TOP_KEYS, "the config")
    base = base or default_config()
    kw = _parse_training(raw)
    attacks = _parse_attacks(raw)
    if attacks is not None:
        kw["attacks"] = attacks
    defenses = _parse_defenses(raw)
    if defenses is not None:
        kw["defenses"] = defenses
    cfg = dataclasses.replace(base, **kw)
    for d in cfg.defenses:
        check_defense_params(d)
    return cfg


def _parse_training(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The data and training settings of ``raw`` (the keys it gives)."""
    kw: dict[str, Any] = {}
    if "dataset" in raw:
        kw["dataset"] = _expect(raw["dataset"], str, "dataset")
    if "arch" in raw:
        from ..models import list_models

        kw["arch"] = _expect(raw["arch"], str, "arch")
        if kw["arch"] not in list_models():
            raise ConfigError(f"unknown arch {kw['arch']!r}; known: {', '.join(list_models())}")
    for key, lo in (("epochs", 0), ("batch_size", 1), ("sources", 1), ("target", 0)):
        if key in raw:
            kw[key] = _expect(raw[key], int, key)
            if kw[key] < lo:
                raise ConfigError(f"{key} must be >= {lo}, got {kw[key]}")
    for key in ("lr", "rate"):
        if key in raw:
            kw[key] = float(_expect(raw[key], (int, float), key))
            if not 0 < kw[key] <= (1 if key == "rate" else 10):
                raise ConfigError(f"{key} is out of range: {kw[key]}")
    if "recipe" in raw:
        from ..training import RECIPES

        kw["recipe"] = _expect(raw["recipe"], str, "recipe")
        if kw["recipe"] not in RECIPES:
            raise ConfigError(f"unknown recipe {kw['recipe']!r}; known: {', '.join(RECIPES)}")
        kw.setdefault("lr", float(RECIPES[kw["recipe"]]["lr"]))
    if "eval_samples" in raw:
        v = raw["eval_samples"]
        kw["eval_samples"] = None if v is None else _expect(v, int, "eval_samples")
    if "seeds" in raw:
        kw["seeds"] = _parse_seeds(raw["seeds"])
    return kw


def _parse_seeds(seeds: Any) -> tuple[int, ...]:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    _expect(seeds, list, "seeds")
    if not seeds:
        raise ConfigError("seeds must name at least one seed")
    out = tuple(int(_expect(s, int, "each seed")) for s in seeds)
    if len(set(out)) != len(out):
        raise ConfigError(f"seeds repeat: {list(out)}")
    return out


def _parse_attacks(raw: Mapping[str, Any]) -> tuple[AttackSpec, ...] | None:
    """The attack columns ``raw`` names (presets, ``[[attack]]``, ``[[victim]]``), or None if it names none."""
    if not ({"attacks", "attack", "victim"} & set(raw)):
        return None
    attacks = [preset_attack_spec(_expect(n, str, "each entry of attacks"))
               for n in _expect(raw.get("attacks", []), list, "attacks")]
    for i, a in enumerate(_tables(raw.get("attack", []), "[[attack]]")):
        attacks.append(_custom_attack(_expect(a, dict, f"[[attack]] #{i + 1}"), i + 1))
    for i, v in enumerate(_tables(raw.get("victim", []), "[[victim]]")):
        attacks.append(_victim(_expect(v, dict, f"[[victim]] #{i + 1}"), i + 1))
    _unique([a.name for a in attacks], "attack", " (give custom attacks a unique name)")
    if not attacks:
        raise ConfigError("the config names no attack")
    return tuple(attacks)


def _parse_defenses(raw: Mapping[str, Any]) -> tuple[DefenseSpec, ...] | None:
    """The defence rows ``raw`` names (names, ``[[defense]]``, ``[[chain]]``, ``[params]``), or None."""
    if "defenses" in raw and "defences" in raw:
        raise ConfigError("give 'defenses' or 'defences', not both")
    params = _expect(raw.get("params", {}), dict, "[params]")
    for k, v in params.items():
        _expect(v, dict, f"[params.{k}]")
    dkey = "defenses" if "defenses" in raw else "defences"
    if not (dkey in raw or "defense" in raw or "defence" in raw or "chain" in raw or params):
        return None
    named_custom = raw.get("defense") or raw.get("defence")
    names = _expect(raw.get(dkey, ["all"] if dkey not in raw and not named_custom else []), list, dkey)
    defenses = [DefenseSpec(n, n, {**BENCH_PARAMS.get(n, {}), **params.get(n, {})})
                for n in expand_defenses([_expect(n, str, f"each entry of {dkey}") for n in names])]
    defenses += [_custom_defense(_expect(d, dict, f"[[defense]] #{i + 1}"), i + 1)
                 for i, d in enumerate(_tables(raw.get("defense", raw.get("defence", [])), "[[defense]]"))]
    defenses += [_parse_chain(_expect(ch, dict, f"[[chain]] #{i + 1}"), i + 1, params)
                 for i, ch in enumerate(_tables(raw.get("chain", []), "[[chain]]"))]
    unknown_p = sorted(set(params) - {d.defense for d in defenses} - {st.defense for d in defenses for st in d.steps()})
    if unknown_p:
        raise ConfigError(f"[params] names defences not in the run: {', '.join(unknown_p)}")
    _unique([d.name for d in defenses], "defence")
    return tuple(defenses)


def _custom_defense(d: Mapping[str, Any], i: int) -> DefenseSpec:
    _check_keys(d, _DEFENSE_KEYS, f"[[defense]] #{i}")
    reg = _expect(d.get("defense", d.get("name")), str, f"[[defense]] #{i} defense")
    if reg not in DEFENSES:
        expand_defenses([reg])  # the unknown-name message
    return DefenseSpec(_expect(d.get("name", reg), str, "defense name"), reg,
                       {**BENCH_PARAMS.get(reg, {}), **_expect(d.get("params", {}), dict, "defense params")})


def _parse_chain(ch: Mapping[str, Any], i: int, params: Mapping[str, Any]) -> DefenseSpec:
    where = f"[[chain]] #{i}"
    _check_keys(ch, _CHAIN_KEYS, where)
    steps = _expect(ch.get("steps", []), list, f"{where} steps")
    if len(steps) < 2:
        raise ConfigError(f"{where} needs at least two steps (defence names)")
    names = [_expect(st, str, f"{where} step") for st in steps]
    for n in names:
        if n not in DEFENSES:
            expand_defenses([n])  # the unknown-name message
    retrain = _expect(ch.get("retrain", "scratch"), str, f"{where} retrain")
    if retrain not in ("scratch", "continue"):
        raise ConfigError(f"{where} retrain must be 'scratch' or 'continue', got {retrain!r}")
    name = _expect(ch.get("name", " > ".join(names)), str, f"{where} name")
    return DefenseSpec(name, CHAIN, {"steps": [[n, dict(params.get(n, {}))] for n in names], "retrain": retrain})


def check_defense_params(d: DefenseSpec) -> None:
    """ConfigError if ``d`` (or a step of its chain) sets a parameter its class does not take."""
    for st in d.steps():
        names = list(DEFENSES.get(st.defense).param_defaults())
        bad = sorted(set(st.params) - set(names))
        if bad:
            raise ConfigError(f"defence {st.name!r} ({st.defense}) takes no parameter {', '.join(map(repr, bad))}; "
                              f"it takes: {', '.join(names) or 'none'}")


def _custom_attack(a: Mapping[str, Any], i: int) -> AttackSpec:
    where = f"[[attack]] #{i}"
    _check_keys(a, _ATTACK_KEYS, where)
    name = _expect(a.get("name", ""), str, f"{where} name")
    if not name:
        raise ConfigError(f"{where} needs a name")
    kind = _expect(a.get("attack", "badnets"), str, f"{where} attack")
    if kind != "badnets" and kind not in ATTACKS:
        raise ConfigError(f"{where}: unknown attack {kind!r}; known: {', '.join(ATTACKS.names())}")
    params = dict(_expect(a.get("params", {}), dict, f"{where} params"))
    for k in ("trigger", "target", "rate", "mode", "source_labels", "cover_rate"):
        if k in a:
            params[k] = a[k]
    if kind == "badnets":
        _expect(params.get("trigger", "square:4"), str, f"{where} trigger")
        if "mode" in params and params["mode"] not in ("all-to-one", "all-to-all"):
            raise ConfigError(f"{where} mode must be 'all-to-one' or 'all-to-all', got {params['mode']!r}")
    return AttackSpec(name, kind, params)


def _victim(v: Mapping[str, Any], i: int) -> AttackSpec:
    """A ``[[victim]]`` table: a model file the user received (any format the safe loader reads),
    benchmarked as it is. ``trigger`` / ``target`` (the known backdoor) and ``poison`` (which
    samples of ``train`` were poisoned) are used for scoring only; ``train`` is the training set,
    needed only by the data sanitisers."""
    where = f"[[victim]] #{i}"
    _check_keys(v, _VICTIM_KEYS, where)
    name = _expect(v.get("name", ""), str, f"{where} name")
    if not name:
        raise ConfigError(f"{where} needs a name")
    path = Path(_expect(v.get("model", ""), str, f"{where} model"))
    if not path.exists():
        raise ConfigError(f"{where}: model not found: {path}")
    params: dict[str, Any] = {"model": str(path), "sha256": _file_digest(path)}
    if ("trigger" in v) != ("target" in v):
        raise ConfigError(f"{where}: trigger and target go together")
    if "trigger" in v:
        params["trigger"] = _expect(v["trigger"], str, f"{where} trigger")
        params["target"] = _expect(v["target"], int, f"{where} target")
    for k in ("train", "poison"):
        if k in v:
            params[k] = _expect(v[k], str, f"{where} {k}")
    if "poison" in params and "train" not in params:
        raise ConfigError(f"{where}: poison names samples of train; give train too")
    return AttackSpec(name, RECEIVED, params)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def load_config(path: str | Path | None = None, *, quick: bool = False) -> BenchConfig:
    """Read a TOML (or, with PyYAML installed, YAML) config; ``quick`` starts from the quick preset."""
    base = quick_config() if quick else default_config()
    if path is None:
        return base
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    return parse_config(_read_mapping(p), base=base)


def _read_mapping(p: Path) -> Any:
    text = p.read_text()
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{p}: YAML configs need PyYAML (pip install pyyaml); or write it as TOML") from None
        try:
            return yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {str(e).splitlines()[0]}") from None
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None


def validate_config(config: BenchConfig, train: ImageDataset) -> None:
    """Build every attack (parsing its trigger, checking its settings against the data) and every
    defence (checking its settings) of ``config``, so that a bad entry fails before any cell runs."""
    from .cells import make_defense

    for a in config.attacks:
        if a.attack == RECEIVED:
            _check_victim(a, train)
            continue
        for seed in config.seeds:
            _check_attack(a, train, seed, config)
    for d in config.defenses:
        check_defense_params(d)
        for st in d.steps():
            try:
                make_defense(st, config.seeds[0])._validate_params()
            except TrojanscopeError as e:
                raise ConfigError(f"defence {d.name!r}: {e}") from None


def _check_victim(a: AttackSpec, train: ImageDataset) -> None:
    """A received model's trigger must parse for the data and its target fit."""
    try:
        if "trigger" in a.params:
            Trigger.parse(a.params["trigger"], train.image_shape)
            if not 0 <= int(a.params["target"]) < train.num_classes:
                raise ConfigError(f"target {a.params['target']} is out of range for {train.num_classes} classes")
    except TrojanscopeError as e:
        raise ConfigError(f"victim {a.name!r}: {e}") from None


def _check_attack(a: AttackSpec, train: ImageDataset, seed: int, config: BenchConfig) -> None:
    from .._utils.validation import check_params
    from .victims import build_attack

    try:
        atk = build_attack(a, train, seed=seed, rate=config.rate, target=config.target)
        if atk is None:
            return
        if hasattr(atk, "_check"):
            atk._check(train.num_classes)
        elif getattr(atk, "_constraints", None):
            check_params(atk, atk._constraints)
        target = getattr(atk, "target", None)
        if isinstance(target, int) and not 0 <= target < train.num_classes:
            raise ConfigError(f"target {target} is out of range for {train.num_classes} classes")
    except TrojanscopeError as e:
        raise ConfigError(f"attack {a.name!r}: {e}") from None
