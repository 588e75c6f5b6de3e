//! Python's notions of whitespace, word characters and decimal digits, which A1111's regular expressions (`\s`,
//! `\b`, `\d`) and `float()` use on prompts.

/// Python's `str.isspace()` (what `\s` matches): Unicode whitespace plus the information separators U+001C–U+001F.
pub fn is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// A word character for `\b` (Python's `\w`: alphanumeric or `_`).
pub fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The zero of every Unicode decimal-digit block (category Nd, Unicode 14): each is followed by 1…9.
const DIGIT_ZEROS: [u32; 66] = [
    0x30, 0x660, 0x6F0, 0x7C0, 0x966, 0x9E6, 0xA66, 0xAE6, 0xB66, 0xBE6, 0xC66, 0xCE6, 0xD66, 0xDE6, 0xE50, 0xED0,
    0xF20, 0x1040, 0x1090, 0x17E0, 0x1810, 0x1946, 0x19D0, 0x1A80, 0x1A90, 0x1B50, 0x1BB0, 0x1C40, 0x1C50, 0xA620,
    0xA8D0, 0xA900, 0xA9D0, 0xA9F0, 0xAA50, 0xABF0, 0xFF10, 0x104A0, 0x10D30, 0x11066, 0x110F0, 0x11136, 0x111D0,
    0x112F0, 0x11450, 0x114D0, 0x11650, 0x116C0, 0x11730, 0x118E0, 0x11950, 0x11C50, 0x11D50, 0x11DA0, 0x16A60,
    0x16AC0, 0x16B50, 0x1D7CE, 0x1D7D8, 0x1D7E2, 0x1D7EC, 0x1D7F6, 0x1E140, 0x1E2F0, 0x1E950, 0x1FBF0,
];

/// The value of a decimal digit in any script (Python's `\d` and `float()` accept them all).
pub fn decimal_digit(c: char) -> Option<u32> {
    let code = c as u32;
    let zero = match DIGIT_ZEROS.binary_search(&code) {
        Ok(i) => DIGIT_ZEROS[i],
        Err(0) => return None,
        Err(i) => DIGIT_ZEROS[i - 1],
    };
    (code - zero < 10).then_some(code - zero)
}

/// Python's `float()` of a string made of an optional sign, decimal digits (any script) and dots; `None` where
/// Python raises (`"."`, `"1.2.3"`).
pub fn parse_float(text: &str) -> Option<f64> {
    let ascii: String = text
        .chars()
        .map(|c| match decimal_digit(c) {
            Some(d) => char::from_digit(d, 10).unwrap_or(c),
            None => c,
        })
        .collect();
    if ascii.chars().filter(|&c| c == '.').count() > 1 || !ascii.chars().any(|c| c.is_ascii_digit()) {
        return None;
    }
    ascii.parse::<f64>().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_whitespace_and_digits() {
        assert!(is_space(' ') && is_space('\u{3000}') && is_space('\u{1c}') && !is_space('a'));
        assert_eq!(decimal_digit('7'), Some(7));
        assert_eq!(decimal_digit('３'), Some(3));
        assert_eq!(decimal_digit('٣'), Some(3));
        assert_eq!(decimal_digit('a'), None);
        assert_eq!(decimal_digit('\u{2f}'), None);
        assert_eq!(parse_float("1.25"), Some(1.25));
        assert_eq!(parse_float("+.5"), Some(0.5));
        assert_eq!(parse_float("-5."), Some(-5.0));
        assert_eq!(parse_float("１.５"), Some(1.5));
        assert_eq!(parse_float("."), None);
        assert_eq!(parse_float("1.2.3"), None);
        assert_eq!(parse_float("+"), None);
    }
}
