"""Generated Python with its long code lines wrapped, as one would wrap them by hand: inside their brackets, at
the commas (aligned with the bracket, or on a hanging indent), or a long sum at its pluses. Lines are at most
WIDTH characters wherever a bracket or a sum allows; strings, comments and docstrings are never touched.

Only single-line statements are rewrapped, and only at places where Python joins lines implicitly (inside
brackets), so the code's meaning is unchanged: a sum gains parentheses around it, nothing else is added.

Prose is wrapped apart (`wrap_long_prose`): a docstring's long line breaks at its last space that fits, and a
comment alone on its line continues as a comment; a docstring's text gains line breaks, nothing else.
"""

from __future__ import annotations

import io
import keyword
import re
import tokenize

WIDTH = 120
_OPENERS, _CLOSERS = "([{", ")]}"


def wrap_long_lines(text: str, width: int = WIDTH) -> str:
    """`text` (Python source) with each long one-line statement wrapped; anything that does not tokenize is
    returned as it is."""
    lines = text.split("\n")
    if all(len(line) <= width for line in lines):  # most generated files: nothing to tokenize
        return text
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError):
        return text
    wrapped: dict[int, list[str]] = {}
    statement: list[tokenize.TokenInfo] = []
    for token in tokens:
        if not statement and token.type in (tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT):
            continue  # blank lines, comment lines and indentation come before a statement's first token
        statement.append(token)
        if token.type not in (tokenize.NEWLINE, tokenize.ENDMARKER):
            continue
        first, last = statement[0].start[0], statement[-1].start[0]
        if any(len(lines[row - 1]) > width for row in range(first, last + 1)):
            line = _one_line(statement, lines)
            if line is not None:
                wrapped[first] = _wrap_statement(line, width)
                wrapped.update({row: [] for row in range(first + 1, last + 1)})
        statement = []
    out = []
    for number, line in enumerate(lines, start=1):
        out.extend(wrapped.get(number, [line]))
    return "\n".join(out)


def _one_line(statement: list[tokenize.TokenInfo], lines: list[str]) -> str | None:
    """The statement on one line: itself, or its physical lines joined where they break inside brackets; None
    where a comment or a string spans its breaks (those stay as written)."""
    first, last = statement[0].start[0], statement[-1].start[0]
    if first == last:
        return lines[first - 1]
    if any(t.type == tokenize.COMMENT and t.start[0] < last for t in statement) or any(
            t.type == tokenize.STRING and t.start[0] != t.end[0] for t in statement):
        return None
    parts = [lines[row - 1].rstrip().removesuffix("\\").rstrip() for row in range(first, last + 1)]
    parts[1:] = [part.strip() for part in parts[1:]]  # a backslash's continuation joins like a bracket's
    joined = parts[0]
    for part in parts[1:]:
        joined += part if joined.endswith(("(", "[", "{")) or part.startswith((")", "]", "}")) else " " + part
    return joined


def _wrap_statement(line: str, width: int) -> list[str]:
    indent = len(line) - len(line.lstrip())
    code, comment = _split_comment(line)
    parts = _wrap_expression(code[indent:], indent, width - len(comment))
    if parts is None:
        return [line]
    parts[0] = " " * indent + parts[0]
    parts[-1] += comment
    return parts


def _split_comment(line: str) -> tuple[str, str]:
    """(code, "  # comment" or "")."""
    for token in tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline):
        if token.type == tokenize.COMMENT:
            offset = len(line) - len(line.lstrip()) + token.start[1]
            code = line[:offset].rstrip()
            return code, line[len(code):]
    return line.rstrip(), ""


def _significant(text: str) -> list[tokenize.TokenInfo] | None:
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError):
        return None
    return [t for t in tokens if t.type not in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER,
                                                 tokenize.INDENT, tokenize.DEDENT)]


def _wrap_expression(text: str, column: int, width: int, bracketed: bool = False) -> list[str] | None:
    """`text` laid out from `column` within `width`: its first line without the indent, later lines with it;
    None where it cannot be wrapped (no bracket with several items, no sum)."""
    if column + len(text) <= width:
        return [text]
    if text.startswith("from ") and " import " in text and "(" not in text:  # an import list gets brackets
        module, names = text.split(" import ", 1)
        text = f"{module} import ({names})"
    tokens = _significant(text)
    if not tokens:
        return None
    by_terms = _wrap_sum(text, tokens, column, width, bracketed)
    if by_terms is not None and all(len(line) <= width for line in by_terms[1:]) and column + len(by_terms[0]) <= width:
        return by_terms
    pairs = _bracket_pairs(tokens)
    if pairs:
        # The outermost bracket with the most inside it: a call's arguments, a signature, a tuple.
        open_at, close_at = max(pairs, key=lambda p: (p[1].start[1] - p[0].end[1], -p[0].start[1]))
        inner_start, inner_end = open_at.end[1], close_at.start[1]
        items = _split_at_commas(text[inner_start:inner_end])
        head, tail = text[:inner_start], text[inner_end:]
        if len(items) > 1 or (items and column + len(head) + len(items[0]) + len(tail) > width):
            return _pack(head, items, tail, column, width)
    return by_terms


def _bracket_pairs(tokens) -> list[tuple[tokenize.TokenInfo, tokenize.TokenInfo]]:
    """The (opening, closing) token pairs at depth 0."""
    pairs, depth, opened = [], 0, None
    for token in tokens:
        if token.type == tokenize.OP and token.string in _OPENERS:
            if depth == 0:
                opened = token
            depth += 1
        elif token.type == tokenize.OP and token.string in _CLOSERS:
            depth -= 1
            if depth == 0 and opened is not None:
                pairs.append((opened, token))
    return pairs


def _split_at_commas(text: str) -> list[str]:
    """The comma-separated items of a bracket's contents (commas at its own depth), each keeping its comma."""
    tokens = _significant(text) or []
    items, start, depth = [], 0, 0
    for token in tokens:
        if token.type == tokenize.OP and token.string in _OPENERS:
            depth += 1
        elif token.type == tokenize.OP and token.string in _CLOSERS:
            depth -= 1
        elif token.type == tokenize.OP and token.string == "," and depth == 0:
            items.append(text[start:token.end[1]].strip())
            start = token.end[1]
    if text[start:].strip():
        items.append(text[start:].strip())
    return items


def _pack(head: str, items: list[str], tail: str, column: int, width: int) -> list[str]:
    """head + items + tail, the items packed greedily on lines aligned after the bracket, or on a hanging indent
    (four spaces deeper than the statement) where the bracket sits too far right for the longest item. An item
    that fills a line alone and still overflows is wrapped inside its own brackets."""
    aligned = column + len(head)
    hanging = aligned + max(len(item) for item in items) + len(tail) > width and len(head.strip()) > 1
    indent = column + 4 if hanging else aligned  # where every line's items start
    rows: list[list[str]] = [[]]  # the items of each line after the head's
    for item in items:
        used = len(" ".join(rows[-1] + [item])) + (len(tail) if item is items[-1] else 0)
        if rows[-1] and indent + used > width:
            rows.append([])
        rows[-1].append(item)
    lines = [head.rstrip()] if hanging else []
    for number, row in enumerate(rows):
        text = " ".join(row)
        last = number == len(rows) - 1
        if len(row) == 1 and indent + len(text) + (len(tail) if last else 0) > width:
            deeper = _wrap_expression(text, indent, width, bracketed=True)
            if deeper is not None:
                text = "\n".join(deeper)
        prefix = head if (not hanging and number == 0) else " " * indent
        if last and hanging and tail.strip() and len((prefix + text).rsplit("\n", 1)[-1]) + len(tail) > width:
            # On a hanging indent a tail that does not fit after the items closes the bracket on a line of its
            # own, at the statement's indent: `x = (` / items / `)*rest`.
            lines += [prefix + text, " " * column + tail]
        else:
            lines.append(prefix + text + (tail if last else ""))
    return "\n".join(lines).split("\n")  # a deeper wrap's lines are lines of their own


def _wrap_sum(text: str, tokens, column: int, width: int, bracketed: bool) -> list[str] | None:
    """A long sum split before its top-level + and - signs, its terms packed greedily: inside brackets as it
    is, an assignment's right side inside parentheses it gains (`name = (a + b` / `+ c)`)."""
    depth, equals, cuts, previous = 0, None, [], None
    for token in tokens:
        if token.type == tokenize.OP and token.string in _OPENERS:
            depth += 1
        elif token.type == tokenize.OP and token.string in _CLOSERS:
            depth -= 1
        elif token.type == tokenize.OP and depth == 0 and token.string == "=" and equals is None and not bracketed:
            equals = token
        elif (token.type == tokenize.OP and depth == 0 and token.string in "+-" and (bracketed or equals)
              and previous is not None and _ends_operand(previous)):
            cuts.append(token.start[1])
        previous = token
    if not cuts:
        return None
    start = 0 if bracketed else equals.end[1] + 1
    bounds = [start, *cuts, len(text)]
    terms = [text[a:b].strip() for a, b in zip(bounds, bounds[1:])]
    prefix = "" if bracketed else text[:start] + "("
    closing = "" if bracketed else ")"
    indent = column + len(prefix)
    lines, current = [], prefix + terms[0]
    for term in terms[1:]:
        base = column if not lines else indent
        if base + len(current) + 1 + len(term) + len(closing) > width:
            lines.append(current)
            current = term
        else:
            current += " " + term
    lines.append(current)
    out = [lines[0]]
    for number, line in enumerate(lines[1:], start=1):
        end = closing if number == len(lines) - 1 else ""
        deeper = (_wrap_expression(line, indent, width - len(end), bracketed=True)
                  if indent + len(line) + len(end) > width else None)
        if deeper is None:  # it fits (or cannot be wrapped)
            out.append(" " * indent + line)
        else:  # a term too long alone: wrapped inside its own brackets
            out += [" " * indent + deeper[0], *deeper[1:]]
    out[-1] += closing
    return out


def _ends_operand(token: tokenize.TokenInfo) -> bool:
    """Whether a + or - after this token is binary (a name, number, string or closing bracket ends an operand)."""
    if token.type == tokenize.NAME:
        return not keyword.iskeyword(token.string)
    return token.type in (tokenize.NUMBER, tokenize.STRING) or token.string in _CLOSERS


def long_code_lines(text: str, width: int = WIDTH) -> list[int]:
    """The numbers of the lines of `text` (Python source) longer than `width` that hold code: a docstring (a
    statement that is a string alone), a multi-line string's lines and a line holding only a comment are
    prose, and not counted."""
    docstrings, comments, strings = _prose_rows(text)
    prose = docstrings | comments | strings
    return [number for number, line in enumerate(text.split("\n"), start=1)
            if len(line) > width and number not in prose]


# A docstring line that opens with a label ("objective: ...", "[S] dk += ...", "- item") hangs its continuation.
_LABELLED = re.compile(r"(\[\w+\] |[\w ,()-]{1,30}: |- )")


def wrap_long_prose(text: str, width: int = WIDTH) -> str:
    """`text` (Python source) with each long line of prose broken at spaces: a docstring's line (continued at
    its indentation, or four spaces past it after a label) and a comment alone on its line (continued as a
    comment). What runs over joins the next line where that line goes on the same paragraph, as one would
    reflow it by hand. A line with no space to break at stays as it is; anything that does not tokenize too."""
    lines = text.split("\n")
    if all(len(line) <= width for line in lines):  # most generated files: nothing to tokenize or check
        return text
    try:
        docstrings, comments, _ = _prose_rows(text)
    except (tokenize.TokenError, SyntaxError):
        return text
    out, carry = [], ""  # carry: words run over from the line before, for this line's paragraph
    for number, line in enumerate(lines, start=1):
        kind = "comment" if number in comments else "docstring" if number in docstrings else None
        if kind is None or (not carry and len(line) <= width):
            out.append(line)
            continue
        indent = line[:len(line) - len(line.lstrip())]
        body = line.strip()
        if kind == "comment":  # "#", one space, then the comment's own indentation (kept) and words
            words = body[1:].removeprefix(" ")
            indent += "# " + words[:len(words) - len(words.lstrip())]
            body = words.strip()
        if carry:
            body = carry + " " + body
            carry = ""
        if len(indent) + len(body) <= width:
            out.append(indent + body)
            continue
        opening = '"""' if body.startswith('"""') else ""
        hanging = "    " if kind == "docstring" and _LABELLED.match(body.removeprefix(opening)) else ""
        parts = _break_words(body, width - len(indent), len(hanging))
        if len(parts) > 1 and not hanging and _goes_on(lines, number, kind, line[:len(line) - len(line.lstrip())],
                                                       docstrings, comments):
            parts, carry = parts[:-1], parts[-1]
        out.extend([indent + parts[0]] + [indent + hanging + part for part in parts[1:]])
    wrapped = "\n".join(out)
    try:  # a break right after a backslash would escape the line's end: keep such text as it was
        compile(wrapped, "<generated>", "exec", dont_inherit=True)
    except SyntaxError:
        return text
    return wrapped


def _goes_on(lines: list[str], number: int, kind: str, indent: str, docstrings: set[int], comments: set[int]) -> bool:
    """Whether line `number + 1` goes on with line `number`'s sentence: prose of the same kind at the same
    indentation that starts in lower case and is neither a label's line nor a formula (no =, += or <-)."""
    if number >= len(lines) or (number + 1) not in (comments if kind == "comment" else docstrings):
        return False
    following = lines[number]
    body = following.strip().removeprefix("#").strip() if kind == "comment" else following.strip()
    return (following[:len(following) - len(following.lstrip())] == indent and body[:1].islower()
            and not _LABELLED.match(body) and not any(sign in body for sign in (" = ", " += ", " <- ")))


def _prose_rows(text: str) -> tuple[set[int], set[int], set[int]]:
    """The rows of docstrings (a statement that is a string alone), of comments alone on their line, and of
    multi-line strings."""
    docstrings, comments, strings, statement = set(), set(), set(), []
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.STRING and token.end[0] > token.start[0]:
            strings.update(range(token.start[0], token.end[0] + 1))
        elif token.type == tokenize.COMMENT and token.line.strip().startswith("#"):
            comments.add(token.start[0])
        if token.type in (tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT):
            continue
        if token.type not in (tokenize.NEWLINE, tokenize.ENDMARKER):
            statement.append(token)
            continue
        if len(statement) == 1 and statement[0].type == tokenize.STRING:
            docstrings.update(range(statement[0].start[0], statement[0].end[0] + 1))
        statement = []
    return docstrings, comments, strings


def _break_words(words: str, width: int, hanging: int = 0) -> list[str]:
    """`words` in pieces of at most `width` characters (after the first, `width - hanging`), broken at spaces;
    a piece without a space to break at runs over."""
    pieces = []
    while len(words) > width - (hanging if pieces else 0):
        room = width - (hanging if pieces else 0)
        cut = words.rfind(" ", 0, room + 1)
        if cut <= 0:
            cut = words.find(" ", room)
            if cut < 0:
                break
        pieces.append(words[:cut].rstrip())
        words = words[cut:].lstrip()
    return pieces + [words]


def long_lines(text: str, width: int = WIDTH) -> list[int]:
    """The numbers of the lines of `text` longer than `width`, code or prose, that had a place to break (a
    space after their first word: one long word, a user's URL say, cannot be wrapped)."""
    return [number for number, line in enumerate(text.split("\n"), start=1)
            if len(line) > width and " " in line.strip()[:width]]
