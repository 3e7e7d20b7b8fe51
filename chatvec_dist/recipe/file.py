"""Recipe files (YAML): load with errors that name the field and line; dump any recipe back to a file."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import overload

import yaml

from ..io.header import shown
from ..io.s3 import is_url
from .alpha_rules import Alpha, AlphaRule, problem
from .spec import ALPHA, FLOAT32_MAX, Dare, Recipe, RecipeError, Target, Ties, Vector, broadcast_alphas, parse_size

HEADER = "# chatvec recipe: run it with `chatvec run THIS_FILE`\n"


def dump_recipe(recipe: Recipe) -> str:
    data = dataclasses.asdict(recipe)
    for target in data["targets"]:  # (CP id, chat id) pairs, written as the mapping a user writes
        if isinstance(target.get("special_tokens"), tuple):
            target["special_tokens"] = dict(target["special_tokens"])
    return HEADER + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except OSError as e:
        raise RecipeError(f"cannot read: {e.strerror}", file=str(path)) from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RecipeError(f"not valid YAML: {' '.join(str(e).split())}", file=str(path)) from None
    except RecursionError:
        raise RecipeError("nested too deeply to be a recipe", file=str(path)) from None
    return _Reader(str(path)).recipe(root)


def with_absolute_paths(recipe: Recipe, cwd: str) -> Recipe:
    """`recipe` with the relative paths it was given in `cwd` made absolute, so that it means the same from any
    folder: every output, and each source that is a folder there (anything else stays: a Hub id). An `s3://` URL
    stays as it is, source or output."""

    @overload
    def source(spec: str) -> str: ...
    @overload
    def source(spec: None) -> None: ...
    def source(spec: str | None) -> str | None:
        if spec is None or os.path.isabs(spec) or is_url(spec) or not os.path.isdir(os.path.join(cwd, spec)):
            return spec
        return os.path.normpath(os.path.join(cwd, spec))

    def output(out: str | None) -> str | None:
        return out if not out or is_url(out) else os.path.normpath(os.path.join(cwd, out))

    vectors = tuple(dataclasses.replace(v, chat=source(v.chat), base=source(v.base)) for v in recipe.vectors)
    targets = tuple(dataclasses.replace(t, cp=source(t.cp), out=output(t.out)) for t in recipe.targets)
    return dataclasses.replace(recipe, vectors=vectors, targets=targets)


def as_recorded(recipe: Recipe, meta: dict) -> Recipe:
    """The recipe an output stores, ready to run from any folder: paths made absolute against the folder it ran
    in (`with_absolute_paths`), except that a source recorded as a Hub repo stays its id (even if a folder of that
    name turned up there), one recorded as an `s3://` URL stays that URL, and a local one gone from there keeps its
    recorded path (never read as a Hub id)."""
    sources: dict = meta["sources"] if isinstance(meta.get("sources"), dict) else {}
    resolved = with_absolute_paths(recipe, meta.get("cwd") or os.getcwd())

    def recorded(spec: str | None, now: str | None, src: object) -> str | None:
        if spec is None or now is None or not isinstance(src, dict):
            return now
        if "repo" in src or is_url(spec):
            return spec
        return now if os.path.isabs(now) or not isinstance(src.get("path"), str) else src["path"]

    terms: list = sources["vectors"] if isinstance(sources.get("vectors"), list) else []
    terms = [t if isinstance(t, dict) else {} for t in terms] + [{}] * len(recipe.vectors)
    vectors = tuple(
        Vector(recorded(v.chat, r.chat, t.get("chat")) or v.chat, recorded(v.base, r.base, t.get("base")), v.dare)
        for v, r, t in zip(recipe.vectors, resolved.vectors, terms)
    )
    targets = tuple(
        dataclasses.replace(r, cp=recorded(t.cp, r.cp, sources.get("cp"))) if t.name == meta.get("target") else r
        for t, r in zip(recipe.targets, resolved.targets)
    )
    return dataclasses.replace(resolved, vectors=vectors, targets=targets)


def recipe_from_dict(data: dict, origin: str = "<recipe>") -> Recipe:
    """A recipe from plain data (as stored in a manifest), validated like a file."""
    return _Reader(origin).recipe(yaml.compose(yaml.safe_dump(data), Loader=yaml.SafeLoader))


class _Reader:
    def __init__(self, origin: str) -> None:
        self.origin = origin
        self._loader = yaml.SafeLoader("")

    def fail(self, node: yaml.Node | None, field: str, what: str) -> RecipeError:
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        return RecipeError(f"field '{field}': {what}", file=f"{self.origin}{line}")

    def mapping(
        self, node: yaml.Node | None, field: str, allowed: set[str], required: set[str]
    ) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, field, "expected a mapping")
        items = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.value not in allowed:
                raise self.fail(
                    key,
                    f"{field}.{getattr(key, 'value', '?')}" if field else str(key.value),
                    f"unknown field (allowed: {', '.join(sorted(allowed))})",
                )
            if key.value in items:
                raise self.fail(key, f"{field}.{key.value}" if field else key.value, "given twice")
            items[key.value] = value
        for name in sorted(required - set(items)):
            raise self.fail(node, f"{field}.{name}" if field else name, "is required")
        return items

    def scalar(self, node: yaml.Node, field: str, kinds: tuple[type, ...], optional: bool = False):
        names = " or ".join(k.__name__ for k in kinds) + (" or null" if optional else "")
        if not isinstance(node, yaml.ScalarNode):  # never built: aliases could make it any size
            raise self.fail(
                node, field, f"expected {names}, got a {'list' if isinstance(node, yaml.SequenceNode) else 'mapping'}"
            )
        value = self._loader.construct_object(node, deep=True)
        if value is None and optional:
            return None
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            raise self.fail(node, field, f"expected {names}, got {shown(value)}")
        return value

    def number(self, node: yaml.Node, field: str) -> float:
        """A number; `1e-1` too (YAML 1.1 reads it as a string). Whether it is a usable alpha is Target's rule."""
        value = self.scalar(node, field, (int, float, str))
        try:
            return float(value)
        except (ValueError, OverflowError):  # OverflowError: an integer beyond any float
            raise self.fail(node, field, f"expected a finite number, got {shown(value)}") from None

    def sequence(self, node: yaml.Node, field: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, field, "expected a list")
        return node.value

    def size(self, node: yaml.Node, field: str) -> int:
        value = self.scalar(node, field, (int, str))
        try:
            return value if isinstance(value, int) else parse_size(value)
        except ValueError:
            raise self.fail(node, field, f"not a size: {value!r} (e.g. 5GB, 64MiB)") from None

    def recipe(self, root: yaml.Node | None) -> Recipe:
        fields = {f.name for f in dataclasses.fields(Recipe)}
        items = self.mapping(root, "", fields, {"vectors", "targets"})
        vectors = tuple(
            self.vector(n, f"vectors[{i}]") for i, n in enumerate(self.sequence(items["vectors"], "vectors"))
        )
        targets = tuple(
            self.target(n, f"targets[{i}]", len(vectors))
            for i, n in enumerate(self.sequence(items["targets"], "targets"))
        )
        if not vectors or not targets:
            raise self.fail(root, "vectors" if not vectors else "targets", "needs at least one entry")
        options: dict[str, object] = {
            name: self.size(items[name], name) for name in ("max_shard_size", "unit_bytes") if name in items
        }
        if "chat_template_from_chat" in items:
            options["chat_template_from_chat"] = self.scalar(
                items["chat_template_from_chat"], "chat_template_from_chat", (bool,)
            )
        return self.build(Recipe, items, "", root, vectors, targets, **options)

    def build(self, cls: type, items: dict[str, yaml.Node], field: str, node: yaml.Node | None, *args, **kwargs):
        """`cls(*args, **kwargs)`, its refusal of a value told as the field and line that gave it."""
        try:
            return cls(*args, **kwargs)
        except RecipeError as e:
            where = f"{field}.{e.field}" if field else e.field
            raise self.fail(items.get(e.field, node), where, e.detail) from None

    def vector(self, node: yaml.Node, field: str) -> Vector:
        items = self.mapping(node, field, {"chat", "base", "dare"}, {"chat", "base"})
        chat = self.scalar(items["chat"], f"{field}.chat", (str,))
        base = self.scalar(items["base"], f"{field}.base", (str,), optional=True)
        dare = self.sparsity(items.get("dare"), f"{field}.dare", Dare, "seed", (int,))
        return self.build(Vector, items, field, node, chat, base, dare)

    def sparsity(self, node: yaml.Node | None, field: str, cls: type, option: str, kinds: tuple[type, ...]):
        """`dare: {density: D, seed: S}` or `ties: {density: D, normalize: B}` (null or absent: none)."""
        if node is None or isinstance(node, yaml.ScalarNode) and self.scalar(node, field, (dict,), True) is None:
            return None
        items = self.mapping(node, field, {"density", option}, {"density"})
        values = {"density": self.number(items["density"], f"{field}.density")}
        if option in items:
            values[option] = self.scalar(items[option], f"{field}.{option}", kinds)
        return self.build(cls, items, field, node, **values)

    def target(self, node: yaml.Node, field: str, n_vectors: int) -> Target:
        names = {f.name for f in dataclasses.fields(Target)}
        items = self.mapping(node, field, names, {"name", "cp", "out"})
        values: dict[str, object] = {
            key: self.scalar(items[key], f"{field}.{key}", (str,), optional=key in ("cp", "dtype"))
            for key in ("name", "cp", "out", "vocab", "dtype")
            if key in items
        }
        if "alphas" in items:
            values["alphas"] = self.alphas(items["alphas"], f"{field}.alphas", n_vectors)
        else:
            values["alphas"] = broadcast_alphas((ALPHA,), n_vectors)
        values["ties"] = self.sparsity(items.get("ties"), f"{field}.ties", Ties, "normalize", (bool,))
        if "exclude" in items:
            values["exclude"] = tuple(
                self.scalar(n, f"{field}.exclude", (str,)) for n in self.sequence(items["exclude"], f"{field}.exclude")
            )
        if "alpha_rules" in items:
            values["alpha_rules"] = self.alpha_rules(items["alpha_rules"], f"{field}.alpha_rules", n_vectors)
        if "special_tokens" in items:
            values["special_tokens"] = self.special_tokens(items["special_tokens"], f"{field}.special_tokens")
        return self.build(Target, items, field, node, **values)

    def alpha_rules(self, node: yaml.Node, field: str, n_vectors: int) -> tuple[AlphaRule, ...]:
        """`- match: REGEX` / `alphas: [A, ...]`, one entry per vector (or one for all): a number, or a list of
        them (a gradient over the layers); a rule Target would refuse is told at its own line."""
        rules = []
        for i, item in enumerate(self.sequence(node, field)):
            where = f"{field}[{i}]"
            parts = self.mapping(item, where, {"match", "alphas"}, {"match", "alphas"})
            raw = parts["alphas"]
            entries = [raw] if isinstance(raw, yaml.ScalarNode) else self.sequence(raw, f"{where}.alphas")
            alphas: list[Alpha] = [
                self.number(e, f"{where}.alphas")
                if isinstance(e, yaml.ScalarNode)
                else tuple(self.number(p, f"{where}.alphas") for p in self.sequence(e, f"{where}.alphas"))
                for e in entries
            ]
            rule = AlphaRule(self.scalar(parts["match"], f"{where}.match", (str,)), tuple(alphas))
            wrong = problem(rule, n_vectors, FLOAT32_MAX)
            if wrong is not None:
                raise self.fail(item, where, wrong)
            rules.append(rule)
        return tuple(rules)

    def special_tokens(self, node: yaml.Node, field: str) -> str | tuple[tuple[int, int], ...] | None:
        """`auto`, null, a mapping of CP token ids to chat token ids, or a list of [CP id, chat id] pairs (as a
        manifest stores it). Whether the ids are usable is Target's rule."""
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node, field, (str,), optional=True)
        if isinstance(node, yaml.MappingNode):
            return tuple((self.scalar(k, field, (int,)), self.scalar(v, field, (int,))) for k, v in node.value)
        pairs = [self.sequence(n, field) for n in self.sequence(node, field)]
        if any(len(p) != 2 for p in pairs):
            raise self.fail(node, field, "expected [CP id, chat id] pairs")
        return tuple((self.scalar(cp, field, (int,)), self.scalar(chat, field, (int,))) for cp, chat in pairs)

    def alphas(self, node: yaml.Node, field: str, n_vectors: int) -> tuple[float, ...]:
        """One number (for every vector) or a list of them (one per vector)."""
        raw = [node] if isinstance(node, yaml.ScalarNode) else self.sequence(node, field)
        try:
            return broadcast_alphas([self.number(n, field) for n in raw], n_vectors)
        except RecipeError as e:
            raise self.fail(node, field, e.detail) from None
