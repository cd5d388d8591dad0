//! One-line error reports: an error and its sources joined, for logs and command-line errors in
//! both daemons and the tools.

/// An error and its sources as one line ("cannot open x: permission denied"), for logs and
/// one-line command-line errors in both daemons.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
