//! Text a stranger chose (a TFTP file name, a boot event, a username), made safe for a log line
//! or the event log: control characters escaped, so no one can start a forged line or hide text
//! behind terminal escapes.

use std::borrow::Cow;

/// `text` with every control character (newlines and escapes included) written as `\u{..}`;
/// borrowed when there is none.
pub fn escape_control(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            escaped.extend(c.escape_unicode());
        } else {
            escaped.push(c);
        }
    }
    Cow::Owned(escaped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_plain_text_is_borrowed() {
        assert!(matches!(escape_control("pxelinux.0"), Cow::Borrowed("pxelinux.0")));
        assert_eq!(escape_control("a\nb"), "a\\u{a}b");
        assert_eq!(escape_control("\u{1b}[31mred"), "\\u{1b}[31mred");
        assert_eq!(escape_control("tab\there é"), "tab\\u{9}here é");
    }
}
