"""Recipe files (YAML): load with errors that name the field and line; dump any recipe back to a file."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import yaml

from ..dtypes import OUTPUT_DTYPES
from ..errors import ChatvecError
from ..io.header import shown
from ..planning.layout import check_max_shard_size, check_unit_bytes
from .spec import VOCAB_POLICIES, Recipe, Target, Vector, parse_size

HEADER = "# chatvec recipe: run it with `chatvec run THIS_FILE`\n"


class RecipeError(ChatvecError):
    """A recipe file is malformed; names the field and line."""


def dump_recipe(recipe: Recipe) -> str:
    return HEADER + yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False, allow_unicode=True)


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
    folder: every output, and each source that is a folder there (anything else stays: a Hub id)."""

    def source(spec: str | None) -> str | None:
        if spec is None or os.path.isabs(spec) or not os.path.isdir(os.path.join(cwd, spec)):
            return spec
        return os.path.normpath(os.path.join(cwd, spec))

    vectors = tuple(Vector(source(v.chat), source(v.base)) for v in recipe.vectors)
    targets = tuple(
        dataclasses.replace(t, cp=source(t.cp), out=os.path.normpath(os.path.join(cwd, t.out))) for t in recipe.targets
    )
    return dataclasses.replace(recipe, vectors=vectors, targets=targets)


def as_recorded(recipe: Recipe, meta: dict) -> Recipe:
    """The recipe an output stores, ready to run from any folder: paths made absolute against the folder it ran
    in (`with_absolute_paths`), except that a source recorded as a Hub repo stays its id (even if a folder of that
    name turned up there) and a local one gone from there keeps its recorded path (never read as a Hub id)."""
    sources = meta.get("sources") if isinstance(meta.get("sources"), dict) else {}
    resolved = with_absolute_paths(recipe, meta.get("cwd") or os.getcwd())

    def recorded(spec: str | None, now: str | None, src: object) -> str | None:
        if spec is None or not isinstance(src, dict):
            return now
        if "repo" in src:
            return spec
        return now if os.path.isabs(now) or not isinstance(src.get("path"), str) else src["path"]

    terms = sources.get("vectors") if isinstance(sources.get("vectors"), list) else []
    terms = [t if isinstance(t, dict) else {} for t in terms] + [{}] * len(recipe.vectors)
    vectors = tuple(
        Vector(recorded(v.chat, r.chat, t.get("chat")), recorded(v.base, r.base, t.get("base")))
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
        """A finite number; `1e-1` too (YAML 1.1 reads it as a string)."""
        value = self.scalar(node, field, (int, float, str))
        try:
            number = float(value)
        except (ValueError, OverflowError):  # OverflowError: an integer beyond any float
            raise self.fail(node, field, f"expected a finite number, got {shown(value)}") from None
        if not math.isfinite(number):
            raise self.fail(node, field, f"{shown(value)} is not a finite number")
        return number

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
        options = {}
        for name, check in (("max_shard_size", check_max_shard_size), ("unit_bytes", check_unit_bytes)):
            if name in items:
                options[name] = self.size(items[name], name)
                try:
                    check(options[name])
                except ChatvecError as e:
                    raise self.fail(items[name], name, e.what) from None
        if "chat_template_from_chat" in items:
            options["chat_template_from_chat"] = self.scalar(
                items["chat_template_from_chat"], "chat_template_from_chat", (bool,)
            )
        return Recipe(vectors, targets, **options)

    def vector(self, node: yaml.Node, field: str) -> Vector:
        items = self.mapping(node, field, {"chat", "base"}, {"chat", "base"})
        return Vector(
            self.scalar(items["chat"], f"{field}.chat", (str,)),
            self.scalar(items["base"], f"{field}.base", (str,), optional=True),
        )

    def target(self, node: yaml.Node, field: str, n_vectors: int) -> Target:
        names = {f.name for f in dataclasses.fields(Target)}
        items = self.mapping(node, field, names, {"name", "cp", "out"})

        def get(key: str, kinds: tuple[type, ...], optional: bool = False):
            return self.scalar(items[key], f"{field}.{key}", kinds, optional)

        alphas: tuple[float, ...] = (1.0,) * n_vectors
        if "alphas" in items:
            node_a = items["alphas"]
            raw = [node_a] if isinstance(node_a, yaml.ScalarNode) else self.sequence(node_a, f"{field}.alphas")
            alphas = tuple(self.number(n, f"{field}.alphas") for n in raw)
            if len(alphas) == 1:
                alphas *= n_vectors
            if len(alphas) != n_vectors:
                raise self.fail(node_a, f"{field}.alphas", f"{len(alphas)} values for {n_vectors} vectors")
        vocab = get("vocab", (str,)) if "vocab" in items else "auto"
        if vocab not in VOCAB_POLICIES:
            raise self.fail(items["vocab"], f"{field}.vocab", f"{vocab!r} is not one of {', '.join(VOCAB_POLICIES)}")
        dtype = get("dtype", (str,), True) if "dtype" in items else None
        if dtype is not None and dtype not in OUTPUT_DTYPES:
            raise self.fail(items["dtype"], f"{field}.dtype", f"{dtype!r} is not one of {', '.join(OUTPUT_DTYPES)}")
        exclude = (
            tuple(
                self.scalar(n, f"{field}.exclude", (str,)) for n in self.sequence(items["exclude"], f"{field}.exclude")
            )
            if "exclude" in items
            else ()
        )
        return Target(get("name", (str,)), get("cp", (str,), True), get("out", (str,)), alphas, vocab, exclude, dtype)
