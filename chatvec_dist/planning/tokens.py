"""Chat-template token rows (`special_tokens`): CP's rows of some token ids become the chat model's rows, in the
input embedding and the LM head. CP models often never trained the chat tokens (`<|eot_id|>`), and a merged model
that keeps CP's rows for them cannot end a turn. `auto` finds the tokens by their text in both tokenizers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..errors import PlanError, SourceError
from ..io.checkpoint import MAX_SIDE_BYTES, read_json_object
from ..recipe.spec import Target
from .fp8 import SCALE_SUFFIX, is_fp8
from .planner import VOCAB_LAST, PlannedTensor, Sources, Src
from .tied import tied_heads


@dataclass(frozen=True)
class TokenRow:
    """CP's row `cp` takes the chat model's row `chat`; `token` is its text where `auto` found it."""

    cp: int
    chat: int
    token: str | None = None


def token_rows(target: Target, sources: Sources) -> tuple[TokenRow, ...]:
    """The target's map as rows: its explicit pairs, or for `auto` the chat model's special and added tokens that
    its chat template, eos and bos use, each found by its text in CP's tokenizer. Raises PlanError."""
    spec = target.special_tokens
    if spec is None:
        return ()
    if spec != "auto":
        assert isinstance(spec, tuple)
        return tuple(TokenRow(cp, chat) for cp, chat in spec)
    assert sources.cp is not None  # Target's rule
    chat, cp = Tokenizer(sources.terms[0].plus.directory), Tokenizer(sources.cp.directory)
    tokens = chat.template_tokens()
    if not tokens:
        raise PlanError(
            "special_tokens auto: the chat model has no chat template, eos or bos token to take rows for",
            file=str(chat.directory),
        )
    found: dict[int, TokenRow] = {}
    for token in tokens:
        chat_id = chat.id_of(token)
        if chat_id is None:
            raise PlanError(f"special_tokens auto: the chat model's token {token!r} has no id", file=chat.file)
        cp_id = cp.id_of(token)
        if cp_id is None:
            raise PlanError(
                f"special_tokens auto: CP's tokenizer lacks the chat model's token {token!r} (its chat template, eos "
                "or bos uses it): add the token to CP's tokenizer and embeddings, or give special_tokens as a map "
                "of CP ids to chat ids",
                file=cp.file,
            )
        found.setdefault(cp_id, TokenRow(cp_id, chat_id, token))
    return tuple(found[i] for i in sorted(found))


def with_token_rows(tensors: list[PlannedTensor], rows: tuple[TokenRow, ...], sources: Sources) -> list[PlannedTensor]:
    """Give each vocabulary tensor (reason `vocab:*`; an excluded one keeps CP's values) the rows it takes from the
    same tensor of the first vector's chat model (a tied one's embedding for CP's stored head), every id checked
    against both tensors' rows."""
    if not rows:
        return tensors
    chat = sources.terms[0].plus
    heads = tied_heads(sources)  # CP's stored head: a tied chat model's head is its input embedding
    done = []
    for t in tensors:
        if t.reason.startswith("vocab:") and t.cp is not None and not t.name.endswith(SCALE_SUFFIX):
            ref = chat.tensors[heads.get(t.name, t.name)]  # the planner paired every tensor not excluded
            _check_rows(t, rows, ref.info.shape[token_dim(t)], ref.path)
            if is_fp8(t.cp.dtype) or is_fp8(t.out_dtype) or is_fp8(ref.info.dtype):
                raise PlanError(
                    "special_tokens into a block-scaled FP8 tensor are not supported yet: a row shares its 128×128 "
                    "block scales with 127 others (dequantize the vocabulary tensors to bfloat16 first)",
                    file=t.cp.path,
                    tensor=t.name,
                )
            row_src = Src(ref.path, ref.info.start, ref.info.dtype)
            t = dataclasses.replace(t, rows=tuple((r.cp, r.chat) for r in rows), row_src=row_src)
        done.append(t)
    if not any(t.rows for t in done):
        assert sources.cp is not None
        raise PlanError(
            "special_tokens: no vocabulary tensor (embed_tokens, lm_head, ...) to take rows into (or each is excluded)",
            file=str(sources.cp.directory),
        )
    return done


def token_dim(t: PlannedTensor) -> int:
    """The dimension of a vocabulary tensor's tokens: its rows, or the last of BART's [1, V] final_logits_bias
    (one element per token, the first dimension being 1)."""
    return len(t.shape) - 1 if VOCAB_LAST.search(t.name) else 0


def _check_rows(t: PlannedTensor, rows: tuple[TokenRow, ...], chat_rows: int, chat_path: str) -> None:
    assert t.cp is not None
    size = t.shape[token_dim(t)]
    for r in rows:
        if r.cp >= size:
            raise PlanError(
                f"special token id {r.cp} is out of range: CP has {size} rows", file=t.cp.path, tensor=t.name
            )
        if r.chat >= chat_rows:
            raise PlanError(
                f"special token id {r.chat} is out of range: the chat model has {chat_rows} rows",
                file=chat_path,
                tensor=t.name,
            )


class Tokenizer:
    """What `auto` reads of a model's tokenizer files: the chat template, eos and bos, and token ids by text."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.file = str(directory / "tokenizer.json")
        self.config = read_json_object(directory / "tokenizer_config.json")
        self.json = read_json_object(directory / "tokenizer.json", limit=MAX_SIDE_BYTES)
        self.added: dict[str, int] = {}
        for entry in self.json.get("added_tokens") or []:
            if isinstance(entry, dict) and isinstance(entry.get("content"), str) and _is_id(entry.get("id")):
                self.added[entry["content"]] = entry["id"]
        decoder = self.config.get("added_tokens_decoder")
        for key, entry in (decoder if isinstance(decoder, dict) else {}).items():
            if isinstance(entry, dict) and isinstance(entry.get("content"), str) and key.isdigit():
                self.added.setdefault(entry["content"], int(key))

    def template(self) -> str:
        """The chat template's text: chat_template.jinja, else tokenizer_config.json's (all named templates)."""
        jinja = self.directory / "chat_template.jinja"
        if jinja.is_file():
            try:
                return jinja.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise SourceError(f"cannot read the chat template ({type(e).__name__})", file=str(jinja)) from None
        value = self.config.get("chat_template")
        if isinstance(value, list):  # [{"name": "default", "template": ...}, ...]
            return "\n".join(t["template"] for t in value if isinstance(t, dict) and isinstance(t.get("template"), str))
        return value if isinstance(value, str) else ""

    def template_tokens(self) -> list[str]:
        """The added tokens that the chat template's text holds (not whitespace alone), then eos and bos."""
        text = self.template()
        used = [t for t in sorted(self.added, key=self.added.__getitem__) if t.strip() and t in text]
        for key in ("eos_token", "bos_token"):
            value = self.config.get(key)
            token = value.get("content") if isinstance(value, dict) else value
            if isinstance(token, str) and token and token not in used:
                used.append(token)
        return used

    def id_of(self, token: str) -> int | None:
        """The token's id: an added token's, else the model vocabulary's (a dict, or Unigram's list of pieces)."""
        if token in self.added:
            return self.added[token]
        model = self.json.get("model")
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if isinstance(vocab, dict):
            found = vocab.get(token)
            return found if _is_id(found) else None
        if isinstance(vocab, list):
            return next((i for i, p in enumerate(vocab) if isinstance(p, list) and p[:1] == [token]), None)
        return None


def _is_id(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0
