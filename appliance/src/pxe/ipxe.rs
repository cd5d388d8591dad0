//! Per-MAC iPXE scripts, rendered from the rack's local boot table (no region needed).

use metalrack_api::agent::{DeployEnv, CMDLINE_MAC, CMDLINE_RACK, CMDLINE_TOKEN};
use metalrack_api::machines::{BootAction, MachineBoot};

/// The script for `mac` (lower-case, colon-separated). Every script ends by fetching a
/// callback URL, so the rack knows the machine got that far.
pub fn script(base_url: &str, mac: &str, machine: Option<&MachineBoot>, deploy_env: Option<&DeployEnv>) -> String {
    let dashed = mac.replace(':', "-");
    let callback = |event: &str| format!("{base_url}/callback/{dashed}?event={event}");
    match (machine.map(|m| &m.boot), deploy_env) {
        (None | Some(BootAction::Enlist), Some(env)) => {
            agent_script(base_url, mac, env, "", "enlist", &callback("loaded"), &callback("failed"))
        }
        (None | Some(BootAction::Enlist), None) => format!(
            "#!ipxe\n\
             echo Metalrack: {mac} is not known here yet: enlisting\n\
             imgfetch {} ||\n\
             echo Enlistment is recorded; waiting for an operator. Retrying in 30 s\n\
             sleep 30\n\
             chain {base_url}/ipxe/{dashed}\n",
            callback("enlist")
        ),
        (Some(BootAction::Local), _) => local_script(base_url, mac),
        (Some(BootAction::Agent { env, token, job, .. }), _) => {
            agent_script(base_url, mac, env, token, &format!("{job:?}"), &callback("loaded"), &callback("failed"))
        }
        (Some(BootAction::Image { image, arch, version, kernel_params }), _) => {
            let files = format!("{base_url}/images/{image}/{arch}/{version}");
            let params = if kernel_params.is_empty() { String::new() } else { format!(" {kernel_params}") };
            format!(
                "#!ipxe\n\
                 echo Metalrack: {mac} boots {image} {arch} {version}\n\
                 imgfetch --name kernel {files}/kernel BOOTIF=01-{dashed}{params} || goto failed\n\
                 imgfetch --name initrd {files}/initrd || goto failed\n\
                 imgfetch {} ||\n\
                 boot kernel\n\
                 :failed\n\
                 imgfetch {} ||\n\
                 echo Metalrack: could not load {image} {version}; retrying in 10 s\n\
                 sleep 10\n\
                 chain {base_url}/ipxe/{dashed}\n",
                callback("loaded"),
                callback("failed")
            )
        }
    }
}

/// Boot from the local disk: iPXE exits and the firmware tries its next boot device.
pub fn local_script(base_url: &str, mac: &str) -> String {
    let dashed = mac.replace(':', "-");
    format!(
        "#!ipxe\n\
         echo Metalrack: {mac} boots from its local disk\n\
         imgfetch {base_url}/callback/{dashed}?event=local ||\n\
         exit 1\n"
    )
}

/// Boots the deploy environment with the agent's parameters on the kernel command line.
fn agent_script(
    base_url: &str,
    mac: &str,
    env: &DeployEnv,
    token: &str,
    what: &str,
    loaded: &str,
    failed: &str,
) -> String {
    let dashed = mac.replace(':', "-");
    let (image, arch, version) = (&env.image.image, &env.image.arch, &env.image.version);
    let files = format!("{base_url}/images/{image}/{arch}/{version}");
    let params = if env.kernel_params.is_empty() { String::new() } else { format!(" {}", env.kernel_params) };
    let token = if token.is_empty() { String::new() } else { format!(" {CMDLINE_TOKEN}={token}") };
    format!(
        "#!ipxe\n\
         echo Metalrack: {mac} runs the deploy environment: {what}\n\
         imgfetch --name kernel {files}/kernel BOOTIF=01-{dashed} {CMDLINE_RACK}={base_url} {CMDLINE_MAC}={mac}{token}{params} || goto failed\n\
         imgfetch --name initrd {files}/initrd || goto failed\n\
         imgfetch {loaded} ||\n\
         boot kernel\n\
         :failed\n\
         imgfetch {failed} ||\n\
         echo Metalrack: could not load the deploy environment; retrying in 10 s\n\
         sleep 10\n\
         chain {base_url}/ipxe/{dashed}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_by_boot_action() {
        let base = "http://10.99.0.1:5248";
        let enlist = script(base, "52:54:00:aa:bb:01", None, None);
        assert!(enlist.starts_with("#!ipxe\n") && enlist.contains("/callback/52-54-00-aa-bb-01?event=enlist"));
        let machine = MachineBoot {
            mac: "52:54:00:aa:bb:01".into(),
            hostname: "n1".into(),
            boot: BootAction::Image {
                image: "ubuntu/noble".into(),
                arch: "amd64".into(),
                version: "1".into(),
                kernel_params: "console=ttyS0".into(),
            },
        };
        let boot = script(base, &machine.mac, Some(&machine), None);
        assert!(boot.contains("imgfetch --name kernel http://10.99.0.1:5248/images/ubuntu/noble/amd64/1/kernel BOOTIF=01-52-54-00-aa-bb-01 console=ttyS0"));
        assert!(boot.contains("images/ubuntu/noble/amd64/1/initrd"));
        assert!(boot.find("event=loaded").unwrap() < boot.find("boot kernel").unwrap());
        let local = script(base, &machine.mac, Some(&MachineBoot { boot: BootAction::Local, ..machine.clone() }), None);
        assert!(local.contains("event=local") && local.contains("exit"));
    }
}
