//! Text for messages about data that may be hostile (read from a store, written by a
//! guest): bounded, without control characters, in words rather than debug dumps.

/// `s` for a message: control characters replaced and at most 64 characters, since the
/// text may come from a damaged or forged template.
pub fn shown(s: &str) -> String {
    const MAX: usize = 64;
    let mut out: String = s
        .chars()
        .take(MAX)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if s.chars().nth(MAX).is_some() {
        out.push_str("...");
    }
    out
}

/// A bincode decode error in words (its `Display` is Rust debug text).
pub fn decode_error_text(e: &bincode::error::DecodeError) -> String {
    use bincode::error::DecodeError as E;
    match e {
        E::UnexpectedEnd { additional } => format!("it ends {additional} byte(s) too early"),
        E::LimitExceeded => "it is larger than the size limit".into(),
        E::Utf8 { .. } | E::InvalidCharEncoding(_) => "a text field is not UTF-8".into(),
        E::OutsideUsizeRange(n) => format!("a length of {n} is out of range"),
        _ => "a field holds a value of the wrong type".into(),
    }
}
