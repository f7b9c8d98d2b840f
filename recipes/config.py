"""Compose, type-check and validate the run config (Hydra compose API).

``load_config(overrides)`` is the whole validation path: a typo'd key, a wrong type, an unknown
group option, bad override syntax, or a value the dataclasses' ``__post_init__`` checks reject
raises :class:`ConfigError` with one line that names the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import re

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from recipes.schema import CONFIG_DIR, ConfigError, RunConfig, register

GROUPS = ("model", "task", "task@sft_task", "rollout", "recipe", "experiment", "trainer@sft", "trainer@rl")


def group_options(group: str) -> list[str]:
    """YAML options of a config group (``trainer@rl`` -> the files in configs/trainer/)."""
    folder = CONFIG_DIR / group.split("@")[0]
    return sorted(p.stem for p in folder.glob("*.yaml"))


def compose(overrides: list[str]) -> DictConfig:
    """The composed (unresolved) config for ``overrides``; Hydra/OmegaConf errors pass through."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="dllm-rl"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def _reject_extra_keys(node: DictConfig, prefix: str = "") -> None:
    """Keys added with ``+key=...`` to a structured node are typos the schema cannot type-check."""
    cls = OmegaConf.get_type(node)
    allowed = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None
    for k in node.keys():
        if allowed is not None and k not in allowed:
            raise ConfigError(f"{prefix}{k}: unknown key{_suggest(prefix + str(k))}")
        child = node._get_node(k)
        if isinstance(child, DictConfig) and not child._is_interpolation() and not child._is_none():
            _reject_extra_keys(child, f"{prefix}{k}.")


def _failing_key(node: DictConfig, prefix: str = "") -> str:
    """The dotted key of the deepest structured node whose dataclass rejects its values."""
    for k in node.keys():
        child = node._get_node(k)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_interpolation() \
                and dataclasses.is_dataclass(OmegaConf.get_type(child)):
            try:
                OmegaConf.to_object(child)
            except OmegaConfBaseException:
                raise
            except ValueError:
                return _failing_key(child, f"{prefix}{k}.")
    return prefix


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Resolve interpolations and build the dataclasses: OmegaConf checks types, their
    ``__post_init__`` checks values (the error is prefixed with the key of the failing node)."""
    _reject_extra_keys(cfg)
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException:
        raise
    except ValueError as e:
        raise ConfigError(f"{_failing_key(cfg)}{_first_line(str(e))}") from e
    assert isinstance(obj, RunConfig)
    return obj


# Free-form dict fields: their entries may be set without Hydra's "+" (model.tiny.hidden_size=64).
OPEN_DICTS = ("model.tiny", "task.columns", "task.rewards", "sft_task.columns", "sft_task.rewards", "eval.modes",
              "sft.estimator_options",
              "rl.estimator_options", "rl.objective_options", "rl.rewards")


def _open_dict_overrides(overrides: list[str]) -> tuple[list[str], dict]:
    """Entries of free-form dicts need no "+": ``model.tiny.hidden_size=64`` becomes
    ``++model.tiny.hidden_size=64``. A whole-dict value (``task.rewards={gsm8k: 1.0}``) replaces
    the dict instead of merging into it: it is returned separately and set after composition."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hydra.errors import OverrideParseException

    out, replace = [], {}
    for o in overrides:
        key = o.split("=", 1)[0]
        if "=" in o and not key.startswith(("+", "~")):
            if key in OPEN_DICTS:
                try:
                    replace[key] = OverridesParser.create().parse_overrides([o])[0].value()
                except OverrideParseException as e:
                    raise ConfigError(f"{o}: bad override syntax ({_first_line(str(e))})") from None
                continue
            if any(key.startswith(d + ".") for d in OPEN_DICTS):
                o = "++" + o
        out.append(o)
    return out, replace


def load_config(overrides: list[str] | tuple[str, ...] = (), notes: list[str] | None = None) -> RunConfig:
    """Compose + resolve + validate; every failure becomes one :class:`ConfigError` line.
    ``notes``: gets the line of :func:`shadowed_rollout_overrides` (if any)."""
    from hydra.errors import HydraException

    try:
        plain, replace = _open_dict_overrides(list(overrides))
        cfg = compose(plain)
        for key, value in replace.items():
            if not isinstance(value, dict):
                raise ConfigError(f"{key}={value!r}: expected a dict, e.g. {key}={{name: value}}")
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
        run = to_run_config(cfg)
        if notes is not None:
            line = shadowed_rollout_overrides(cfg, list(overrides))
            if line:
                notes.append(line)
        return run
    except ConfigError:
        raise
    except (HydraException, OmegaConfBaseException, ValueError, TypeError, KeyError) as e:
        raise ConfigError(_stage_trainer_mismatch(list(overrides)) or explain(e, overrides)) from e


def _stage_trainer_mismatch(overrides: list[str]) -> str | None:
    """The stage's own line for ``trainer@<stage>=<option>`` of another kind than the recipe runs
    there. Composing fails before the stage check in that case when the recipe file sets a key the
    option's schema lacks (``sft_grpo_distill``'s ``rl.num_iterations`` under ``trainer@rl=sft``)."""
    from recipes.schema import RECIPES, TRAINER_SCHEMAS, stage_mismatch, trainer_options

    def value(name: str) -> str | None:
        return next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == name), None)

    recipe = value("recipe")
    if recipe is None:  # the default recipe: configs/config.yaml's defaults list
        defaults = OmegaConf.load(CONFIG_DIR / "config.yaml").defaults
        recipe = next((d["recipe"] for d in defaults if isinstance(d, DictConfig) and "recipe" in d), None)
    for key, cls in RECIPES.get(recipe, ()):
        option = value(f"trainer@{key}")
        kinds = [c for schema, c in TRAINER_SCHEMAS.items() if option in trainer_options([schema])]
        if kinds and cls not in kinds:
            return stage_mismatch(key, recipe, cls, f"a {kinds[0].__name__}")
    return None


# ---- one rule for rollout settings ----------------------------------------------------------------

def shadowed_rollout_overrides(cfg: DictConfig, overrides: list[str]) -> str | None:
    """One line naming every command-line ``rollout.<key>`` (or ``rollout=<option>`` key) that a
    stage of the recipe does not see because its own ``<stage>.rollout.<key>`` is set on purpose
    (configs/trainer: every other key is ``${rollout.<key>}``); None when nothing is shadowed."""
    from recipes.schema import RECIPES

    recipe = OmegaConf.select(cfg, "recipe.name")
    stage_keys = [key for key, _ in RECIPES.get(recipe, ())]
    keys: dict[str, str] = {}  # dotted key under rollout -> the override that set it
    for o in overrides:
        name, _, value = o.partition("=")
        name = name.lstrip("+~")
        if name.startswith("rollout."):
            keys.setdefault(name[len("rollout."):], o)
        elif name == "rollout":  # a group option: the keys its file sets
            for k in OmegaConf.load(CONFIG_DIR / "rollout" / f"{value}.yaml").keys():
                keys.setdefault(str(k), o)
    explicit = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    shadowed = []
    for stage in stage_keys:
        node = cfg.get(stage)
        for key, override in keys.items():
            child = node
            for part in ("rollout", *key.split(".")):  # an interpolation on the way: the key follows `rollout`
                child = child._get_node(part) if isinstance(child, DictConfig) and part in child else None
                if child is None or child._is_interpolation():
                    break
            if child is None or child._is_interpolation() or isinstance(child, DictConfig) or any(
                    e == f"{stage}.rollout.{key}" or f"{stage}.rollout.{key}".startswith(e + ".") for e in explicit):
                continue
            shadowed.append(f"{override} does not reach {stage}.rollout.{key} (its trainer sets {child._value()!r}; "
                            f"set {stage}.rollout.{key}=... to change it)")
    return "shadowed rollout settings: " + "; ".join(shadowed) if shadowed else None


# ---- one-line messages ---------------------------------------------------------------------------

def _root_cause(e: BaseException) -> BaseException:
    """The first OmegaConf error in the cause chain (it carries the full key), else the last cause."""
    seen = 0
    while not isinstance(e, OmegaConfBaseException) and (e.__cause__ or e.__context__) is not None and seen < 10:
        e, seen = e.__cause__ or e.__context__, seen + 1
    return e


def _known_keys() -> list[str]:
    """Every dotted key of the default composition (used to suggest a fix for a typo)."""
    cfg = compose([])
    keys: list[str] = []

    def walk(node, prefix: str) -> None:
        if isinstance(node, DictConfig):
            for k in node.keys():
                walk(node._get_node(k), f"{prefix}{k}.")
        elif not isinstance(node, ListConfig):
            keys.append(prefix[:-1])

    walk(cfg, "")
    return keys


def _suggest(bad_key: str) -> str:
    """"did you mean" text: keys with the same last part, else close spellings."""
    try:
        known = _known_keys()
    except Exception:  # noqa: BLE001 - suggestions are best effort
        return ""
    last = bad_key.split(".")[-1]
    same_leaf = [k for k in known if k.split(".")[-1] == last]
    close = same_leaf or difflib.get_close_matches(bad_key, known, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(close[:4])}?" if close else ""


def _first_line(text: str) -> str:
    return next((line.strip() for line in str(text).splitlines() if line.strip()), str(text))


def explain(e: BaseException, overrides=()) -> str:
    """Turn a Hydra/OmegaConf exception into one line naming the key and what is allowed."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(e, OverrideParseException):
        return f"bad override syntax: {_first_line(str(e))}"
    if isinstance(e, MissingConfigException) or "Could not find '" in str(e):
        missing = getattr(e, "missing_cfg_file", None) or ""
        text = str(e)
        if not missing and "Could not find '" in text:
            missing = text.split("Could not find '", 1)[1].split("'", 1)[0]
        group, _, option = missing.rpartition("/")
        if group:
            shown = next((o for o in overrides if o.split("=")[0].lstrip("+~").split("@")[0] == group), f"{group}={option}")
            return f"{shown}: no such option; {group} is one of: {', '.join(group_options(group))}"
        return _first_line(text)
    cause = _root_cause(e)
    if isinstance(cause, OmegaConfBaseException):
        text = str(cause)
        found = re.search(r"full_key: (\S+)", text)
        key = cause.full_key or (found.group(1) if found else "")
        msg = _first_line(text)
        override = next((o for o in overrides if o.split("=")[0].lstrip("+~") == key), None)
        if "not in struct" in msg or "Key '" in msg and "not" in msg:
            bad = next((o.split("=")[0].lstrip("+~") for o in overrides
                        if o.split("=")[0].lstrip("+~").startswith(key)), key)
            return f"{bad}: unknown key{_suggest(bad)}"
        if "could not be converted" in msg or "Invalid value" in msg or "Non optional" in msg \
                or "Value '" in msg:
            return f"{override or key}: {msg}"
        if "Missing mandatory value" in msg:
            return f"{key}: required value is missing (set {key}=...)"
        return f"{key}: {msg}" if key else msg
    msg = _first_line(str(cause) or str(e))
    return msg if msg not in ("", "None") else f"{type(cause).__name__}: {cause!r}"
