//! A1111 emphasis: a text → fragments with weights.
//!
//! `(a)` ×1.1, `((a))` ×1.21, `(a:w)` ×w, `[a]` ×(1/1.1), nesting multiplies; `\(` `\)` `\[` `\]` `\\` are literal
//! characters (any other backslash disappears); brackets never closed multiply everything after them, stray closing
//! brackets and colons are text; the word `BREAK` starts a new 75-token chunk. Adjacent fragments of equal weight
//! merge. Weights are f64 and multiplied in A1111's order, so they equal A1111's to the last bit.
//!
//! One divergence: a weight A1111's pattern accepts but Python cannot convert (`(a:1.2.3)`, `(a:.)`) raises an
//! error in A1111; here the colon is read as text and the parenthesis closes with ×1.1.
//!
//! A quirk kept on purpose: a `BREAK` inside brackets is multiplied like the text around it, stops being a break
//! and is encoded as the word "BREAK" with a negative weight (A1111 does exactly that).

use super::chars::{decimal_digit, is_space, is_word, parse_float};

/// A piece of a prompt text as the encoder sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Fragment {
    Text {
        text: String,
        weight: f64,
    },
    /// `BREAK`: pad the current chunk and start a new one.
    Break,
}

/// A1111's break marker inside the parser (a fragment "BREAK" with weight exactly -1 after all multiplications).
const BREAK_WEIGHT: f64 = -1.0;
const ROUND: f64 = 1.1;
const SQUARE: f64 = 1.0 / 1.1;

/// Parses `text` into weighted fragments (never empty: `""` gives one empty fragment of weight 1).
pub fn parse_attention(text: &str) -> Vec<Fragment> {
    let s: Vec<char> = text.chars().collect();
    let mut res: Vec<(String, f64)> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();

    fn multiply(res: &mut [(String, f64)], start: usize, factor: f64) {
        for entry in &mut res[start..] {
            entry.1 *= factor;
        }
    }
    fn plain(res: &mut Vec<(String, f64)>, piece: &[char]) {
        for (k, part) in split_break(piece).into_iter().enumerate() {
            if k > 0 {
                res.push(("BREAK".to_string(), BREAK_WEIGHT));
            }
            res.push((part.iter().collect(), 1.0));
        }
    }

    let mut i = 0;
    while i < s.len() {
        match s[i] {
            '\\' => {
                if let Some(&next) = s.get(i + 1).filter(|c| matches!(c, '(' | ')' | '[' | ']' | '\\')) {
                    res.push((next.to_string(), 1.0));
                    i += 2;
                } else {
                    res.push((String::new(), 1.0));
                    i += 1;
                }
            }
            '(' => {
                round.push(res.len());
                i += 1;
            }
            '[' => {
                square.push(res.len());
                i += 1;
            }
            ':' => match weight_token(&s, i) {
                Some((weight, end)) => {
                    match (weight, round.pop()) {
                        (Some(w), Some(start)) => multiply(&mut res, start, w),
                        (Some(_), None) => plain(&mut res, &s[i..end]),
                        (None, open) => {
                            // Not a number Python can read: the colon is text (see the module docs).
                            if let Some(start) = open {
                                round.push(start);
                            }
                            plain(&mut res, &s[i..i + 1]);
                            i += 1;
                            continue;
                        }
                    }
                    i = end;
                }
                None => {
                    plain(&mut res, &s[i..i + 1]);
                    i += 1;
                }
            },
            ')' => {
                match round.pop() {
                    Some(start) => multiply(&mut res, start, ROUND),
                    None => plain(&mut res, &s[i..i + 1]),
                }
                i += 1;
            }
            ']' => {
                match square.pop() {
                    Some(start) => multiply(&mut res, start, SQUARE),
                    None => plain(&mut res, &s[i..i + 1]),
                }
                i += 1;
            }
            _ => {
                let start = i;
                while i < s.len() && !matches!(s[i], '\\' | '(' | ')' | '[' | ']' | ':') {
                    i += 1;
                }
                plain(&mut res, &s[start..i]);
            }
        }
    }
    for start in round {
        multiply(&mut res, start, ROUND);
    }
    for start in square {
        multiply(&mut res, start, SQUARE);
    }
    merge_equal_weights(res)
}

/// Adjacent pieces of equal weight joined (A1111's last pass), BREAK markers as [`Fragment::Break`]; at least one
/// (possibly empty) fragment.
fn merge_equal_weights(pieces: Vec<(String, f64)>) -> Vec<Fragment> {
    let mut merged: Vec<(String, f64)> = Vec::with_capacity(pieces.len().max(1));
    for (text, weight) in pieces {
        match merged.last_mut() {
            Some(last) if last.1 == weight => last.0.push_str(&text),
            _ => merged.push((text, weight)),
        }
    }
    if merged.is_empty() {
        merged.push((String::new(), 1.0));
    }
    merged
        .into_iter()
        .map(
            |(text, weight)| {
                if text == "BREAK" && weight == BREAK_WEIGHT {
                    Fragment::Break
                } else {
                    Fragment::Text { text, weight }
                }
            },
        )
        .collect()
}

/// `:\s*([+-]?[.\d]+)\s*\)` at `i`: the weight (`None` if Python's `float()` would fail) and the end.
fn weight_token(s: &[char], i: usize) -> Option<(Option<f64>, usize)> {
    let mut j = i + 1;
    while j < s.len() && is_space(s[j]) {
        j += 1;
    }
    let mut k = j;
    if k < s.len() && matches!(s[k], '+' | '-') {
        k += 1;
    }
    let mut m = k;
    while m < s.len() && (s[m] == '.' || decimal_digit(s[m]).is_some()) {
        m += 1;
    }
    if m == k {
        return None;
    }
    let mut e = m;
    while e < s.len() && is_space(s[e]) {
        e += 1;
    }
    if e < s.len() && s[e] == ')' {
        let number: String = s[j..m].iter().collect();
        Some((parse_float(&number), e + 1))
    } else {
        None
    }
}

/// Splits at `\s*\bBREAK\b\s*`.
fn split_break(s: &[char]) -> Vec<&[char]> {
    const WORD: [char; 5] = ['B', 'R', 'E', 'A', 'K'];
    let mut parts = Vec::new();
    let (mut last, mut i) = (0, 0);
    while i < s.len() {
        let mut j = i;
        while j < s.len() && is_space(s[j]) {
            j += 1;
        }
        let found = s[j..].starts_with(&WORD)
            && (j == 0 || !is_word(s[j - 1]))
            && s.get(j + WORD.len()).is_none_or(|&c| !is_word(c));
        if found {
            let mut k = j + WORD.len();
            while k < s.len() && is_space(s[k]) {
                k += 1;
            }
            parts.push(&s[last..i]);
            last = k;
            i = k;
        } else if j > i {
            // No BREAK after this whitespace run: no match can start inside it either.
            i = j;
        } else {
            i += 1;
        }
    }
    parts.push(&s[last..]);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frags(text: &str) -> Vec<(String, f64)> {
        parse_attention(text)
            .into_iter()
            .map(|f| match f {
                Fragment::Text { text, weight } => (text, weight),
                Fragment::Break => ("<BREAK>".into(), f64::NAN),
            })
            .collect()
    }

    fn v(items: &[(&str, f64)]) -> Vec<(String, f64)> {
        items.iter().map(|(t, w)| (t.to_string(), *w)).collect()
    }

    #[test]
    fn a1111_documented_examples() {
        assert_eq!(frags("normal text"), v(&[("normal text", 1.0)]));
        assert_eq!(frags("an (important) word"), v(&[("an ", 1.0), ("important", 1.1), (" word", 1.0)]));
        assert_eq!(frags("(unbalanced"), v(&[("unbalanced", 1.1)]));
        assert_eq!(frags("\\(literal\\]"), v(&[("(literal]", 1.0)]));
        assert_eq!(frags("(unnecessary)(parens)"), v(&[("unnecessaryparens", 1.1)]));
        assert_eq!(
            frags("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
            v(&[
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ])
        );
    }

    #[test]
    fn breaks_and_whitespace_around_weights() {
        let f = parse_attention("a BREAK b");
        assert_eq!(
            f,
            vec![
                Fragment::Text { text: "a".into(), weight: 1.0 },
                Fragment::Break,
                Fragment::Text { text: "b".into(), weight: 1.0 }
            ]
        );
        assert_eq!(frags("aBREAK b"), v(&[("aBREAK b", 1.0)]));
        assert_eq!(frags("(a: 1.5 )"), v(&[("a", 1.5)]));
        // A BREAK inside brackets is A1111's "BREAK" word with weight -1.1.
        assert_eq!(frags("(BREAK)"), v(&[("", 1.1), ("BREAK", -1.1), ("", 1.1)]).into_iter().collect::<Vec<_>>());
    }

    #[test]
    fn unreadable_weights_are_text() {
        assert_eq!(frags("(a:1.2.3)"), v(&[("a:1.2.3", 1.1)]));
        assert_eq!(frags("a:1.5)"), v(&[("a:1.5)", 1.0)]));
        assert_eq!(frags("(a:１.５)"), v(&[("a", 1.5)]));
        assert_eq!(frags(""), v(&[("", 1.0)]));
        assert_eq!(frags("a\\b\\"), v(&[("ab", 1.0)]));
    }
}
