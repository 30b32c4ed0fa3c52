//! The per-node state machine (explicit times, no clock) and report summaries.

use derper::probe::{Check, MeshCheck, NodeChecks, NodeReport, TlsInfo};

use super::*;

const GRACE: Duration = Duration::from_secs(10);
const STEP: Duration = Duration::from_secs(3);

fn ok(ms: u64) -> Outcome {
    Outcome {
        check: "ok",
        result: "ok".into(),
        latency: Some(Duration::from_millis(ms)),
    }
}

fn ok_us(us: u64) -> Outcome {
    Outcome {
        latency: Some(Duration::from_micros(us)),
        ..ok(0)
    }
}

fn fail() -> Outcome {
    Outcome {
        check: "tls",
        result: "tls: TLS handshake timed out after 5s".into(),
        latency: None,
    }
}

/// Feeds `outcomes` one probe interval apart; returns (withheld, changed, transition) after
/// each.
fn run(
    state: &mut NodeState,
    start: Instant,
    outcomes: &[Outcome],
) -> Vec<(bool, bool, Option<Transition>)> {
    let wall = OffsetDateTime::UNIX_EPOCH;
    outcomes
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let at = start + STEP * u32::try_from(i).unwrap();
            let (changed, t) = state.record(o, at, wall, GRACE);
            (state.view().unwrap().withheld, changed, t)
        })
        .collect()
}

#[test]
fn a_node_is_withheld_only_after_failing_for_the_grace_time() {
    let mut s = NodeState::default();
    let steps = run(
        &mut s,
        Instant::now(),
        &[ok(2), fail(), fail(), fail(), fail(), fail()],
    );
    let withheld: Vec<bool> = steps.iter().map(|s| s.0).collect();
    // failures at 3, 6, 9 s are within the 10 s grace; the one at 12 s is past it
    assert_eq!(withheld, [false, false, false, false, false, true]);
}

#[test]
fn a_pass_between_failures_restarts_the_grace_time() {
    let mut s = NodeState::default();
    let steps = run(
        &mut s,
        Instant::now(),
        &[fail(), fail(), fail(), ok(2), fail(), fail(), fail()],
    );
    assert!(
        steps.iter().all(|s| !s.0),
        "never failing 10 s in a row: {steps:?}"
    );
}

#[test]
fn a_withheld_node_comes_back_only_after_consecutive_passes() {
    let mut s = NodeState::default();
    let mut seq = vec![ok(2)];
    seq.extend(std::iter::repeat_n(fail(), 5));
    // one lucky pass, then failing again: stays withheld
    seq.push(ok(2));
    seq.push(fail());
    seq.extend(std::iter::repeat_n(ok(2), 3));
    let steps = run(&mut s, Instant::now(), &seq);
    let withheld: Vec<bool> = steps.iter().map(|s| s.0).collect();
    assert_eq!(
        withheld,
        [
            false, false, false, false, false, true, // failing past the grace
            true, true, // a single pass does not bring it back
            true, true, false // RECOVER_PASSES passes in a row do
        ]
    );
    assert_eq!(RECOVER_PASSES, 3);
}

#[test]
fn events_only_on_transitions_after_a_first_pass() {
    let mut s = NodeState::default();
    // start-up failures (relay not listening yet) and the first pass are no Events
    let steps = run(
        &mut s,
        Instant::now(),
        &[
            fail(),
            fail(),
            ok(2),
            ok(3),
            fail(),
            fail(),
            fail(),
            ok(2),
            ok(2),
        ],
    );
    let transitions: Vec<Option<Transition>> = steps.into_iter().map(|s| s.2).collect();
    assert_eq!(
        transitions,
        [
            None,
            None,
            None,
            None,
            Some(Transition::Unhealthy(
                "tls: TLS handshake timed out after 5s".into()
            )),
            None,
            None,
            Some(Transition::Healthy),
            None,
        ]
    );
}

#[test]
fn the_view_changes_only_with_result_latency_bucket_or_withheld() {
    let mut s = NodeState::default();
    // 3 ms and 4 ms share the 4 ms bucket; 5 ms is in the 8 ms one
    let steps = run(
        &mut s,
        Instant::now(),
        &[ok(3), ok(4), ok(4), ok(5), fail(), fail()],
    );
    let changed: Vec<bool> = steps.iter().map(|s| s.1).collect();
    assert_eq!(changed, [true, false, false, true, true, false]);
    let v = s.view().unwrap();
    assert!(!v.healthy);
    assert_eq!(v.latency_ms, None);
}

#[test]
fn latency_hovering_at_a_bucket_boundary_does_not_rewrite_the_view() {
    let mut s = NodeState::default();
    // 3.9 ms -> 4; 4.1 ms -> 8 (up at once); 3.9 ms again stays 8; 1.5 ms (two buckets down)
    // -> 2
    let steps = run(
        &mut s,
        Instant::now(),
        &[
            ok_us(3900),
            ok_us(4100),
            ok_us(3900),
            ok_us(4100),
            ok_us(1500),
        ],
    );
    let changed: Vec<bool> = steps.iter().map(|s| s.1).collect();
    assert_eq!(changed, [true, true, false, false, true]);
    assert_eq!(s.view().unwrap().latency_ms, Some(2));
    assert_eq!(next_latency_bucket(None, Duration::from_millis(3)), 4);
    assert_eq!(next_latency_bucket(Some(8), Duration::from_millis(3)), 8);
    assert_eq!(next_latency_bucket(Some(8), Duration::from_millis(2)), 2);
}

#[test]
fn latency_is_rounded_up_to_a_power_of_two_milliseconds() {
    let ms = |m: f64| latency_bucket_ms(Duration::from_secs_f64(m / 1000.0));
    assert_eq!(ms(0.2), 1);
    assert_eq!(ms(1.0), 1);
    assert_eq!(ms(1.5), 2);
    assert_eq!(ms(17.0), 32);
    assert_eq!(ms(1000.0), 1024);
}

#[test]
fn the_tracker_forgets_nodes_that_left_and_reports_the_change() {
    let t = Tracker::default();
    let now = Instant::now();
    let wall = OffsetDateTime::UNIX_EPOCH;
    let both = BTreeMap::from([("a".to_owned(), ok(2)), ("b".to_owned(), ok(2))]);
    assert!(t.record_round("ns/r", &both, now, wall, GRACE).0);
    assert!(!t.record_round("ns/r", &both, now + STEP, wall, GRACE).0);
    let one = BTreeMap::from([("a".to_owned(), ok(2))]);
    assert!(t.record_round("ns/r", &one, now + STEP * 2, wall, GRACE).0);
    assert_eq!(t.views("ns/r").keys().collect::<Vec<_>>(), ["a"]);
    t.retain_regions(&[]);
    assert!(t.views("ns/r").is_empty());
}

fn pass() -> Check {
    Check::pass("fine", Some(Duration::from_millis(3)))
}

fn node(name: &str, checks: NodeChecks) -> NodeReport {
    NodeReport {
        name: name.into(),
        region_id: 900,
        host_name: "127.0.0.1".into(),
        address: None,
        stun_address: None,
        ok: checks.iter().iter().all(|(_, c)| c.ok()),
        checks,
        server_key: None,
        fast_start: None,
        tls: None,
        stun_mapped_address: None,
        ipv6: None,
        notes: Vec::new(),
    }
}

fn all_pass() -> NodeChecks {
    NodeChecks {
        tcp: pass(),
        tls: pass(),
        derp: pass(),
        round_trip: pass(),
        stun: pass(),
    }
}

fn report(nodes: Vec<NodeReport>, mesh: Vec<MeshCheck>) -> RegionReport {
    RegionReport {
        region_id: 900,
        region_code: "home".into(),
        ok: false,
        nodes,
        mesh,
        problems: Vec::new(),
    }
}

#[test]
fn summary_names_the_first_failed_check_and_a_pin_mismatch() {
    let mut down = all_pass();
    down.tcp = Check::fail("connecting to 127.0.0.1:443: Connection refused");
    down.tls = Check::skip("not reached");
    let mut pinned = all_pass();
    pinned.tls =
        Check::fail("pin mismatch: the map says sha256-raw:aa, the server presented sha256-raw:bb");
    let mut wrong_pin = node("c", pinned);
    wrong_pin.tls = Some(TlsInfo {
        version: "TLSv1.3".into(),
        expected_pin: Some("sha256-raw:aa".into()),
        presented_pin: Some("sha256-raw:bb".into()),
        chain_len: 1,
        leaf_not_after: None,
        metacert: None,
    });
    let s = summarize(&report(
        vec![node("a", all_pass()), node("b", down), wrong_pin],
        Vec::new(),
    ));
    assert_eq!(s["a"].result, "ok");
    assert_eq!(s["a"].latency, Some(Duration::from_millis(3)));
    assert_eq!(s["b"].check, "tcp");
    assert_eq!(
        s["b"].result,
        "tcp: connecting to 127.0.0.1:443: Connection refused"
    );
    assert_eq!(s["c"].check, "pin");
    assert!(s["c"].result.contains("sha256-raw:aa") && s["c"].result.contains("sha256-raw:bb"));
}

#[test]
fn mesh_failures_blame_both_ends_only_when_both_pass_their_own_checks() {
    let mut down = all_pass();
    down.tcp = Check::fail("connecting timed out after 5s");
    let mesh = |from: &str, to: &str, ok: bool| MeshCheck {
        from: from.into(),
        to: to.into(),
        check: if ok {
            pass()
        } else {
            Check::fail("nothing arrived within 3s")
        },
    };
    // c is down: its mesh failures are explained by its own checks; a <-> b is broken too
    let s = summarize(&report(
        vec![
            node("a", all_pass()),
            node("b", all_pass()),
            node("c", down),
        ],
        vec![
            mesh("a", "b", false),
            mesh("a", "c", false),
            mesh("b", "a", false),
            mesh("b", "c", false),
            mesh("c", "a", false),
            mesh("c", "b", false),
        ],
    ));
    assert_eq!(s["a"].check, "mesh");
    assert!(s["a"].result.contains("mesh peer b"), "{}", s["a"].result);
    assert_eq!(s["b"].check, "mesh");
    assert!(s["b"].result.contains("mesh peer a"), "{}", s["b"].result);
    assert_eq!(s["c"].check, "tcp");
    // with a working a <-> b link, only c fails
    let mut down = all_pass();
    down.tcp = Check::fail("connecting timed out after 5s");
    let s = summarize(&report(
        vec![
            node("a", all_pass()),
            node("b", all_pass()),
            node("c", down),
        ],
        vec![
            mesh("a", "b", true),
            mesh("a", "c", false),
            mesh("b", "a", true),
        ],
    ));
    assert!(s["a"].ok() && s["b"].ok());
}

#[test]
fn probe_target_dials_the_published_overrides() {
    use crate::crd::{DerpRegionStatus, NodeStatus};
    let mut r = crate::fixtures::region();
    r.status = Some(DerpRegionStatus {
        nodes: vec![
            NodeStatus {
                name: "behind-nat".into(),
                ipv4: Some("198.51.100.7".into()),
                derp_port: Some(8443),
                stun_port: Some(3479),
                cert_name: "sha256-raw:aa".into(),
                ..Default::default()
            },
            NodeStatus {
                name: "plain".into(),
                ipv4: Some("203.0.113.2".into()),
                cert_name: "sha256-raw:bb".into(),
                ..Default::default()
            },
        ],
        ..Default::default()
    });
    let t = probe_target(&r);
    let nat = &t.nodes[0];
    assert_eq!(
        (nat.ipv4.as_str(), nat.host_name.as_str()),
        ("198.51.100.7", "198.51.100.7")
    );
    assert_eq!((nat.derp_port, nat.stun_port), (8443, 3479));
    let plain = &t.nodes[1];
    assert_eq!(
        (plain.derp_port, plain.stun_port),
        (443, 3478),
        "the region's ports"
    );
}
