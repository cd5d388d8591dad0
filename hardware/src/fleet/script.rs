//! The part of iPXE's script language the rack's scripts use (`appliance/src/pxe/ipxe.rs`):
//! `echo`, `imgfetch [--name NAME] URL [ARGS...] [|| goto LABEL | ||]`, `boot NAME`, `sleep N`,
//! `chain URL`, `exit N`, `goto LABEL`, `:LABEL`. A script is run step by step by the machine
//! ([`Step`] says what to do next), so fetching stays with the caller.

/// Lines of one script, at most: the rack's are under 20.
pub const SCRIPT_LINES_MAX: usize = 256;
/// Steps run in one script before it counts as looping.
const STEPS_MAX: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScriptError {
    #[error("the script does not start with #!ipxe")]
    NotIpxe,
    #[error("the script has over {SCRIPT_LINES_MAX} lines")]
    TooLong,
    #[error("line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error("the script ran {STEPS_MAX} steps without ending")]
    Loops,
}

/// One fetch the script asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetch {
    /// `--name`, if given (`kernel`, `initrd`).
    pub name: Option<String>,
    pub url: String,
    /// Words after the URL: the kernel's command line for `--name kernel`.
    pub args: String,
}

/// What the machine does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Fetch; then call [`Script::fetched`] with whether it worked.
    Fetch(Fetch),
    Sleep(u64),
    /// Boot the image fetched under this name.
    Boot(String),
    /// Fetch this script and run it instead.
    Chain(String),
    /// iPXE exits: the firmware tries its next boot device (the local disk).
    Exit,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Command {
    Nothing,
    Fetch { fetch: Fetch, on_failure: OnFailure },
    Sleep(u64),
    Boot(String),
    Chain(String),
    Exit,
    Goto(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum OnFailure {
    /// No `||`: a failed command ends the script (iPXE's default).
    Abort,
    /// `||` alone: go on.
    Continue,
    Goto(String),
}

/// A parsed script and where it is.
#[derive(Debug)]
pub struct Script {
    commands: Vec<Command>,
    labels: Vec<(String, usize)>,
    next: usize,
    steps: usize,
    /// The fetch in flight and what its failure does.
    pending: Option<OnFailure>,
}

impl Script {
    pub fn parse(text: &str) -> Result<Script, ScriptError> {
        let mut lines = text.lines();
        if lines.next().map(str::trim) != Some("#!ipxe") {
            return Err(ScriptError::NotIpxe);
        }
        let mut commands = Vec::new();
        let mut labels = Vec::new();
        for (index, line) in lines.enumerate() {
            if index >= SCRIPT_LINES_MAX {
                return Err(ScriptError::TooLong);
            }
            let line_number = index + 2;
            let error = |reason: &str| ScriptError::Line { line: line_number, reason: reason.to_string() };
            let line = line.trim();
            if let Some(label) = line.strip_prefix(':') {
                labels.push((label.trim().to_string(), commands.len()));
                continue;
            }
            let (body, on_failure) = match line.split_once("||") {
                None => (line, OnFailure::Abort),
                Some((body, rest)) => match rest.trim().strip_prefix("goto ") {
                    Some(label) => (body.trim(), OnFailure::Goto(label.trim().to_string())),
                    None if rest.trim().is_empty() => (body.trim(), OnFailure::Continue),
                    None => return Err(error("only `|| goto LABEL` and a bare `||` are understood")),
                },
            };
            let mut words = body.split_whitespace();
            let command = match words.next() {
                None | Some("echo") | Some("#") => Command::Nothing,
                Some(word) if word.starts_with('#') => Command::Nothing,
                Some("imgfetch" | "kernel" | "initrd" | "module") => {
                    let mut name = None;
                    let mut word = words.next().ok_or_else(|| error("imgfetch without a URL"))?;
                    if word == "--name" || word == "-n" {
                        name = Some(words.next().ok_or_else(|| error("--name without a name"))?.to_string());
                        word = words.next().ok_or_else(|| error("imgfetch without a URL"))?;
                    }
                    let args = words.collect::<Vec<_>>().join(" ");
                    Command::Fetch { fetch: Fetch { name, url: word.to_string(), args }, on_failure }
                }
                Some("boot") => Command::Boot(words.next().unwrap_or_default().to_string()),
                Some("sleep") => Command::Sleep(
                    words.next().and_then(|s| s.parse().ok()).ok_or_else(|| error("sleep without seconds"))?,
                ),
                Some("chain") => Command::Chain(words.next().ok_or_else(|| error("chain without a URL"))?.to_string()),
                Some("exit") => Command::Exit,
                Some("goto") => Command::Goto(words.next().ok_or_else(|| error("goto without a label"))?.to_string()),
                Some(other) => return Err(error(&format!("unknown command {other:?}"))),
            };
            commands.push(command);
        }
        Ok(Script { commands, labels, next: 0, steps: 0, pending: None })
    }

    fn jump(&mut self, label: &str) -> Result<(), ScriptError> {
        let target = self.labels.iter().find(|(name, _)| name == label).map(|(_, at)| *at);
        self.next = target.ok_or_else(|| ScriptError::Line { line: 0, reason: format!("no label {label:?}") })?;
        Ok(())
    }

    /// The next step; `None` when the script ended without booting (iPXE then fails the boot).
    pub fn next_step(&mut self) -> Result<Option<Step>, ScriptError> {
        loop {
            self.steps += 1;
            if self.steps > STEPS_MAX {
                return Err(ScriptError::Loops);
            }
            let Some(command) = self.commands.get(self.next).cloned() else { return Ok(None) };
            self.next += 1;
            match command {
                Command::Nothing => {}
                Command::Goto(label) => self.jump(&label)?,
                Command::Fetch { fetch, on_failure } => {
                    self.pending = Some(on_failure);
                    return Ok(Some(Step::Fetch(fetch)));
                }
                Command::Sleep(seconds) => return Ok(Some(Step::Sleep(seconds))),
                Command::Boot(name) => return Ok(Some(Step::Boot(name))),
                Command::Chain(url) => return Ok(Some(Step::Chain(url))),
                Command::Exit => return Ok(Some(Step::Exit)),
            }
        }
    }

    /// The outcome of the last [`Step::Fetch`]: `false` follows its `||`, or ends the script.
    pub fn fetched(&mut self, ok: bool) -> Result<(), ScriptError> {
        match (ok, self.pending.take()) {
            (true, _) | (false, Some(OnFailure::Continue)) => Ok(()),
            (false, Some(OnFailure::Goto(label))) => self.jump(&label),
            (false, Some(OnFailure::Abort) | None) => {
                self.next = self.commands.len();
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The deploy environment's script as `appliance/src/pxe/ipxe.rs` writes it.
    const AGENT: &str = "#!ipxe\n\
        echo Metalrack: 52:54:00:aa:bb:01 runs the deploy environment: Deploy\n\
        imgfetch --name kernel http://10.0.0.1:5248/images/metalrack/deploy-env/amd64/1/kernel BOOTIF=01-52-54-00-aa-bb-01 metalrack.rack=http://10.0.0.1:5248 metalrack.mac=52:54:00:aa:bb:01 metalrack.token=abc console=ttyS0 || goto failed\n\
        imgfetch --name initrd http://10.0.0.1:5248/images/metalrack/deploy-env/amd64/1/initrd || goto failed\n\
        imgfetch http://10.0.0.1:5248/callback/52-54-00-aa-bb-01?event=loaded ||\n\
        boot kernel\n\
        :failed\n\
        imgfetch http://10.0.0.1:5248/callback/52-54-00-aa-bb-01?event=failed ||\n\
        echo Metalrack: could not load the deploy environment; retrying in 10 s\n\
        sleep 10\n\
        chain http://10.0.0.1:5248/ipxe/52-54-00-aa-bb-01\n";

    fn fetch_url(step: Option<Step>) -> String {
        match step {
            Some(Step::Fetch(fetch)) => fetch.url,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_agent_script_fetches_kernel_initrd_and_callback_then_boots() {
        let mut script = Script::parse(AGENT).unwrap();
        let Some(Step::Fetch(kernel)) = script.next_step().unwrap() else { panic!() };
        assert_eq!(kernel.name.as_deref(), Some("kernel"));
        assert!(kernel.args.starts_with("BOOTIF=01-52-54-00-aa-bb-01 metalrack.rack=http://10.0.0.1:5248"));
        assert!(kernel.args.ends_with("metalrack.token=abc console=ttyS0"), "{}", kernel.args);
        script.fetched(true).unwrap();
        assert!(fetch_url(script.next_step().unwrap()).ends_with("/initrd"));
        script.fetched(true).unwrap();
        assert!(fetch_url(script.next_step().unwrap()).ends_with("event=loaded"));
        script.fetched(false).unwrap();
        assert_eq!(script.next_step().unwrap(), Some(Step::Boot("kernel".into())));
    }

    #[test]
    fn a_failed_kernel_fetch_goes_to_the_failure_label_and_chains_again() {
        let mut script = Script::parse(AGENT).unwrap();
        script.next_step().unwrap();
        script.fetched(false).unwrap();
        assert!(fetch_url(script.next_step().unwrap()).ends_with("event=failed"));
        script.fetched(true).unwrap();
        assert_eq!(script.next_step().unwrap(), Some(Step::Sleep(10)));
        assert!(
            matches!(script.next_step().unwrap(), Some(Step::Chain(url)) if url.ends_with("/ipxe/52-54-00-aa-bb-01"))
        );
    }

    #[test]
    fn the_local_boot_script_exits_after_its_callback() {
        let local = "#!ipxe\necho Metalrack: m boots from its local disk\nimgfetch http://10.0.0.1:5248/callback/m?event=local ||\nexit 1\n";
        let mut script = Script::parse(local).unwrap();
        assert!(fetch_url(script.next_step().unwrap()).ends_with("event=local"));
        script.fetched(false).unwrap();
        assert_eq!(script.next_step().unwrap(), Some(Step::Exit));
    }

    #[test]
    fn bad_scripts_are_refused_and_loops_end() {
        assert_eq!(Script::parse("echo hi\n").unwrap_err(), ScriptError::NotIpxe);
        assert!(matches!(Script::parse("#!ipxe\nformat disk\n"), Err(ScriptError::Line { line: 2, .. })));
        let long = format!("#!ipxe\n{}", "echo x\n".repeat(SCRIPT_LINES_MAX + 1));
        assert_eq!(Script::parse(&long).unwrap_err(), ScriptError::TooLong);
        let mut looping = Script::parse("#!ipxe\n:top\ngoto top\n").unwrap();
        assert_eq!(looping.next_step().unwrap_err(), ScriptError::Loops);
        let mut no_label = Script::parse("#!ipxe\ngoto nowhere\n").unwrap();
        assert!(no_label.next_step().is_err());
    }
}
