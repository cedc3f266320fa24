"""Helpers shared by the tests."""


def assert_math_blocks_balanced(text: str) -> None:
    """Every ``$$`` display block opens and closes on its own line, with no blank line inside
    (a blank line breaks the block in GitHub Markdown)."""
    assert text.count("$$") % 2 == 0
    inside = False
    for line in text.splitlines():
        if line.strip() == "$$":
            inside = not inside
        else:
            assert "$$" not in line, f"display math must open and close on its own line: {line!r}"
            if inside:
                assert line.strip(), "a blank line inside $$ ... $$ breaks the block in GitHub Markdown"
    assert not inside, "a $$ block is never closed"
