//! Machines: each machine's boot decision by MAC (set by operators, served to racks with the
//! catalogue so boots never ask the region) and the boot events racks report.

pub mod store;

use metalrack_api::images::{validate_image_name, validate_image_token};
use metalrack_api::machines::{
    normalize_mac, BootAction, BootEvent, MachineBoot, MachineUpdate, BOOT_EVENTS_PER_REQUEST_MAX,
};

use metalrack_image_tools::log_safe::escape_control;

use crate::db::StoreError;
use crate::state::Shared;
use crate::users::User;

/// Longest hostname, kernel command line or boot event message accepted.
pub const TEXT_LEN_MAX: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum MachinesError {
    #[error("only administrators may change machines")]
    NotAdmin,
    #[error("{reason}")]
    InvalidMac { reason: String },
    #[error("hostname too long")]
    HostnameTooLong,
    #[error("{reason}")]
    InvalidImage { reason: String },
    #[error("kernel_params must be one line of at most {TEXT_LEN_MAX} characters")]
    InvalidKernelParams,
    #[error("at most {BOOT_EVENTS_PER_REQUEST_MAX} events per request")]
    TooManyEvents,
    #[error("invalid boot event kind {kind:?}")]
    InvalidEvent { kind: String },
    #[error("cannot {step}")]
    Store { step: &'static str, source: StoreError },
}

fn store_error(step: &'static str) -> impl FnOnce(StoreError) -> MachinesError {
    move |source| MachinesError::Store { step, source }
}

pub async fn list(shared: &Shared) -> Result<Vec<MachineBoot>, MachinesError> {
    shared.store.machines().await.map_err(store_error("list machines"))
}

/// Sets what a machine boots; racks hear of it with their next catalogue poll.
pub async fn put(shared: &Shared, actor: &User, mac: &str, update: MachineUpdate) -> Result<(), MachinesError> {
    if !actor.is_admin {
        return Err(MachinesError::NotAdmin);
    }
    let mac = normalize_mac(mac).map_err(|reason| MachinesError::InvalidMac { reason })?;
    if update.hostname.len() > TEXT_LEN_MAX {
        return Err(MachinesError::HostnameTooLong);
    }
    if let BootAction::Image { image, arch, version, kernel_params } = &update.boot {
        let invalid = |reason| MachinesError::InvalidImage { reason };
        validate_image_name(image).map_err(invalid)?;
        validate_image_token("arch", arch).map_err(invalid)?;
        validate_image_token("version", version).map_err(invalid)?;
        if kernel_params.len() > TEXT_LEN_MAX || kernel_params.chars().any(|c| c.is_control()) {
            return Err(MachinesError::InvalidKernelParams);
        }
    }
    let machine = MachineBoot { mac: mac.clone(), hostname: update.hostname, boot: update.boot };
    shared.store.put_machine(&machine).await.map_err(store_error("store the machine"))?;
    let message = format!("machine {mac} boots {}", serde_json::to_string(&machine.boot).unwrap_or_default());
    shared
        .store
        .record_event("machine.boot", &actor.username, &message)
        .await
        .map_err(store_error("record the change"))?;
    shared.notify_change();
    Ok(())
}

/// Boot events a rack queued (also while the region was away), recorded as region events. The
/// batch is checked whole before any is stored.
pub async fn record_boot_events(shared: &Shared, rack_name: &str, events: Vec<BootEvent>) -> Result<(), MachinesError> {
    if events.len() > BOOT_EVENTS_PER_REQUEST_MAX {
        return Err(MachinesError::TooManyEvents);
    }
    if let Some(bad) = events.iter().find(|e| !e.kind.starts_with("boot.") || e.message.len() > TEXT_LEN_MAX) {
        return Err(MachinesError::InvalidEvent { kind: bad.kind.clone() });
    }
    for event in events {
        // A machine chose some of this (a TFTP file name): no control characters reach the log.
        let actor = format!("{} via {rack_name}", escape_control(&event.mac));
        shared
            .store
            .record_event(&escape_control(&event.kind), &actor, &escape_control(&event.message))
            .await
            .map_err(store_error("record a boot event"))?;
    }
    Ok(())
}
