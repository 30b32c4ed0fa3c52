//! PURE region ID ownership: which region keeps a `regionID` that several regions claim, and
//! what the others report.
//!
//! Two regions with the same ID would overwrite each other in every merged derpMap (the
//! operator's `/derpmap.json`, a policy file holding both snippets). The oldest region
//! (`metadata.creationTimestamp`, then `namespace/name`) keeps the ID; every other claimant
//! is a loser: `Ready=False` and `DerpMapPublished=False` with reason `RegionIDConflict`
//! naming the winner, a Warning Event, no derpMap ConfigMap and no place in `/derpmap.json`.
//! Its certificates and relays stay, so its pins do not change when the conflict is fixed.

use time::OffsetDateTime;

use super::conditions::{PlannedEvent, condition, set_condition};
use crate::crd::{DerpRegion, DerpRegionStatus, region_key};

/// Reason of the conditions and the Event of a region whose ID another region holds.
pub const REGION_ID_CONFLICT: &str = "RegionIDConflict";

/// Precedence between regions (for region IDs and node ports): the older region, then the
/// lower `namespace/name`, comes first.
pub fn precedence(r: &DerpRegion) -> (Option<k8s_openapi::jiff::Timestamp>, String) {
    (
        r.metadata.creation_timestamp.as_ref().map(|t| t.0),
        region_key(r),
    )
}

/// The region among `all` (which may include `region` itself) that holds `region`'s
/// `spec.regionID` when that is not `region`: the claimant that comes first by
/// [`precedence`]. Regions being deleted claim nothing.
pub fn region_id_winner<'a>(
    region: &DerpRegion,
    all: impl IntoIterator<Item = &'a DerpRegion>,
) -> Option<String> {
    let mine = precedence(region);
    all.into_iter()
        .filter(|o| {
            o.metadata.uid != region.metadata.uid
                && o.metadata.deletion_timestamp.is_none()
                && o.spec.region_id == region.spec.region_id
        })
        .map(precedence)
        .filter(|p| *p < mine)
        .min()
        .map(|p| p.1)
}

/// Whether a region's last status says it lost its region ID (to re-check it when another
/// region changes).
pub fn in_conflict(status: Option<&DerpRegionStatus>) -> bool {
    status.is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.reason == REGION_ID_CONFLICT)
    })
}

/// Apply the region ID outcome to a planned status: conditions, the published derpMap and
/// Events (conflict found or gone, `spec.regionID` changed).
pub fn apply(
    status: &mut DerpRegionStatus,
    prev: &DerpRegionStatus,
    now: OffsetDateTime,
    region_id: i32,
    winner: Option<&str>,
    events: &mut Vec<PlannedEvent>,
) {
    if let Some(old) = prev.region_id
        && old != region_id
    {
        events.push(PlannedEvent {
            warning: true,
            reason: "RegionIDChanged".into(),
            note: format!(
                "spec.regionID changed from {old} to {region_id}: every client and control \
                 server must get the new derpMap (Tailscale SaaS: paste the policy snippet \
                 again; headscale derp.urls: next update_frequency poll; derp.paths: update \
                 the file, read at the same poll)"
            ),
        });
    }
    let was = prev
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready" && c.reason == REGION_ID_CONFLICT)
        .map(|c| c.message.clone());
    let Some(winner) = winner else {
        if was.is_some() {
            events.push(PlannedEvent {
                warning: false,
                reason: "RegionIDConflictResolved".into(),
                note: format!(
                    "region ID {region_id} is no longer claimed by an older region; the \
                     derpMap is published again"
                ),
            });
        }
        return;
    };
    let message = format!(
        "spec.regionID {region_id} is already used by region {winner}, which is older (or \
         sorts first); this region is left out of every published derpMap and has no derpMap \
         ConfigMap until the conflict is gone: change spec.regionID here or there, or delete \
         one of them"
    );
    if was.as_deref() != Some(message.as_str()) {
        events.push(PlannedEvent {
            warning: true,
            reason: REGION_ID_CONFLICT.into(),
            note: message.clone(),
        });
    }
    status.derp_map = None;
    for ty in ["Ready", "DerpMapPublished"] {
        set_condition(
            status,
            prev,
            now,
            condition(ty, false, REGION_ID_CONFLICT, message.clone()),
        );
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::fixtures::region_spec;

    fn at(ns: &str, name: &str, id: i32, secs: i64) -> DerpRegion {
        let mut spec = region_spec();
        spec.region_id = id;
        let mut r = DerpRegion::new(name, spec);
        r.metadata.namespace = Some(ns.into());
        r.metadata.uid = Some(format!("uid-{ns}-{name}"));
        r.metadata.creation_timestamp = Some(Time(
            k8s_openapi::jiff::Timestamp::from_second(1_800_000_000 + secs).unwrap(),
        ));
        r
    }

    #[test]
    fn the_oldest_claimant_keeps_the_id_then_the_lowest_namespace_name() {
        let old = at("b", "old", 900, 0);
        let new = at("a", "new", 900, 10);
        let twin = at("a", "twin", 900, 0); // same age as `old`, sorts first
        let other = at("a", "other", 901, -100);
        let all = [&old, &new, &twin, &other];
        assert_eq!(region_id_winner(&new, all), Some("a/twin".into()));
        assert_eq!(region_id_winner(&old, all), Some("a/twin".into()));
        assert_eq!(region_id_winner(&twin, all), None, "the winner itself");
        assert_eq!(region_id_winner(&other, all), None, "a different ID");
        // the same inputs in another order give the same answer
        assert_eq!(
            region_id_winner(&new, [&other, &twin, &new, &old]),
            Some("a/twin".into())
        );
    }

    #[test]
    fn a_region_being_deleted_claims_nothing() {
        let old = at("ns", "old", 900, 0);
        let mut going = old.clone();
        going.metadata.deletion_timestamp = old.metadata.creation_timestamp.clone();
        let new = at("ns", "new", 900, 10);
        assert_eq!(region_id_winner(&new, [&old, &new]), Some("ns/old".into()));
        assert_eq!(region_id_winner(&new, [&going, &new]), None);
    }

    #[test]
    fn in_conflict_reads_the_ready_reason() {
        let mut st = DerpRegionStatus::default();
        assert!(!in_conflict(Some(&st)));
        st.conditions
            .push(condition("Ready", false, REGION_ID_CONFLICT, String::new()));
        assert!(in_conflict(Some(&st)));
        assert!(!in_conflict(None));
    }
}
