"""Tool calls in a model's own words: which format a chat template asks for, the calls read out of the text
the model writes (whole, or as it streams: tool_parsing.py), and the grammar that forces a call
(`tool_choice: "required"` or a named function).

Families, chosen from the chat template:
- hermes (Qwen2.5/3, Hermes, and rheads' data/chat_templates/hermes_tools.jinja for ChatML models):
  `<tool_call>{"name": .., "arguments": {..}}</tool_call>`, one block per call;
- llama3_json (Llama 3.1-3.3): the whole answer is `{"name": .., "parameters": {..}}` (calls separated
  by ";"), after an optional `<|python_tag|>`;
- mistral: `[TOOL_CALLS][{"name": .., "arguments": {..}}, ..]`, or from the v11 tokenizers on (a template
  that writes `[ARGS]`) `[TOOL_CALLS]name[ARGS]{..}` per call; both are read whichever the template.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from .structured import lark_json, lark_literal
from .tool_parsing import ToolParser


@dataclass(frozen=True)
class ToolFamily:
    name: str
    start: str  # the text that opens the calls; "" when the answer itself is the call (Llama's JSON)
    arguments_key: str  # what the model names a call's arguments
    special: dict[str, int] = field(default_factory=dict)  # the format's markers that are special tokens: ids
    named: bool = False  # Mistral's v11 format, `[TOOL_CALLS]name[ARGS]{..}`, is the one its template writes

    @property
    def kept_ids(self) -> tuple[int, ...]:
        """Special tokens the output's text must keep for the calls to be read (decoding skips the others)."""
        return tuple(self.special.values())

    def parse(self, text: str) -> tuple[str, list[dict]]:
        """The answer's content (the text that is no call, as written) and its tool calls (the API's shape)."""
        stream = ToolStream(self)
        content, deltas = stream.feed(text)
        rest, more = stream.finish()
        calls: list[dict] = []
        for delta in deltas + more:
            if "id" in delta:
                calls.append({"id": delta["id"], "type": "function", "function": dict(delta["function"])})
            else:
                calls[delta["index"]]["function"]["arguments"] += delta["function"]["arguments"]
        return content + rest, calls

    def literal(self, text: str) -> str:
        """A Lark term for the marker `text`: its special token where it is one, else its text."""
        return f"<[{self.special[text]}]>" if text in self.special else lark_literal(text)

    def grammar(self, tools: list[tuple[str, dict | None]], one: bool) -> str:
        """A Lark grammar for one call (`one`) or one or more, of these (name, parameters schema) tools."""
        call = {"anyOf": [call_schema(name, parameters, self.arguments_key) for name, parameters in tools]}
        opening = self.literal(self.start) if self.start else ""
        if self.name == "mistral" and self.named:
            named = [f"{opening} {lark_literal(name)} {self.literal('[ARGS]')} {lark_json(parameters or OBJECT)}"
                     for name, parameters in tools]
            return f"start: call{'' if one else '+'}\ncall: {' | '.join(named)}"
        if self.name == "mistral":
            calls = {"type": "array", "items": call, "minItems": 1, **({"maxItems": 1} if one else {})}
            return f"start: {opening} calls\ncalls: {lark_json(calls)}"
        if self.name == "llama3_json":
            more = "" if one else ' (";" call)*'
            return f"start: call{more}\ncall: {lark_json(call)}"
        more = "" if one else r' ("\n" block)*'
        block = rf'{opening} "\n" call "\n" {self.literal("</tool_call>")}'
        return f"start: block{more}\nblock: {block}\ncall: {lark_json(call)}"


OBJECT = {"type": "object"}


def call_schema(name: str, parameters: dict | None, arguments_key: str) -> dict:
    return {"type": "object", "properties": {"name": {"const": name}, arguments_key: parameters or OBJECT},
            "required": ["name", arguments_key], "additionalProperties": False}


# name -> (the calls' opening, the arguments' key, the markers the parser reads, kept where special tokens)
FAMILIES = {"hermes": ("<tool_call>", "arguments", ("<tool_call>", "</tool_call>")),
            "llama3_json": ("", "parameters", ()),  # <|python_tag|> is optional: skipped, nothing is lost
            "mistral": ("[TOOL_CALLS]", "arguments", ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"))}


def family_name(chat_template: str | None) -> str | None:
    """The tool-call format a chat template asks for; None where it takes no tools."""
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<tool_call>" in template:
        return "hermes"
    if "tools" in template and ("<|python_tag|>" in template or "ipython" in template):
        return "llama3_json"
    return None


def family_of(tokenizer) -> ToolFamily | None:
    """The tokenizer's chat template's tool family, with which of its markers are special tokens."""
    name = family_name(tokenizer.chat_template)
    if name is None:
        return None
    start, arguments_key, markers = FAMILIES[name]
    special_ids = set(tokenizer.all_special_ids) | {
        i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special}
    special = {}
    for marker in markers:
        token = tokenizer.convert_tokens_to_ids(marker)  # an unknown token maps to unk's id
        if token in special_ids and tokenizer.convert_ids_to_tokens(token) == marker:
            special[marker] = token
    return ToolFamily(name, start, arguments_key, special, named="[ARGS]" in tokenizer.chat_template)


class ToolStream:
    """One choice's text, as it comes, split into content and tool calls in the API's delta shape."""

    def __init__(self, family: ToolFamily):
        self.parser, self.calls = ToolParser(family.name), 0

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """The content and the tool-call deltas that the text so far makes sure of."""
        return self.deltas(self.parser.feed(text))

    def finish(self) -> tuple[str, list[dict]]:
        """The same for what is left once the answer is whole."""
        return self.deltas(self.parser.finish())

    def deltas(self, events: list[list[str]]) -> tuple[str, list[dict]]:
        content, deltas = "", []
        for kind, text in events:
            if kind == "content":
                content += text
            elif kind == "call":
                deltas.append({"index": self.calls, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                               "function": {"name": text, "arguments": ""}})
                self.calls += 1
            elif deltas and deltas[-1]["index"] == self.calls - 1:  # a call's arguments in its first delta
                deltas[-1]["function"]["arguments"] += text
            else:
                deltas.append({"index": self.calls - 1, "function": {"arguments": text}})
        return content, deltas
