"""A from-scratch Python model of how AUTOMATIC1111's webui reads an SDXL prompt, used to write the reference fixtures
for dreamshaper's `src/prompt/` (it mirrors the Rust code's algorithm; it is not A1111's code).

Three stages, as in A1111 (default settings: "Original" emphasis, token wrap length 20, current scheduling rules):

1. ``schedule(prompt, steps)``: prompt editing ``[from:to:when]`` / ``[to:when]`` / ``[from::when]`` and alternation
   ``[a|b|c]`` → ``[(until_step, text), ...]``. A1111 parses with a lark Earley grammar; its language is reproduced
   here by a recursive reader that prefers a bracket construct whenever one is valid (A1111's lark resolves the
   grammar's ambiguity that way). A prompt the grammar rejects (a ``|`` outside a valid alternation, a backslash
   before a newline or at the end) is used literally at every step.
2. ``attention(text)``: emphasis ``(a)`` ×1.1, ``[a]`` ×(1/1.1), ``(a:w)`` ×w, escapes, ``BREAK``
   → ``[[fragment, weight], ...]`` (``["BREAK", -1.0]`` marks a chunk break).
3. ``chunks(fragments, tokenize, bos, eos, comma)``: 75-token chunks with the comma backtrack, wrapped in BOS/EOS.

Only the standard library is needed here; ``make_a1111_refs.py`` adds the tokenizers and text encoders.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

CHUNK_LENGTH = 75
COMMA_BACKTRACK = 20
# Deeper nesting of bracket constructs makes the whole prompt literal (A1111 hits Python's recursion limit near there).
MAX_DEPTH = 128

# ---------------------------------------------------------------------------------------------------------------------
# 1. Prompt editing and alternation
# ---------------------------------------------------------------------------------------------------------------------

# lark's SIGNED_NUMBER: sign? (INT exp | (INT "." INT? | "." INT) exp? | INT), ASCII digits only.
_NUMBER = re.compile(r"[+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+)")


@dataclass
class Text:
    text: str


@dataclass
class Scheduled:
    before: list | None  # None: the "[to:when]" form
    after: list
    number: str  # the NUMBER token as written
    when: int = 0  # filled in by `_resolve_steps`


@dataclass
class Alternate:
    options: list = field(default_factory=list)


def _matched_openers(s: str) -> list[bool]:
    """Which `(` / `[` have a closer of their kind with balanced brackets between (only those can start a construct;
    a stray closer spoils every bracket still open). An optimisation that keeps the reader's recursion shallow."""
    matched = [False] * len(s)
    stack: list[tuple[str, int]] = []
    i = 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            i += 1
        elif c in "([":
            stack.append((c, i))
        elif c in ")]":
            opener = "(" if c == ")" else "["
            if stack and stack[-1][0] == opener:
                matched[stack.pop()[1]] = True
            else:
                stack.clear()
        i += 1
    return matched


class _TooDeep(Exception):
    pass


class _Reader:
    def __init__(self, s: str):
        self.s = s
        self.n = len(s)
        self.depth = 0
        self.matched = _matched_openers(s)

    def prompt(self, i: int):
        """The longest `prompt` (text, whitespace, escapes, valid bracket constructs) from i: (nodes, end)."""
        s, n = self.s, self.n
        nodes: list = []
        start = i
        while i < n:
            c = s[i]
            if c == "\\":
                if i + 1 < n and s[i + 1] != "\n":
                    i += 2
                    continue
                break
            if c in "]):|":
                break
            if c in "([":
                if not self.matched[i]:
                    break
                if self.depth >= MAX_DEPTH:
                    raise _TooDeep
                self.depth += 1
                construct = self.paren(i) if c == "(" else self.bracket(i)
                self.depth -= 1
                if construct is None:
                    break
                if i > start:
                    nodes.append(Text(s[start:i]))
                inner, i = construct
                nodes.extend(inner)
                start = i
                continue
            i += 1
        if i > start:
            nodes.append(Text(s[start:i]))
        return nodes, i

    def paren(self, i: int):
        """`( prompt )` or `( prompt : prompt )` at i: (nodes, end) or None."""
        s, n = self.s, self.n
        first, j = self.prompt(i + 1)
        if j < n and s[j] == ")":
            return [Text("("), *first, Text(")")], j + 1
        if j < n and s[j] == ":":
            second, k = self.prompt(j + 1)
            if k < n and s[k] == ")":
                return [Text("("), *first, Text(":"), *second, Text(")")], k + 1
        return None

    def number_tail(self, i: int):
        """`WHITESPACE? NUMBER WHITESPACE? ]` at i: (number, end) or None."""
        s, n = self.s, self.n
        while i < n and s[i].isspace():
            i += 1
        m = _NUMBER.match(s, i)
        if m is None:
            return None
        i = m.end()
        while i < n and s[i].isspace():
            i += 1
        if i < n and s[i] == "]":
            return m.group(0), i + 1
        return None

    def bracket(self, i: int):
        """`[ prompt ]`, a scheduled `[...:...:n]` / `[...:n]` or an alternation `[a|b]` at i."""
        s, n = self.s, self.n
        first, j = self.prompt(i + 1)
        if j >= n:
            return None
        c = s[j]
        if c == "]":
            return [Text("["), *first, Text("]")], j + 1
        if c == "|":
            options = [first]
            while j < n and s[j] == "|":
                option, j = self.prompt(j + 1)
                options.append(option)
            if j < n and s[j] == "]":
                return [Alternate(options)], j + 1
            return None
        if c == ":":
            tail = self.number_tail(j + 1)
            if tail is not None:
                return [Scheduled(None, first, tail[0])], tail[1]
            second, k = self.prompt(j + 1)
            if k < n and s[k] == ":":
                tail = self.number_tail(k + 1)
                if tail is not None:
                    return [Scheduled(first, second, tail[0])], tail[1]
        return None

    def start(self):
        """The whole prompt: prompts and stray `[ ] ( ) :`; None when it cannot be read (A1111's LarkError)."""
        nodes: list = []
        i = 0
        while i < self.n:
            inner, j = self.prompt(i)
            if j > i:
                nodes.extend(inner)
                i = j
            elif self.s[i] in "[]():":
                nodes.append(Text(self.s[i]))
                i += 1
            else:
                return None
        return nodes


def _walk(nodes):
    for node in nodes:
        yield node
        if isinstance(node, Scheduled):
            if node.before is not None:
                yield from _walk(node.before)
            yield from _walk(node.after)
        elif isinstance(node, Alternate):
            for option in node.options:
                yield from _walk(option)


def _resolve_steps(nodes, steps: int) -> list[int]:
    points = {steps}
    for node in _walk(nodes):
        if isinstance(node, Scheduled):
            v = float(node.number)
            if "." in node.number:
                v *= steps
            # int() of an infinite float raises in Python (A1111 fails); saturate instead.
            if v == float("inf"):
                when = steps
            elif v == float("-inf"):
                when = -1
            else:
                when = min(steps, int(v))
            node.when = when
            if when >= 1:
                points.add(when)
        elif isinstance(node, Alternate):
            points.update(range(1, steps + 1))
    return sorted(points)


def _text_at(nodes, step: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, Text):
            out.append(node.text)
        elif isinstance(node, Scheduled):
            chosen = (node.before or []) if step <= node.when else node.after
            out.append(_text_at(chosen, step))
        else:
            out.append(_text_at(node.options[(step - 1) % len(node.options)], step))
    return "".join(out)


def _read(prompt: str):
    try:
        return _Reader(prompt).start()
    except _TooDeep:
        return None


def is_literal(prompt: str) -> bool:
    """True when the grammar rejects the prompt (it is then used as written at every step)."""
    return _read(prompt) is None


def schedule(prompt: str, steps: int) -> list[list]:
    """[[until_step, text], ...] (A1111's get_learned_conditioning_prompt_schedules for one prompt)."""
    nodes = _read(prompt)
    if nodes is None:
        return [[steps, prompt]]
    return [[t, _text_at(nodes, t)] for t in _resolve_steps(nodes, steps)]


# ---------------------------------------------------------------------------------------------------------------------
# 2. Emphasis
# ---------------------------------------------------------------------------------------------------------------------


def _is_word(c: str) -> bool:
    return c.isalnum() or c == "_"


def _split_break(text: str) -> list[str]:
    """Split at `\\s*\\bBREAK\\b\\s*`."""
    parts = []
    n = len(text)
    last = 0
    i = 0
    while i < n:
        j = i
        while j < n and text[j].isspace():
            j += 1
        if (
            text.startswith("BREAK", j)
            and (j == 0 or not _is_word(text[j - 1]))
            and (j + 5 == n or not _is_word(text[j + 5]))
        ):
            k = j + 5
            while k < n and text[k].isspace():
                k += 1
            parts.append(text[last:i])
            last = i = k
            continue
        i += 1
    parts.append(text[last:])
    return parts


def _weight_token(text: str, i: int):
    """`:\\s*([+-]?[.\\d]+)\\s*\\)` at i: (weight text, end) or None."""
    n = len(text)
    j = i + 1
    while j < n and text[j].isspace():
        j += 1
    k = j
    if k < n and text[k] in "+-":
        k += 1
    m = k
    while m < n and (text[m] == "." or unicodedata.category(text[m]) == "Nd"):
        m += 1
    if m == k:
        return None
    e = m
    while e < n and text[e].isspace():
        e += 1
    if e < n and text[e] == ")":
        return text[j:m], e + 1
    return None


def attention(text: str) -> list[list]:
    """[[fragment, weight], ...], runs of equal weight merged; ["BREAK", -1.0] marks a chunk break."""
    res: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply(start: int, factor: float):
        for p in range(start, len(res)):
            res[p][1] *= factor

    def plain(piece: str):
        for idx, part in enumerate(_split_break(piece)):
            if idx > 0:
                res.append(["BREAK", -1.0])
            res.append([part, 1.0])

    n = len(text)
    i = 0
    while i < n:
        c = text[i]
        if c == "\\":
            if i + 1 < n and text[i + 1] in "()[]\\":
                res.append([text[i + 1], 1.0])
                i += 2
            else:
                res.append(["", 1.0])
                i += 1
        elif c == "(":
            round_brackets.append(len(res))
            i += 1
        elif c == "[":
            square_brackets.append(len(res))
            i += 1
        elif c == ":":
            token = _weight_token(text, i)
            weight = None
            if token is not None:
                try:
                    weight = float(token[0])
                except ValueError:
                    # A1111 raises here ("1.2.3", "."); dreamshaper reads the colon as text instead.
                    token = None
            if token is not None and round_brackets:
                multiply(round_brackets.pop(), weight)
                i = token[1]
            elif token is not None:
                plain(text[i : token[1]])
                i = token[1]
            else:
                plain(":")
                i += 1
        elif c == ")":
            if round_brackets:
                multiply(round_brackets.pop(), 1.1)
            else:
                plain(")")
            i += 1
        elif c == "]":
            if square_brackets:
                multiply(square_brackets.pop(), 1 / 1.1)
            else:
                plain("]")
            i += 1
        else:
            j = i
            while j < n and text[j] not in "\\()[]:":
                j += 1
            plain(text[i:j])
            i = j

    for pos in round_brackets:
        multiply(pos, 1.1)
    for pos in square_brackets:
        multiply(pos, 1 / 1.1)
    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


# ---------------------------------------------------------------------------------------------------------------------
# 3. Chunks
# ---------------------------------------------------------------------------------------------------------------------


def chunks(fragments, tokenize, bos: int, eos: int, comma: int | None):
    """[(ids[77], multipliers[77]), ...] for one encoder; `tokenize(text)` gives ids without BOS/EOS."""
    out = []
    tokens: list[int] = []
    mults: list[float] = []
    last_comma = -1

    def close():
        nonlocal tokens, mults, last_comma
        pad = CHUNK_LENGTH - len(tokens)
        out.append(([bos, *tokens, *[eos] * pad, eos], [1.0, *mults, *[1.0] * pad, 1.0]))
        tokens, mults, last_comma = [], [], -1

    for text, weight in fragments:
        if text == "BREAK" and weight == -1:
            close()
            continue
        for token in tokenize(text):
            if token == comma:
                last_comma = len(tokens)
            elif (
                COMMA_BACKTRACK != 0
                and len(tokens) == CHUNK_LENGTH
                and last_comma != -1
                and len(tokens) - last_comma <= COMMA_BACKTRACK
            ):
                cut = last_comma + 1
                moved, moved_mults = tokens[cut:], mults[cut:]
                tokens, mults = tokens[:cut], mults[:cut]
                close()
                tokens, mults = moved, moved_mults
            if len(tokens) == CHUNK_LENGTH:
                close()
            tokens.append(token)
            mults.append(weight)
    if tokens or not out:
        close()
    return out


def empty_chunk(bos: int, eos: int):
    return [bos, *[eos] * (CHUNK_LENGTH + 1)], [1.0] * (CHUNK_LENGTH + 2)


def with_padding(ids: list[int], eos: int, pad: int) -> list[int]:
    """What the encoder sees: everything after the first EOS becomes the tokenizer's pad id."""
    if eos == pad or eos not in ids:
        return list(ids)
    first = ids.index(eos)
    return ids[: first + 1] + [pad] * (len(ids) - first - 1)
