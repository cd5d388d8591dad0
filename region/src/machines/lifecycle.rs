//! The machine lifecycle's transition table: which trigger moves a machine from which state to
//! which, as a pure function, so every rule is in one place and tested whole. Callers store the
//! result and record who caused it; an illegal pair comes back with the reason the API shows.

use metalrack_api::machines::MachineState;
use MachineState::*;

/// What can happen to a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Trigger {
    /// Its agent reported an inventory without a job (or an operator added it).
    Enlisted,
    /// An operator asked for commissioning.
    Commission,
    /// The commissioning agent reported the inventory.
    InventoryReported,
    /// An operator asked for a deploy: the machine waits for a slot on its rack.
    Allocate,
    /// The deploy scheduler gave it a slot.
    SlotGranted,
    /// The agent wrote and verified the image (the machine reboots next).
    ImageWritten,
    /// The rack told the machine to boot its disk after the deploy.
    BootedLocal,
    /// An operator asked for a release (`erase`: the agent erases the disk first).
    Release,
    /// The releasing agent erased the disk.
    Released,
    /// The machine is off after a release without erase.
    PowerOffConfirmed,
    /// The agent reported a failure.
    JobFailed,
    /// No report for the stall timeout.
    Stalled,
    /// An operator stopped the job or the wait.
    Abort,
    MarkBroken,
    /// `commissioned`: it has an inventory, so it is ready again; else it is new.
    MarkFixed {
        commissioned: bool,
    },
}

impl Trigger {
    /// Every trigger, for tests that go through all pairs.
    pub const ALL: [Trigger; 16] = [
        Trigger::Enlisted,
        Trigger::Commission,
        Trigger::InventoryReported,
        Trigger::Allocate,
        Trigger::SlotGranted,
        Trigger::ImageWritten,
        Trigger::BootedLocal,
        Trigger::Release,
        Trigger::Released,
        Trigger::PowerOffConfirmed,
        Trigger::JobFailed,
        Trigger::Stalled,
        Trigger::Abort,
        Trigger::MarkBroken,
        Trigger::MarkFixed { commissioned: true },
        Trigger::MarkFixed { commissioned: false },
    ];

    /// How the reason names the trigger.
    fn verb(self) -> &'static str {
        match self {
            Trigger::Enlisted => "enlist",
            Trigger::Commission => "commission",
            Trigger::InventoryReported => "take an inventory report",
            Trigger::Allocate => "deploy",
            Trigger::SlotGranted => "start a deploy",
            Trigger::ImageWritten => "take an image-written report",
            Trigger::BootedLocal => "take a booted-local report",
            Trigger::Release => "release",
            Trigger::Released => "take a released report",
            Trigger::PowerOffConfirmed => "finish a release",
            Trigger::JobFailed => "fail a job",
            Trigger::Stalled => "time out a job",
            Trigger::Abort => "abort",
            Trigger::MarkBroken => "mark broken",
            Trigger::MarkFixed { .. } => "mark fixed",
        }
    }
}

/// A trigger that does not apply in the machine's state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Illegal {
    pub reason: String,
}

/// The state `trigger` moves a machine in `state` to, or why it cannot.
pub fn transition(state: MachineState, trigger: Trigger) -> Result<MachineState, Illegal> {
    let next = match (state, trigger) {
        (New, Trigger::Enlisted) => New,
        (New | Ready | FailedCommissioning | FailedDeployment | FailedReleasing, Trigger::Commission) => Commissioning,
        (Commissioning, Trigger::InventoryReported) => Ready,
        (Ready | FailedDeployment | FailedReleasing, Trigger::Allocate) => Allocated,
        (Allocated, Trigger::SlotGranted) => Deploying,
        (Deploying, Trigger::ImageWritten) => Deploying,
        (Deploying, Trigger::BootedLocal) => Deployed,
        (Allocated | Deployed | FailedDeployment | FailedReleasing, Trigger::Release) => Releasing,
        (Releasing, Trigger::Released | Trigger::PowerOffConfirmed) => Ready,
        (Commissioning, Trigger::JobFailed | Trigger::Stalled) => FailedCommissioning,
        (Deploying, Trigger::JobFailed | Trigger::Stalled) => FailedDeployment,
        (Releasing, Trigger::JobFailed | Trigger::Stalled) => FailedReleasing,
        // MAAS's words: an aborted commissioning leaves the machine new, an aborted wait frees
        // it; a job stopped halfway leaves a disk in an unknown state, which is a failure.
        (Commissioning, Trigger::Abort) => New,
        (Allocated, Trigger::Abort) => Ready,
        (Deploying, Trigger::Abort) => FailedDeployment,
        (Releasing, Trigger::Abort) => FailedReleasing,
        (state, Trigger::MarkBroken) if state != Broken => Broken,
        (Broken, Trigger::MarkFixed { commissioned: true }) => Ready,
        (Broken, Trigger::MarkFixed { commissioned: false }) => New,
        (state, trigger) => return Err(Illegal { reason: reason(state, trigger) }),
    };
    Ok(next)
}

/// Why `trigger` does not apply in `state`: what the operator should do instead, where there is
/// something to do.
fn reason(state: MachineState, trigger: Trigger) -> String {
    let hint = match (state, trigger) {
        (Broken, _) => "; mark it fixed first",
        (Deployed, Trigger::Commission | Trigger::Allocate) => "; release it first",
        (
            Commissioning | Deploying | Releasing | Allocated,
            Trigger::Commission | Trigger::Allocate | Trigger::Release,
        ) => "; abort it first",
        (New, Trigger::Allocate) => "; commission it first",
        _ => "",
    };
    format!("cannot {} a machine that is {}{hint}", trigger.verb(), state.label().to_lowercase())
}

/// States in which an agent job runs (the stall timer watches these).
pub fn runs_job(state: MachineState) -> bool {
    matches!(state, Commissioning | Deploying | Releasing)
}

pub fn is_failed(state: MachineState) -> bool {
    matches!(state, FailedCommissioning | FailedDeployment | FailedReleasing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every legal edge, and nothing else: the table as a list.
    const LEGAL: &[(MachineState, Trigger, MachineState)] = &[
        (New, Trigger::Enlisted, New),
        (New, Trigger::Commission, Commissioning),
        (Ready, Trigger::Commission, Commissioning),
        (FailedCommissioning, Trigger::Commission, Commissioning),
        (FailedDeployment, Trigger::Commission, Commissioning),
        (FailedReleasing, Trigger::Commission, Commissioning),
        (Commissioning, Trigger::InventoryReported, Ready),
        (Ready, Trigger::Allocate, Allocated),
        (FailedDeployment, Trigger::Allocate, Allocated),
        (FailedReleasing, Trigger::Allocate, Allocated),
        (Allocated, Trigger::SlotGranted, Deploying),
        (Deploying, Trigger::ImageWritten, Deploying),
        (Deploying, Trigger::BootedLocal, Deployed),
        (Allocated, Trigger::Release, Releasing),
        (Deployed, Trigger::Release, Releasing),
        (FailedDeployment, Trigger::Release, Releasing),
        (FailedReleasing, Trigger::Release, Releasing),
        (Releasing, Trigger::Released, Ready),
        (Releasing, Trigger::PowerOffConfirmed, Ready),
        (Commissioning, Trigger::JobFailed, FailedCommissioning),
        (Deploying, Trigger::JobFailed, FailedDeployment),
        (Releasing, Trigger::JobFailed, FailedReleasing),
        (Commissioning, Trigger::Stalled, FailedCommissioning),
        (Deploying, Trigger::Stalled, FailedDeployment),
        (Releasing, Trigger::Stalled, FailedReleasing),
        (Commissioning, Trigger::Abort, New),
        (Allocated, Trigger::Abort, Ready),
        (Deploying, Trigger::Abort, FailedDeployment),
        (Releasing, Trigger::Abort, FailedReleasing),
        (Broken, Trigger::MarkFixed { commissioned: true }, Ready),
        (Broken, Trigger::MarkFixed { commissioned: false }, New),
    ];

    #[test]
    fn every_legal_edge_goes_where_the_table_says_and_every_other_pair_is_refused_with_a_reason() {
        for state in MachineState::ALL {
            for trigger in Trigger::ALL {
                let listed = LEGAL.iter().find(|(s, t, _)| *s == state && *t == trigger).map(|(_, _, to)| *to);
                let expected = match (listed, trigger) {
                    (Some(to), _) => Some(to),
                    (None, Trigger::MarkBroken) if state != Broken => Some(Broken),
                    (None, _) => None,
                };
                match (transition(state, trigger), expected) {
                    (Ok(to), Some(want)) => assert_eq!(to, want, "{state:?} + {trigger:?}"),
                    (Err(illegal), None) => {
                        assert!(illegal.reason.starts_with("cannot "), "{state:?} + {trigger:?}: {}", illegal.reason)
                    }
                    (got, want) => panic!("{state:?} + {trigger:?}: got {got:?}, the table says {want:?}"),
                }
            }
        }
    }

    #[test]
    fn reasons_tell_the_operator_what_to_do() {
        assert_eq!(
            transition(Deployed, Trigger::Commission).unwrap_err().reason,
            "cannot commission a machine that is deployed; release it first"
        );
        assert_eq!(
            transition(Broken, Trigger::Allocate).unwrap_err().reason,
            "cannot deploy a machine that is broken; mark it fixed first"
        );
        assert!(transition(New, Trigger::Allocate).unwrap_err().reason.ends_with("commission it first"));
    }

    fn state() -> impl Strategy<Value = MachineState> {
        proptest::sample::select(MachineState::ALL.to_vec())
    }

    fn trigger() -> impl Strategy<Value = Trigger> {
        proptest::sample::select(Trigger::ALL.to_vec())
    }

    proptest! {
        #[test]
        fn every_pair_gives_a_state_or_a_reason(state in state(), trigger in trigger()) {
            match transition(state, trigger) {
                Ok(next) => prop_assert!(MachineState::ALL.contains(&next)),
                Err(illegal) => prop_assert!(!illegal.reason.is_empty()),
            }
        }

        #[test]
        fn broken_is_left_only_by_mark_fixed(trigger in trigger()) {
            if let Ok(next) = transition(Broken, trigger) {
                prop_assert!(matches!(trigger, Trigger::MarkFixed { .. }), "{trigger:?} left Broken for {next:?}");
            }
        }

        #[test]
        fn failed_states_are_left_only_by_a_new_job_or_mark_broken(state in state(), trigger in trigger()) {
            if is_failed(state) {
                if let Ok(next) = transition(state, trigger) {
                    prop_assert!(
                        matches!(trigger, Trigger::Commission | Trigger::Allocate | Trigger::Release | Trigger::MarkBroken),
                        "{trigger:?} left {state:?} for {next:?}"
                    );
                }
            }
        }

        #[test]
        fn a_stalled_or_failed_job_always_ends_in_a_failed_state(state in state(), trigger in prop_oneof![Just(Trigger::Stalled), Just(Trigger::JobFailed)]) {
            match transition(state, trigger) {
                Ok(next) => prop_assert!(runs_job(state) && is_failed(next)),
                Err(_) => prop_assert!(!runs_job(state)),
            }
        }

        #[test]
        fn any_machine_but_a_broken_one_can_be_marked_broken(state in state()) {
            prop_assert_eq!(transition(state, Trigger::MarkBroken).is_ok(), state != Broken);
        }

        #[test]
        fn only_a_deploy_slot_starts_a_deploy(state in state(), trigger in trigger()) {
            if let Ok(Deploying) = transition(state, trigger) {
                prop_assert!(state == Deploying || trigger == Trigger::SlotGranted);
            }
        }
    }
}
