//! The shell commands README.md's "Operator guide" shows, read from the Markdown at test time
//! (so the README cannot drift from the binaries), and their placeholders replaced.
//!
//! Two places hold commands: fenced code blocks (one command per logical line: `\` continues
//! it, `# ...` is a comment) and inline code in the prose that starts with one of the
//! [`PROGRAMS`], where `a | b | c` lists alternatives of the last word (`regiond secret show |
//! set HEX32 | rotate`). Inline code that only names a command a block shows (`rackd serve`) is
//! a reference, not another command.

use std::path::PathBuf;

/// The programs whose inline mentions in the prose are commands.
pub const PROGRAMS: [&str; 3] = ["regiond", "rackd", "imgtool"];

/// The heading the operator guide starts with; the next `## ` heading ends it.
const GUIDE_HEADING: &str = "## Operator guide";

/// One command as the guide shows it, placeholders and all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuideCommand {
    pub text: String,
    /// Line in README.md where it starts (1-based), for messages.
    pub line: usize,
    /// From inline code in the prose rather than from a code block.
    pub inline: bool,
}

/// README.md at the workspace root.
pub fn readme_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../README.md")
}

/// The operator guide's commands, in the order the guide shows them; empty if it has no guide.
pub fn operator_guide_commands(markdown: &str) -> Vec<GuideCommand> {
    let lines: Vec<&str> = markdown.lines().collect();
    let Some(start) = lines.iter().position(|l| l.trim_end() == GUIDE_HEADING) else { return Vec::new() };
    let end = lines[start + 1..].iter().position(|l| l.starts_with("## ")).map_or(lines.len(), |i| start + 1 + i);

    let mut block_commands = Vec::new();
    // Prose, with each line's number, and a marker where a block was (inline code never spans one).
    let mut prose: Vec<(usize, &str)> = Vec::new();
    let mut in_block = false;
    let mut pending: Option<(usize, String)> = None;
    for (index, line) in lines.iter().enumerate().take(end).skip(start + 1) {
        let number = index + 1;
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            prose.push((number, ""));
            continue;
        }
        if !in_block {
            prose.push((number, line));
            continue;
        }
        let code = strip_comment(line).trim_end();
        let (first_line, mut text) = pending.take().unwrap_or((number, String::new()));
        match code.strip_suffix('\\') {
            Some(continued) => {
                text.push_str(continued.trim());
                text.push(' ');
                pending = Some((first_line, text));
            }
            None => {
                text.push_str(code.trim());
                if !text.is_empty() {
                    block_commands.push(GuideCommand { text, line: first_line, inline: false });
                }
            }
        }
    }

    let mut inline_commands = Vec::new();
    for (line, span) in inline_code(&prose) {
        let words: Vec<&str> = span.split_whitespace().collect();
        if words.len() < 2 || !PROGRAMS.contains(&words[0]) {
            continue;
        }
        let is_reference =
            block_commands.iter().any(|c: &GuideCommand| c.text == span || c.text.starts_with(&format!("{span} ")));
        if is_reference {
            continue;
        }
        for text in alternatives(&span) {
            inline_commands.push(GuideCommand { text, line, inline: true });
        }
    }
    let mut commands: Vec<GuideCommand> = block_commands.into_iter().chain(inline_commands).collect();
    commands.sort_by_key(|c| c.line);
    commands
}

/// `line` up to a `#` that starts a shell comment (after whitespace, outside quotes).
fn strip_comment(line: &str) -> &str {
    let mut quote: Option<char> = None;
    let mut after_space = true;
    for (i, c) in line.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            None if c == '#' && after_space => return &line[..i],
            None => {}
        }
        after_space = c.is_whitespace();
    }
    line
}

/// Inline code spans (single backticks) of the prose, whitespace runs made one space, each with
/// the line it starts on.
fn inline_code(prose: &[(usize, &str)]) -> Vec<(usize, String)> {
    let mut spans = Vec::new();
    let mut open: Option<(usize, String)> = None;
    for &(line, text) in prose {
        if text.is_empty() {
            open = None; // a block or a blank line ends a paragraph, and with it any span
            continue;
        }
        for (i, piece) in text.split('`').enumerate() {
            if i > 0 {
                match open.take() {
                    Some((start, code)) => spans.push((start, code.split_whitespace().collect::<Vec<_>>().join(" "))),
                    None => open = Some((line, String::new())),
                }
            }
            if let Some((_, code)) = open.as_mut() {
                code.push_str(piece);
                code.push(' ');
            }
        }
    }
    spans
}

/// `prog sub a | b | c` → `prog sub a`, `prog sub b`, `prog sub c`: each alternative replaces the
/// first part's last word.
fn alternatives(span: &str) -> Vec<String> {
    let mut parts = span.split(" | ");
    let first = parts.next().unwrap_or_default().to_owned();
    let prefix = first.rsplit_once(' ').map_or("", |(prefix, _)| prefix).to_owned();
    std::iter::once(first).chain(parts.map(|alternative| format!("{prefix} {alternative}"))).collect()
}

/// `text` with each placeholder replaced, in order, where it stands as a whole word (not inside
/// a longer name: `U` in `--username U`, not in `URL`).
pub fn substitute(text: &str, replacements: &[(&str, &str)]) -> String {
    let is_word = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    let mut text = text.to_owned();
    for (placeholder, value) in replacements {
        let mut out = String::new();
        let mut copied = 0;
        for (at, _) in text.match_indices(placeholder) {
            let before = text[..at].chars().next_back();
            let after = text[at + placeholder.len()..].chars().next();
            if !is_word(before) && !is_word(after) {
                out.push_str(&text[copied..at]);
                out.push_str(value);
                copied = at + placeholder.len();
            }
        }
        out.push_str(&text[copied..]);
        text = out;
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUIDE: &str = "# Title\n\n```sh\nnot-in-the-guide\n```\n\n## Operator guide\n\n\
        Run `regiond serve --listen A` or `rackd serve`, see `regiond secret show | set HEX | rotate`\n\
        and `imgtool`.\n\n```sh\nregiond serve                 # a comment\nrackd serve\n\
        imgtool push f --url http://R/MAAS \\\n  --api-key KEY   # more\n\
        curl -d '{\"a\":\"#not a comment\"}' x\n```\n\nA span `regiond apikey\n--username U` over two lines.\n\n\
        ## Layout\n\n`regiond createadmin --username ignored`\n";

    #[test]
    fn blocks_and_inline_commands_of_the_guide_only() {
        let commands: Vec<(String, bool)> =
            operator_guide_commands(GUIDE).into_iter().map(|c| (c.text, c.inline)).collect();
        let expected = [
            ("regiond serve --listen A", true),
            ("regiond secret show", true),
            ("regiond secret set HEX", true),
            ("regiond secret rotate", true),
            ("regiond serve", false),
            ("rackd serve", false),
            ("imgtool push f --url http://R/MAAS --api-key KEY", false),
            ("curl -d '{\"a\":\"#not a comment\"}' x", false),
            ("regiond apikey --username U", true),
        ];
        let expected: Vec<(String, bool)> = expected.iter().map(|(t, i)| (t.to_string(), *i)).collect();
        assert_eq!(commands, expected);
    }

    #[test]
    fn no_guide_no_commands() {
        assert!(operator_guide_commands("# Title\n\n```sh\nregiond serve\n```\n").is_empty());
    }

    #[test]
    fn placeholders_are_replaced_as_whole_words_in_order() {
        let text = "regiond createadmin --username U --ssh-key KEY; curl -H \"Bearer KEY\" URL U";
        let replaced = substitute(text, &[("--ssh-key KEY", "--ssh-key 'k'"), ("KEY", "secret"), ("U", "ops")]);
        assert_eq!(replaced, "regiond createadmin --username ops --ssh-key 'k'; curl -H \"Bearer secret\" URL ops");
        assert_eq!(substitute("KEYS KEY_ XKEY KEY", &[("KEY", "k")]), "KEYS KEY_ XKEY k");
    }
}
