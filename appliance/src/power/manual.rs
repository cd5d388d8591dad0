//! The manual "driver" for machines without a BMC: every action is a warning that asks the
//! operator to press the button; the state is never known.

use metalrack_api::power::{BootDevice, PowerState};

use super::PowerControl;

/// Asks the operator, through the log, to do what a BMC would.
#[derive(Debug, Clone)]
pub struct ManualDriver {
    machine_id: String,
    mac: String,
}

/// Nothing can fail: there is nothing to call.
#[derive(Debug, thiserror::Error)]
#[error("the manual power driver cannot fail")]
pub enum ManualError {}

impl ManualDriver {
    pub fn new(machine_id: &str, mac: &str) -> ManualDriver {
        ManualDriver { machine_id: machine_id.to_string(), mac: mac.to_string() }
    }

    fn ask(&self, what: &str) {
        tracing::warn!(machine_id = %self.machine_id, mac = %self.mac, "manual power: the operator must {what}");
    }
}

impl PowerControl for ManualDriver {
    type Error = ManualError;
    const CONFIRMS_POWER: bool = false;

    async fn power_on(&self) -> Result<(), ManualError> {
        self.ask("power the machine on");
        Ok(())
    }

    async fn power_off(&self) -> Result<(), ManualError> {
        self.ask("power the machine off");
        Ok(())
    }

    async fn power_cycle(&self) -> Result<(), ManualError> {
        self.ask("power the machine off and on again (or on, if it is off)");
        Ok(())
    }

    async fn query(&self) -> Result<PowerState, ManualError> {
        Ok(PowerState::Unknown)
    }

    async fn set_next_boot(&self, device: BootDevice) -> Result<(), ManualError> {
        let what = match device {
            BootDevice::Pxe => "set the machine to boot from the network next (its firmware's boot menu)",
            BootDevice::Disk => "set the machine to boot from its disk next (its firmware's boot menu)",
        };
        self.ask(what);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use metalrack_api::power::{PowerAction, PowerParameters, PowerRequest};

    use super::super::run;
    use super::*;

    #[tokio::test]
    async fn a_manual_request_succeeds_with_an_unknown_state() {
        let request = PowerRequest {
            boot_generation: 0,
            id: 1,
            machine_id: "m1".into(),
            mac: "52:54:00:00:00:01".into(),
            parameters: PowerParameters::Manual,
            actions: vec![PowerAction::SetNextBoot(BootDevice::Pxe), PowerAction::Cycle, PowerAction::Query],
        };
        let result = run(&request).await;
        assert_eq!(result.error, None);
        assert_eq!(result.state, PowerState::Unknown);
        let on_only = PowerRequest { actions: vec![PowerAction::On], ..request };
        assert_eq!(run(&on_only).await.state, PowerState::Unknown, "an operator asked is not a machine on");
    }
}
