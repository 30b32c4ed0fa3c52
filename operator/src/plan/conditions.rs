//! What every planning step shares and no step owns: the Events a plan publishes and the
//! status conditions it sets. A leaf: it imports nothing from `plan`, so the steps' modules
//! (`pod_failures`, `region_id`, …) use it without importing their parent.

use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::crd::{Condition, DerpRegionStatus};

/// An Event to publish on the region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedEvent {
    /// Warning (true) or Normal.
    pub warning: bool,
    /// CamelCase reason.
    pub reason: String,
    /// Human-readable note.
    pub note: String,
}

/// `t` as RFC 3339 (the format of condition and status times).
pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// A condition of `type_`, `True` when `ok`, with no times set yet.
pub(crate) fn condition(type_: &str, ok: bool, reason: &str, message: String) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if ok { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time: None,
        observed_generation: None,
    }
}

/// Replace (or add) condition `c` in `status`, keeping its transition time when the status
/// did not change since `prev`.
pub(crate) fn set_condition(
    status: &mut DerpRegionStatus,
    prev: &DerpRegionStatus,
    now: OffsetDateTime,
    mut c: Condition,
) {
    c.observed_generation = status.conditions.iter().find_map(|x| x.observed_generation);
    carry_transition_time(&mut c, prev, now);
    match status.conditions.iter_mut().find(|x| x.type_ == c.type_) {
        Some(x) => *x = c,
        None => status.conditions.push(c),
    }
}

/// Sets `c`'s transition time: the one of the same condition with the same status in `prev`,
/// or `now` if its status changed (or it is new).
pub(crate) fn carry_transition_time(
    c: &mut Condition,
    prev: &DerpRegionStatus,
    now: OffsetDateTime,
) {
    c.last_transition_time = prev
        .conditions
        .iter()
        .find(|p| p.type_ == c.type_ && p.status == c.status)
        .and_then(|p| p.last_transition_time.clone())
        .or_else(|| Some(rfc3339(now)));
}
