from inference.structured import schema_grammar


def test_schema_strings_exclude_raw_control_characters() -> None:
    grammar = schema_grammar({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]})
    (char_rule,) = [line for line in grammar.splitlines() if line.startswith("char ::=")]
    assert char_rule.startswith('char ::= [^"\\\\\\x7F\\x00-\\x1F] |'), char_rule
