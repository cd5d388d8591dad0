//! Running the host tools the lab drives (`ip`, `qemu-system-x86_64`), with errors that name the
//! command line and carry what it printed on stderr.

use std::process::{Command, ExitStatus, Output, Stdio};

/// The most stderr an error keeps. `ip` and QEMU explain a failure in a line or two; a cap keeps a
/// runaway tool from flooding a test log through one error.
pub const STDERR_KEPT_BYTES_MAX: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot start `{command}`")]
    Spawn { command: String, source: std::io::Error },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed { command: String, status: ExitStatus, stderr: String },
}

/// The command line as a person would type it, for error messages.
pub(crate) fn describe(command: &Command) -> String {
    let mut words = vec![command.get_program().to_string_lossy().into_owned()];
    words.extend(command.get_args().map(|arg| arg.to_string_lossy().into_owned()));
    words.join(" ")
}

/// `stderr` as text for an error: trimmed and cut to [`STDERR_KEPT_BYTES_MAX`].
pub(crate) fn stderr_text(stderr: &[u8]) -> String {
    let kept = &stderr[..stderr.len().min(STDERR_KEPT_BYTES_MAX)];
    let mut text = String::from_utf8_lossy(kept).trim().to_string();
    if stderr.len() > STDERR_KEPT_BYTES_MAX {
        text.push_str(" […]");
    }
    if text.is_empty() {
        text.push_str("(nothing on stderr)");
    }
    text
}

/// Runs `command` to completion with no stdin; an error unless it exits with status 0.
pub(crate) fn run(command: &mut Command) -> Result<Output, CommandError> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|source| CommandError::Spawn { command: describe(command), source })?;
    if !output.status.success() {
        return Err(CommandError::Failed {
            command: describe(command),
            status: output.status,
            stderr: stderr_text(&output.stderr),
        });
    }
    Ok(output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_names_command_and_stderr() {
        let error = run(Command::new("sh").args(["-c", "echo broken >&2; exit 3"])).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("`sh -c echo broken >&2; exit 3`"), "{message}");
        assert!(message.contains("broken"), "{message}");
        assert!(message.contains('3'), "{message}");
    }

    #[test]
    fn missing_program_is_a_spawn_error() {
        let error = run(&mut Command::new("/nonexistent/metalrack-no-such-tool")).unwrap_err();
        assert!(matches!(error, CommandError::Spawn { .. }), "{error:?}");
    }

    #[test]
    fn long_stderr_is_cut() {
        let text = stderr_text(&vec![b'x'; STDERR_KEPT_BYTES_MAX * 2]);
        assert!(text.len() < STDERR_KEPT_BYTES_MAX + 16);
        assert!(text.ends_with("[…]"));
    }
}
