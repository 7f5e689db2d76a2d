"""Tool calls in a model's own words: which format a chat template asks for, how to read the calls out of
the text the model writes (whole, or as it streams), and the grammar that forces a call
(`tool_choice: "required"` or a named function).

Families, chosen from the chat template:
- hermes (Qwen2.5/3, Hermes, and rheads' data/chat_templates/hermes_tools.jinja for ChatML models):
  `<tool_call>{"name": .., "arguments": {..}}</tool_call>`, one block per call;
- llama3_json (Llama 3.1-3.3): the whole answer is `{"name": .., "parameters": {..}}` (calls separated
  by ";"), after an optional `<|python_tag|>`;
- mistral: `[TOOL_CALLS][{"name": .., "arguments": {..}}, ..]`.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from .structured import lark_json, lark_literal


@dataclass(frozen=True)
class ToolFamily:
    name: str
    start: str  # the text that opens the calls; "" when the answer itself is the call (Llama's JSON)
    arguments_key: str  # what the model names a call's arguments
    start_token: int | None = None  # the start's token id where it is one special token (no text to match)

    def parse(self, text: str) -> tuple[str, list[dict]]:
        """The answer's content (the text before the calls, as written) and its tool calls (in the API's
        shape); text that does not parse as calls is content, whole."""
        content, calls = PARSERS[self.name](text, self)
        if calls is None:
            return text, []
        return content, [api_call(call, self.arguments_key) for call in calls]

    def content_room(self, text: str) -> int:
        """How much of a streamed answer's text so far is content for sure: the text before the calls'
        start, less any tail that may still become it."""
        if not self.start or self.start_token is not None:  # no start in the text: the answer is the calls
            stripped = text.lstrip()
            return 0 if not stripped or stripped[0] in "{<[" else len(text)
        at = text.find(self.start)
        if at >= 0:
            return at
        for keep in range(min(len(self.start) - 1, len(text)), 0, -1):
            if self.start.startswith(text[-keep:]):
                return len(text) - keep
        return len(text)

    def grammar(self, tools: list[tuple[str, dict | None]], one: bool) -> str:
        """A Lark grammar for one call (`one`) or one or more, of these (name, parameters schema) tools."""
        call = {"anyOf": [call_schema(name, parameters, self.arguments_key) for name, parameters in tools]}
        opening = f"<[{self.start_token}]>" if self.start_token is not None else lark_literal(self.start)
        if self.name == "mistral":
            calls = {"type": "array", "items": call, "minItems": 1, **({"maxItems": 1} if one else {})}
            return f"start: {opening} calls\ncalls: {lark_json(calls)}"
        if self.name == "llama3_json":
            more = "" if one else ' (";" call)*'
            return f"start: call{more}\ncall: {lark_json(call)}"
        more = "" if one else r' ("\n" block)*'
        block = rf'{opening} "\n" call "\n" {lark_literal("</tool_call>")}'
        return f"start: block{more}\nblock: {block}\ncall: {lark_json(call)}"


def call_schema(name: str, parameters: dict | None, arguments_key: str) -> dict:
    return {"type": "object", "properties": {"name": {"const": name},
                                             arguments_key: parameters or {"type": "object"}},
            "required": ["name", arguments_key], "additionalProperties": False}


def api_call(call: dict, arguments_key: str) -> dict:
    arguments = call.get(arguments_key, call.get("arguments", call.get("parameters", {})))
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(arguments)}}


def is_call(value) -> bool:
    arguments = value.get("arguments", value.get("parameters")) if isinstance(value, dict) else None
    return isinstance(value, dict) and isinstance(value.get("name"), str) and isinstance(arguments, dict)


def json_values(text: str, separator: str = "") -> list | None:
    """The JSON values `text` holds one after another (whitespace and `separator` between them), or None."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while True:
        while at < len(text) and (text[at].isspace() or text[at] in separator):
            at += 1
        if at == len(text):
            return values
        try:
            value, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            return None
        values.append(value)


def parse_hermes(text: str, family: ToolFamily) -> tuple[str, list[dict] | None]:
    at = text.find(family.start)
    if at < 0:
        return text, None
    # a model may stop after the last call's JSON, before its closing tag
    bodies = re.findall(r"<tool_call>(.*?)(?:</tool_call>|$)", text[at:], re.DOTALL)
    calls = [json_values(body) for body in bodies]
    if not calls or any(c is None or len(c) != 1 or not is_call(c[0]) for c in calls):
        return text, None
    return text[:at], [c[0] for c in calls]


def parse_llama3_json(text: str, family: ToolFamily) -> tuple[str, list[dict] | None]:
    body = text.strip().removeprefix("<|python_tag|>")
    calls = json_values(body, ";") if body.startswith("{") else None
    if not calls or not all(map(is_call, calls)):
        return text, None
    return "", calls


def parse_mistral(text: str, family: ToolFamily) -> tuple[str, list[dict] | None]:
    at = text.find(family.start)
    # a special-token start is not in the decoded text: the answer then opens with the calls' array
    content, body = (text[:at], text[at + len(family.start):]) if at >= 0 else ("", text)
    values = json_values(body) if body.lstrip().startswith(("[", "{")) else None
    if not values:
        return text, None
    calls = [c for value in values for c in (value if isinstance(value, list) else [value])]
    if not calls or not all(map(is_call, calls)):
        return text, None
    return content, calls


PARSERS = {"hermes": parse_hermes, "llama3_json": parse_llama3_json, "mistral": parse_mistral}
FAMILIES = {"hermes": ("<tool_call>", "arguments"), "llama3_json": ("", "parameters"),
            "mistral": ("[TOOL_CALLS]", "arguments")}


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
    """The tokenizer's chat template's tool family, its start resolved to a special token where it is one."""
    name = family_name(tokenizer.chat_template)
    if name is None:
        return None
    start, arguments_key = FAMILIES[name]
    token = tokenizer.convert_tokens_to_ids(start) if start else None  # an unknown token maps to unk's id
    special = token in set(tokenizer.all_special_ids) and tokenizer.convert_ids_to_tokens(token) == start
    return ToolFamily(name, start, arguments_key, token if special else None)


class ToolStream:
    """One streamed choice's text, split as it comes into content to send now and tool calls at the end."""

    def __init__(self, family: ToolFamily):
        self.family, self.text, self.sent = family, "", 0

    def feed(self, new_text: str) -> str:
        """The content that `new_text` makes sure of (held back: what may be a call)."""
        self.text += new_text
        room = max(self.sent, self.family.content_room(self.text))
        content, self.sent = self.text[self.sent:room], room
        return content

    def finish(self) -> tuple[str, list[dict]]:
        """The content not sent yet and the calls, once the answer is whole."""
        content, calls = self.family.parse(self.text)
        rest = content[self.sent:] if calls else self.text[self.sent:]
        return rest, calls
