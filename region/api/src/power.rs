//! Wire types of power control: how the region tells a rack to drive a machine's BMC, and what
//! the rack answers. The region decides; the rack runs the driver (BMC networks are rack-local).
//!
//! BMC passwords travel only region → rack inside a [`PowerRequest`] (over the rack's pinned
//! TLS), are held by the rack in memory for that request alone, and are never shown back in
//! full: the API shows [`PowerView`].

use serde::{Deserialize, Serialize};

/// Longest BMC address, user name or password, in bytes.
pub const POWER_FIELD_BYTES_MAX: usize = 256;

/// Power requests one long-poll answer carries; more wait for the next poll.
pub const POWER_REQUESTS_PER_POLL_MAX: usize = 256;

/// How to reach a machine's BMC, as the operator set it.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "driver", rename_all = "snake_case", deny_unknown_fields)]
pub enum PowerParameters {
    /// DMTF Redfish over HTTPS (or HTTP for a lab BMC): `ComputerSystem.Reset`,
    /// `PowerState`, `Boot.BootSourceOverrideTarget`.
    Redfish {
        /// `https://HOST[:PORT]` (or `http://` for a lab BMC).
        address: String,
        username: String,
        password: String,
        /// The `Systems/{id}` member to drive; the first member when absent.
        #[serde(default)]
        system_id: Option<String>,
        /// Accept the BMC's own self-signed certificate (most BMCs ship one).
        #[serde(default)]
        trust_self_signed: bool,
    },
    /// IPMI 2.0 over LAN (`ipmitool -I lanplus`).
    Ipmi {
        address: String,
        #[serde(default = "default_ipmi_port")]
        port: u16,
        username: String,
        password: String,
    },
    /// No BMC: the operator is asked to press the button (an event says what to do).
    Manual,
}

fn default_ipmi_port() -> u16 {
    623
}

impl std::fmt::Debug for PowerParameters {
    // The password never reaches a log, even through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.view())
    }
}

impl PowerParameters {
    /// What the API shows: everything but the password.
    pub fn view(&self) -> PowerView {
        match self {
            PowerParameters::Redfish { address, username, system_id, trust_self_signed, .. } => PowerView {
                driver: PowerDriver::Redfish,
                address: Some(address.clone()),
                username: Some(username.clone()),
                password_set: true,
                system_id: system_id.clone(),
                trust_self_signed: *trust_self_signed,
            },
            PowerParameters::Ipmi { address, port, username, .. } => PowerView {
                driver: PowerDriver::Ipmi,
                address: Some(format!("{address}:{port}")),
                username: Some(username.clone()),
                password_set: true,
                system_id: None,
                trust_self_signed: false,
            },
            PowerParameters::Manual => PowerView {
                driver: PowerDriver::Manual,
                address: None,
                username: None,
                password_set: false,
                system_id: None,
                trust_self_signed: false,
            },
        }
    }

    pub fn driver(&self) -> PowerDriver {
        self.view().driver
    }

    /// Checks lengths and forms; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        let check = |field: &str, value: &str| {
            if value.len() > POWER_FIELD_BYTES_MAX {
                return Err(format!("power {field} is longer than {POWER_FIELD_BYTES_MAX} bytes"));
            }
            if value.chars().any(char::is_control) {
                return Err(format!("power {field} holds control characters"));
            }
            Ok(())
        };
        match self {
            PowerParameters::Redfish { address, username, password, system_id, .. } => {
                check("address", address)?;
                check("username", username)?;
                check("password", password)?;
                check("system_id", system_id.as_deref().unwrap_or(""))?;
                if !(address.starts_with("https://") || address.starts_with("http://")) {
                    return Err(format!("a Redfish address is https://HOST[:PORT], not {address:?}"));
                }
                if let Some(id) = system_id {
                    if id.is_empty() || id.contains(['/', '?', '#']) {
                        return Err(format!("a Redfish system id is one path segment, not {id:?}"));
                    }
                }
                Ok(())
            }
            PowerParameters::Ipmi { address, username, password, .. } => {
                check("address", address)?;
                check("username", username)?;
                check("password", password)?;
                if address.is_empty() || address.starts_with('-') || address.contains(char::is_whitespace) {
                    return Err(format!("an IPMI address is a host name or IP address, not {address:?}"));
                }
                Ok(())
            }
            PowerParameters::Manual => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum PowerDriver {
    Redfish,
    Ipmi,
    Manual,
}

/// A machine's power settings as the API shows them: no password.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PowerView {
    pub driver: PowerDriver,
    pub address: Option<String>,
    pub username: Option<String>,
    /// A password is stored (it is never shown).
    pub password_set: bool,
    pub system_id: Option<String>,
    pub trust_self_signed: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum PowerState {
    On,
    Off,
    /// Never queried, or the driver cannot tell (manual).
    #[default]
    Unknown,
    /// The last query failed (the reason is in the machine's events).
    Error,
}

/// Where a machine boots next.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum BootDevice {
    /// The network (the rack's PXE).
    Pxe,
    /// The local disk.
    Disk,
}

/// One step of a power request, run in order by the rack.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "action", content = "device", rename_all = "snake_case")]
pub enum PowerAction {
    On,
    /// Hard off (`ForceOff`).
    Off,
    /// Off then on; on when it was off.
    Cycle,
    Query,
    /// The next boot only (`BootSourceOverrideEnabled = Once`).
    SetNextBoot(BootDevice),
}

/// `GET /rack/power` answer: what the region asks this rack to do.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PowerRequest {
    /// The region's id of this request; the result names it.
    pub id: i64,
    pub machine_id: String,
    pub mac: String,
    pub parameters: PowerParameters,
    pub actions: Vec<PowerAction>,
    /// The rack's boot generation (`RackCatalogue::boot_generation`) as of this request: the
    /// change that asked for it is in every catalogue of this generation or newer, so the rack
    /// powers the machine on only once its boot table is that new, and the machine cannot boot
    /// a decision from before the change. 0 (older regions): no wait.
    #[serde(default)]
    pub boot_generation: u64,
}

/// `POST /rack/power` body: what came of one request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PowerResult {
    pub id: i64,
    pub machine_id: String,
    /// The state after the request (from its last `Query`, or what its last action implies).
    pub state: PowerState,
    /// Why it failed (the driver's error chain), if it did; `None` when every action ran.
    #[serde(default)]
    pub error: Option<String>,
}

/// Longest [`PowerResult::error`] in bytes; the rack cuts longer ones.
pub const POWER_ERROR_BYTES_MAX: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_not_in_debug_output_nor_in_the_view() {
        let p = PowerParameters::Redfish {
            address: "https://10.0.0.5".into(),
            username: "admin".into(),
            password: "hunter2-secret".into(),
            system_id: None,
            trust_self_signed: true,
        };
        assert!(!format!("{p:?}").contains("hunter2"));
        assert!(!serde_json::to_string(&p.view()).unwrap().contains("hunter2"));
        assert!(p.view().password_set);
    }

    #[test]
    fn parameters_parse_from_the_operators_json_and_are_checked() {
        let p: PowerParameters =
            serde_json::from_str(r#"{"driver":"ipmi","address":"10.0.0.6","username":"u","password":"p"}"#).unwrap();
        assert_eq!(p.view().address.as_deref(), Some("10.0.0.6:623"));
        p.validate().unwrap();
        let bad =
            PowerParameters::Ipmi { address: "-oProxy".into(), port: 623, username: "u".into(), password: "p".into() };
        assert!(bad.validate().unwrap_err().contains("IPMI address"));
        let bad = PowerParameters::Redfish {
            address: "10.0.0.5".into(),
            username: "u".into(),
            password: "p".into(),
            system_id: None,
            trust_self_signed: false,
        };
        assert!(bad.validate().unwrap_err().contains("https://"));
        assert!(serde_json::from_str::<PowerParameters>(
            r#"{"driver":"ipmi","address":"a","username":"u","password":"p","pasword":"typo"}"#
        )
        .is_err());
    }

    #[test]
    fn actions_json() {
        let json = serde_json::to_string(&[PowerAction::SetNextBoot(BootDevice::Pxe), PowerAction::On]).unwrap();
        assert_eq!(json, r#"[{"action":"set_next_boot","device":"pxe"},{"action":"on"}]"#);
    }
}
