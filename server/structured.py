"""Structured outputs: what a request asks its output to be (a JSON schema, any JSON object, a regex, one of
some strings) as an llguidance grammar for the engine (`SamplingParams.grammar`).

Each builder checks its grammar (without a tokenizer: only the grammar itself is at fault), so a bad
schema or regex is refused in request validation, with the field's name, before it reaches the engine.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance

# Compact JSON: with free whitespace a small model may write newlines until its token limit.
JSON_OPTIONS = {"whitespace_flexible": False}


def checked(grammar: str) -> str:
    """The grammar, or ValueError with llguidance's reason it does not compile."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ValueError(f"not a grammar this server can enforce: {messages[0] if messages else 'invalid'}")
    return grammar


def json_schema_grammar(schema: dict[str, Any]) -> str:
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as error:
        raise ValueError(f"not a JSON schema: {error}") from error
    return checked(grammar)


def json_object(text: str, what: str) -> dict[str, Any]:
    """`text` parsed as a JSON object, or a ValueError saying that `what` must be one."""
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} must be a JSON object's text: {error}") from error
    if not isinstance(parsed, dict):
        raise ValueError(f"{what} must be a JSON object's text")
    return parsed


def json_text_schema(text: str | dict[str, Any]) -> dict[str, Any]:
    """vLLM's guided_json: a schema, or its JSON text."""
    return text if isinstance(text, dict) else json_object(text, "a JSON schema")


def regex_grammar(regex: str) -> str:
    return checked(llguidance.LLMatcher.grammar_from_regex(regex))


def choice_grammar(choices: list[str]) -> str:
    return checked(llguidance.grammar_from("choice", json.dumps(choices)))


def lark_grammar(lark: str) -> str:
    return checked(llguidance.LLMatcher.grammar_from_lark(lark))


def lark_json(schema: dict[str, Any]) -> str:
    """A Lark rule body for JSON that follows `schema`, compact as JSON_OPTIONS."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS}, separators=(",", ":"))


def lark_literal(text: str) -> str:
    return json.dumps(text)  # Lark's string literals take JSON's escapes
