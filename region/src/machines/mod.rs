//! Machines: each machine's boot decision by MAC (set by operators, served to racks with the
//! catalogue so boots never ask the region) and the boot events racks report.

pub mod store;

use metalrack_api::images::{validate_image_name, validate_image_token};
use metalrack_api::machines::{
    normalize_mac, BootAction, BootEvent, MachineBoot, MachineUpdate, BOOT_EVENTS_PER_REQUEST_MAX,
    BOOT_EVENT_KIND_BYTES_MAX, BOOT_EVENT_MAC_BYTES_MAX, BOOT_EVENT_MESSAGE_BYTES_MAX, BOOT_EVENT_QUEUE_ID_END,
};

use metalrack_image_tools::log_safe::escape_control;

use crate::db::StoreError;
use crate::state::Shared;
use crate::users::User;

/// Longest hostname or kernel command line accepted (boot event fields have their own limits in
/// the wire contract, which racks truncate to).
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
    #[error("boot event {index}: invalid kind {kind:?} (kinds start with \"boot.\")")]
    InvalidEvent { index: usize, kind: String },
    #[error("boot event {index}: {field} is {len} bytes, at most {max}")]
    EventFieldTooLong { index: usize, field: &'static str, len: usize, max: usize },
    #[error("boot event {index}: queue_id must be below 2^53 and seq below 2^63")]
    EventIdOutOfRange { index: usize },
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
/// batch is checked whole before any is stored, and stored in one transaction; an event whose
/// `(queue_id, seq)` this rack sent before is skipped, so a batch sent again is stored once.
/// Returns how many were new.
pub async fn record_boot_events(
    shared: &Shared,
    rack_id: &str,
    rack_name: &str,
    events: Vec<BootEvent>,
) -> Result<u64, MachinesError> {
    check_boot_events(&events)?;
    // A machine chose some of this (a TFTP file name): no control characters reach the log.
    let events: Vec<BootEvent> = events
        .into_iter()
        .map(|mut event| {
            for field in [&mut event.kind, &mut event.mac, &mut event.message] {
                if let std::borrow::Cow::Owned(escaped) = escape_control(field) {
                    *field = escaped;
                }
            }
            event
        })
        .collect();
    shared.store.record_boot_events(rack_id, rack_name, &events).await.map_err(store_error("record boot events"))
}

/// Refuses a batch the rack should not have sent (it truncates fields and bounds batches by the
/// same named limits), naming the first bad event and field.
fn check_boot_events(events: &[BootEvent]) -> Result<(), MachinesError> {
    if events.len() > BOOT_EVENTS_PER_REQUEST_MAX {
        return Err(MachinesError::TooManyEvents);
    }
    for (index, event) in events.iter().enumerate() {
        for (field, len, max) in [
            ("kind", event.kind.len(), BOOT_EVENT_KIND_BYTES_MAX),
            ("mac", event.mac.len(), BOOT_EVENT_MAC_BYTES_MAX),
            ("message", event.message.len(), BOOT_EVENT_MESSAGE_BYTES_MAX),
        ] {
            if len > max {
                return Err(MachinesError::EventFieldTooLong { index, field, len, max });
            }
        }
        if !event.kind.starts_with("boot.") {
            return Err(MachinesError::InvalidEvent { index, kind: event.kind.clone() });
        }
        if event.queue_id >= BOOT_EVENT_QUEUE_ID_END || i64::try_from(event.seq).is_err() {
            return Err(MachinesError::EventIdOutOfRange { index });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64, message: &str) -> BootEvent {
        BootEvent {
            queue_id: 7,
            seq,
            at_ms: 1,
            mac: "52:54:00:aa:bb:01".into(),
            kind: "boot.tftp".into(),
            message: message.into(),
            report: None,
        }
    }

    #[test]
    fn oversize_fields_are_refused_naming_the_event_and_field() {
        let mut events = vec![event(1, "fine"), event(2, &"x".repeat(BOOT_EVENT_MESSAGE_BYTES_MAX))];
        check_boot_events(&events).unwrap();
        events[1].message.push('x');
        let error = check_boot_events(&events).unwrap_err().to_string();
        assert_eq!(error, "boot event 1: message is 1025 bytes, at most 1024");
        events[1] = event(2, "m");
        events[1].mac = "m".repeat(BOOT_EVENT_MAC_BYTES_MAX + 1);
        assert!(check_boot_events(&events).unwrap_err().to_string().contains("mac is 65 bytes"));
        events[1] = event(2, "m");
        events[1].kind = format!("boot.{}", "k".repeat(BOOT_EVENT_KIND_BYTES_MAX));
        assert!(check_boot_events(&events).unwrap_err().to_string().contains("kind is 37 bytes"));
        events[1] = event(2, "m");
        events[1].kind = "user.login".into();
        assert!(check_boot_events(&events).unwrap_err().to_string().contains("invalid kind"));
        events[1] = event(u64::MAX, "m");
        assert!(matches!(check_boot_events(&events), Err(MachinesError::EventIdOutOfRange { index: 1 })));
    }

    #[tokio::test]
    async fn a_batch_sent_twice_is_stored_once_and_other_racks_and_queues_are_apart() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::db::Store::open(dir.path()).await.unwrap();
        let batch: Vec<BootEvent> = (1..=3).map(|seq| event(seq, &format!("event {seq}"))).collect();
        assert_eq!(store.record_boot_events("r1", "rack1", &batch).await.unwrap(), 3);
        assert_eq!(store.record_boot_events("r1", "rack1", &batch).await.unwrap(), 0, "the resend");
        // Half old, half new: a batch split after a refusal, or one that grew since.
        let overlapping: Vec<BootEvent> = (2..=5).map(|seq| event(seq, &format!("event {seq}"))).collect();
        assert_eq!(store.record_boot_events("r1", "rack1", &overlapping).await.unwrap(), 2);
        assert_eq!(store.record_boot_events("r2", "rack2", &batch).await.unwrap(), 3, "another rack");
        let mut new_queue = batch.clone();
        new_queue.iter_mut().for_each(|e| e.queue_id = 8);
        assert_eq!(store.record_boot_events("r1", "rack1", &new_queue).await.unwrap(), 3, "a wiped rack's new queue");
        // Racks from before ids: nothing to tell resends apart by, so each is stored.
        let mut legacy = batch.clone();
        legacy.iter_mut().for_each(|e| (e.queue_id, e.seq) = (0, 0));
        assert_eq!(store.record_boot_events("r1", "rack1", &legacy).await.unwrap(), 3);
        assert_eq!(store.record_boot_events("r1", "rack1", &legacy).await.unwrap(), 3);
        let messages: Vec<String> = store.events(100).await.unwrap().into_iter().rev().map(|e| e.message).collect();
        assert_eq!(messages.len(), 5 + 3 + 3 + 6);
        assert_eq!(&messages[..5], ["event 1", "event 2", "event 3", "event 4", "event 5"], "in order, once");
    }
}
