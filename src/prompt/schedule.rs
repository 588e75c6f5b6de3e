//! A1111 prompt editing and alternation: which text is encoded at which step.
//!
//! - `[from:to:when]` uses `from` up to step `when`, then `to`; `[to:when]` adds `to` after `when`; `[from::when]`
//!   removes `from` after `when`. `when` with a decimal point is a fraction of the steps (`0.25`, `1.0`), without
//!   one a step number (A1111's current rule; integers below 1 never switch). Whitespace may surround `when`.
//! - `[a|b|c]` cycles through its options every step; options may be empty (`[fe|]male`).
//! - Everything else (emphasis brackets, stray brackets and colons, `[bad : wrong]`) is kept as text for the
//!   emphasis parser.
//!
//! A1111 parses with a lark Earley grammar. Its language is reproduced here by a recursive reader that takes a bracket
//! construct whenever one is valid at a position (a `[…]` or `(…)` whose content is itself valid, with `:` and `|`
//! only where the construct allows them), and reads a bracket as a literal character otherwise. A prompt the grammar
//! rejects — a `|` outside a valid alternation, a backslash at the end or before a newline — is used literally at
//! every step, as A1111 does. Where A1111's grammar is ambiguous (a valid construct that could also be read as
//! literal brackets, next to other unmatched brackets) its choice depends on Python's hash seed and varies between
//! runs; we always take the construct, which is one of A1111's outcomes.
//!
//! A1111 hands the loop the entry whose `until` is the first ≥ the 0-based evaluation index, so an entry covers the
//! evaluations after the previous entry's `until` up to and including its own (see [`entry_at`]).

use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;

use super::chars::is_space;

/// Deeper nesting of matched brackets than this makes the whole prompt literal (A1111 fails near there: Python's
/// recursion limit); it keeps the reader's recursion shallow.
const MAX_DEPTH: usize = 128;

/// One entry of a prompt's schedule: `text` is encoded for the evaluations up to and including `until` (A1111's
/// `end_at_step`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledText {
    pub until: usize,
    pub text: String,
}

/// A prompt read for `steps` model evaluations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// Ascending `until`, the last one = `steps`; consecutive entries may hold the same text (A1111 lists every step
    /// an alternation or edit could change, and encodes them as one batch).
    pub entries: Vec<ScheduledText>,
    /// The grammar rejected the prompt, so it is used literally (no editing, no alternation).
    pub literal: bool,
}

/// The entry A1111 uses at 0-based evaluation `index`: the first whose `until` ≥ `index` (the last one after that).
pub fn entry_at<T>(entries: &[T], until: impl Fn(&T) -> usize, index: usize) -> usize {
    entries.iter().position(|e| index <= until(e)).unwrap_or(entries.len().saturating_sub(1))
}

/// Reads `prompt` for `steps` model evaluations (at least 1).
pub fn schedule(prompt: &str, steps: usize) -> Schedule {
    match schedule_distinct(prompt, steps, usize::MAX) {
        Ok(read) => read.into_schedule(),
        Err(_) => unreachable!("no limit on the distinct texts"),
    }
}

/// A prompt's schedule with each distinct text once: what encoding needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistinctSchedule {
    /// (`until`, index into `texts`): [`Schedule::entries`]' steps, ascending, the last one = `steps`.
    pub entries: Vec<(usize, usize)>,
    /// The distinct texts, in order of first use.
    pub texts: Vec<String>,
    /// The grammar rejected the prompt, so it is used literally (no editing, no alternation).
    pub literal: bool,
    /// Characters written while building the texts (the scheduling work, see [`schedule_distinct`]).
    work: usize,
}

impl DistinctSchedule {
    /// Every entry with its text (A1111's list).
    pub fn into_schedule(self) -> Schedule {
        let entries =
            self.entries.iter().map(|&(until, t)| ScheduledText { until, text: self.texts[t].clone() }).collect();
        Schedule { entries, literal: self.literal }
    }
}

/// A prompt reads as more distinct texts over the steps than [`schedule_distinct`] was allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyTexts {
    pub limit: usize,
    /// Characters written before the limit was passed.
    work: usize,
}

/// [`schedule`] with each distinct text built once, refused as soon as there are more than `max_texts`.
///
/// The texts change only where an edit switches or an alternation turns, and which text a step gets depends only on
/// how many distinct switch steps lie before it and on the step modulo the alternations' common period. Steps with
/// the same pair share a text without building it again, so the work is the prompt's length times the number of
/// distinct texts built (at most `max_texts + 1`), plus a little per step: linear in the prompt's length and its
/// number of edits, however many steps and edits there are.
pub fn schedule_distinct(prompt: &str, steps: usize, max_texts: usize) -> Result<DistinctSchedule, TooManyTexts> {
    let steps = steps.max(1);
    let chars: Vec<char> = prompt.chars().collect();
    let Some(items) = Reader::new(&chars).read() else {
        let work = chars.len();
        return if max_texts == 0 {
            Err(TooManyTexts { limit: max_texts, work })
        } else {
            Ok(DistinctSchedule { entries: vec![(steps, 0)], texts: vec![prompt.to_string()], literal: true, work })
        };
    };
    let mut shape = Shape::default();
    collect_shape(&items, steps, &mut shape);
    let switches: Vec<usize> = shape.switches.into_iter().collect();
    // Steps 1…steps when anything alternates, else the switch steps and the last.
    let points: Vec<usize> = match shape.period {
        Some(_) => (1..=steps).collect(),
        None => switches.iter().copied().filter(|&t| t < steps).chain([steps]).collect(),
    };
    let period = shape.period.unwrap_or(1);

    let mut by_key: HashMap<(usize, usize), usize> = HashMap::new();
    let mut by_text: HashMap<u64, Vec<usize>> = HashMap::new();
    let mut texts: Vec<String> = Vec::new();
    let mut entries = Vec::with_capacity(points.len());
    let mut work = 0;
    for t in points {
        let key = (switches.partition_point(|&w| w < t), (t - 1) % period);
        let index = match by_key.get(&key) {
            Some(&i) => i,
            None => {
                let text = text_at(&chars, &items, t, steps);
                work += text.len();
                let candidates = by_text.entry(hash(&text)).or_default();
                let index = match candidates.iter().find(|&&i| texts[i] == text) {
                    Some(&i) => i,
                    None => {
                        if texts.len() == max_texts {
                            return Err(TooManyTexts { limit: max_texts, work });
                        }
                        texts.push(text);
                        candidates.push(texts.len() - 1);
                        texts.len() - 1
                    }
                };
                by_key.insert(key, index);
                index
            }
        };
        entries.push((t, index));
    }
    Ok(DistinctSchedule { entries, texts, literal: false, work })
}

fn hash(text: &str) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(text)
}

/// What makes a prompt's text change: the edits' switch steps (1 … steps) and the alternations' common period
/// (`None` without alternation; at most `steps`, past which every step is its own phase anyway).
#[derive(Debug, Default)]
struct Shape {
    switches: BTreeSet<usize>,
    period: Option<usize>,
}

fn collect_shape(items: &[Item], steps: usize, shape: &mut Shape) {
    for item in items {
        let Item::Node(node) = item else { continue };
        match node.as_ref() {
            Node::Edit { before, after, when } => {
                let when = when.step(steps);
                if when >= 1 {
                    shape.switches.insert(when as usize);
                }
                if let Some(before) = before {
                    collect_shape(before, steps, shape);
                }
                collect_shape(after, steps, shape);
            }
            Node::Alternate(options) => {
                let period = shape.period.unwrap_or(1);
                let n = options.len();
                let lcm = period / gcd(period, n) * n;
                shape.period = Some(lcm.min(steps));
                for option in options {
                    collect_shape(option, steps, shape);
                }
            }
        }
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// A piece of a read prompt: literal text (a range of the prompt's characters) or a step-dependent node.
#[derive(Debug, Clone)]
enum Item {
    Text(usize, usize),
    Node(Rc<Node>),
}

#[derive(Debug)]
enum Node {
    /// `[before:after:number]`; `before` is `None` in the `[after:number]` form.
    Edit {
        before: Option<Vec<Item>>,
        after: Vec<Item>,
        when: When,
    },
    Alternate(Vec<Vec<Item>>),
}

struct Reader<'a> {
    s: &'a [char],
    /// Whether the bracket opening at each position has a matching closer (only those can start a construct).
    matched: Vec<bool>,
    /// Constructs already read, by starting position (a construct's validity depends on its position only).
    memo: HashMap<usize, Option<(Vec<Item>, usize)>>,
    depth: usize,
    too_deep: bool,
}

impl<'a> Reader<'a> {
    fn new(s: &'a [char]) -> Self {
        Self { s, matched: matched_openers(s), memo: HashMap::new(), depth: 0, too_deep: false }
    }

    fn at(&self, i: usize) -> Option<char> {
        self.s.get(i).copied()
    }

    /// The whole prompt: prompts and stray `[ ] ( ) :`; `None` when the grammar rejects it.
    fn read(&mut self) -> Option<Vec<Item>> {
        let mut items = Vec::new();
        let mut i = 0;
        while i < self.s.len() {
            let (inner, j) = self.prompt(i);
            if self.too_deep {
                return None;
            }
            if j > i {
                items.extend(inner);
                i = j;
            } else if matches!(self.s[i], '[' | ']' | '(' | ')' | ':') {
                items.push(Item::Text(i, i + 1));
                i += 1;
            } else {
                return None;
            }
        }
        Some(items)
    }

    /// The longest prompt (text, whitespace, escapes, valid constructs) from `i`: its items and end.
    fn prompt(&mut self, mut i: usize) -> (Vec<Item>, usize) {
        let mut items = Vec::new();
        let mut start = i;
        while let Some(c) = self.at(i) {
            match c {
                '\\' => match self.at(i + 1) {
                    Some(next) if next != '\n' => i += 2,
                    _ => break,
                },
                ']' | ')' | ':' | '|' => break,
                '(' | '[' => {
                    let Some((inner, end)) = self.construct(i) else { break };
                    if i > start {
                        items.push(Item::Text(start, i));
                    }
                    items.extend(inner);
                    i = end;
                    start = i;
                }
                _ => i += 1,
            }
        }
        if i > start {
            items.push(Item::Text(start, i));
        }
        (items, i)
    }

    fn construct(&mut self, i: usize) -> Option<(Vec<Item>, usize)> {
        if !self.matched[i] {
            return None;
        }
        if let Some(known) = self.memo.get(&i) {
            return known.clone();
        }
        if self.depth >= MAX_DEPTH {
            self.too_deep = true;
            return None;
        }
        self.depth += 1;
        let result = if self.s[i] == '(' { self.paren(i) } else { self.bracket(i) };
        self.depth -= 1;
        if !self.too_deep {
            self.memo.insert(i, result.clone());
        }
        result
    }

    /// `( prompt )` or `( prompt : prompt )`: emphasis, kept as text around its content.
    fn paren(&mut self, i: usize) -> Option<(Vec<Item>, usize)> {
        let (first, j) = self.prompt(i + 1);
        let mut items = vec![Item::Text(i, i + 1)];
        items.extend(first);
        match self.at(j)? {
            ')' => {}
            ':' => {
                let (second, k) = self.prompt(j + 1);
                if self.at(k)? != ')' {
                    return None;
                }
                items.push(Item::Text(j, j + 1));
                items.extend(second);
                items.push(Item::Text(k, k + 1));
                return Some((items, k + 1));
            }
            _ => return None,
        }
        items.push(Item::Text(j, j + 1));
        Some((items, j + 1))
    }

    /// `[ prompt ]` (emphasis, kept as text), an edit `[a:b:n]` / `[b:n]` or an alternation `[a|b|…]`.
    fn bracket(&mut self, i: usize) -> Option<(Vec<Item>, usize)> {
        let (first, j) = self.prompt(i + 1);
        match self.at(j)? {
            ']' => {
                let mut items = vec![Item::Text(i, i + 1)];
                items.extend(first);
                items.push(Item::Text(j, j + 1));
                Some((items, j + 1))
            }
            '|' => {
                let mut options = vec![first];
                let mut j = j;
                while self.at(j) == Some('|') {
                    let (option, k) = self.prompt(j + 1);
                    options.push(option);
                    j = k;
                }
                (self.at(j)? == ']').then(|| (vec![Item::Node(Rc::new(Node::Alternate(options)))], j + 1))
            }
            ':' => {
                if let Some((when, end)) = self.number_tail(j + 1) {
                    let node = Node::Edit { before: None, after: first, when };
                    return Some((vec![Item::Node(Rc::new(node))], end));
                }
                let (second, k) = self.prompt(j + 1);
                if self.at(k)? != ':' {
                    return None;
                }
                let (when, end) = self.number_tail(k + 1)?;
                let node = Node::Edit { before: Some(first), after: second, when };
                Some((vec![Item::Node(Rc::new(node))], end))
            }
            _ => None,
        }
    }

    /// `whitespace? NUMBER whitespace? ]` from `i` (lark's SIGNED_NUMBER, ASCII digits): the number and the end.
    fn number_tail(&self, mut i: usize) -> Option<(When, usize)> {
        while self.at(i).is_some_and(is_space) {
            i += 1;
        }
        let start = i;
        let digits = |mut k: usize| {
            while self.at(k).is_some_and(|c| c.is_ascii_digit()) {
                k += 1;
            }
            k
        };
        let exponent = |k: usize| -> Option<usize> {
            if !matches!(self.at(k), Some('e' | 'E')) {
                return None;
            }
            let mut m = k + 1;
            if matches!(self.at(m), Some('+' | '-')) {
                m += 1;
            }
            let end = digits(m);
            (end > m).then_some(end)
        };
        if matches!(self.at(i), Some('+' | '-')) {
            i += 1;
        }
        let int_end = digits(i);
        let end = if int_end > i {
            if let Some(e) = exponent(int_end) {
                e
            } else if self.at(int_end) == Some('.') {
                let frac_end = digits(int_end + 1);
                exponent(frac_end).unwrap_or(frac_end)
            } else {
                int_end
            }
        } else if self.at(i) == Some('.') && digits(i + 1) > i + 1 {
            let frac_end = digits(i + 1);
            exponent(frac_end).unwrap_or(frac_end)
        } else {
            return None;
        };
        let number: String = self.s[start..end].iter().collect();
        let mut k = end;
        while self.at(k).is_some_and(is_space) {
            k += 1;
        }
        (self.at(k)? == ']').then_some((When::new(&number), k + 1))
    }
}

/// Marks the `(` and `[` that have a closer of their kind with balanced brackets between (escapes skipped). A
/// construct's content must be balanced, so no other bracket can start one; a stray closer spoils every bracket
/// still open around it.
fn matched_openers(s: &[char]) -> Vec<bool> {
    let mut matched = vec![false; s.len()];
    let mut open: Vec<(char, usize)> = Vec::new();
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            '\\' => i += 1,
            c @ ('(' | '[') => open.push((c, i)),
            c @ (')' | ']') => {
                let opener = if c == ')' { '(' } else { '[' };
                match open.last() {
                    Some(&(o, at)) if o == opener => {
                        matched[at] = true;
                        open.pop();
                    }
                    _ => open.clear(),
                }
            }
            _ => {}
        }
        i += 1;
    }
    matched
}

/// An edit's number, read once: its value and whether it has a decimal point.
#[derive(Debug, Clone, Copy)]
struct When {
    value: f64,
    fraction: bool,
}

impl When {
    fn new(number: &str) -> Self {
        Self { value: number.parse().unwrap_or(0.0), fraction: number.contains('.') }
    }

    /// A1111's switch step: with a decimal point a fraction of `steps`, else a step number; capped at `steps`,
    /// truncated towards zero (Python fails on an infinite value; we saturate).
    fn step(self, steps: usize) -> i64 {
        let v = if self.fraction { self.value * steps as f64 } else { self.value };
        if v.is_nan() {
            return 0;
        }
        (v.trunc().clamp(i64::MIN as f64, i64::MAX as f64) as i64).min(steps as i64)
    }
}

fn text_at(s: &[char], items: &[Item], step: usize, steps: usize) -> String {
    let mut out = String::new();
    append_at(s, items, step, steps, &mut out);
    out
}

fn append_at(s: &[char], items: &[Item], step: usize, steps: usize, out: &mut String) {
    for item in items {
        match item {
            Item::Text(a, b) => out.extend(&s[*a..*b]),
            Item::Node(node) => match node.as_ref() {
                Node::Edit { before, after, when } => {
                    if (step as i64) <= when.step(steps) {
                        if let Some(before) = before {
                            append_at(s, before, step, steps, out);
                        }
                    } else {
                        append_at(s, after, step, steps, out);
                    }
                }
                Node::Alternate(options) => append_at(s, &options[(step - 1) % options.len()], step, steps, out),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(prompt: &str) -> Vec<(usize, String)> {
        schedule(prompt, 10).entries.into_iter().map(|e| (e.until, e.text)).collect()
    }

    fn v(items: &[(usize, &str)]) -> Vec<(usize, String)> {
        items.iter().map(|(t, s)| (*t, s.to_string())).collect()
    }

    /// A1111's own doctests of `get_learned_conditioning_prompt_schedules` (10 steps).
    #[test]
    fn a1111_documented_examples() {
        assert_eq!(g("test"), v(&[(10, "test")]));
        assert_eq!(g("a [b:3]"), v(&[(3, "a "), (10, "a b")]));
        assert_eq!(g("a [b: 3]"), v(&[(3, "a "), (10, "a b")]));
        assert_eq!(g("a [[[b]]:2]"), v(&[(2, "a "), (10, "a [[b]]")]));
        assert_eq!(g("[(a:2):3]"), v(&[(3, ""), (10, "(a:2)")]));
        assert_eq!(g("a [b : c : 1] d"), v(&[(1, "a b  d"), (10, "a  c  d")]));
        assert_eq!(g("a[b:[c:d:2]:1]e"), v(&[(1, "abe"), (2, "ace"), (10, "ade")]));
        assert_eq!(g("a [unbalanced"), v(&[(10, "a [unbalanced")]));
        assert_eq!(g("a [b:.5] c"), v(&[(5, "a  c"), (10, "a b c")]));
        // A1111's doctest for this one is marked "not handling this right now" and is stale: A1111 reads it
        // literally (the `|` is in no valid alternation).
        assert_eq!(g("a [{b|d{:.5] c"), v(&[(10, "a [{b|d{:.5] c")]));
        assert_eq!(g("((a][:b:c [d:3]"), v(&[(3, "((a][:b:c "), (10, "((a][:b:c d")]));
        let alternating: Vec<(usize, &str)> = (1..=10).map(|t| (t, if t % 2 == 1 { "a" } else { "(b:1.1)" })).collect();
        assert_eq!(g("[a|(b:1.1)]"), v(&alternating));
        let fe: Vec<(usize, &str)> = (1..=10).map(|t| (t, if t % 2 == 1 { "female" } else { "male" })).collect();
        assert_eq!(g("[fe|]male"), v(&fe));
        let fe3: Vec<(usize, &str)> = (1..=10).map(|t| (t, if t % 4 == 1 { "female" } else { "male" })).collect();
        assert_eq!(g("[fe|||]male"), v(&fe3));
    }

    #[test]
    fn literal_when_the_grammar_fails_or_the_colon_has_no_number() {
        assert_eq!(g("[bad : wrong]"), v(&[(10, "[bad : wrong]")]));
        let s = schedule("a | b [c:d:5]", 10);
        assert!(s.literal);
        assert_eq!(s.entries, vec![ScheduledText { until: 10, text: "a | b [c:d:5]".into() }]);
        assert!(schedule("trailing \\", 10).literal);
        assert!(!schedule("escaped \\[a:b:3\\]", 10).literal);
        assert_eq!(g("escaped \\[a:b:3\\]"), v(&[(10, "escaped \\[a:b:3\\]")]));
    }

    #[test]
    fn when_numbers() {
        // A decimal point means a fraction of the steps; integers are steps; below 1 never switches.
        assert_eq!(g("[a:b:1.5]"), v(&[(10, "a")]));
        assert_eq!(g("[a:b:1e1]"), v(&[(10, "a")]));
        assert_eq!(g("[a:b:0]"), v(&[(10, "b")]));
        assert_eq!(g("[a:b:-3]"), v(&[(10, "b")]));
        assert_eq!(g("[a:b:0.29 ]"), v(&[(2, "a"), (10, "b")]));
        assert_eq!(g("[a:b:1e999]"), v(&[(10, "a")]));
        assert_eq!(schedule("[a:b:0.29]", 100).entries[0].until, 28, "0.29 × 100 truncates like Python");
    }

    #[test]
    fn entry_lookup_follows_a1111() {
        let s = schedule("[a:b:3]", 10);
        let at = |i| s.entries[entry_at(&s.entries, |e| e.until, i)].text.clone();
        assert_eq!((0..=4).map(at).collect::<Vec<_>>(), vec!["a", "a", "a", "a", "b"]);
    }

    #[test]
    fn deep_nesting_is_literal_and_unclosed_brackets_are_cheap() {
        let deep = format!("{}x{}", "(".repeat(100_000), ")".repeat(100_000));
        assert!(schedule(&deep, 10).literal);
        let unclosed = format!("{}[a:b:3]", "( word ".repeat(20_000));
        let s = schedule(&unclosed, 10);
        assert!(!s.literal);
        assert_eq!(s.entries.len(), 2);
        let stray = format!("{}[a:b:3]", "[ word ) ".repeat(20_000));
        assert_eq!(schedule(&stray, 10).entries.len(), 2);
    }

    /// `n` edits `[wN:xN:N]` switching at steps 1 … n, in a text about `n · 40` characters long.
    fn edits(n: usize) -> String {
        (1..=n).map(|k| format!("a long enough phrase number {k}, [w{k}:x{k}:{k}] ")).collect()
    }

    #[test]
    fn distinct_schedule_is_the_schedule_with_each_text_once() {
        for prompt in ["a [b:c:3] [d|e] f", "[a|b|c] [d|e]", "[x:[p|q]:4] y", "a | b [c:d:5]", "plain", ""] {
            for steps in [1, 4, 10, 13] {
                let full = schedule(prompt, steps);
                let distinct = schedule_distinct(prompt, steps, usize::MAX).unwrap();
                let unique: BTreeSet<&str> = full.entries.iter().map(|e| e.text.as_str()).collect();
                assert_eq!(distinct.texts.len(), unique.len(), "{prompt:?} × {steps}");
                assert_eq!(distinct.clone().into_schedule(), full, "{prompt:?} × {steps}");
            }
        }
    }

    #[test]
    fn scheduling_work_is_linear_in_the_edits() {
        // An alternation makes every step an entry, but only two texts: each is built once (building every step's
        // text, as before, wrote 100 × the prompt).
        let prompt = format!("{} [cat|dog]", "a painting of a lighthouse, ".repeat(100));
        let read = schedule_distinct(&prompt, 100, usize::MAX).unwrap();
        assert_eq!((read.entries.len(), read.texts.len()), (100, 2));
        assert!(
            read.work <= 2 * prompt.len(),
            "{} characters written for a {}-character prompt",
            read.work,
            prompt.len()
        );

        // n edits at n different steps are n + 1 texts; with a limit on the texts, building stops past it, so twice
        // the edits (twice the prompt) cost twice the work, not four times (n + 1 texts of a length ∝ n).
        let work = |n: usize| {
            let prompt = edits(n);
            let refused = schedule_distinct(&prompt, 100, 16).unwrap_err();
            assert_eq!(refused.limit, 16);
            assert!(refused.work <= 17 * prompt.len());
            refused.work
        };
        let (w50, w100) = (work(50), work(100));
        assert!(w100 * 10 <= w50 * 21, "work {w50} for 50 edits, {w100} for 100");
        // Within the limit everything is built once.
        let prompt = edits(10);
        let read = schedule_distinct(&prompt, 100, 16).unwrap();
        assert_eq!(read.texts.len(), 11);
        assert!(read.work <= 11 * prompt.len());
    }
}
